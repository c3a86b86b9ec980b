"""SLiMe optimisation (official ``Slime.training_step``; spec section 2).

1. Encode the prompt "part" x K and the empty prompt once. The learned parameters are the
   text-encoder OUTPUT rows 1..K-1 (one per part); row 0 (start of text) is the fixed
   background class; every later row stays as encoded.
2. Per step (batch 1): augment the image/mask pair (``augment``; the crop's focus class
   follows the official loader, ``augment.crop_focus``), VAE posterior sample x scale,
   draw t uniformly from 5..100 and the noise, run the UNet on the empty prompt (no grad)
   and on the spliced prompt with the cross blocks 7-11 (logits of the K class tokens)
   and the self blocks 13-15 captured.
3. Losses on the self grid (``losses``): weighted CE of the layer-mean logits, K x MSE of
   WAS against the one-hot mask, and the guided SD loss; Adam (lr 0.1) on the rows. A
   non-finite loss or row stops the fit (``TrainingDiverged``): nothing NaN is kept.
4. After each epoch (every pair once, shuffled) the validation pairs are segmented
   (``segment``, unaugmented) and the rows of the best mean IoU are kept (ties: the later
   epoch), as the official ``on_validation_epoch_end`` does. Without validation pairs the
   training pairs are the validation set, as the official 1-shot runs do
   (``--val_data_dir`` = ``--train_data_dir``). ``select="last"`` skips validation and
   keeps the last epoch instead.
5. A checkpoint (rows, optimiser, random state, history) after each epoch makes the fit
   resumable. Its fingerprint holds the content digests of every photo and mask, the
   class names, the model and every setting but the epoch count; a checkpoint of another
   fit is discarded with a warning naming what changed, never resumed.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError, InputError, TrainingDiverged
from ..io import write_bytes
from ..log import get
from ..modeling.capture import AttentionCapture
from ..modeling.latents import image_seed, q_sample
from . import augment as AUG
from . import diffusion as D
from . import losses as L
from . import maps as M
from . import segment as S
from .artifact import fitted_on

log = get(__name__)

INIT_WORD = "part"
SELECT_BEST = "best"     # the epoch of the best validation mIoU (official)
SELECT_LAST = "last"     # the last epoch, no validation
MIXED_PRECISION = ("no", "fp16", "bf16")
MAX_TIMESTEP = 999


@dataclass(frozen=True)
class FitSettings:
    epochs: int = 200
    lr: float = 0.1
    t_min: int = 5
    t_max: int = 100
    was_weight: float = 1.0
    sd_weight: float = 0.005
    guidance: float = 100.0
    augment: bool = True
    min_crop: float = 0.6
    rotate: float = 30.0
    init_prompt: str | None = None    # default "part" x K
    seed: int = 0
    mixed_precision: str = "no"       # no | fp16 | bf16 (accelerate autocast, GPU)
    select: str = SELECT_BEST         # best (validated, official) | last
    segment: S.SegmentSettings = field(default_factory=S.SegmentSettings)

    def to_dict(self) -> dict:
        return asdict(self)

    def check(self) -> "FitSettings":
        """ConfigError (exit 2) naming the option of the first setting out of range."""
        finite = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)  # noqa: E731
        rules = [
            ("--epochs", self.epochs, isinstance(self.epochs, int) and self.epochs >= 1, "an integer >= 1"),
            ("--lr", self.lr, finite(self.lr) and self.lr > 0, "a finite number > 0"),
            ("--t-range", (self.t_min, self.t_max),
             isinstance(self.t_min, int) and isinstance(self.t_max, int)
             and 0 <= self.t_min <= self.t_max <= MAX_TIMESTEP, f"0 <= low <= high <= {MAX_TIMESTEP}"),
            ("--was-weight", self.was_weight, finite(self.was_weight) and self.was_weight >= 0, "finite and >= 0"),
            ("--sd-weight", self.sd_weight, finite(self.sd_weight) and self.sd_weight >= 0, "finite and >= 0"),
            ("--guidance", self.guidance, finite(self.guidance), "a finite number"),
            ("--min-crop", self.min_crop, finite(self.min_crop) and 0 < self.min_crop <= 1, "in (0, 1]"),
            ("--rotate", self.rotate, finite(self.rotate) and 0 <= self.rotate <= 180, "in [0, 180] degrees"),
            ("--mixed-precision", self.mixed_precision, self.mixed_precision in MIXED_PRECISION,
             " or ".join(MIXED_PRECISION)),
            ("--select", self.select, self.select in (SELECT_BEST, SELECT_LAST), f"{SELECT_BEST} or {SELECT_LAST}"),
        ]
        for option, value, ok, want in rules:
            if not ok:
                shown = " ".join(map(str, value)) if isinstance(value, tuple) else value
                raise ConfigError(f"{option} {shown}: must be {want}")
        self.segment.check()
        return self


@dataclass
class Example:
    """One annotated photo: RGB uint8 (H, W, 3) and its index mask (H, W), values 0..K-1.
    ``digest``: sha256 of the photo file and of the mask file when read from files
    (``examples.read_example``); else the fingerprint digests the arrays."""
    key: str
    rgb: np.ndarray
    mask: np.ndarray
    digest: str | None = None

    def content_digest(self) -> str:
        if self.digest:
            return self.digest
        h = hashlib.sha256()
        for a in (self.rgb, self.mask):
            h.update(repr((a.shape, str(a.dtype))).encode())
            h.update(np.ascontiguousarray(a).tobytes())
        return "arrays:" + h.hexdigest()


@dataclass
class FitResult:
    cond: torch.Tensor             # (77, D) spliced
    uncond: torch.Tensor           # (77, D)
    best_epoch: int | None         # 0-based; None with select="last"
    validation_iou: float | None   # percent
    history: list[dict]            # per step: epoch, t, focus, ce, mse, sd, total
    epochs: list[dict] = field(default_factory=list)   # per epoch: loss means, validation_iou


# -- 1. prompts --------------------------------------------------------------------------
def initial_prompts(sd, classes: int, init_prompt: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond, uncond): "part" x K and the empty prompt, (77, D) each."""
    return D.encode_prompt(sd, init_prompt or " ".join([INIT_WORD] * classes)), D.encode_prompt(sd, "")


