"""The fitted parts file (``*.slime``): safetensors tensors + one JSON metadata entry.

    tensors   cond    (77, D)  the spliced prompt: row 0 background (fixed), rows 1..K-1
                               learned, the rest the fixed "part" x K / end / padding rows
              uncond  (77, D)  the empty prompt (only the SD loss of a further fit uses it)
    metadata  "text2mask.slime": JSON {format, classes, learned_rows, model {id, family,
              revision | folder_sha256, hidden_size}, settings, seed, best_epoch,
              validation_iou, version}

Loading onto a model checks it: another text width D or another family (SD 1.x vs 2.x)
is refused; another revision or folder digest only warns (a fine-tune of the same base
may still work, but nobody has checked).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from .. import __version__
from ..errors import InputError, ModelLoadError
from ..io import write_bytes
from ..log import get

log = get(__name__)

FORMAT = "text2mask.slime/1"
META_KEY = "text2mask.slime"
SUFFIX = ".slime"


@dataclass
class SlimeParts:
    classes: list[str]                 # index order, 0 = background
    cond: torch.Tensor                 # (77, D)
    uncond: torch.Tensor               # (77, D)
    model: dict                        # id, family, revision / folder_sha256, hidden_size
    settings: dict = field(default_factory=dict)
    seed: int = 0
    best_epoch: int | None = None
    validation_iou: float | None = None
    version: str = __version__

    @property
    def learned_rows(self) -> list[int]:
        return list(range(1, len(self.classes)))

    @property
    def hidden_size(self) -> int:
        return int(self.cond.shape[-1])

    def segment_settings(self):
        """The segmentation settings stored with the fit (validation used them)."""
        from .segment import SegmentSettings

        return SegmentSettings(**self.settings.get("segment", {}))

    def metadata(self) -> dict:
        meta = {k: v for k, v in asdict(self).items() if k not in ("cond", "uncond")}
        return {"format": FORMAT, "learned_rows": self.learned_rows, **meta}


def fitted_on(sd) -> dict:
    """The base model a fit ran on, as the parts file records it (not a run fingerprint:
    ``check_model`` compares it with the model the parts are loaded onto)."""
    info = sd.info
    out = {"id": info["model"], "family": info["family"],
           "hidden_size": int(sd.text_encoder.config.hidden_size)}
    for key in ("revision", "resolved_revision", "folder_sha256"):
        if info.get(key):
            out[key] = info[key]
    return out


def save_parts(parts: SlimeParts, path: str | os.PathLike) -> Path:
    path = Path(path)
    tensors = {"cond": parts.cond.detach().float().cpu().contiguous(),
               "uncond": parts.uncond.detach().float().cpu().contiguous()}
    data = save(tensors, metadata={META_KEY: json.dumps(parts.metadata())})
    write_bytes(path, data)
    return path


def load_parts(path: str | os.PathLike) -> SlimeParts:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: parts file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get(META_KEY, "null"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(f"{path}: not a SLiMe parts file ({type(e).__name__}: {e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise InputError(f"{path}: not a SLiMe parts file of format {FORMAT}")
    if set(tensors) != {"cond", "uncond"} or tensors["cond"].shape != tensors["uncond"].shape:
        raise InputError(f"{path}: expected tensors cond and uncond of one shape")
    return SlimeParts(classes=list(meta["classes"]), cond=tensors["cond"], uncond=tensors["uncond"],
                      model=meta["model"], settings=meta.get("settings", {}), seed=meta.get("seed", 0),
                      best_epoch=meta.get("best_epoch"), validation_iou=meta.get("validation_iou"),
                      version=meta.get("version", ""))


def check_model(parts: SlimeParts, sd, where: str = "parts file") -> None:
    """Refuse a model of another text width or family; warn on another revision/digest."""
    have = fitted_on(sd)
    want = parts.model
    if have["hidden_size"] != parts.hidden_size:
        raise ModelLoadError(f"{where}: fitted on {want.get('id')} (text width {parts.hidden_size}); "
                             f"model {have['id']} has text width {have['hidden_size']}")
    if have["family"] != want.get("family"):
        raise ModelLoadError(f"{where}: fitted on a {want.get('family')} model ({want.get('id')}); "
                             f"{have['id']} is {have['family']}")
    for key in ("folder_sha256", "resolved_revision"):
        if want.get(key) and have.get(key) and want[key] != have[key]:
            log.warning(f"{where}: fitted on {want.get('id')} with {key} {want[key][:12]}, "
                        f"but the model has {have[key][:12]}; the masks may differ")
