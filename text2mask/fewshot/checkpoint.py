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
import math
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from ..errors import ModelLoadError
from ..io import read_json, write_json
from ..log import get
from ..modeling.loading import RANDOM_WEIGHTS_MARKER, folder_digest
from .diffews import SUPPORT_CHANNELS, TEXT_CONDITIONS, DiffewsUNet
from .episodes import BENCHMARKS, FOLDS
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
    """The fewshot.json fields. A local base model is recorded by its absolute path, so the
    checkpoint loads from any working folder."""
    local = Path(base_model).expanduser()
    if local.exists():
        base_model = str(local.resolve())
    return {"base_model": base_model, "base_model_sha256": base_model_digest(base_model),
            "benchmark": benchmark, "fold": fold, "training_classes": training_classes, "max_shots": max_shots,
            **asdict(config), "source": source}


def read_info(path: str | Path) -> dict:
    """The validated fewshot.json of the checkpoint folder ``path`` (ModelLoadError, exit 2,
    naming the file and the field otherwise). Its ``method`` field (default "diffews")
    picks the validator in ``VALIDATORS``, so other few-shot methods share the layout."""
    path = Path(path).expanduser()
    f = path / FEWSHOT_JSON
    if not f.is_file():
        raise ModelLoadError(f"{path}: not a text2mask few-shot checkpoint (no {FEWSHOT_JSON}).{_what_it_is(path)}")
    info = read_json(f, "few-shot checkpoint description", error=ModelLoadError)
    if not isinstance(info, dict):
        raise ModelLoadError(f"{f}: expected a JSON object, got {type(info).__name__}")
    method = info.get("method", METHOD)
    if method not in VALIDATORS:
        raise ModelLoadError(f"{f}: field 'method' is {method!r}; this text2mask reads "
                             f"{', '.join(map(repr, VALIDATORS))}")
    VALIDATORS[method](info, f)
    return {**info, "method": method}


def _what_it_is(path: Path) -> str:
    """A hint for a folder that is not a few-shot checkpoint."""
    if released_unet(path) is not None:
        return " It is a released DiffewS folder: convert it first with `text2mask fewshot import`."
    if (path / "model_index.json").is_file() or (path / "unet" / "config.json").is_file():
        return (" It is a Stable Diffusion model folder: a few-shot checkpoint is trained from one with "
                "`text2mask fewshot train --model`. To try the commands offline, make a tiny random one from a "
                "source checkout with `python scripts/make_tiny_model.py --family fewshot OUT` (docs/fewshot.md).")
    return ""


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _need(ok: bool, f: Path, field: str, value, expected: str) -> None:
    if not ok:
        raise ModelLoadError(f"{f}: field {field!r} must be {expected}, got {value!r}")


def check_diffews_info(info: dict, f: Path) -> None:
    """The fields of a DiffewS fewshot.json: types, ranges, finite values."""
    for key in ("version", "base_model", "threshold", "resolution", "text_condition"):
        if key not in info:
            raise ModelLoadError(f"{f}: missing field {key!r}")
    _need(info["version"] == VERSION and _is_int(info["version"]), f, "version", info["version"],
          f"{VERSION} (the layout this text2mask writes)")
    _need(isinstance(info["base_model"], str) and bool(info["base_model"]), f, "base_model", info["base_model"],
          "a model folder or hub id")
    sha = info.get("base_model_sha256")
    _need(sha is None or (isinstance(sha, str) and len(sha) == 64), f, "base_model_sha256", sha,
          "a sha256 hex digest or null")
    t = info["threshold"]
    _need(isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and 0 <= t < 1, f,
          "threshold", t, "a finite number in [0, 1) (relative to the mask image's maximum)")
    r = info["resolution"]
    _need(_is_int(r) and r >= 8 and r % 8 == 0, f, "resolution", r, "a positive multiple of 8")
    _need(info["text_condition"] in TEXT_CONDITIONS, f, "text_condition", info["text_condition"],
          " or ".join(TEXT_CONDITIONS))
    bench = info.get("benchmark")
    _need(bench is None or bench in BENCHMARKS, f, "benchmark", bench, f"null or {' or '.join(BENCHMARKS)}")
    fold = info.get("fold")
    _need(fold is None or (_is_int(fold) and 0 <= fold < FOLDS), f, "fold", fold, f"null or 0..{FOLDS - 1}")
    classes = info.get("training_classes")
    _need(classes is None or (isinstance(classes, list) and all(_is_int(c) and c >= 1 for c in classes)), f,
          "training_classes", classes, "null or a list of class indices")
    shots = info.get("max_shots")
    _need(shots is None or (_is_int(shots) and shots >= 1), f, "max_shots", shots, "null or an integer >= 1")