def splice(cond: torch.Tensor, learned: torch.Tensor) -> torch.Tensor:
    """cond with rows 1..K-1 replaced by ``learned`` (K-1, D); differentiable."""
    return torch.cat([cond[:1], learned.to(cond.dtype), cond[1 + learned.shape[0]:]])


# -- 2. one step's draws -----------------------------------------------------------------
def mask_on_grid(mask: np.ndarray, grid: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour mask on the loss grid (F.interpolate 'nearest', as the official)."""
    m = torch.from_numpy(np.array(mask, dtype=np.float32))[None, None]
    return F.interpolate(m, size=grid, mode="nearest")[0, 0].long()


# -- 3. one step -------------------------------------------------------------------------
def step_losses(sd, cond: torch.Tensor, uncond: torch.Tensor, classes: int, z0: torch.Tensor,
                mask: torch.Tensor, t: int, noise: torch.Tensor, settings: FitSettings) -> L.Losses:
    """Losses of one step; ``mask`` (H, W) on the self grid, z0 and noise (1, 4, h, w).

    The official code runs [uncond, cond] as one batch. The unconditional prediction does
    not depend on the learned rows, so it runs here without autograd and the captured,
    differentiable call holds only the conditional row: the same losses and gradients
    with half the saved activations."""
    alpha_bar = sd.alphas_cumprod[t].to(z0.device, torch.float32)
    z_t = q_sample(z0, alpha_bar, noise).to(sd.dtype)
    timestep = torch.tensor(t, device=sd.device)
    with torch.no_grad():
        pred_uncond = sd.unet(z_t, timestep, encoder_hidden_states=uncond[None].to(sd.dtype)).sample
    with AttentionCapture(sd.unet, M.CROSS_BLOCKS, M.SELF_BLOCKS, cross_logits_tokens=range(classes),
                          stop_early=False) as cap:
        maps = cap.run(z_t, timestep, cond[None].to(sd.dtype))
    logits = M.training_cross([maps.cross_logits[b][0] for b in M.CROSS_BLOCKS], maps.grid)
    mask = mask.to(logits.device)
    ce = L.cross_entropy(logits, mask)
    mse = L.was_mse(M.was(maps.self_attn[0], M.k_way_softmax(logits)), mask)
    target = L.sd_target(sd.prediction_type, noise, z0, alpha_bar)
    sd_l = L.sd_loss(pred_uncond, maps.output, target, settings.guidance)
    return L.combine(ce, mse, sd_l, settings.was_weight, settings.sd_weight)


def training_pair(example: Example, canvas: int, settings: FitSettings, rng: np.random.Generator,
                  focus: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The step's (image, mask) on the canvas: augmented (crop around class ``focus``),
    or only squashed."""
    if settings.augment:
        aug = AUG.Augmentation(min_crop=settings.min_crop, rotate=settings.rotate, focus_class=focus)
        return AUG.augment(example.rgb, example.mask, canvas, aug, rng)
    return AUG.square(example.rgb, example.mask, canvas)


def draw_step(sd, example: Example, settings: FitSettings, rng: np.random.Generator,
              gen: torch.Generator, focus: int = 0) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """(z0, mask on the grid, t, noise) of one step; all draws from (rng, gen)."""
    canvas = settings.segment.canvas
    img, mask = training_pair(example, canvas, settings, rng, focus)
    z0 = D.encode(sd, D.pixels(img)[None], gen)
    t = int(torch.randint(settings.t_min, settings.t_max + 1, (1,), generator=gen))
    noise = torch.randn(z0.shape, generator=gen).to(z0.device)
    return z0, mask_on_grid(mask, tuple(z0.shape[-2:])), t, noise


# -- 4. validation -----------------------------------------------------------------------
def validation_iou(sd, cond: torch.Tensor, classes: int, example: Example, seg: S.SegmentSettings,
                   seed: int) -> float:
    """Mean IoU (percent) over the classes present in the validation mask, scored on the
    canvas (image and mask squashed to it, unaugmented) as the official
    ``validation_step`` does. ``example.rgb`` is already in the fed channel order."""
    from ..evaluation.parts import image_ious

    img, mask = AUG.square(example.rgb, example.mask, seg.canvas)
    gen = torch.Generator().manual_seed(seed)
    labels = S.canvas_scores(sd, cond, classes, [D.pixels(img)], seg, [gen])[0].argmax(dim=0).numpy()
    return 100 * float(np.mean(list(image_ious(mask, labels, classes).values())))


def epoch_validation(sd, cond: torch.Tensor, classes: int, pairs: Sequence[Example], seg: S.SegmentSettings,
                     seed: int, epoch: int) -> float:
    """The official epoch score: the mean over the validation pairs of their mean IoU."""
    return float(np.mean([validation_iou(sd, cond, classes, v, seg, image_seed(seed, f"validation/{epoch}/{v.key}"))
                          for v in pairs]))


# -- 5. checkpoint -----------------------------------------------------------------------
def fingerprint(sd, examples: Sequence[Example], validation: Sequence[Example] | None,
                classes: Sequence[str], settings: FitSettings) -> dict:
    """What a checkpoint must match to be resumed. Not the epoch count: an interrupted fit
    may be resumed to run longer (the epochs already run do not depend on it)."""
    pairs = lambda xs: None if xs is None else [[e.key, e.content_digest()] for e in xs]  # noqa: E731
    return {"classes": list(classes), "examples": pairs(examples), "validation": pairs(validation),
            "model": fitted_on(sd), "settings": {k: v for k, v in settings.to_dict().items() if k != "epochs"}}


def differences(old: dict, new: dict) -> list[str]:
    """Readable names of what differs between two fingerprints."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if key in ("examples", "validation") and isinstance(a, list) and isinstance(b, list) \
                and [x[0] for x in a] == [x[0] for x in b]:
            out += [f"the content of {key[:-1] if key == 'examples' else key} pair {x[0]!r}"
                    for x, y in zip(a, b) if x != y]
        elif key == "settings" and isinstance(a, dict) and isinstance(b, dict):
            out += [f"setting {k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        else:
            out.append(key)
    return out


@dataclass
class _State:
    """Everything a resumed fit needs, saved after each epoch."""
    epoch: int
    learned: torch.Tensor
    optimizer: dict
    torch_rng: torch.Tensor
    numpy_rng: dict
    best_epoch: int | None
    best_iou: float | None
    best_rows: torch.Tensor | None
    history: list
    epochs: list


def _save_state(path: Path, fp: dict, state: _State) -> None:
    buf = io.BytesIO()
    # The numpy generator state holds 128-bit integers: stored as JSON text, as are the
    # fingerprint and the history.
    torch.save({**{f.name: getattr(state, f.name) for f in fields(state)},
                "fingerprint": json.dumps(fp, sort_keys=True), "numpy_rng": json.dumps(state.numpy_rng),
                "history": json.dumps(state.history), "epochs": json.dumps(state.epochs)}, buf)
    write_bytes(path, buf.getvalue())


def _checkpoint_error(path: Path, what: str) -> InputError:
    return InputError(f"{path}: not a usable SLiMe fit checkpoint ({what}); pass --restart to discard it")


def _load_state(path: Path, classes: int, width: int) -> tuple[dict, _State]:
    """(fingerprint, state) of a checkpoint file, schema-checked: exit 2 naming the field."""
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a bad file
        raise _checkpoint_error(path, f"{type(e).__name__}: {e}") from e
    names = {f.name for f in fields(_State)} | {"fingerprint"}
    if not isinstance(d, dict) or set(d) != names:
        raise _checkpoint_error(path, "unexpected content")
    try:
        fp = json.loads(d.pop("fingerprint"))
        for key in ("numpy_rng", "history", "epochs"):
            d[key] = json.loads(d[key])
    except (TypeError, ValueError) as e:
        raise _checkpoint_error(path, f"fingerprint or history: {e}") from e
    shape = (classes - 1, width)

    def rows_ok(t):
        return isinstance(t, torch.Tensor) and tuple(t.shape) == shape and bool(torch.isfinite(t).all())

    checks = {
        "epoch": isinstance(d["epoch"], int) and d["epoch"] >= 0,
        "learned": rows_ok(d["learned"]),
        "optimizer": isinstance(d["optimizer"], dict),
        "torch_rng": isinstance(d["torch_rng"], torch.Tensor),
        "numpy_rng": isinstance(d["numpy_rng"], dict),
        "best_epoch": d["best_epoch"] is None or isinstance(d["best_epoch"], int),
        "best_iou": d["best_iou"] is None or (isinstance(d["best_iou"], float) and math.isfinite(d["best_iou"])),
        "best_rows": d["best_rows"] is None or rows_ok(d["best_rows"]),
        "history": isinstance(d["history"], list),
        "epochs": isinstance(d["epochs"], list) and len(d["epochs"]) == d["epoch"],
    }
    bad = [k for k, ok in checks.items() if not ok]
    if bad:
        raise _checkpoint_error(path, f"field {bad[0]} is missing, malformed or not finite")
    return fp, _State(**d)


# -- 6. the loop -------------------------------------------------------------------------
def _diverged(what: str, epoch: int, position: int, settings: FitSettings, path: Path | None,
              state: _State) -> TrainingDiverged:
    kept = (f"; the checkpoint {path} (after epoch {state.epoch}) is kept" if path is not None and path.is_file()
            else "")
    return TrainingDiverged(f"the fit diverged at epoch {epoch + 1}, step {position + 1}: {what} is not finite "
                            f"(--lr {settings.lr:g} is too large?); no parts file is written{kept}")


def fit(sd, examples: Sequence[Example], classes: Sequence[str], settings: FitSettings,
        validation: Example | Sequence[Example] | None = None, checkpoint: str | os.PathLike | None = None,
        progress: bool = True, on_step: Callable[[dict], None] | None = None,
        restart: bool = False) -> FitResult:
    """Optimise the part rows on ``examples`` (masks 0..K-1, K = len(classes)).

    ``validation``: pairs to select the epoch by; None = the training pairs (official
    1-shot protocol), unless ``settings.select == "last"``. ``checkpoint``: resume from and
    save to this file; ``restart`` discards a kept one first."""
    from accelerate import Accelerator

    from ..log import progress as progress_bar

    settings.check()
    k = len(classes)
    if isinstance(validation, Example):
        validation = [validation]
    given_validation = list(validation) if validation else None
    path = Path(checkpoint) if checkpoint else None
    fp = fingerprint(sd, examples, given_validation, classes, settings)
    bgr = settings.segment.bgr
    train = [replace(e, rgb=S.channels(e.rgb, bgr)) for e in examples]
    if settings.select == SELECT_LAST:
        val_pairs: list[Example] = []
    else:
        val_pairs = [replace(e, rgb=S.channels(e.rgb, bgr)) for e in given_validation] if given_validation else train

    cond0, uncond = initial_prompts(sd, k, settings.init_prompt)
    accelerator = Accelerator(cpu=sd.device.type == "cpu", mixed_precision=settings.mixed_precision)
    learned = torch.nn.Parameter(cond0[1:k].clone())
    optimizer = accelerator.prepare(torch.optim.Adam([learned], lr=settings.lr))
    gen = torch.Generator().manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    state = _State(0, learned.data, {}, gen.get_state(), rng.bit_generator.state, None, None, None, [], [])

    if path is not None and path.is_file():
        if restart:
            log.info(f"--restart: discarding the checkpoint {path}")
            path.unlink()
        else:
            old_fp, kept = _load_state(path, k, learned.shape[1])
            changed = differences(old_fp, fp)
            if changed:
                log.warning(f"{path}: checkpoint of another fit ({', '.join(changed)} changed); starting over")
            elif kept.epoch > settings.epochs:
                raise ConfigError(f"{path}: the kept checkpoint has run {kept.epoch} epochs, more than --epochs "
                                  f"{settings.epochs}; pass --epochs {kept.epoch} or more, or --restart")
            else:
                state = kept
                learned.data.copy_(state.learned)
                optimizer.load_state_dict(state.optimizer)
                gen.set_state(state.torch_rng)
                rng.bit_generator.state = state.numpy_rng
                log.info(f"resuming the fit after epoch {state.epoch} from {path}")

    bar = progress_bar(total=settings.epochs * len(train), initial=state.epoch * len(train), enabled=progress,
                       desc="fit", unit="step")
    for epoch in range(state.epoch, settings.epochs):
        steps = []
        for position, i in enumerate(rng.permutation(len(train))):
            focus = AUG.crop_focus(position, k)
            z0, mask, t, noise = draw_step(sd, train[i], settings, rng, gen, focus)
            with accelerator.autocast():
                losses = step_losses(sd, splice(cond0, learned), uncond, k, z0, mask, t, noise, settings)
            record = {"epoch": epoch, "t": t, "focus": focus, **losses.numbers()}
            if not all(math.isfinite(v) for v in record.values()):
                bad = next(n for n in ("ce", "mse", "sd", "total") if not math.isfinite(record[n]))
                raise _diverged(f"the {bad} loss", epoch, position, settings, path, state)
            optimizer.zero_grad()
            accelerator.backward(losses.total)
            optimizer.step()
            if not bool(torch.isfinite(learned).all()):
                raise _diverged("a learned row", epoch, position, settings, path, state)
            steps.append(record)
            if on_step:
                on_step(record)
            bar.set_postfix({k_: f"{v:.4g}" for k_, v in record.items() if k_ in ("ce", "mse", "sd")})
            bar.update()
        iou = None
        if val_pairs:
            iou = epoch_validation(sd, splice(cond0, learned.detach()), k, val_pairs, settings.segment,
                                   settings.seed, epoch)
            if state.best_iou is None or iou >= state.best_iou:
                state.best_epoch, state.best_iou, state.best_rows = epoch, iou, learned.detach().clone()
            bar.set_postfix({"val_iou": f"{iou:.1f}", "best": f"{state.best_iou:.1f}@{state.best_epoch}"})
        state.history += steps
        state.epochs.append({"epoch": epoch, "steps": len(steps),
                             **{n: float(np.mean([s[n] for s in steps])) for n in ("ce", "mse", "sd", "total")},
                             "validation_iou": iou})
        state.epoch = epoch + 1
        if path is not None:
            state.learned, state.optimizer = learned.detach().clone(), optimizer.state_dict()
            state.torch_rng, state.numpy_rng = gen.get_state(), rng.bit_generator.state
            _save_state(path, fp, state)
    bar.close()
    rows = state.best_rows if state.best_rows is not None else learned.detach()
    return FitResult(splice(cond0, rows).detach(), uncond, state.best_epoch, state.best_iou, state.history,
                     state.epochs)


def history_document(result: FitResult, classes: Sequence[str], settings: FitSettings,
                     validation: str) -> dict:
    """The ``<parts>.history.json`` document: per epoch the mean losses and the validation
    mIoU, the selected epoch, and every step's draws and losses."""
    return {"classes": list(classes), "select": settings.select, "validation": validation,
            "best_epoch": result.best_epoch, "validation_iou": result.validation_iou,
            "epochs": result.epochs, "steps": result.history}
