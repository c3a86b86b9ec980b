"""Batch pseudo-labelling of a dataset (``text2mask generate``): the WSSS method plugged
into the shared batch engine (``text2mask.runs``).

Per image: read its labels and photo (``inputs``, ``prepare``: shrink a huge photo, plan
the prompts), one UNet call per batch of images of one padded size (``model_step``),
then CRF and PNGs in a writer process (``finish``). The engine brings resume, the input
records, the failure log, shards, the lock and run.json.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import partial
from os.path import abspath
from pathlib import Path

import numpy as np

from ..data.base import Dataset, Sample
from ..distributed import Distributed
from ..errors import ConfigError
from ..evaluation.semantic import format_table
from ..io import read_image
from ..modeling.latents import Draws
from ..modeling.capture import CaptureLayout, layout_of, transformer_blocks
from ..preprocess import Geometry, geometry, shrink
from ..runs import RunOptions as _EngineOptions, RunSummary, run
from ..runs.budget import gib
from ..runs.engine import shard_of  # noqa: F401 - part of this module's API (tests, scripts)
from ..runs.manifest import model_identity
from ..runs.method import Evaluation, StageFailed
from ..runs.records import file_digest, marker_path
from ..runs.scoring import score_pairs
from .predictor import Text2Mask
from .prompts import PromptPlan
from .result import background_only
from .write import FOLDERS, finish, output_path

DRAWS = "draws"

NO_LABELS = "no_labels"
MARKER = "masks/{id}.png"
_TOKENS = 77                 # text tokens per prompt (CLIP)
_FLOAT32 = 4


@dataclass
class RunOptions(_EngineOptions):
    max_pixels: int | None = 4_000_000  # larger photos are worked on shrunk (masks written full size)
    save_draws: bool = False            # write each image's draws to <out>/draws/<id>.safetensors
    draws: Path | None = None           # replay: a folder of <id>.safetensors (e.g. another run's draws/)


@dataclass
class WsssSummary(RunSummary):
    @property
    def no_labels(self) -> int:
        """Of ``done``: images without labels, written all-background."""
        return self.tags.get(NO_LABELS, 0)


@dataclass
class Prepared:
    """One image ready for the model: the (possibly shrunk) photo and its prompt plan."""

    key: str
    rgb: np.ndarray
    plan: PromptPlan | None                  # None: no labels, no model call
    full_size: tuple[int, int] | None = None  # (h, w) to write at, if the photo was shrunk
    geo: Geometry | None = field(default=None, repr=False)
    draws: Draws | None = field(default=None, repr=False)


def row_bytes(unet, geo: Geometry, layout: CaptureLayout | None = None) -> int:
    """Estimated bytes of one UNet row (one image x prompt x sample) at ``geo``: the
    captured blocks compute explicit fp32 attention, logits and probabilities of all
    heads (2 x heads x N x M x 4 bytes: M = N for Self, 77 text tokens for Cross; the
    largest of them is alive at once), and keep the head-mean maps of every captured
    layer (Self N^2, each Cross N x 77; SDXL's blocks have 2 or 10 layers) until the pass
    ends. The other blocks use fused attention (memory linear in N) and are left out. At
    704x704 with SD 1.x's 8 heads this is ~255 MB per row, which matches the ~22 GB that
    --samples 100 took for one photo."""
    lh, lw = geo.latent
    blocks = transformer_blocks(unet)
    layout = layout or layout_of(unet)

    def tokens(i: int) -> int:
        f = blocks[i].factor
        return -(-lh // f) * -(-lw // f)

    def heads(i: int) -> int:
        return unet.get_submodule(blocks[i].name).transformer_blocks[0].attn1.heads

    scores = max([2 * heads(i) * tokens(i) ** 2 for i in layout.self_blocks]
                 + [2 * heads(i) * tokens(i) * _TOKENS for i in layout.cross_blocks])
    kept = (sum(blocks[i].layers * tokens(i) ** 2 for i in layout.self_blocks)
            + sum(blocks[i].layers * tokens(i) * _TOKENS for i in layout.cross_blocks))
    return (scores + kept) * _FLOAT32


def largest_geometry(side: int | None = None) -> Geometry:
    """The geometry with the most latent cells over every aspect ratio (a 1000-pixel side
    and every other side 1..1000 covers each band of the reference resize; a fixed long
    ``side``: the square)."""
    if side:
        return geometry(side, side, side)
    shapes = [geometry(h, 1000) for h in range(1, 1001)] + [geometry(1000, w) for w in range(1, 1001)]
    return max(shapes, key=lambda g: g.padded_height * g.padded_width)


class WsssMethod:
    """The ``text2mask.runs.Method`` of WSSS pseudo masks."""

    name = "wsss"
    unit = "image"
    all_folders = (*FOLDERS, DRAWS)
    marker = MARKER
    finish_stage = "crf/write"

    def __init__(self, predictor: Text2Mask, dataset: Dataset, opts: RunOptions, log=print):
        self.predictor, self.dataset, self.opts, self.log = predictor, dataset, opts, log
        cfg = predictor.config
        self.folders = (*(FOLDERS if cfg.crf else tuple(f for f in FOLDERS if f != "crf")),
                        *((DRAWS,) if opts.save_draws else ()))
        self._check_budget()

    def _check_budget(self) -> None:
        """Refuse up front when one prompt's rows (--samples) of the largest image cannot
        fit in one UNet call."""
        budget = self.opts.memory_budget
        if budget is None:
            return
        need = self.predictor.config.samples * row_bytes(self.predictor.sd.unet,
                                                         largest_geometry(self.predictor.sd.spec.wsss_side))
        if need > budget:
            raise ConfigError(f"--samples {self.predictor.config.samples} needs about {gib(need)} in one UNet call "
                              f"for the largest image, over --memory-budget {gib(budget)}; lower --samples "
                              "or raise --memory-budget")

    # -- configuration and records ---------------------------------------------------
    def fingerprint(self) -> dict:
        """Everything that changes the bytes of a mask. Paths are not in it: the inputs
        of each image are checked through its record instead."""
        cs = self.predictor.class_set
        batching = {"batch_size": self.opts.batch_size,
                    "memory_budget": self.opts.memory_budget if self.opts.batch_size > 1 else None}
        return {"model": model_identity(self.predictor.sd.info),
                "method": asdict(self.predictor.config),
                "class_set": {"name": cs.name, "classes": [asdict(c) for c in cs.classes]},
                "preprocess": {"max_pixels": self.opts.max_pixels},
                "batching": batching,
                "draws": "replayed" if self.opts.draws is not None else "from (seed, image id)"}

    def describe(self) -> dict:
        ds = self.dataset
        folders = {str(Path(abspath(s.image)).parent) for s in ds.samples}
        return {"seed": self.predictor.config.seed,
                "model": self.predictor.sd.info,
                "dataset": {"name": ds.name, "split": ds.split, "images": len(ds),
                            "image_dir": folders.pop() if len(folders) == 1 else None,
                            "label_source": ds.label_source,
                            "gt_dir": abspath(ds.gt_dir) if ds.gt_dir else None,
                            "class_set": self.predictor.class_set.source}}

    def inputs(self, sample: Sample) -> dict:
        """The image's class indices (after the label source is read) and photo digest
        (and, when replaying, its draws file's)."""
        record = {"labels": list(self.dataset.labels(sample)),
                  "photo_sha256": file_digest(sample.image, "image file")}
        if self.opts.draws is not None:
            record["draws_sha256"] = file_digest(self._draws_file(sample.id), "draws file")
        return record

    def _draws_file(self, key: str) -> Path:
        return Path(self.opts.draws) / f"{key}.safetensors"

    def _draws(self, key: str, geo: Geometry) -> Draws | None:
        """The image's draws when they are replayed or saved; None: attend's default."""
        if self.opts.draws is not None:
            return Draws.load(self._draws_file(key))
        if not self.opts.save_draws:
            return None
        cfg, sd = self.predictor.config, self.predictor.sd
        return Draws.default(cfg.seed, key, (sd.vae.config.latent_channels, *geo.latent), cfg.samples)

    # -- the three stages ------------------------------------------------------------
    def prepare(self, sample: Sample, inputs: dict) -> Prepared:
        photo = read_image(sample.image)
        rgb = shrink(photo, self.opts.max_pixels)
        full = photo.shape[:2] if rgb is not photo else None
        classes = tuple(inputs["labels"])
        if not classes:
            self.log(f"{sample.id}: no image-level labels; writing an all-background mask")
            return Prepared(sample.id, rgb, None, full)
        try:
            plan = self.predictor.plan(classes)
        except Exception as e:
            raise StageFailed("prompt") from e
        if plan.actions:
            self.log(f"{sample.id}: prompt too long for 77 tokens: " + "; ".join(plan.actions))
        geo = self.predictor.geometry(*rgb.shape[:2])
        draws = self._draws(sample.id, geo)
        if self.opts.save_draws:
            draws.save(Path(self.opts.out) / DRAWS / f"{sample.id}.safetensors")
        return Prepared(sample.id, rgb, plan, full, geo, draws)

    def batch_key(self, p: Prepared):
        return None if p.plan is None else (p.geo.padded_height, p.geo.padded_width)

    def call_cost(self, p: Prepared) -> int:
        if p.plan is None:
            return 0
        rows = len(p.plan.prompts) * self.predictor.config.samples
        return rows * row_bytes(self.predictor.sd.unet, p.geo)

    def model_step(self, batch: list[Prepared]):
        if batch[0].plan is None:
            return [background_only(p.key, *p.rgb.shape[:2]) for p in batch]
        items = [(p.key, p.rgb, p.plan) for p in batch]
        draws = {p.key: p.draws for p in batch if p.draws is not None}
        return self.predictor.attend(items, draws=draws) if draws else self.predictor.attend(items)

    def finish(self, p: Prepared, att):
        att.full_size = p.full_size
        return partial(finish, att, p.rgb, self.predictor.config)

    def tags(self, p: Prepared):
        return (NO_LABELS,) if p.plan is None else ()

    # -- evaluation --------------------------------------------------------------------
    def evaluate(self, out: Path, samples: list[Sample], log) -> Evaluation:
        """Metrics of each written folder over the complete images, ground truth found
        per image (``Sample.gt``); complete images without it are named, not scored."""
        if self.dataset.gt_dir is None and not any(s.gt for s in self.dataset.samples):
            return Evaluation(None)
        complete = [s for s in samples if marker_path(out, MARKER, s.id).is_file()]
        scored = [s for s in complete if s.gt is not None]
        no_gt = [s.id for s in complete if s.gt is None]
        if no_gt:
            log(f"{len(no_gt)} image(s) have no ground truth and are not scored: " + ", ".join(no_gt[:10])
                + (" ..." if len(no_gt) > 10 else ""))
        if not scored:
            return Evaluation(None, no_gt)
        names = self.dataset.class_set.names
        metrics = {"split": self.dataset.split, "images": len(scored),
                   "gt_dirs": sorted({abspath(Path(s.gt).parent) for s in scored}), "no_gt": no_gt}
        errors = []
        for folder in self.folders:
            pairs = [(output_path(out, folder, s.id), Path(s.gt)) for s in scored]
            if not all(p.is_file() for p, _ in pairs):
                continue
            try:
                res = score_pairs(pairs, len(names), names)
            except ConfigError as e:  # e.g. a GT of another size: the masks stay, the numbers can't be had
                log(f"error: cannot evaluate {folder}/: {e}")
                metrics[folder] = {"error": str(e)}
                errors.append((f"({folder}/ evaluation)", str(e)))
                continue
            metrics[folder] = res
            log(format_table(res, f"{folder}/ vs ground truth ({self.dataset.name} {self.dataset.split}, "
                                  f"{len(scored)} images)"))
        return Evaluation(metrics, no_gt, errors)


def generate(predictor: Text2Mask, dataset: Dataset, opts: RunOptions, log=print,
             dist: Distributed | None = None) -> WsssSummary:
    """Pseudo masks for ``dataset`` into ``opts.out`` (see ``text2mask.runs.run``)."""
    dist = dist or Distributed.from_env()
    method = WsssMethod(predictor, dataset, opts, log if dist.main else (lambda m: None))
    if dist.main:
        if predictor.sd.info.get("random_weights"):
            log("WARNING: the model has random weights (test model): these masks and metrics are MEANINGLESS")
        for note in dataset.notes:
            log(f"note: {note}")
        log(f"labels from {dataset.label_source}")
    return run(method, dataset.samples, opts, log=log, dist=dist, summary_type=WsssSummary)

