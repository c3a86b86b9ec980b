"""Official SLiMe checkpoints: a folder of ``embedding_i.pth`` learned rows becomes a
parts file (``text2mask slime import``)."""
from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import torch

from ..errors import InputError, ModelLoadError
from .artifact import SlimeParts, fitted_on
from .examples import parse_classes
from .fit import initial_prompts, splice
from .segment import SegmentSettings


def embedding_files(folder: str | os.PathLike) -> dict[int, Path]:
    """{i: embedding_i.pth} of an official checkpoint folder, i = 0..n-1 without gaps."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder (an official checkpoint folder holds embedding_0.pth, ...)")
    found = {int(p.stem.split("_", 1)[1]): p for p in folder.glob("embedding_*.pth")
             if p.stem.split("_", 1)[1].isdigit()}
    if not found:
        raise InputError(f"{folder}: no embedding_0.pth, embedding_1.pth, ... (official SLiMe checkpoint)")
    if sorted(found) != list(range(len(found))):
        missing = sorted(set(range(max(found) + 1)) - set(found))
        raise InputError(f"{folder}: embedding_{missing[0]}.pth is missing (found {len(found)} files)")
    return found


def import_official(folder: str | os.PathLike, sd, classes: str | None = None,
                    init_prompt: str | None = None, bgr: bool = False) -> SlimeParts:
    """Parts from an official checkpoint folder: ``embedding_i.pth`` (i = 0..K-2), each
    the (1, 1, D) learned row of class i + 1, spliced into this model's "part" x K
    prompt (or ``init_prompt``, the official ``--text_prompt``). ``bgr``: segment with the
    photo's channels as B, G, R by default (embeddings trained with the official HEAD,
    which reads photos with ``cv2.imread``; for the released embeddings it is unknown)."""
    folder = Path(folder)
    found = embedding_files(folder)
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
        if not bool(torch.isfinite(rows[-1]).all()):
            raise InputError(f"{found[i]}: the embedding holds non-finite values")
    cond0, uncond = initial_prompts(sd, k, init_prompt)
    return SlimeParts(names, splice(cond0, torch.stack(rows)).cpu(), uncond.cpu(), fitted_on(sd),
                      {"imported_from": str(folder.resolve()), "init_prompt": init_prompt,
                       "segment": asdict(SegmentSettings(bgr=bgr))})
