"""DiffSeg checkpoints (a folder)::

    scm.safetensors     the spatial control module's weights
    pam.safetensors     the perceptual attention module's weights
    fewshot.json        method "diffseg", version, base decoder and prior (+ digests), the
                        inference config (resolution, t, layers, threshold, noise seed, PAM
                        width and position codes), edge detector (+ file and digest), SCM and
                        PAM widths, benchmark, fold, training classes, source; written last
                        (its presence marks a whole checkpoint)

The UNet, MoVQ and CLIP tower are the base model's (frozen in training), loaded from
``base_model`` / ``prior`` and checked against their digests.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from ...errors import ModelLoadError
from ...io import read_json, write_bytes, write_json
from ...log import get
from ..checkpoint import FEWSHOT_JSON
from .edges import DETECTORS, EdgeDetector
from .model import DiffSeg, DiffSegConfig, DiffSegHeads

log = get(__name__)

METHOD = "diffseg"
VERSION = 1
SCM_FILE, PAM_FILE = "scm.safetensors", "pam.safetensors"


def _state(module: torch.nn.Module, what: str) -> dict:
    state = {k: v.detach().float().contiguous().cpu() for k, v in module.state_dict().items()}
    bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if bad:
        from ...errors import TrainingDiverged

        raise TrainingDiverged(f"the {what} holds non-finite weights ({bad[0]}, …); nothing was written")
    return state


def save_diffseg(out: str | Path, heads: DiffSegHeads, info: dict) -> Path:
    """Write ``heads`` and ``info`` (the fewshot.json fields) to ``out``; fewshot.json last."""
    from safetensors.torch import save

    out = Path(out)
    scm, pam = _state(heads.scm, "SCM"), _state(heads.pam, "PAM")      # all checked before any write
    out.mkdir(parents=True, exist_ok=True)
    (out / FEWSHOT_JSON).unlink(missing_ok=True)      # a half-rewritten folder must not look whole
    write_bytes(out / SCM_FILE, save(scm))
    write_bytes(out / PAM_FILE, save(pam))
    write_json(out / FEWSHOT_JSON, {"method": METHOD, "version": VERSION, **info,
                                    "scm": heads.scm.describe(), "pam": heads.pam.describe()})
    return out


def checkpoint_info(base_model: str, prior: str | None, base_info: dict, config: DiffSegConfig,
                    edges: EdgeDetector, *, benchmark: str | None, fold: int | None,
                    training_classes: list[int] | None, source: str, training: dict | None = None) -> dict:
    return {"base_model": base_model, "prior": prior, "base_model_sha256": base_info.get("folder_sha256"),
            "prior_sha256": base_info.get("prior_sha256"), "config": config.to_json(), "edges": edges.describe(),
            "benchmark": benchmark, "fold": fold, "training_classes": training_classes, "max_shots": 1,
            "training": training, "source": source}


def _field(info: dict, f: Path, key: str, types, optional: bool = False):
    if key not in info or (optional and info[key] is None):
        if optional:
            return None
        raise ModelLoadError(f"{f}: missing field {key!r}")
    v = info[key]
    if not isinstance(v, types):
        raise ModelLoadError(f"{f}: field {key!r} is {v!r}, expected {getattr(types, '__name__', types)}")
    return v


def check_diffseg_info(info: dict, f: Path) -> None:
    """The fields of a DiffSeg fewshot.json: types, ranges, finite values (ModelLoadError,
    exit 2, naming the file and the field). ``fewshot.checkpoint.read_info`` calls it for
    ``"method": "diffseg"``."""
    if info.get("method") != METHOD or info.get("version") != VERSION or isinstance(info.get("version"), bool):
        raise ModelLoadError(f"{f}: method {info.get('method')!r} version {info.get('version')!r}; expected "
                             f"{METHOD!r} version {VERSION}")
    if not _field(info, f, "base_model", str):
        raise ModelLoadError(f"{f}: field 'base_model' is empty")
    _field(info, f, "prior", str, optional=True)
    for key in ("base_model_sha256", "prior_sha256"):
        sha = _field(info, f, key, str, optional=True)
        if sha is not None and len(sha) != 64:
            raise ModelLoadError(f"{f}: field {key!r} must be a sha256 hex digest or null, got {sha!r}")
    try:
        config_from_json(_field(info, f, "config", dict))
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"{f}: field 'config': {e}") from None
    edges = _field(info, f, "edges", dict)
    if edges.get("detector") not in DETECTORS:
        raise ModelLoadError(f"{f}: field 'edges.detector' is {edges.get('detector')!r}, expected "
                             f"{' or '.join(DETECTORS)}")
    if edges["detector"] == "hed" and not (isinstance(edges.get("sha256"), str) and isinstance(edges.get("file"), str)):
        raise ModelLoadError(f"{f}: field 'edges': HED edges need their file and sha256")
    fold = _field(info, f, "fold", int, optional=True)
    if fold is not None and not 0 <= fold < 4:
        raise ModelLoadError(f"{f}: field 'fold' must be null or 0..3, got {fold!r}")
    classes = _field(info, f, "training_classes", list, optional=True)
    if classes is not None and not all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in classes):
        raise ModelLoadError(f"{f}: field 'training_classes' must be null or a list of class indices")


def read_diffseg_info(path: str | Path) -> dict:
    """The validated fewshot.json of a DiffSeg checkpoint folder."""
    f = Path(path).expanduser() / FEWSHOT_JSON
    info = read_json(f, "few-shot checkpoint description", ModelLoadError)
    if not isinstance(info, dict):
        raise ModelLoadError(f"{f}: expected a JSON object, got {type(info).__name__}")
    check_diffseg_info(info, f)
    return info


def config_from_json(cfg: dict) -> DiffSegConfig:
    known = set(DiffSegConfig.__dataclass_fields__)
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(f"unknown keys {unknown}")
    types = {"resolution": int, "timestep": int, "seed": int, "pam_width": int, "threshold": (int, float),
             "threshold_mode": str, "positions": bool, "layers": (list, type(None))}
    for key, t in types.items():
        if key in cfg and (not isinstance(cfg[key], t) or (t is int and isinstance(cfg[key], bool))):
            raise ValueError(f"{key} is {cfg[key]!r}")
    if isinstance(cfg.get("threshold"), float) and not math.isfinite(cfg["threshold"]):
        raise ValueError(f"threshold is {cfg['threshold']}")
    if cfg.get("layers") is not None and not all(isinstance(i, int) and not isinstance(i, bool) for i in cfg["layers"]):
        raise ValueError(f"layers is {cfg['layers']!r}")
    return DiffSegConfig(**{k: float(v) if k == "threshold" else v for k, v in cfg.items()})


def _load_state(path: Path, module: torch.nn.Module, what: str) -> None:
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises several types on a bad file
        raise ModelLoadError(f"{path}: cannot read the {what} weights ({type(e).__name__}: {e})") from None
    want = module.state_dict()
    wrong = sorted(k for k in set(want) & set(state) if tuple(want[k].shape) != tuple(state[k].shape))
    missing, extra = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    if missing or extra or wrong:
        raise ModelLoadError(f"{path}: the {what} weights do not fit this model (missing {missing[:3]}, unexpected "
                             f"{extra[:3]}, wrong shape {wrong[:3]})")
    bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if bad:
        raise ModelLoadError(f"{path}: the {what} weight {bad[0]} holds non-finite values")
    module.load_state_dict({k: v.to(want[k].dtype) for k, v in state.items()})


def edge_detector(info: dict, where: Path, hed: str | Path | None = None, device="cpu") -> EdgeDetector:
    """The checkpoint's edge detector; HED from its recorded file or ``hed``, whose digest
    must match the recorded one (maps on other edges than the training ones are refused)."""
    rec = info["edges"]
    if rec["detector"] == "canny":
        if hed is not None:
            raise ModelLoadError(f"{where} was trained on Canny edges; --hed does not apply")
        return EdgeDetector("canny")
    det = EdgeDetector("hed", hed or rec["file"], device)
    if det.sha256 != rec["sha256"]:
        raise ModelLoadError(f"{where} was trained on HED weights with sha256 {rec['sha256'][:12]}…; "
                             f"{det.file} has {det.sha256[:12]}…: pass --hed with the training file")
    return det


def load_diffseg(path: str | Path, *, device: str | None = None, dtype: str | None = None,
                 base_model: str | None = None, prior: str | None = None, hed: str | Path | None = None,
                 threshold: float | None = None, trainable: bool = False) -> DiffSeg:
    """A DiffSeg checkpoint on its base model (or ``base_model``/``prior``, e.g. after a move)."""
    from dataclasses import replace

    from ...modeling import kandinsky
    from ...modeling.loading import RANDOM_WEIGHTS_MARKER, folder_digest

    path = Path(path).expanduser().resolve()
    info = read_diffseg_info(path)
    config = config_from_json(info["config"])
    if threshold is not None:
        config = replace(config, threshold=threshold)
    edges = edge_detector(info, path, hed)           # a wrong HED file fails before the base model loads
    base = kandinsky.load(base_model or info["base_model"], device=device, dtype=dtype,
                          prior=prior if prior is not None else info.get("prior"))
    for key in ("base_model_sha256", "prior_sha256"):
        recorded, now = info.get(key), base.info.get("folder_sha256" if key == "base_model_sha256" else key)
        if recorded and now and recorded != now:
            log.warning(f"the {'base model' if key == 'base_model_sha256' else 'prior'} differs from the one the "
                        f"checkpoint was made on (sha256 {recorded[:12]}…): its maps may not fit SCM/PAM")
    heads = DiffSegHeads(base.unet, base.unet.config.in_channels, config)
    _load_state(path / SCM_FILE, heads.scm, "SCM")
    _load_state(path / PAM_FILE, heads.pam, "PAM")
    heads.to(base.device).train(trainable).requires_grad_(trainable)
    if edges._hed is not None:
        edges._hed.to(base.device)
    base.info = {**base.info, "checkpoint": str(path), "checkpoint_sha256": folder_digest(path)}
    if (path / RANDOM_WEIGHTS_MARKER).is_file():
        base.info["random_weights"] = True
    return DiffSeg(base, heads, config, edges, {"checkpoint": info})
