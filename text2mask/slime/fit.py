"""SLiMe optimisation (official ``Slime.training_step``; spec section 2).

1. Encode the prompt "part" x K and the empty prompt once. The learned parameters are the
   text-encoder OUTPUT rows 1..K-1 (one per part); row 0 (start of text) is the fixed
   background class; every later row stays as encoded.
2. Per step (batch 1): augment the image/mask pair, VAE posterior sample x scale, draw t
   uniformly from 5..100 and the noise, run the UNet on the empty prompt (no grad) and on
   the spliced prompt with the cross blocks 7-11 (logits of the K class tokens) and the
   self blocks 13-15 captured.
3. Losses on the self grid (``losses``): weighted CE of the layer-mean logits, K x MSE of
   WAS against the one-hot mask, and the guided SD loss; Adam (lr 0.1) on the rows.
4. After each epoch (every pair once, shuffled): with a validation pair, segment it
   (``segment``) and keep the rows of the best mean IoU (ties: the later epoch); a
   checkpoint of rows, optimiser and random state makes the fit resumable.
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigMismatch, InputError
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
    segment: S.SegmentSettings = field(default_factory=S.SegmentSettings)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Example:
    """One annotated photo: RGB uint8 (H, W, 3) and its index mask (H, W), values 0..K-1."""
    key: str
    rgb: np.ndarray
    mask: np.ndarray


@dataclass
class FitResult:
    cond: torch.Tensor             # (77, D) spliced
    uncond: torch.Tensor           # (77, D)
    best_epoch: int | None         # with a validation pair
    validation_iou: float | None   # percent
    history: list[dict]            # per step: epoch, ce, mse, sd, total, t


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


def training_pair(example: Example, canvas: int, settings: FitSettings,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The step's (image, mask) on the canvas: augmented, or only squashed."""
    if settings.augment:
        aug = AUG.Augmentation(min_crop=settings.min_crop, rotate=settings.rotate)
        return AUG.augment(example.rgb, example.mask, canvas, aug, rng)
    return AUG.square(example.rgb, example.mask, canvas)


