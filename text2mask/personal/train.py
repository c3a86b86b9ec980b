"""The built-in Custom Diffusion trainer (``text2mask personalize``), defaults = the
diffusers README single-concept recipe (PERSONALIZED.md §2).

Trained: the new token's embedding row (the rest of the table is untouched by
construction: the row is its own parameter, substituted where the token occurs) and
``attn2.to_k``/``to_v`` of every transformer block (``freeze="crossattn"`` adds ``to_q``
and ``to_out.0``). Loss: ε-MSE (v-MSE for a v-prediction model) at t ~ U{0..999},

    L = Σ_cells m·‖ε − ε_θ(z_t, t, c)‖² / Σ_cells m  +  λ · ‖ε' − ε_θ(z'_t, t', c_class)‖²  (prior)

with m the valid latent cells of an augmented instance photo (a shrunk photo pasted on
black: the pasted area less one cell per side). AdamW, lr = base_lr × batch × processes ×
accumulation (× 2 with prior), constant, grad clip 1.0. Runs under 🤗 accelerate (fp16 /
bf16 autocast; ``accelerate launch`` for several GPUs); checkpoints with
``Accelerator.save_state`` and resumes from the newest. Writes format A + concept.json.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import InputError
from ..io import image_files, read_image
from ..log import get, progress
from .concept import KV_PARAMS, Q_OUT_PARAMS, add_tokens, save_concept

log = get(__name__)
CHECKPOINT_PREFIX = "step-"


@dataclass
class TrainConfig:
    class_name: str
    token: str = "<new1>"
    init_token: str = "ktn"
    size: int = 512
    batch_size: int = 2
    steps: int | None = None            # None: 250 on several processes, 500 on one (the README's 2-GPU run)
    base_lr: float = 1e-5
    scale_lr: bool = True
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-2
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    accumulation: int = 1
    freeze: str = "crossattn_kv"        # crossattn_kv: K/V; crossattn: also Q and out
    augment: bool = True
    prior_weight: float = 1.0
    mixed_precision: str = "no"         # no | fp16 | bf16
    checkpoint_every: int = 250
    seed: int = 0
    instance_prompt: str = field(default="", init=False)

    def __post_init__(self):
        if self.freeze not in ("crossattn_kv", "crossattn"):
            raise InputError(f"freeze must be crossattn_kv or crossattn, got {self.freeze!r}")
        if self.size % 8:
            raise InputError(f"size must be a multiple of 8 (the VAE's factor), got {self.size}")
        self.instance_prompt = f"photo of a {self.token} {self.class_name}"


# -- data ------------------------------------------------------------------------------------
def _square(img: Image.Image, side: int) -> Image.Image:
    return img.resize((side, side), Image.BILINEAR)


def augment(rgb: np.ndarray, size: int, rng: random.Random) -> tuple[np.ndarray, np.ndarray, str]:
    """One augmented instance photo: (size, size, 3) uint8, its (size/8, size/8) loss mask
    and the prompt prefix (diffusers' Custom Diffusion recipe)."""
    img = Image.fromarray(rgb)
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    cells = size // 8
    mask = np.ones((cells, cells), np.float32)
    if rng.random() < 0.66:
        scale = rng.randint(size // 3, size)
        canvas = np.zeros((size, size, 3), np.uint8)
        y, x = rng.randint(0, size - scale), rng.randint(0, size - scale)
        canvas[y:y + scale, x:x + scale] = np.asarray(_square(img, scale))
        mask[:] = 0
        # the pasted area less one latent cell per side: edge cells mix photo and black
        mask[y // 8 + 1:(y + scale) // 8 - 1, x // 8 + 1:(x + scale) // 8 - 1] = 1
        prefix = rng.choice(["a far away ", "very small "]) if scale < 0.6 * size else ""
        return canvas, mask, prefix
    scale = rng.randint(int(1.2 * size), int(1.4 * size))
    big = np.asarray(_square(img, scale))
    y, x = rng.randint(0, scale - size), rng.randint(0, scale - size)
    return np.ascontiguousarray(big[y:y + size, x:x + size]), mask, rng.choice(["zoomed in ", "close up "])


def _to_tensor(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 127.5 - 1.0


class ConceptPhotos(torch.utils.data.Dataset):
    """Instance photos (augmented) and, with prior preservation, class photos; an epoch
    is long enough that the loader never runs dry before ``steps``."""

    def __init__(self, photos: Sequence[np.ndarray], class_photos: Sequence[np.ndarray], cfg: TrainConfig,
                 length: int):
        self.photos, self.class_photos, self.cfg, self.length = list(photos), list(class_photos), cfg, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        cfg = self.cfg
        rng = random.Random(cfg.seed * 1_000_003 + i)
        rgb = self.photos[i % len(self.photos)]
        if cfg.augment:
            img, mask, prefix = augment(rgb, cfg.size, rng)
        else:
            img, mask, prefix = np.asarray(_square(Image.fromarray(rgb), cfg.size)), np.ones((cfg.size // 8,) * 2, np.float32), ""
        item = {"pixels": _to_tensor(img), "mask": torch.from_numpy(mask), "prompt": prefix + cfg.instance_prompt}
        if self.class_photos:
            item["class_pixels"] = _to_tensor(np.asarray(_square(Image.fromarray(
                self.class_photos[i % len(self.class_photos)]), cfg.size)))
        return item


def _collate(items: list[dict]) -> dict:
    out = {"prompt": [x["prompt"] for x in items]}
    for k in ("pixels", "mask", "class_pixels"):
        if k in items[0]:
            out[k] = torch.stack([x[k] for x in items])
    return out


def read_photos(paths: Sequence[Path], what: str) -> list[np.ndarray]:
    files = []
    for p in map(Path, paths):
        files += image_files(p) if p.is_dir() else [p]
    if not files:
        raise InputError(f"no {what} photos found in {', '.join(map(str, paths))}")
    return [read_image(f) for f in files]


# -- model -----------------------------------------------------------------------------------
def trained_names(unet, freeze: str) -> list[str]:
    """Parameter names trained: attn2 K/V (and Q/out) of every transformer block."""
    params = KV_PARAMS + (Q_OUT_PARAMS if freeze == "crossattn" else ())
    return [n for n, _ in unet.named_parameters() if ".attn2." in n and n.endswith(params)]


class Personalizer(torch.nn.Module):
    """The trained model in one module (so that accelerate/DDP sees every trained
    tensor): the token's row as its own parameter, substituted into the frozen text
    encoder's token embeddings wherever the token's id occurs, and the UNet."""

    def __init__(self, sd, token_id: int, init_row: torch.Tensor):
        super().__init__()
        self.unet, self.text_encoder = sd.unet, sd.text_encoder
        self.token_id = token_id
        self.row = torch.nn.Parameter(init_row.detach().clone().float())
        # removed by ``close``: the hook must not outlive the training run
        self._hook = sd.text_encoder.get_input_embeddings().register_forward_hook(self._substitute)

    def _substitute(self, module, inputs, output):
        hit = (inputs[0] == self.token_id)[..., None]
        return torch.where(hit, self.row.to(output.dtype), output)

    def close(self) -> None:
        self._hook.remove()

    def forward(self, latents, timesteps, ids):
        text = self.text_encoder(ids)[0]
        return self.unet(latents, timesteps, encoder_hidden_states=text).sample


def _learning_rate(cfg: TrainConfig, processes: int, prior: bool) -> float:
    if not cfg.scale_lr:
        return cfg.base_lr
    return cfg.base_lr * cfg.batch_size * processes * cfg.accumulation * (2 if prior else 1)


def _checkpoints(folder: Path) -> list[tuple[int, Path]]:
    if not folder.is_dir():
        return []
    found = [(int(p.name[len(CHECKPOINT_PREFIX):]), p) for p in folder.iterdir()
             if p.name.startswith(CHECKPOINT_PREFIX) and p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return sorted(found)


def train_concept(sd, photos: Sequence[Path], out: Path, cfg: TrainConfig, class_photos: Sequence[Path] = (),
                  resume: bool = True, show_progress: bool = True) -> Path:
    """Train a concept on ``photos`` and write it to ``out`` (format A + concept.json).
    Checkpoints go to ``<out>-checkpoints/step-N`` (the newest is resumed from)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    acc = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.accumulation,
                      cpu=sd.device.type == "cpu")
    set_seed(cfg.seed)
    instance = read_photos(photos, "instance")
    prior = read_photos(class_photos, "class") if class_photos else []
    if not prior:
        log.warning("no class images (--class-images): training without prior preservation")
    steps = cfg.steps or (500 if acc.num_processes == 1 else 250)

    # 1. The token, its initial row and the trained tensors.
    # A vocabulary entry as such (diffusers' script looked "ktn" up this way: the sub-word piece, id 42170),
    # else a word that tokenizes to one token.
    vocab = sd.tokenizer.get_vocab()
    init_ids = [vocab[cfg.init_token]] if cfg.init_token in vocab else \
        sd.tokenizer(cfg.init_token, add_special_tokens=False).input_ids
    if len(init_ids) != 1:
        raise InputError(f"initializer {cfg.init_token!r} must be one token (it is {len(init_ids)})")
    (token_id,) = add_tokens(sd, [cfg.token])
    table = sd.text_encoder.get_input_embeddings().weight
    model = Personalizer(sd, token_id, table[init_ids[0]])
    model.requires_grad_(False)
    names = trained_names(sd.unet, cfg.freeze)
    params = dict(sd.unet.named_parameters())
    for n in names:
        params[n].requires_grad_(True)
    model.row.requires_grad_(True)

    try:
        return _fit(sd, model, acc, instance, prior, names, params, steps, out, cfg, resume, show_progress)
    finally:
        model.close()
        for n in names:
            params[n].requires_grad_(False)


def _fit(sd, model, acc, instance, prior, names, params, steps, out, cfg, resume, show_progress) -> Path:
    trained = [model.row] + [params[n] for n in names]
    # 2. Optimizer, data, accelerate.
    lr = _learning_rate(cfg, acc.num_processes, bool(prior))
    opt = torch.optim.AdamW(trained, lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay, eps=cfg.eps)
    data = ConceptPhotos(instance, prior, cfg, steps * cfg.batch_size * cfg.accumulation * acc.num_processes)
    loader = torch.utils.data.DataLoader(data, batch_size=cfg.batch_size, shuffle=False, collate_fn=_collate)
    model, opt, loader = acc.prepare(model, opt, loader)

    # The iterator draws its base seed from the global RNG: made before a checkpoint restores that RNG.
    batches = iter(loader)
    checkpoints = Path(f"{out}-checkpoints")
    start = 0
    found = _checkpoints(checkpoints) if resume else []
    if found:
        start, path = found[-1]
        acc.load_state(str(path))
        log.info(f"resumed from {path} (step {start})")

    # 3. The loop.
    sd.vae.requires_grad_(False)
    alphas = sd.alphas_cumprod.to(acc.device, torch.float32)
    v_pred = sd.prediction_type == "v_prediction"
    bar = progress(total=steps, initial=start, enabled=show_progress and acc.is_main_process, desc="personalize",
                   unit="step")
    for _ in range(start * cfg.accumulation):   # the data already seen before the checkpoint
        next(batches)
    step = start
    while step < steps:
        for _ in range(cfg.accumulation):
            batch = next(batches)
            with acc.accumulate(model):
                loss = _loss(model, sd, batch, alphas, v_pred, cfg)
                acc.backward(loss)
                if acc.sync_gradients:
                    acc.clip_grad_norm_(trained, cfg.max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < steps:
            acc.save_state(str(checkpoints / f"{CHECKPOINT_PREFIX}{step}"))
    bar.close()
    acc.wait_for_everyone()

    # 4. Write format A + concept.json (main process).
    if acc.is_main_process:
        unwrapped = acc.unwrap_model(model)
        attn2 = {n: params[n].detach().float().cpu() for n in names}
        info = {"class": cfg.class_name, "base_model": {k: v for k, v in sd.info.items() if k != "device"},
                "settings": {**asdict(cfg), "steps": steps, "learning_rate": lr, "processes": acc.num_processes,
                             "prior_preservation": bool(prior), "instance_photos": len(instance)}}
        save_concept(out, [cfg.token], unwrapped.row.detach().float().cpu()[None], attn2, info)
    acc.wait_for_everyone()
    return out


def _loss(model, sd, batch, alphas, v_pred, cfg: TrainConfig) -> torch.Tensor:
    device = alphas.device
    pixels, prompts = batch["pixels"], list(batch["prompt"])
    mask = batch["mask"].to(device)
    n = len(pixels)
    if "class_pixels" in batch:
        pixels = torch.cat([pixels, batch["class_pixels"]])
        prompts += [cfg.class_name] * n
    with torch.no_grad():
        z = sd.vae.encode(pixels.to(device, sd.vae.dtype)).latent_dist.sample() * sd.latent_scale
    z = z.float()
    noise = torch.randn_like(z)
    t = torch.randint(0, len(alphas), (len(z),), device=device)
    a = alphas[t].view(-1, 1, 1, 1)
    z_t = a.sqrt() * z + (1 - a).sqrt() * noise
    target = a.sqrt() * noise - (1 - a).sqrt() * z if v_pred else noise
    ids = sd.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    pred = model(z_t.to(sd.unet.dtype), t, ids.to(device)).float()
    err = (pred - target) ** 2
    m = mask[:, None].expand_as(err[:n])
    loss = ((err[:n] * m).sum(dim=(1, 2, 3)) / m.sum(dim=(1, 2, 3)).clamp_min(1)).mean()
    if len(pred) > n:
        loss = loss + cfg.prior_weight * err[n:].mean()
    return loss
