"""A tiny random DiffewS checkpoint (text2mask layout) on a tiny SD 2-layout model, for
the few-shot tests and for trying the commands offline
(``python scripts/make_tiny_model.py --family fewshot OUT``). Its masks are MEANINGLESS:
it checks mechanics only."""
from __future__ import annotations

from pathlib import Path

import torch

from text2mask.fewshot.checkpoint import checkpoint_info, save_checkpoint
from text2mask.fewshot.diffews import DiffewsUNet, support_conv_in
from text2mask.fewshot.model import FewShotConfig
from text2mask.modeling.loading import RANDOM_WEIGHTS_MARKER

RESOLUTION = 64


def make_fewshot_checkpoint(base_dir: str | Path, out: str | Path, seed: int = 0) -> Path:
    """The base model's UNet and a conv_in_ref perturbed away from its initialisation."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(Path(base_dir) / "unet")
    conv = support_conv_in(unet.conv_in)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        conv.weight.add_(0.05 * torch.randn_like(conv.weight))
    info = checkpoint_info(str(base_dir), FewShotConfig(resolution=RESOLUTION, text_condition="unpadded"),
                           benchmark="pascal5i", fold=0, training_classes=list(range(6, 21)), max_shots=1,
                           source="tests: random weights")
    out = save_checkpoint(out, DiffewsUNet(unet, conv), info)
    (Path(out) / RANDOM_WEIGHTS_MARKER).write_text("Random tiny DiffewS checkpoint: masks are meaningless.\n")
    return out


def make_tiny_fewshot(out: str | Path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """A self-contained tiny few-shot checkpoint: the tiny SD 2 base in ``out/base``."""
    from tiny_models import make_tiny_model

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty; choose a new folder")
    base = make_tiny_model(out / "base", seed=seed, family="sd2", prediction_type=prediction_type)
    return make_fewshot_checkpoint(base, out, seed=seed)
