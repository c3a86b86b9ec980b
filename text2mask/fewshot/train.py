"""Training DiffewS on a benchmark fold's training classes (``text2mask fewshot train``).

One optimisation step (the reference's recipe, ``train_tools/…_nshot_v3.py``):

    k ~ U{1..N} shots for the step's episodes (DiffewS-n; N = 1 is strict 1-shot)
    z_q, z_s, z_ms, z_mq = s·(posterior draws) of query, supports, support masks, query mask
    ẑ_m = −UNet(z_q | K/V of the support pass on conv_in_ref([z_s ; z_ms])),  t = 1, c∅
    L = ‖ẑ_m − z_mq‖²  (mean)            (the reference's MSE(UNet, −z_mq), the same value)

AdamW (lr 1e-5, weight decay 0.01), linear (power-1 polynomial) decay to 1e-7 without
warm-up, gradient norm clipped at 1.0, the whole UNet and conv_in_ref trained; VAE and
text encoder frozen. 🤗 accelerate runs it on one or several devices
(``accelerate launch``) with fp16/bf16 mixed precision and gradient accumulation.

Every draw of a step (its episodes, shots, posterior noise) comes from a generator
seeded by (seed, step, micro-batch, process), so a resumed run (``checkpoint-N/``,
accelerate ``save_state``) repeats exactly the losses and weights of the uninterrupted
run with the same number of processes.

Resume is honest: ``train.json`` holds the run's fingerprint (``fingerprint``): the
initial model by content (a folder's or file's sha256; a hub id with its revision), the
list files' sha256, a digest of (name, size, modification time) of every listed image
and mask, every setting and the number of processes. A folder whose fingerprint differs
is never resumed nor overwritten (exit 2, naming what differs). A step whose loss or
parameters are not finite stops the training (``TrainingDiverged``, exit 1) before
anything of it is saved.
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError, ConfigMismatch, DatasetError, InputError, TrainingDiverged
from ..io import read_json, write_json
from ..log import get, progress as progress_bar
from ..runs.interrupt import stop_after_step
from ..modeling.loading import file_digest, folder_digest
from .checkpoint import FEWSHOT_JSON, checkpoint_info, load_diffews, read_info, save_checkpoint
from .diffews import DiffewsUNet, mask_to_image, square_mask, support_conv_in
from .episodes import Benchmark, ImageLists, check_classes, read_labelled, read_lists, training_episode
from .model import DiffewS, EpisodeInputs, FewShotConfig, encode, episode_inputs

log = get(__name__)

TRAIN_JSON = "train.json"
TRAIN_JSON_VERSION = 2
CHECKPOINT = re.compile(r"checkpoint-(\d+)")
FLOAT32_MAX = 3.4028234663852886e38
LR_END = 1e-7            # diffusers' polynomial schedule default, which the reference used


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 10_000                 # optimisation steps (the paper's strict recipe)
    batch_size: int = 1                 # episodes per process per micro-batch
    grad_accum: int = 4                 # micro-batches per step (paper: 4 GPUs x 4 = 16 episodes)
    lr: float = 1e-5
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    max_shots: int = 1                  # k ~ U{1..max_shots} per step
    checkpoint_every: int = 2_000
    seed: int = 42
    mixed_precision: str = "no"         # no | fp16 | bf16
    fewshot: FewShotConfig = field(default_factory=FewShotConfig)

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum", "max_shots", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ConfigError(f"unknown --mixed-precision {self.mixed_precision!r}; use no, fp16 or bf16")
        for name in ("lr", "max_grad_norm"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0 < value <= FLOAT32_MAX):   # the optimiser runs in float32
                raise ConfigError(f"--{name.replace('_', '-')} must be a finite number > 0 (float32), got {value}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"weight decay must be a finite number >= 0, got {self.weight_decay}")


@dataclass
class TrainData:
    bench: Benchmark
    root: Path
    lists: ImageLists
    fold: int


def training_data(bench: Benchmark, root: Path, lists: Path, fold: int) -> TrainData:
    got = read_lists(bench, lists, "trn", fold)
    classes = tuple(sorted(got.per_class))
    if not classes:
        raise ConfigError(f"{', '.join(map(str, got.files))}: no training images")
    leaked = sorted(set(classes) & set(bench.test_classes(fold)))
    if leaked:
        raise ConfigError(f"training lists hold test classes {leaked} of fold {fold}")
    check_classes(got, classes, ", ".join(map(str, got.files)))
    return TrainData(bench, root, got, fold)


@dataclass
class TrainingEpisode:
    inputs: EpisodeInputs
    query_mask: torch.Tensor      # (R, R) bool


def draw_batch(data: TrainData, rng: np.random.Generator, batch_size: int, max_shots: int,
               resolution: int) -> list[TrainingEpisode]:
    """A micro-batch: k ~ U{1..max_shots}, then ``batch_size`` episodes of k shots."""
    k = int(rng.integers(1, max_shots + 1))
    out = []
    for _ in range(batch_size):
        e = training_episode(data.bench, data.lists, rng, k)
        q = read_labelled(data.bench, data.root, e.query, e.cls)
        sup = [read_labelled(data.bench, data.root, s, e.cls) for s in e.supports]
        out.append(TrainingEpisode(episode_inputs(q.rgb, [(s.rgb, s.mask) for s in sup], resolution),
                                   square_mask(q.mask, resolution)))
    return out


def episode_loss(model: DiffewS, net, batch: list[TrainingEpisode], generator: torch.Generator) -> torch.Tensor:
    """L = mean ‖ẑ_m − z_mq‖² over a micro-batch (``net``: the possibly wrapped DiffewsUNet)."""
    with torch.no_grad():
        query, support, k = model.latents([e.inputs for e in batch], generator)
        target = encode(model.sd, mask_to_image(torch.stack([e.query_mask for e in batch])), generator)
    pred = net(query, support, k, model.text())
    return F.mse_loss(pred.float(), target.float())


def step_generators(seed: int, step: int, micro: int, rank: int, device) -> tuple[np.random.Generator, torch.Generator]:
    """The draws of one micro-batch: episodes (NumPy) and posterior noise (torch)."""
    rng = np.random.default_rng([seed, step, micro, rank])
    g = torch.Generator(device=device).manual_seed(int(rng.integers(2**62)))
    return rng, g


def _latest_checkpoint(out: Path) -> tuple[int, Path] | None:
    found = [(int(m.group(1)), p) for p in out.glob("checkpoint-*") if (m := CHECKPOINT.fullmatch(p.name))
             and (p / "step.json").is_file()]
    return max(found) if found else None


# --- the run's fingerprint ---------------------------------------------------------------

def init_identity(init: str, revision: str | None = None) -> dict:
    """The initial model by content: a local folder's or file's sha256 (a few-shot
    checkpoint adds its recorded base model's), or a hub id with its revision (pin a
    commit with --revision for an exact resume: a branch may move)."""
    p = Path(init).expanduser()
    if p.is_dir():
        if (p / FEWSHOT_JSON).is_file():
            return {"kind": "few-shot checkpoint", "sha256": folder_digest(p),
                    "base_sha256": read_info(p).get("base_model_sha256")}
        return {"kind": "model folder", "sha256": folder_digest(p)}
    if p.is_file():
        return {"kind": "model file", "sha256": file_digest(p)}
    return {"kind": "hub id", "id": init, "revision": revision or "main"}


def data_files_digest(data: TrainData) -> str:
    """sha256 over (path below the data root, size, modification time in ns) of every
    listed image and mask. The contents are not read (COCO-20i lists ~10^5 files): a
    file replaced, edited or touched changes the digest; a copy that keeps the times
    (``cp -a``, ``rsync -a``) does not. A missing file is named here, before any work."""
    h = hashlib.sha256()
    names = sorted({n for names in data.lists.per_class.values() for n in names})
    for name in names:
        for p in (data.bench.image_path(data.root, name), data.bench.mask_path(data.root, name)):
            try:
                st = p.stat()
            except OSError as e:
                raise DatasetError(f"{p}: file of training image {name!r} (listed in "
                                   f"{', '.join(map(str, data.lists.files))}) cannot be read "
                                   f"({e.strerror or e})") from None
            h.update(f"{p.relative_to(data.root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def fingerprint(init: dict, data: TrainData, config: TrainConfig, processes: int) -> dict:
    """What makes the run's weights: compared field by field on every start."""
    return {"init": init, "benchmark": data.bench.name, "fold": data.fold, "lists_sha256": data.lists.digest(),
            "data_files": data_files_digest(data), "config": asdict(config), "processes": processes}


