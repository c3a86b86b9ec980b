"""Training DiffSeg's SCM and PAM on a fold's training classes
(``text2mask fewshot train --method diffseg``) [P §5.2; DIFFSEG.md "Training"].

    epoch    one 1-shot episode per (image, class) pair of the fold's ``trn`` lists, in a
             permutation seeded by (seed, epoch); its support drawn from the class's
             other images (O10: 1-shot training, the same weights tested at 1 and 5 shots)
    step     B episodes per process: one UNet forward (down + mid build no graph: nothing
             there requires grad) and the backward through the up path, SCM and PAM
    loss     2·MSE(M_a, G) + MSE(L_pre, MoVQ(Ĝ))  (``stages.diffseg_loss``)
    optimiser SGD, momentum 0.9, weight decay 1e-4, lr 0.01 × 0.9 every 20 epochs
             (StepLR by epoch), 200 epochs [P: lr, schedule, epochs; O9: the rest]

Everything deterministic is computed once per image and cached in memory (MoVQ latents
of queries, masked supports and ground-truth masks, CLIP embeddings, edge maps), each
image on its own, so the cache does not depend on batching. Every random draw of a step
(support choice, noise ε) comes from a generator seeded by (seed, epoch, step, process),
so a run resumed from ``checkpoint-E/`` (accelerate ``save_state`` at the end of epoch E)
repeats exactly the losses of the uninterrupted run. ``accelerate launch`` runs it on
several GPUs (the heads wrapped in DDP; the frozen UNet is passed in, never wrapped).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ...errors import ConfigError, ModelLoadError, TrainingDiverged
from ...io import read_json, write_json, write_text
from ...log import get
from ..diffews import mask_to_image, square_image, square_mask
from ..episodes import read_labelled
from ..train import TRAIN_JSON, TRAIN_JSON_VERSION, TrainData, _latest_checkpoint, check_run_folder, data_files_digest
from .checkpoint import checkpoint_info, read_diffseg_info, save_diffseg
from .edges import EdgeDetector
from .model import DiffSegConfig, DiffSegHeads, Features, query_inputs, support_inputs
from .stages import diffseg_loss, map_targets

log = get(__name__)

LOSSES_JSON = "losses.json"
STATE_JSON = "step.json"       # written last into checkpoint-E/: marks the state as complete


@dataclass(frozen=True)
class DiffSegTrainConfig:
    epochs: int = 200
    batch_size: int = 2                 # episodes per process per step (paper: 4 GPUs × 2 = 8)
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_step_epochs: int = 20
    lr_gamma: float = 0.9
    checkpoint_every: int = 10          # epochs
    seed: int = 42
    mixed_precision: str = "no"         # no | fp16 | bf16
    diffseg: DiffSegConfig = field(default_factory=DiffSegConfig)

    def __post_init__(self):
        for name in ("epochs", "batch_size", "lr_step_epochs", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("lr", "momentum", "weight_decay", "lr_gamma"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0) or (name in ("lr", "lr_gamma") and v == 0):
                raise ConfigError(f"--{name.replace('_', '-')} must be a finite {'positive' if name in ('lr', 'lr_gamma') else 'non-negative'} number, got {v}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ConfigError(f"unknown --mixed-precision {self.mixed_precision!r}; use no, fp16 or bf16")

    def to_json(self) -> dict:
        return {**{k: v for k, v in asdict(self).items() if k != "diffseg"}, "diffseg": self.diffseg.to_json()}


def epoch_lr(config: DiffSegTrainConfig, epoch: int) -> float:
    """torch's StepLR by epoch: lr · γ^⌊epoch / step⌋."""
    return config.lr * config.lr_gamma ** (epoch // config.lr_step_epochs)


def training_pairs(data: TrainData) -> list[tuple[str, int]]:
    """The (image, class) pairs an epoch visits once each: PASCAL's list lines, COCO's
    images per training class."""
    if data.bench.name == "pascal5i":
        return list(data.lists.pairs)
    return [(name, c) for c in sorted(data.lists.per_class) for name in data.lists.per_class[c]]


def epoch_batches(pairs: int, seed: int, epoch: int, world: int, batch: int) -> list[list[list[int]]]:
    """[step][process] -> pair indices. A permutation seeded by (seed, epoch), wrapped round
    so that every process runs the same number of full steps (as DistributedSampler)."""
    perm = np.random.default_rng([seed, epoch]).permutation(pairs)
    steps = -(-pairs // (batch * world))
    order = perm[np.arange(steps * batch * world) % pairs]
    return [[order[(s * world + r) * batch:(s * world + r + 1) * batch].tolist() for r in range(world)]
            for s in range(steps)]


def draw_support(rng: np.random.Generator, pool: tuple[str, ...], query: str) -> str:
    while True:
        s = pool[int(rng.integers(len(pool)))]
        if s != query:
            return s


def source_identity(src: str | None, revision: str | None = None) -> dict | None:
    """A model source by content: a local folder's sha256, or a hub id with its revision."""
    from ...modeling.loading import folder_digest

    if src is None:
        return None
    p = Path(src).expanduser()
    if p.is_dir():
        kind = "few-shot checkpoint" if (p / "fewshot.json").is_file() else "model folder"
        return {"kind": kind, "sha256": folder_digest(p)}
    return {"kind": "hub id", "id": src, "revision": revision or "main"}


def fingerprint(init: str, prior: str | None, data: TrainData, edges: EdgeDetector, config: "DiffSegTrainConfig",
                processes: int, revision: str | None = None) -> dict:
    """What makes the run's weights: compared field by field on every start (the listed
    images and masks by name, size and modification time, as DiffewS' trainer)."""
    return {"method": "diffseg", "init": source_identity(init, revision), "prior": source_identity(prior),
            "benchmark": data.bench.name, "fold": data.fold, "lists_sha256": data.lists.digest(),
            "data_files": data_files_digest(data), "edges": {k: v for k, v in edges.describe().items() if k != "file"},
            "config": config.to_json(), "processes": processes}


class FeatureCache:
    """The deterministic per-image features of training, computed once each, on the CPU."""

    def __init__(self, base, detector: EdgeDetector, data: TrainData, resolution: int):
        self.base, self.detector, self.data, self.r = base, detector, data, resolution
        self._query: dict[str, tuple] = {}
        self._support: dict[tuple[str, int], tuple] = {}
        self._target: dict[tuple[str, int], tuple] = {}

    def _read(self, name: str, cls: int):
        return read_labelled(self.data.bench, self.data.root, name, cls)

    @torch.no_grad()
    def query(self, name: str, cls: int):
        if name not in self._query:
            img = self._read(name, cls)
            lat, edges, _ = query_inputs(self.base, square_image(img.rgb, self.r)[None], self.detector, 0)
            # edges are k/255 for uint8 k: kept as the uint8 k (a quarter of the memory), exactly
            self._query[name] = (lat[0].cpu(), (edges[0] * 255).round().to(torch.uint8).cpu())
        if (name, cls) not in self._target:
            img = self._read(name, cls)
            mask, ignore = square_mask(img.mask, self.r), square_mask(img.ignore, self.r)
            lat = self._query[name][0]
            g, w = map_targets(mask[None], ignore[None], tuple(lat.shape[-2:]))
            gt = self.base.encode(mask_to_image((mask & ~ignore)[None])).float()
            self._target[name, cls] = (g[0].cpu(), w[0].cpu(), gt[0].cpu())
        return self._query[name], self._target[name, cls]

    @torch.no_grad()
    def support(self, name: str, cls: int):
        if (name, cls) not in self._support:
            img = self._read(name, cls)
            if not img.mask.any():
                raise ConfigError(f"training image {name}: no pixel of class {cls} in its mask "
                                  f"{self.data.bench.mask_path(self.data.root, name)}")
            lat, emb = support_inputs(self.base, square_image(img.rgb, self.r)[None],
                                      square_mask(img.mask, self.r)[None])
            self._support[name, cls] = (lat[0].cpu(), emb[0].cpu())
        return self._support[name, cls]


def step_batch(cache: FeatureCache, pairs: list[tuple[str, int]], indices: list[int], rng: np.random.Generator,
               generator: torch.Generator):
    """Features and targets of one step's episodes; the support and ε drawn here."""
    q_lat, edges, s_lat, embeds, gs, ws, gts = [], [], [], [], [], [], []
    for i in indices:
        name, cls = pairs[i]
        (lat, e), (g, w, gt) = cache.query(name, cls)
        support = draw_support(rng, cache.data.lists.per_class[cls], name)
        sl, emb = cache.support(support, cls)
        q_lat.append(lat), edges.append(e), s_lat.append(sl), embeds.append(emb)
        gs.append(g), ws.append(w), gts.append(gt)
    lat = torch.stack(q_lat)
    noise = torch.randn(lat.shape, generator=generator)
    feats = Features(lat, torch.stack(s_lat), torch.stack(embeds), torch.stack(edges).float() / 255, noise)
    return feats, (torch.stack(gs), torch.stack(ws), torch.stack(gts))


def step_generators(seed: int, epoch: int, step: int, rank: int) -> tuple[np.random.Generator, torch.Generator]:
    rng = np.random.default_rng([seed, epoch, step, rank])
    return rng, torch.Generator().manual_seed(int(rng.integers(2**62)))


def initial_heads(init: str, prior: str | None, config: DiffSegTrainConfig, device, frozen_dtype: str,
                  revision: str | None = None):
    """(base, heads, base source, prior source): a DiffSeg checkpoint to fine-tune (its base
    and config), or a Kandinsky 2.2 decoder with fresh heads (SCM's outputs zero)."""
    from ...modeling import kandinsky

    path = Path(init).expanduser()
    if (path / "fewshot.json").is_file():
        from .checkpoint import load_diffseg

        info = read_diffseg_info(path)
        m = load_diffseg(path, device=device, dtype=frozen_dtype, trainable=True)
        if m.config != config.diffseg:
            raise ConfigError(f"--init {init} was made with {m.config.to_json()}; train with the same settings")
        return m.base, m.heads, info["base_model"], info.get("prior")
    base = kandinsky.load(init, device=device, dtype=frozen_dtype, prior=prior, revision=revision)
    source = str(path.resolve()) if path.exists() else init
    prior_source = str(Path(prior).expanduser().resolve()) if prior and Path(prior).expanduser().exists() else prior
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        heads = DiffSegHeads(base.unet, base.unet.config.in_channels, config.diffseg)
    return base, heads.to(base.device).train().requires_grad_(True), source, prior_source


def _finite_parameters(module: torch.nn.Module, epoch: int) -> None:
    for name, p in module.named_parameters():
        if not torch.isfinite(p).all():
            raise TrainingDiverged(f"epoch {epoch}: parameter {name} is not finite; lower --lr. Nothing was written "
                                   "(the last checkpoint-N/ stays)")


def train(init: str, data: TrainData, out: Path, config: DiffSegTrainConfig, *, prior: str | None = None,
          edges: EdgeDetector | None = None, resume: bool = False, device: str | None = None,
          progress: bool = True, revision: str | None = None) -> list[float]:
    """Train SCM and PAM and write the final checkpoint into ``out``; returns every step's
    loss (mean over processes), the resumed steps included."""
    from accelerate import Accelerator

    out = Path(out)
    edges = edges or EdgeDetector()
    pairs = training_pairs(data)
    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=device == "cpu")
    # 0. The fingerprint, checked against the folder before the model loads.
    record = {"version": TRAIN_JSON_VERSION,
              "fingerprint": fingerprint(init, prior, data, edges, config, accelerator.num_processes, revision),
              "paths": {"init": str(init), "prior": prior, "data_root": str(data.root),
                        "lists": [str(f) for f in data.lists.files], "hed": edges.file}}
    state = check_run_folder(out, record, resume)
    if state == "finished":
        log.info(f"{out}: the training is finished (fewshot.json); nothing to do")
        return []
    frozen = {"fp16": "fp16", "bf16": "bf16"}.get(config.mixed_precision, "fp32")
    base, heads, base_source, prior_source = initial_heads(init, prior, config, str(accelerator.device), frozen,
                                                               revision)
    cfg = config.diffseg
    if base.latent_factor != 8:
        raise ModelLoadError(f"{init}: MoVQ downsamples by {base.latent_factor}; SCM's edge encoder expects 8")
    alpha_bar = float(base.alphas_cumprod[cfg.timestep])
    cache = FeatureCache(base, edges, data, cfg.resolution)

    opt = torch.optim.SGD(heads.parameters(), lr=config.lr, momentum=config.momentum,
                          weight_decay=config.weight_decay)
    net, opt = accelerator.prepare(heads, opt)

    start, losses = 0, []
    if state == "resume":
        start, path = _latest_checkpoint(out)
        accelerator.load_state(str(path))
        losses = list(read_json(path / LOSSES_JSON, "training losses", ConfigError))
        log.info(f"resuming from {path} (epoch {start} of {config.epochs})")
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / TRAIN_JSON, record)

    steps = len(epoch_batches(len(pairs), config.seed, 0, accelerator.num_processes, config.batch_size))
    bar = tqdm(total=config.epochs * steps, initial=start * steps, unit="step",
               disable=not (progress and accelerator.is_main_process))
    rank = accelerator.process_index
    for epoch in range(start, config.epochs):
        lr = epoch_lr(config, epoch)
        for group in opt.param_groups:
            group["lr"] = lr
        for step, per_rank in enumerate(epoch_batches(len(pairs), config.seed, epoch, accelerator.num_processes,
                                                      config.batch_size)):
            rng, g = step_generators(config.seed, epoch, step, rank)
            feats, (gmap, weight, gt) = step_batch(cache, pairs, per_rank[rank], rng, g)
            dev = accelerator.device
            with accelerator.autocast():
                m_a, l_pre = net(base.unet, feats.to(dev), alpha_bar, cfg.timestep, cfg.layers)
                loss = diffseg_loss(m_a, l_pre, gmap.to(dev), weight.to(dev), gt.to(dev))
            accelerator.backward(loss)
            opt.step()
            opt.zero_grad()
            value = accelerator.gather(loss.detach()[None]).mean().item()
            if not math.isfinite(value):
                raise TrainingDiverged(f"epoch {epoch + 1}, step {step + 1}: the loss is {value}; lower --lr or use "
                                       "bf16/fp32. Nothing was written (the last checkpoint-N/ stays)")
            losses.append(value)
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{value:.4f}", lr=f"{lr:.2e}")
        _finite_parameters(net, epoch + 1)
        done = epoch + 1
        if done % config.checkpoint_every == 0 and done < config.epochs:
            _save_state(accelerator, out, done, losses)
    bar.close()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        info = checkpoint_info(base_source, prior_source, base.info, cfg, edges, benchmark=data.bench.name,
                               fold=data.fold, training_classes=sorted(data.lists.per_class),
                               source=f"trained by text2mask for {config.epochs} epochs",
                               training=config.to_json())
        save_diffseg(out, accelerator.unwrap_model(net), info)
        write_json(out / LOSSES_JSON, losses)
        if base.info.get("random_weights"):
            from ...modeling.loading import RANDOM_WEIGHTS_MARKER

            write_text(out / RANDOM_WEIGHTS_MARKER, "DiffSeg heads trained on a random test model: masks are "
                                                    "meaningless.\n")
        log.info(f"checkpoint written to {out}")
    return losses


def _save_state(accelerator, out: Path, epoch: int, losses: list[float]) -> None:
    path = out / f"checkpoint-{epoch}"
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        write_json(path / LOSSES_JSON, losses)
        write_json(path / STATE_JSON, {"epoch": epoch})   # last: marks the state as complete

