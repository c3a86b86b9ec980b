"""DiffewS checkpoints: text2mask's layout, loading, and the importer of the released one.

Our layout (a folder)::

    unet/                          diffusers UNet2DConditionModel (the fine-tuned UNet)
    support_conv_in.safetensors    conv_in_ref: "weight" (C, 8, 3, 3), "bias" (C,)
    fewshot.json                   method, base model (+ digest), benchmark, fold, training
                                   classes, max shots, text condition, threshold, resolution,
                                   version; written last (its presence marks a whole checkpoint)

The VAE, text encoder and tokenizer are the base model's (frozen in training), loaded
from ``base_model`` (a local SD 2.x folder or hub id) and checked against its digest.

The released DiffewS weights (ModelScope ``zzzmmz/Diffews``: ``coco_fold0..3``,
``incontext``) are a diffusers UNet folder whose state dict also holds ``conv_in_ref.*``
(and whose config has ``in_channels_ref``), one ``unet/`` level deeper than the
evaluation script's ``--unet_ckpt_path`` (``<model>/unet/unet``). ``import_released``
splits it into our layout.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from ..errors import ModelLoadError
from ..io import write_json
from ..log import get
from ..modeling.loading import RANDOM_WEIGHTS_MARKER, folder_digest
from .diffews import SUPPORT_CHANNELS, DiffewsUNet
from .model import DiffewS, FewShotConfig

log = get(__name__)

FEWSHOT_JSON = "fewshot.json"
SUPPORT_CONV = "support_conv_in.safetensors"
VERSION = 1
METHOD = "diffews"
_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def base_model_digest(base_model: str) -> str | None:
    """sha256 of a local base model folder (None for a hub id: its revision names it)."""
    p = Path(base_model).expanduser()
    return folder_digest(p) if p.is_dir() else None


def save_checkpoint(out: str | Path, net: DiffewsUNet, info: dict) -> Path:
    """Write ``net`` and ``info`` (the fewshot.json fields) to ``out``; fewshot.json last."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / FEWSHOT_JSON).unlink(missing_ok=True)   # a half-rewritten folder must not look whole
    net.unet.save_pretrained(out / "unet", safe_serialization=True)
    conv = {k: v.detach().contiguous().cpu() for k, v in net.conv_in_ref.state_dict().items()}
    tmp = out / f".{SUPPORT_CONV}.tmp"
    save_file(conv, str(tmp))
    tmp.replace(out / SUPPORT_CONV)
    write_json(out / FEWSHOT_JSON, {"method": METHOD, "version": VERSION, **info})
    return out


def checkpoint_info(base_model: str, config: FewShotConfig, *, benchmark: str | None, fold: int | None,
                    training_classes: list[int] | None, max_shots: int | None, source: str) -> dict:
    return {"base_model": base_model, "base_model_sha256": base_model_digest(base_model),
            "benchmark": benchmark, "fold": fold, "training_classes": training_classes, "max_shots": max_shots,
            **asdict(config), "source": source}


def read_info(path: str | Path) -> dict:
    path = Path(path).expanduser()
    f = path / FEWSHOT_JSON
    if not f.is_file():
        hint = (" It looks like a released DiffewS folder: convert it first with `text2mask fewshot import`."
                if find_released_unet(path, quiet=True) else "")
        raise ModelLoadError(f"{path}: not a text2mask few-shot checkpoint (no {FEWSHOT_JSON}).{hint}")
    try:
        info = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{f}: cannot read ({e})") from None
    if info.get("method") != METHOD or info.get("version") != VERSION:
        raise ModelLoadError(f"{f}: method {info.get('method')!r} version {info.get('version')!r}; "
                             f"expected {METHOD!r} version {VERSION}")
    for key in ("base_model", "threshold", "resolution", "text_condition"):
        if key not in info:
            raise ModelLoadError(f"{f}: missing field {key!r}")
    return info


def _support_conv(path: Path, channels: int, device, dtype) -> torch.nn.Conv2d:
    from safetensors.torch import load_file

    try:
        state = load_file(str(path / SUPPORT_CONV))
    except Exception as e:  # noqa: BLE001 - safetensors raises several types on a bad file
        raise ModelLoadError(f"{path / SUPPORT_CONV}: cannot read the support conv ({type(e).__name__}: {e})") from None
    w = state.get("weight")
    if w is None or "bias" not in state or tuple(w.shape[:2]) != (channels, SUPPORT_CHANNELS):
        raise ModelLoadError(f"{path / SUPPORT_CONV}: expected weight ({channels}, {SUPPORT_CHANNELS}, k, k) and bias")
    conv = torch.nn.Conv2d(SUPPORT_CHANNELS, channels, w.shape[-1], padding=w.shape[-1] // 2)
    conv.load_state_dict(state)
    return conv.to(device=device, dtype=dtype)


def load_unet(path: Path, dtype):
    from diffusers import UNet2DConditionModel

    try:
        return UNet2DConditionModel.from_pretrained(path / "unet", torch_dtype=dtype)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"{path / 'unet'}: cannot load the UNet ({type(e).__name__}: {e})") from None


