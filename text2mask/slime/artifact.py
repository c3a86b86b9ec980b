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


def model_identity(sd) -> dict:
    """What identifies the base model a fit ran on."""
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
    have = model_identity(sd)
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


def import_official(folder: str | os.PathLike, sd, classes: str | None = None,
                    init_prompt: str | None = None) -> SlimeParts:
    """Parts from an official checkpoint folder: ``embedding_i.pth`` (i = 0..K-2), each
    the (1, 1, D) learned row of class i + 1, spliced into this model's "part" x K
    prompt (or ``init_prompt``, the official ``--text_prompt``)."""
    from dataclasses import asdict

    from .examples import parse_classes
    from .fit import initial_prompts, splice
    from .segment import SegmentSettings

    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder")
    found = {int(p.stem.split("_", 1)[1]): p for p in folder.glob("embedding_*.pth")
             if p.stem.split("_", 1)[1].isdigit()}
    if not found:
        raise InputError(f"{folder}: no embedding_0.pth, embedding_1.pth, ... (official SLiMe checkpoint)")
    if sorted(found) != list(range(len(found))):
        missing = sorted(set(range(max(found) + 1)) - set(found))
        raise InputError(f"{folder}: embedding_{missing[0]}.pth is missing (found {len(found)} files)")
    k = len(found) + 1
    names = parse_classes(classes) if classes else ["background"] + [f"part{i}" for i in range(1, k)]
    if len(names) != k:
        raise InputError(f"{folder}: {len(found)} embeddings are {k} classes with background, "
                         f"but --classes names {len(names)}")
    width = int(sd.text_encoder.config.hidden_size)
    rows = []
    for i in range(len(found)):
        try:
            t = torch.load(found[i], map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several types for a bad file
            raise InputError(f"{found[i]}: cannot read ({type(e).__name__}: {e})") from e
        if not isinstance(t, torch.Tensor) or t.numel() != width:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ModelLoadError(f"{found[i]}: expected a (1, 1, {width}) embedding for this model, got {shape}")
        rows.append(t.detach().reshape(width).float())
    cond0, uncond = initial_prompts(sd, k, init_prompt)
    return SlimeParts(names, splice(cond0, torch.stack(rows)).cpu(), uncond.cpu(), model_identity(sd),
                      {"imported_from": str(folder.resolve()), "init_prompt": init_prompt,
                       "segment": asdict(SegmentSettings())})
