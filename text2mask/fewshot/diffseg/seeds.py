"""Mean ± standard deviation over seeded test manifests, per fold (DiffSeg's protocol:
"all tests 10 times" [P §5.2]; the toolkit's manifests with seeds 0..9).

``text2mask fewshot score RUN...`` calls ``seed_table`` with the scored run folders: runs
of one benchmark, shot count and fold whose manifests have different seeds are one
group; with two or more seeds in a group the table gives the mean and the sample
standard deviation (n − 1) of mIoU and FB-IoU across them, and, with all four folds,
the 4-fold mean of the per-fold means. Nothing here is DiffSeg-specific: any few-shot
run folders can be summarised this way.
"""
from __future__ import annotations

import math
from pathlib import Path

from ...errors import InputError
from ...io import read_json

METRICS = ("mIoU", "FB-IoU")


def manifest_seed(run: str | Path) -> int:
    doc = read_json(Path(run) / "run.json", "run record")
    seed = (doc.get("episodes") or {}).get("seed") if isinstance(doc, dict) else None
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise InputError(f"{Path(run) / 'run.json'}: field 'episodes.seed' missing: not a few-shot evaluation folder")
    return seed


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n − 1; 0 for one value)."""
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def seed_groups(seeds: list[int], results: list[dict]) -> dict:
    """{(benchmark, shots): {fold: {"seeds": [...], "mIoU": (mean, std), "FB-IoU": (mean, std)}}}.
    The same (benchmark, shots, fold, seed) twice is refused: one run would count double."""
    groups: dict = {}
    for seed, r in zip(seeds, results):
        key = (r["benchmark"], r["shots"])
        fold = groups.setdefault(key, {}).setdefault(r["fold"], {"seeds": [], "values": {m: [] for m in METRICS}})
        if seed in fold["seeds"]:
            raise InputError(f"two runs of {r['benchmark']} fold {r['fold']}, {r['shots']}-shot, manifest seed {seed}: "
                             "pass each seed once")
        fold["seeds"].append(seed)
        for m in METRICS:
            fold["values"][m].append(float(r[m]))
    return {key: {f: {"seeds": sorted(g["seeds"]), **{m: mean_std(g["values"][m]) for m in METRICS}}
                  for f, g in sorted(folds.items())} for key, folds in groups.items()}


def seed_table(runs: list[Path], results: list[dict], log) -> dict:
    """Log mean ± std over seeds per fold when some fold has several seeds; returns the groups."""
    groups = seed_groups([manifest_seed(r) for r in runs], results)
    if not any(len(g["seeds"]) > 1 for folds in groups.values() for g in folds.values()):
        return groups
    for (bench, shots), folds in groups.items():
        for fold, g in folds.items():
            m, s = g["mIoU"]
            fm, fs = g["FB-IoU"]
            log(f"{bench} fold {fold}, {shots}-shot over {len(g['seeds'])} seeded manifest(s) {g['seeds']}: "
                f"mIoU {m:.1f} ± {s:.1f}%, FB-IoU {fm:.1f} ± {fs:.1f}%")
        if sorted(folds) == [0, 1, 2, 3]:
            log(f"{bench} {shots}-shot, 4-fold mean of the per-fold means: "
                f"mIoU {sum(g['mIoU'][0] for g in folds.values()) / 4:.1f}%, "
                f"FB-IoU {sum(g['FB-IoU'][0] for g in folds.values()) / 4:.1f}%")
    return groups
