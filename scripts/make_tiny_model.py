"""Write a tiny random Stable Diffusion model (v1 or v2 layout, diffusers format) for offline tests.

    python scripts/make_tiny_model.py OUT_DIR [--seed 0] [--family sd1|sd2] [--prediction-type epsilon|v_prediction]
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
    parser.add_argument("--family", choices=FAMILIES, default="sd1",
                        help="sd1: OpenAI CLIP, 8 heads, conv projections; sd2: OpenCLIP-style, per-block heads, "
                             "linear projections")
    parser.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default="epsilon",
                        help="what the UNet predicts (SD 2.x 768 models: v_prediction)")
    args = parser.parse_args(argv)
    print(make_tiny_model(args.out_dir, seed=args.seed, family=args.family, prediction_type=args.prediction_type))


if __name__ == "__main__":
    main()