def draw_step(sd, example: Example, settings: FitSettings, rng: np.random.Generator,
              gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """(z0, mask on the grid, t, noise) of one step; all draws from (rng, gen)."""
    canvas = settings.segment.canvas
    img, mask = training_pair(example, canvas, settings, rng)
    z0 = D.encode(sd, D.pixels(img)[None], gen)
    t = int(torch.randint(settings.t_min, settings.t_max + 1, (1,), generator=gen))
    noise = torch.randn(z0.shape, generator=gen).to(z0.device)
    return z0, mask_on_grid(mask, tuple(z0.shape[-2:])), t, noise


# -- 4. the loop -------------------------------------------------------------------------
def validation_iou(sd, cond: torch.Tensor, classes: int, example: Example, seg: S.SegmentSettings,
                   seed: int) -> float:
    """Mean IoU (percent) over the classes present in the validation mask, scored on the
    canvas (image and mask squashed to it) as the official ``validation_step`` does."""
    from ..evaluation.parts import image_ious

    img, mask = AUG.square(example.rgb, example.mask, seg.canvas)
    gen = torch.Generator().manual_seed(seed)
    labels = S.canvas_scores(sd, cond, classes, [D.pixels(img)], seg, [gen])[0].argmax(dim=0).numpy()
    return 100 * float(np.mean(list(image_ious(mask, labels, classes).values())))


def _fingerprint(sd, examples: Sequence[Example], validation: Example | None, classes: Sequence[str],
                 settings: FitSettings) -> dict:
    # Not the epoch count: a finished fit may be resumed to run longer.
    return {"classes": list(classes), "examples": [e.key for e in examples],
            "validation": validation.key if validation else None, "model": fitted_on(sd),
            "settings": {k: v for k, v in settings.to_dict().items() if k != "epochs"}}


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


def _save_state(path: Path, fingerprint: dict, state: _State) -> None:
    buf = io.BytesIO()
    # The numpy generator state holds 128-bit integers: stored as JSON text.
    torch.save({**{f.name: getattr(state, f.name) for f in fields(state)},
                "fingerprint": json.dumps(fingerprint, sort_keys=True),
                "numpy_rng": json.dumps(state.numpy_rng)}, buf)
    write_bytes(path, buf.getvalue())


def _load_state(path: Path, fingerprint: dict) -> _State:
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a bad file
        raise InputError(f"{path}: cannot read the fit checkpoint ({type(e).__name__}: {e})") from e
    if d.get("fingerprint") != json.dumps(fingerprint, sort_keys=True):
        raise ConfigMismatch(f"{path}: checkpoint of another fit (other images, classes, model or "
                             f"settings); delete it to start over")
    d.pop("fingerprint")
    d["numpy_rng"] = json.loads(d["numpy_rng"])
    return _State(**d)


def fit(sd, examples: Sequence[Example], classes: Sequence[str], settings: FitSettings,
        validation: Example | None = None, checkpoint: str | os.PathLike | None = None,
        progress: bool = True, on_step: Callable[[dict], None] | None = None) -> FitResult:
    """Optimise the part rows on ``examples`` (masks 0..K-1, K = len(classes))."""
    from accelerate import Accelerator

    from ..log import progress as progress_bar

    k = len(classes)
    cond0, uncond = initial_prompts(sd, k, settings.init_prompt)
    accelerator = Accelerator(cpu=sd.device.type == "cpu", mixed_precision=settings.mixed_precision)
    learned = torch.nn.Parameter(cond0[1:k].clone())
    optimizer = accelerator.prepare(torch.optim.Adam([learned], lr=settings.lr))
    gen = torch.Generator().manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    state = _State(0, learned.data, {}, gen.get_state(), rng.bit_generator.state, None, None, None, [])

    path = Path(checkpoint) if checkpoint else None
    fingerprint = _fingerprint(sd, examples, validation, classes, settings)
    if path is not None and path.is_file():
        state = _load_state(path, fingerprint)
        learned.data.copy_(state.learned)
        optimizer.load_state_dict(state.optimizer)
        gen.set_state(state.torch_rng)
        rng.bit_generator.state = state.numpy_rng
        log.info(f"resuming the fit after epoch {state.epoch} from {path}")

    total = settings.epochs * len(examples)
    bar = progress_bar(total=total, initial=state.epoch * len(examples), enabled=progress,
                       desc="fit", unit="step")
    for epoch in range(state.epoch, settings.epochs):
        for i in rng.permutation(len(examples)):
            z0, mask, t, noise = draw_step(sd, examples[i], settings, rng, gen)
            with accelerator.autocast():
                losses = step_losses(sd, splice(cond0, learned), uncond, k, z0, mask, t, noise, settings)
            optimizer.zero_grad()
            accelerator.backward(losses.total)
            optimizer.step()
            record = {"epoch": epoch, "t": t, **losses.numbers()}
            state.history.append(record)
            if on_step:
                on_step(record)
            bar.set_postfix({k_: f"{v:.4g}" for k_, v in record.items() if k_ in ("ce", "mse", "sd")})
            bar.update()
        if validation is not None:
            iou = validation_iou(sd, splice(cond0, learned.detach()), k, validation, settings.segment,
                                 image_seed(settings.seed, f"validation/{epoch}"))
            if state.best_iou is None or iou >= state.best_iou:
                state.best_epoch, state.best_iou, state.best_rows = epoch, iou, learned.detach().clone()
            bar.set_postfix({"val_iou": f"{iou:.1f}", "best": f"{state.best_iou:.1f}@{state.best_epoch}"})
        state.epoch = epoch + 1
        if path is not None:
            state.learned, state.optimizer = learned.detach().clone(), optimizer.state_dict()
            state.torch_rng, state.numpy_rng = gen.get_state(), rng.bit_generator.state
            _save_state(path, fingerprint, state)
    bar.close()
    rows = state.best_rows if state.best_rows is not None else learned.detach()
    return FitResult(splice(cond0, rows).detach(), uncond, state.best_epoch, state.best_iou, state.history)