def _check_diffseg_info(info: dict, f: Path) -> None:
    from .diffseg.checkpoint import check_diffseg_info   # imported here: that module imports this one

    check_diffseg_info(info, f)


# fewshot.json "method" -> its validator (info, file); a method's loader reads the rest.
VALIDATORS: dict[str, Callable[[dict, Path], None]] = {METHOD: check_diffews_info, "diffseg": _check_diffseg_info}


def nonfinite_parameter(module: torch.nn.Module) -> str | None:
    """The name of the first parameter or buffer holding a NaN or infinity, else None."""
    tensors = [(n, t) for n, t in module.state_dict().items() if t.is_floating_point()]
    if tensors and bool(torch.stack([torch.isfinite(t).all() for _, t in tensors]).all()):
        return None
    return next((n for n, t in tensors if not bool(torch.isfinite(t).all())), None)


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
    for where, module in (("unet", unet), (SUPPORT_CONV, conv)):
        bad = nonfinite_parameter(module)
        if bad:
            raise ModelLoadError(f"{path / where}: parameter {bad!r} holds NaN or infinite values; the checkpoint "
                                 "is damaged (or was saved from a diverged training)")
    sd.unet = unet
    config = FewShotConfig(threshold=float(info["threshold"]) if threshold is None else threshold,
                           resolution=info["resolution"],
                           text_condition=text_condition or info["text_condition"])
    sd.info = {**sd.info, "checkpoint": str(path), "checkpoint_sha256": folder_digest(path)}
    if (path / RANDOM_WEIGHTS_MARKER).is_file():
        sd.info["random_weights"] = True
    return DiffewS(sd, DiffewsUNet(unet, conv), config, {"checkpoint": info})


# --- the released layout ----------------------------------------------------------------

def find_released_unet(src: Path) -> Path:
    """The folder holding the released UNet's config.json and weights: ``src/unet/unet``,
    ``src/unet`` or ``src`` itself."""
    for cand in (src / "unet" / "unet", src / "unet", src):
        if (cand / "config.json").is_file() and any((cand / w).is_file() for w in _WEIGHTS):
            return cand
    raise ModelLoadError(f"{src}: no released DiffewS UNet found (looked for config.json and "
                         f"{' or '.join(_WEIGHTS)} in {src}/unet/unet, {src}/unet and {src})")


def released_unet(src: Path) -> Path | None:
    """The released UNet folder under ``src`` when it is one, else None: a UNet whose config
    names ``in_channels_ref`` or whose safetensors hold ``conv_in_ref.weight`` (a plain
    SD UNet has neither). Reads the config and the safetensors header only."""
    try:
        folder = find_released_unet(Path(src))
    except ModelLoadError:
        return None
    try:
        if "in_channels_ref" in json.loads((folder / "config.json").read_text(encoding="utf-8")):
            return folder
        if (folder / _WEIGHTS[0]).is_file():
            from safetensors import safe_open

            with safe_open(str(folder / _WEIGHTS[0]), "pt") as f:
                return folder if "conv_in_ref.weight" in f.keys() else None
    except Exception:  # noqa: BLE001 - an unreadable folder is simply not a release
        return None
    return None


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
    for module in (unet, ref):
        bad = nonfinite_parameter(module)
        if bad:
            raise ModelLoadError(f"{folder}: parameter {bad!r} holds NaN or infinite values; nothing imported")
    training = None
    if benchmark is not None and fold is not None:
        training = list(get_benchmark(benchmark).train_classes(fold))
    info = checkpoint_info(base_model, config, benchmark=benchmark, fold=fold, training_classes=training,
                           max_shots=max_shots, source=f"imported from the released DiffewS layout {folder}")
    return save_checkpoint(out, DiffewsUNet(unet, ref), info)