def load_diffews(path: str | Path, *, device: str | None = None, dtype: str | None = None,
                 base_model: str | None = None, text_condition: str | None = None,
                 threshold: float | None = None, trainable: bool = False) -> DiffewS:
    """A checkpoint in our layout, on its base model (or ``base_model``, e.g. after a move).
    ``text_condition`` / ``threshold`` override the recorded ones (recorded in run.json)."""
    from ..modeling.loading import load

    path = Path(path).expanduser().resolve()
    info = read_info(path)
    base = base_model or info["base_model"]
    sd = load(base, device=device, dtype=dtype)
    recorded = info.get("base_model_sha256")
    if recorded and sd.info.get("folder_sha256") and recorded != sd.info["folder_sha256"]:
        log.warning(f"base model {base} differs from the one the checkpoint was made on "
                    f"(sha256 {recorded[:12]}…): its VAE/text encoder may not match the UNet")
    unet = load_unet(path, sd.dtype).to(sd.device)
    unet.train(trainable).requires_grad_(trainable)
    conv = _support_conv(path, unet.conv_in.out_channels, sd.device, sd.dtype).requires_grad_(trainable)
    sd.unet = unet
    config = FewShotConfig(threshold=info["threshold"] if threshold is None else threshold,
                           resolution=int(info["resolution"]),
                           text_condition=text_condition or info["text_condition"])
    sd.info = {**sd.info, "checkpoint": str(path), "checkpoint_sha256": folder_digest(path)}
    if (path / RANDOM_WEIGHTS_MARKER).is_file():
        sd.info["random_weights"] = True
    return DiffewS(sd, DiffewsUNet(unet, conv), config, {"checkpoint": info})


# --- the released layout ----------------------------------------------------------------

def find_released_unet(src: Path, quiet: bool = False) -> Path | None:
    """The folder holding the released UNet's config.json and weights: ``src/unet/unet``,
    ``src/unet`` or ``src`` itself."""
    for cand in (src / "unet" / "unet", src / "unet", src):
        if (cand / "config.json").is_file() and any((cand / w).is_file() for w in _WEIGHTS):
            return cand
    if quiet:
        return None
    raise ModelLoadError(f"{src}: no released DiffewS UNet found (looked for config.json and "
                         f"{' or '.join(_WEIGHTS)} in {src}/unet/unet, {src}/unet and {src})")


def _released_state(folder: Path) -> dict:
    st, bin_ = folder / _WEIGHTS[0], folder / _WEIGHTS[1]
    try:
        if st.is_file():
            from safetensors.torch import load_file

            return load_file(str(st))
        return torch.load(bin_, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"{folder}: cannot read the UNet weights ({type(e).__name__}: {e})") from None


def import_released(src: str | Path, out: str | Path, *, base_model: str, benchmark: str | None = "coco20i",
                    fold: int | None = None, max_shots: int | None = None,
                    config: FewShotConfig = FewShotConfig(text_condition="unpadded")) -> Path:
    """Convert a released DiffewS UNet folder to our layout. The default text condition
    is the unpadded empty prompt, under which the published numbers were measured."""
    from diffusers import UNet2DConditionModel

    from .episodes import benchmark as get_benchmark

    src = Path(src).expanduser()
    folder = find_released_unet(src)
    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    state = _released_state(folder)
    conv = {k.removeprefix("conv_in_ref."): v for k, v in state.items() if k.startswith("conv_in_ref.")}
    if set(conv) != {"weight", "bias"}:
        raise ModelLoadError(f"{folder}: the state dict has no conv_in_ref.weight/bias; not a DiffewS UNet")
    known = set(UNet2DConditionModel.extract_init_dict(cfg)[0])
    unet = UNet2DConditionModel.from_config({k: v for k, v in cfg.items() if k in known})
    try:
        unet.load_state_dict({k: v for k, v in state.items() if not k.startswith("conv_in_ref.")}, strict=True)
    except RuntimeError as e:
        raise ModelLoadError(f"{folder}: the weights do not fit its config ({str(e).splitlines()[0]})") from None
    ref = torch.nn.Conv2d(SUPPORT_CHANNELS, unet.conv_in.out_channels, conv["weight"].shape[-1],
                          padding=conv["weight"].shape[-1] // 2)
    ref.load_state_dict(conv)
    training = None
    if benchmark is not None and fold is not None:
        training = list(get_benchmark(benchmark).train_classes(fold))
    info = checkpoint_info(base_model, config, benchmark=benchmark, fold=fold, training_classes=training,
                           max_shots=max_shots, source=f"imported from the released DiffewS layout {folder}")
    return save_checkpoint(out, DiffewsUNet(unet, ref), info)
