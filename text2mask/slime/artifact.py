"""The fitted parts file (``*.slime``): safetensors tensors + one JSON metadata entry.

    tensors   cond    (77, D)  the spliced prompt: row 0 background (fixed), rows 1..K-1
                               learned, the rest the fixed "part" x K / end / padding rows
              uncond  (77, D)  the empty prompt (only the SD loss of a further fit uses it)
    metadata  "text2mask.slime": JSON {format, classes, learned_rows, model {id, family,
              revision | folder_sha256, hidden_size}, settings, seed, best_epoch,
              validation_iou, version}

Loading checks the schema (``validate``: class names, tensor shapes, finite rows, the
model record, setting types and the segmentation settings' ranges; exit 2 naming the
file and the field). Loading onto a model checks it: another text width D or another family (SD 1.x vs 2.x)
is refused; another revision or folder digest only warns (a fine-tune of the same base
may still work, but nobody has checked).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from .. import __version__
from ..errors import ConfigError, InputError, ModelLoadError
from ..io import write_bytes
from ..log import get

log = get(__name__)

FORMAT = "text2mask.slime/1"
META_KEY = "text2mask.slime"
SUFFIX = ".slime"
PROMPT_ROWS = 77        # CLIP's sequence: the rows of cond and uncond


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


def _field_error(path: Path, name: str, why: str) -> InputError:
    return InputError(f"{path}: field {name} {why} (not a valid SLiMe parts file; refit or re-import it)")


def _finite_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# Types of the fit settings a parts file records (informational, but checked: a parts file
# is an artefact another tool may have written).
_SETTING_TYPES = {"epochs": int, "lr": float, "t_min": int, "t_max": int, "was_weight": float,
                  "sd_weight": float, "guidance": float, "augment": bool, "min_crop": float, "rotate": float,
                  "init_prompt": (str, type(None)), "seed": int, "mixed_precision": str, "select": str,
                  "imported_from": str}


def validate(path: Path, meta: dict, cond: torch.Tensor, uncond: torch.Tensor) -> None:
    """Schema of a parts file: exit 2 naming the file and the first bad field."""
    classes = meta.get("classes")
    if not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) and c for c in classes):
        raise _field_error(path, "classes", "must be a list of at least two non-empty names (background first)")
    if len(set(classes)) != len(classes):
        raise _field_error(path, "classes", "names a class twice")
    if cond.ndim != 2 or cond.shape[0] != PROMPT_ROWS or cond.shape[1] < 1:
        raise _field_error(path, "cond", f"must be a ({PROMPT_ROWS}, D) tensor, got {tuple(cond.shape)}")
    if len(classes) >= PROMPT_ROWS:
        raise _field_error(path, "classes", f"holds {len(classes)} names; at most {PROMPT_ROWS - 1} fit the prompt")
    if "learned_rows" in meta and meta["learned_rows"] != list(range(1, len(classes))):
        raise _field_error(path, "learned_rows", f"must be 1..{len(classes) - 1} for {len(classes)} classes")
    for name, t in (("cond", cond), ("uncond", uncond)):
        if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
            raise _field_error(path, name, "holds non-finite values (a diverged fit?)")
    model = meta.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("id"), str) or not isinstance(model.get("family"), str):
        raise _field_error(path, "model", "must record the base model's id and family")
    if model.get("hidden_size") != cond.shape[1]:
        raise _field_error(path, "model.hidden_size", f"is {model.get('hidden_size')!r}, but the rows are "
                                                      f"{cond.shape[1]} wide")
    settings = meta.get("settings", {})
    if not isinstance(settings, dict):
        raise _field_error(path, "settings", "must be an object")
    for key, want in _SETTING_TYPES.items():
        if key in settings:
            v = settings[key]
            ok = (isinstance(v, want) and not (want is int and isinstance(v, bool))) if want is not float \
                else _finite_number(v)
            if not ok:
                raise _field_error(path, f"settings.{key}", f"is {v!r}, of the wrong type")
    seg = settings.get("segment", {})
    from .segment import SegmentSettings

    known = {f.name for f in fields(SegmentSettings)}
    if not isinstance(seg, dict) or set(seg) - known:
        raise _field_error(path, "settings.segment", f"must be an object with keys among {', '.join(sorted(known))}")
    try:
        SegmentSettings(**seg).check()
    except ConfigError as e:
        raise _field_error(path, "settings.segment", f"is out of range: {e}") from None
    if not isinstance(meta.get("seed", 0), int) or isinstance(meta.get("seed", 0), bool):
        raise _field_error(path, "seed", "must be an integer")
    best = meta.get("best_epoch")
    if best is not None and (not isinstance(best, int) or isinstance(best, bool) or best < 0):
        raise _field_error(path, "best_epoch", "must be an integer >= 0 or null")
    iou = meta.get("validation_iou")
    if iou is not None and not (_finite_number(iou) and 0 <= iou <= 100):
        raise _field_error(path, "validation_iou", "must be a percentage or null")


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
    validate(path, meta, tensors["cond"], tensors["uncond"])
    return SlimeParts(classes=list(meta["classes"]), cond=tensors["cond"].float(), uncond=tensors["uncond"].float(),
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