# Words for the fields of a fingerprint in a refusal.
_WHAT = {"init": "the initial model (--model)", "lists_sha256": "the list files (--lists)",
         "data_files": "the listed images or masks (name, size or modification time)",
         "processes": "the number of processes", "benchmark": "--benchmark", "fold": "--fold"}


def _differences(old, new, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += _differences(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    if old == new:
        return []
    key = prefix.rstrip(".")
    top = key.split(".")[0]
    if top == "config":
        return [f"--{key.split('.')[-1].replace('_', '-')} ({old!r} -> {new!r})"]
    return [_WHAT.get(top, key)]


def check_run_folder(out: Path, record: dict, resume: bool) -> str:
    """Whether ``out`` may hold this training: "start" (a new folder, or --resume of one
    that has no checkpoint yet), "resume" or "finished" (--resume of a finished run).
    Everything else is refused before the model loads: another fingerprint, a folder of
    checkpoints without train.json, or a second start without --resume."""
    out = Path(out)
    f = out / TRAIN_JSON
    latest = _latest_checkpoint(out) if out.is_dir() else None
    final = (out / FEWSHOT_JSON).is_file()
    if f.is_file():
        old = read_json(f, "training record")
        if not isinstance(old, dict) or old.get("version") != TRAIN_JSON_VERSION \
                or not isinstance(old.get("fingerprint"), dict):
            raise InputError(f"{f}: field 'fingerprint' (version {TRAIN_JSON_VERSION}) missing: not a training record "
                             "of this text2mask; use another --out")
        diff = _differences(old["fingerprint"], record["fingerprint"])
        if diff:
            raise ConfigMismatch(f"{out} holds a training of other inputs or settings (differs: {'; '.join(diff)}); "
                                 "it is never resumed or overwritten: use another --out")
    elif latest or final:
        raise ConfigMismatch(f"{out} holds checkpoints but no {TRAIN_JSON}: which inputs made them is unknown; "
                             "use another --out")
    if not resume:
        if final or latest:
            held = "a finished training" if final else f"checkpoint-{latest[0]}"
            raise ConfigMismatch(f"{out} already holds {held} of this configuration; pass --resume to continue it "
                                 "or use another --out")
        return "start"
    if final:
        return "finished"
    return "resume" if latest else "start"


def initial_model(init: str, device: str | None, fewshot: FewShotConfig, revision: str | None = None,
                  model_config: str | None = None, original_config: str | None = None) -> tuple[DiffewS, str]:
    """A few-shot checkpoint to fine-tune, or a base SD 2.x model (conv_in_ref from conv_in)."""
    from ..modeling.loading import load

    path = Path(init).expanduser()
    if (path / FEWSHOT_JSON).is_file():
        model = load_diffews(path, device=device, dtype="fp32", text_condition=fewshot.text_condition,
                             threshold=fewshot.threshold, trainable=True)
        return model, model.info["checkpoint"]["base_model"]
    sd = load(init, device=device, dtype="fp32", revision=revision, config=model_config,
              original_config=original_config)
    if sd.info.get("family", "sd2") != "sd2":
        log.warning(f"{init} is a {sd.info['family']} model; DiffewS is defined on SD 2.1")
    sd.unet.train().requires_grad_(True)
    conv = support_conv_in(sd.unet.conv_in).requires_grad_(True)
    return DiffewS(sd, DiffewsUNet(sd.unet, conv), fewshot), init


def train(init: str, data: TrainData, out: Path, config: TrainConfig, *, resume: bool = False,
          device: str | None = None, progress: bool = True, revision: str | None = None,
          model_config: str | None = None, original_config: str | None = None) -> list[float]:
    """Train and write the final checkpoint into ``out`` (our layout); returns this
    process's per-step losses (mean over the step's micro-batches; empty when --resume
    finds the training finished)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from diffusers.optimization import get_scheduler

    out = Path(out)
    accelerator = Accelerator(mixed_precision=config.mixed_precision, gradient_accumulation_steps=config.grad_accum,
                              cpu=device == "cpu", project_config=ProjectConfiguration(project_dir=str(out)))
    # 0. The fingerprint, checked against the folder before the model loads.
    record = {"version": TRAIN_JSON_VERSION,
              "fingerprint": fingerprint(init_identity(init, revision), data, config, accelerator.num_processes),
              "paths": {"init": str(init), "data_root": str(data.root), "lists": [str(f) for f in data.lists.files]}}
    state = check_run_folder(out, record, resume)
    if state == "finished":
        log.info(f"{out}: the training is finished (fewshot.json); nothing to do")
        return []
    if resume and state == "start":
        log.info(f"{out}: no checkpoint yet; starting at step 0")
    model, base = initial_model(init, str(accelerator.device), config.fewshot, revision, model_config, original_config)
    frozen = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision, torch.float32)
    model.sd.vae.to(dtype=frozen)
    model.sd.text_encoder.to(dtype=frozen)
    model.sd.dtype = frozen
    with torch.no_grad():
        model.text()
    model._text = model._text.float()

    # 1. Optimiser and schedule (stepped once per process per step, as accelerate expects).
    opt = torch.optim.AdamW(model.net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = get_scheduler("polynomial", opt, num_warmup_steps=0,
                          num_training_steps=config.steps * accelerator.num_processes, power=1.0)
    net, opt, sched = accelerator.prepare(model.net, opt, sched)

    # 2. Resume.
    start = 0
    if state == "resume":
        start, path = _latest_checkpoint(out)
        accelerator.load_state(str(path))
        log.info(f"resuming from {path} (step {start} of {config.steps})")
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / TRAIN_JSON, record)

    # 3. The steps.
    losses = []
    bar = progress_bar(total=config.steps, initial=start, unit="step", enabled=progress and accelerator.is_main_process)
    with stop_after_step(accelerator.num_processes == 1) as stop:
        for step in range(start, config.steps):
            step_loss = 0.0
            for micro in range(config.grad_accum):
                rng, g = step_generators(config.seed, step, micro, accelerator.process_index, accelerator.device)
                batch = draw_batch(data, rng, config.batch_size, config.max_shots, config.fewshot.resolution)
                with accelerator.accumulate(net), accelerator.autocast():
                    loss = episode_loss(model, net, batch, g)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(net.parameters(), config.max_grad_norm)
                    opt.step()
                    sched.step()
                    opt.zero_grad()
                step_loss += loss.item() / config.grad_accum
            check_finite(step + 1, step_loss, net)
            losses.append(step_loss)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{sched.get_last_lr()[0]:.2e}")
            done = step + 1
            if done % config.checkpoint_every == 0 and done < config.steps:
                _save_state(accelerator, out, done)
            elif stop.requested and done < config.steps:
                _save_state(accelerator, out, done)
            if stop.requested and done < config.steps:
                log.info(f"stopped after step {done} of {config.steps}; its checkpoint is kept: rerun with "
                         "--resume to continue")
                raise KeyboardInterrupt
    bar.close()

    # 4. The final checkpoint, in the layout ``fewshot evaluate`` loads.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = DiffewsUNet(accelerator.unwrap_model(net).unet, accelerator.unwrap_model(net).conv_in_ref)
        info = checkpoint_info(base, config.fewshot, benchmark=data.bench.name, fold=data.fold,
                               training_classes=sorted(data.lists.per_class), max_shots=config.max_shots,
                               source=f"trained by text2mask for {config.steps} steps")
        save_checkpoint(out, final, info)
        log.info(f"checkpoint written to {out}")
    return losses


def check_finite(step: int, loss: float, net) -> None:
    """TrainingDiverged (exit 1) when step ``step``'s loss or any parameter after its
    update is not finite: the step is never saved, the last checkpoint stays."""
    advice = "; nothing of it is saved (the last checkpoint stays): lower --lr, or use fp32/bf16"
    if not math.isfinite(loss):
        raise TrainingDiverged(f"training diverged at step {step}: the loss is {loss}{advice}")
    params = [p for p in net.parameters()]
    if not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
        name = next(n for n, p in net.named_parameters() if not bool(torch.isfinite(p).all()))
        raise TrainingDiverged(f"training diverged at step {step}: parameter {name} is not finite after the "
                               f"update{advice}")


def _save_state(accelerator, out: Path, step: int) -> None:
    path = out / f"checkpoint-{step}"
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        write_json(path / "step.json", {"step": step})   # last: marks the state as complete
