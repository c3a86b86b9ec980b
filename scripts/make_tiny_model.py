"""Write a tiny random Stable Diffusion model (v1 or v2 layout, diffusers format) for offline tests.

    python scripts/make_tiny_model.py OUT_DIR [--seed 0] [--family sd1|sd2|sdxl|fewshot|kandinsky22] [--prediction-type epsilon|v_prediction]

``--family fewshot`` writes a tiny random few-shot (DiffewS) checkpoint at OUT_DIR, on a
tiny SD 2-layout base model in OUT_DIR/base, for trying `text2mask fewshot` offline.
``--family sdxl`` writes a tiny random SDXL-base-layout model (both text encoders), for
trying `text2mask generate --model OUT_DIR` on SDXL offline (docs/sdxl.md).
``--family kandinsky22`` writes a tiny random Kandinsky 2.2-layout model (decoder/ and
prior/), the base of `text2mask fewshot train --method diffseg` offline (docs/diffseg.md).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# StableDiffusionPipeline's import notes that torchvision is absent: true, and irrelevant here.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# The builder lives with the tests, outside the package's import path.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from tiny_models import FAMILIES, make_tiny_model  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="folder to write the model into")
    parser.add_argument("--seed", type=int, default=0, help="seed for the random weights")
    parser.add_argument("--family", choices=(*FAMILIES, "sdxl", "fewshot", "kandinsky22"), default="sd1",
                        help="sd1: OpenAI CLIP, 8 heads, conv projections; sd2: OpenCLIP-style, per-block heads, "
                             "linear projections; sdxl: SDXL base layout with both text encoders; fewshot: a DiffewS checkpoint on an sd2 base in OUT_DIR/base; "
                             "kandinsky22: decoder UNet, MoVQ and prior image tower (DiffSeg's base)")
    parser.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default="epsilon",
                        help="what the UNet predicts (SD 2.x 768 models: v_prediction)")
    args = parser.parse_args(argv)
    if args.family == "fewshot":
        from fewshot_models import make_tiny_fewshot

        print(make_tiny_fewshot(args.out_dir, seed=args.seed, prediction_type=args.prediction_type))
        return
    if args.family == "sdxl":
        from tiny_models import make_tiny_sdxl_model

        print(make_tiny_sdxl_model(args.out_dir, seed=args.seed))
        return
    if args.family == "kandinsky22":
        from tiny_kandinsky import make_tiny_kandinsky

        print(make_tiny_kandinsky(args.out_dir, seed=args.seed))
        return
    print(make_tiny_model(args.out_dir, seed=args.seed, family=args.family, prediction_type=args.prediction_type))


if __name__ == "__main__":
    main()
