"""The built-in Custom Diffusion trainer (``text2mask personalize``), defaults = the
diffusers README single-concept recipe (PERSONALIZED.md §2; docs/personalized.md).

Trained: the new token's embedding row (the rest of the table is untouched by
construction: the row is its own parameter, substituted where the token occurs) and
``attn2.to_k``/``to_v`` of every transformer block (``freeze="crossattn"`` adds ``to_q``
and ``to_out.0``). Loss: ε-MSE (v-MSE for a v-prediction model) at t ~ U{0..999},

    L = mean_b [ Σ_{c,cells} m·(ε − ε_θ(z_t, t, c))² / Σ_cells m ]  +  λ · mean (ε' − ε_θ(z'_t, t', c_class))²  (prior)

with m the valid latent cells of an augmented instance photo (a shrunk photo pasted on
black: the pasted area less one cell per side), counted on one channel as diffusers'
``train_custom_diffusion.py`` does (the 4 latent channels are summed, not averaged).
AdamW, lr = base_lr × batch × processes × accumulation (× 2 with prior), constant, grad
clip 1.0. Runs under 🤗 accelerate (fp16 / bf16 autocast; ``accelerate launch`` for
several GPUs). Writes format A + concept.json.

Determinism and resume: every random draw of step s (the VAE posterior sample, the noise,
the timesteps) comes from a generator seeded by (seed, s, micro-batch, process), and each
augmented photo from (seed, its index); nothing is drawn from global RNG state. A
checkpoint ``<out>-checkpoints/step-N`` holds the trained tensors, the optimizer state
and the fingerprint of the inputs (every photo's sha256, class, token, settings, model);
a run resumes only from a checkpoint of the same fingerprint, and then ends bitwise where
an uninterrupted run ends (same process count). The model's own K/V are restored after
training.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import ConfigError, InputError, TrainingDiverged
from ..guard import safe_name
from ..io import image_files, read_image, write_bytes, write_json
from ..log import get, progress
from ..modeling.latents import image_seed, latent_sample, posterior, q_sample
from ..runs.interrupt import stop_after_step
from .concept import KV_PARAMS, Q_OUT_PARAMS, add_tokens, save_concept

log = get(__name__)
CHECKPOINT_PREFIX = "step-"
CHECKPOINT_STATE = "trained.safetensors"
CHECKPOINT_OPTIMIZER = "optimizer.pt"
CHECKPOINT_JSON = "checkpoint.json"
ROW_KEY = "token_row"
FREEZE_MODES = ("crossattn_kv", "crossattn")
MIXED_PRECISION = ("no", "fp16", "bf16")
# Settings that do not change what is trained (a checkpoint of step N serves any --steps >= N:
# the learning rate is constant and every draw depends only on (seed, step)).
NOT_TRAJECTORY = ("steps", "checkpoint_every")


def default_steps(processes: int) -> int:
    """The diffusers README's 250 steps on 2 GPUs; 500 on one (the same number of photos seen)."""
    return 500 if processes == 1 else 250


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
        """Every option range, before any work (exit 2 naming the option)."""
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        need(self.freeze in FREEZE_MODES, f"--freeze {self.freeze!r}: use crossattn_kv or crossattn")
        need(self.mixed_precision in MIXED_PRECISION, f"--mixed-precision {self.mixed_precision!r}: use no, fp16 or bf16")
        need(self.size >= 64 and self.size % 8 == 0, f"--size {self.size}: use a multiple of 8 (the VAE's factor), at least 64")
        need(self.batch_size >= 1, f"--batch-size {self.batch_size}: at least 1")
        need(self.steps is None or self.steps >= 1, f"--steps {self.steps}: at least 1")
        need(self.accumulation >= 1, f"--accumulation {self.accumulation}: at least 1")
        need(self.checkpoint_every >= 0, f"--checkpoint-every {self.checkpoint_every}: 0 (never) or more")
        need(math.isfinite(self.base_lr) and self.base_lr > 0, f"--base-lr {self.base_lr}: a finite number > 0")
        need(math.isfinite(self.prior_weight) and self.prior_weight >= 0, f"prior weight {self.prior_weight}: finite, >= 0")
        need(all(0 <= b < 1 for b in self.betas), f"betas {self.betas}: each in [0, 1)")
        need(self.weight_decay >= 0 and self.eps > 0 and self.max_grad_norm > 0,
             "weight decay >= 0, eps > 0 and max grad norm > 0")
        need(bool(self.class_name.strip()), "--class: give the item's class word, e.g. mug")
        need(bool(self.init_token.strip()), "--init-token: give a token, e.g. ktn")
        need(self.token == self.token.strip() and len(self.token.split()) == 1,
             f"--token {self.token!r}: one word without spaces, e.g. <new1>")
        safe_name(self.token, "concept token")      # it names the file <token>.safetensors
        self.instance_prompt = f"photo of a {self.token} {self.class_name}"

    def total_steps(self, processes: int) -> int:
        return self.steps or default_steps(processes)


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
    """Instance photos (augmented) and, with prior preservation, class photos. Item i is
    the draw number ``first + i`` of the whole training (its augmentation seeded by
    (seed, that number)), so a resumed run starts where the checkpoint stopped."""

    def __init__(self, photos: Sequence[np.ndarray], class_photos: Sequence[np.ndarray], cfg: TrainConfig,
                 length: int, first: int = 0):
        self.photos, self.class_photos, self.cfg = list(photos), list(class_photos), cfg
        self.length, self.first = length, first

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        cfg, i = self.cfg, self.first + i
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


def photo_files(paths: Sequence[Path], what: str) -> list[Path]:
    """The photo files of ``paths`` (files as given, folders' images in name order)."""
    files = []
    for p in map(Path, paths):
        files += image_files(p) if p.is_dir() else [p]
    if not files:
        raise InputError(f"no {what} photos found in {', '.join(map(str, paths)) or '(nothing given)'}")
    return files


def read_photos(paths: Sequence[Path], what: str) -> list[np.ndarray]:
    return [read_image(f) for f in photo_files(paths, what)]


# -- fingerprint and checkpoints -------------------------------------------------------------
def _file_sha256(path: Path) -> str:
    from ..runs.records import file_digest

    return file_digest(path, "photo")


def training_fingerprint(cfg: TrainConfig, instance: Sequence[Path], class_photos: Sequence[Path],
                         processes: int, model: dict | None = None) -> dict:
    """What a checkpoint was trained from: every photo's content (in training order), the
    class, the token and every setting (``steps`` and ``checkpoint_every`` included), the
    process count and (once loaded) the model's identity."""
    doc = {"instance_photos": [_file_sha256(p) for p in instance],
           "class_photos": [_file_sha256(p) for p in class_photos],
           "class": cfg.class_name, "token": cfg.token, "init_token": cfg.init_token,
           "settings": {**asdict(cfg), "steps": cfg.total_steps(processes)}, "processes": processes}
    if model is not None:
        doc["model"] = model
    return doc


def fingerprint_digest(fp: dict) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True, default=str).encode()).hexdigest()


def _trajectory(fp: dict, ignore: Sequence[str]) -> dict:
    """The parts of a fingerprint that decide the trained tensors (see NOT_TRAJECTORY)."""
    doc = {k: v for k, v in fp.items() if k not in ignore}
    if "settings" in doc:
        doc["settings"] = {k: v for k, v in doc["settings"].items() if k not in NOT_TRAJECTORY}
    return json.loads(json.dumps(doc, default=str))


def checkpoint_folder(out: Path) -> Path:
    return Path(f"{out}-checkpoints")


def checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """(step, folder) of the checkpoints in ``folder``, oldest first."""
    if not folder.is_dir():
        return []
    found = [(int(p.name[len(CHECKPOINT_PREFIX):]), p) for p in folder.iterdir()
             if p.name.startswith(CHECKPOINT_PREFIX) and p.name[len(CHECKPOINT_PREFIX):].isdigit() and p.is_dir()]
    return sorted(found)


def _read_checkpoint_json(path: Path, step: int) -> dict:
    file = path / CHECKPOINT_JSON
    try:
        doc = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{file}: missing (a checkpoint of another tool or version); rerun with --restart "
                          "to discard the checkpoints") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{file}: cannot read checkpoint record ({e}); rerun with --restart") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{file}: expected a JSON object")
    if doc.get("step") != step:
        raise ConfigError(f"{file}: field 'step' is {doc.get('step')!r}, the folder says {step}")
    if not isinstance(doc.get("fingerprint"), dict):
        raise ConfigError(f"{file}: field 'fingerprint' missing or not an object")
    return doc


def _differing(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differing(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out


def resume_point(out: Path, fingerprint: dict, steps: int, resume: bool,
                 ignore: Sequence[str] = ()) -> tuple[int, Path | None]:
    """(step to start from, checkpoint or None). Refused (exit 2, before any work): a
    checkpoint past ``steps``, and one made from other inputs or settings (``ignore``:
    fingerprint parts not known yet, e.g. the model before it loads)."""
    found = checkpoints(checkpoint_folder(out))
    if not resume or not found:
        return 0, None
    step, path = found[-1]
    if step > steps:
        raise ConfigError(f"--steps {steps} is below the kept checkpoint {path} (step {step}); give --steps {step} "
                          "or more, or --restart to discard the checkpoints")
    doc = _read_checkpoint_json(path, step)
    old, new = _trajectory(doc["fingerprint"], ignore), _trajectory(fingerprint, ignore)
    if old != new:
        what = ", ".join(_differing(old, new)[:6])
        raise ConfigError(f"{path} was trained from other inputs or settings ({what} differ); it is never resumed: "
                          "rerun with --restart to discard it, or choose another --out")
    return step, path


def _save_checkpoint(folder: Path, step: int, trained: dict[str, torch.Tensor], opt, scaler, fp: dict) -> Path:
    """step-N written whole or not at all (a staging folder renamed into place)."""
    from safetensors.torch import save

    target = folder / f"{CHECKPOINT_PREFIX}{step}"
    stage = folder / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    write_bytes(stage / CHECKPOINT_STATE, save({k: v.detach().float().cpu().contiguous() for k, v in trained.items()}))
    buf = io.BytesIO()
    torch.save({"optimizer": opt.state_dict(), "scaler": scaler.state_dict() if scaler is not None else None}, buf)
    write_bytes(stage / CHECKPOINT_OPTIMIZER, buf.getvalue())
    write_json(stage / CHECKPOINT_JSON, {"step": step, "fingerprint": fp, "fingerprint_sha256": fingerprint_digest(fp)})
    if target.exists():
        shutil.rmtree(target)
    os.replace(stage, target)
    return target


def _load_checkpoint(path: Path, trained: dict[str, torch.Tensor], opt, scaler) -> None:
    """Trained tensors and optimizer state from ``path``, schema-checked: the same names
    and shapes as this training's, finite values (exit 2 naming the file and field)."""
    from safetensors.torch import load_file

    file = path / CHECKPOINT_STATE
    try:
        state = load_file(str(file))
    except Exception as e:  # safetensors raises several types for a bad file
        raise ConfigError(f"{file}: cannot read checkpoint ({type(e).__name__}: {e}); rerun with --restart") from None
    if set(state) != set(trained):
        extra, missing = sorted(set(state) - set(trained)), sorted(set(trained) - set(state))
        raise ConfigError(f"{file}: tensors {(missing or extra)[0]!r} {'missing' if missing else 'unexpected'}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(trained[k].shape):
            raise ConfigError(f"{file}: field {k!r} has shape {tuple(v.shape)}, expected {tuple(trained[k].shape)}")
        if not torch.isfinite(v).all():
            raise ConfigError(f"{file}: field {k!r} holds non-finite values")
    file = path / CHECKPOINT_OPTIMIZER
    try:
        doc = torch.load(file, map_location="cpu", weights_only=True)
        if not isinstance(doc, dict) or not isinstance(doc.get("optimizer"), dict):
            raise ValueError("expected {'optimizer': state dict, 'scaler': ...}")
        opt.load_state_dict(doc["optimizer"])
        if scaler is not None and doc.get("scaler"):
            scaler.load_state_dict(doc["scaler"])
    except Exception as e:  # torch raises several types for a bad or mismatched file
        raise ConfigError(f"{file}: cannot restore the optimizer ({type(e).__name__}: {e}); rerun with --restart") from None
    with torch.no_grad():
        for k, v in state.items():
            trained[k].copy_(v)


def discard_checkpoints(out: Path) -> None:
    """``--restart``: the step-N folders of ``<out>-checkpoints`` (and stale partial ones)."""
    folder = checkpoint_folder(out)
    for _, path in checkpoints(folder):
        shutil.rmtree(path)
    if folder.is_dir():
        for p in folder.iterdir():
            if p.name.startswith(f".{CHECKPOINT_PREFIX}") and ".partial-" in p.name:
                shutil.rmtree(p, ignore_errors=True)


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


def initializer_id(tokenizer, init_token: str) -> int:
    """A vocabulary entry as such (diffusers' script looked "ktn" up this way: the sub-word
    piece, id 42170), else a word that tokenizes to one token."""
    vocab = tokenizer.get_vocab()
    ids = [vocab[init_token]] if init_token in vocab else tokenizer(init_token, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise ConfigError(f"--init-token {init_token!r} must be one token (it is {len(ids)})")
    return ids[0]


def check_new_token(tokenizer, token: str) -> None:
    """The concept's token must not be a word of the model's own vocabulary: training it
    would overwrite that word (diffusers' script refuses it too). A token an earlier concept
    added in this process is fine (each concept trains its own row)."""
    if token in tokenizer.get_vocab() and token not in tokenizer.get_added_vocab():
        raise ConfigError(f"--token {token!r} is already in the model's vocabulary; choose a new one, e.g. <new1>")


def train_concept(sd, photos: Sequence[Path], out: Path, cfg: TrainConfig, class_photos: Sequence[Path] = (),
                  resume: bool = True, show_progress: bool = True) -> Path:
    """Train a concept on ``photos`` and write it to ``out`` (format A + concept.json).
    Checkpoints go to ``<out>-checkpoints/step-N``; the newest is resumed from when its
    fingerprint is this training's (else ConfigError). The model's K/V (and Q/out) are
    restored on return: ``sd`` is the base model again, the concept lives in ``out``."""
    from accelerate import Accelerator

    out = Path(out)
    acc = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.accumulation,
                      cpu=sd.device.type == "cpu")
    instance_files = photo_files(photos, "instance")
    class_files = photo_files(class_photos, "class") if class_photos else []
    instance = [read_image(f) for f in instance_files]
    prior = [read_image(f) for f in class_files]
    if not prior:
        log.warning("no class images (--class-images): training without prior preservation")
    steps = cfg.total_steps(acc.num_processes)
    from ..runs.manifest import model_identity

    fp = training_fingerprint(cfg, instance_files, class_files, acc.num_processes, model_identity(sd.info))
    if not resume and acc.is_main_process:
        discard_checkpoints(out)
    start, path = resume_point(out, fp, steps, resume)

    # 1. The token, its initial row and the trained tensors.
    init_id = initializer_id(sd.tokenizer, cfg.init_token)
    check_new_token(sd.tokenizer, cfg.token)
    (token_id,) = add_tokens(sd, [cfg.token])
    table = sd.text_encoder.get_input_embeddings().weight
    model = Personalizer(sd, token_id, table[init_id])
    model.requires_grad_(False)
    names = trained_names(sd.unet, cfg.freeze)
    params = dict(sd.unet.named_parameters())
    base = {n: params[n].detach().clone() for n in names}
    for n in names:
        params[n].requires_grad_(True)
    model.row.requires_grad_(True)
    try:
        return _fit(sd, model, acc, instance, prior, names, params, steps, start, path, out, cfg, fp, show_progress)
    finally:
        model.close()
        with torch.no_grad():
            for n in names:
                params[n].requires_grad_(False)
                params[n].copy_(base[n])


def _fit(sd, model, acc, instance, prior, names, params, steps, start, path, out, cfg, fp, show_progress) -> Path:
    trained = {ROW_KEY: model.row, **{n: params[n] for n in names}}
    lr = _learning_rate(cfg, acc.num_processes, bool(prior))
    opt = torch.optim.AdamW(list(trained.values()), lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                            eps=cfg.eps)
    per_step = cfg.batch_size * cfg.accumulation * acc.num_processes
    data = ConceptPhotos(instance, prior, cfg, (steps - start) * per_step, first=start * per_step)
    loader = torch.utils.data.DataLoader(data, batch_size=cfg.batch_size, shuffle=False, collate_fn=_collate)
    model, opt, loader = acc.prepare(model, opt, loader)
    if path is not None:
        _load_checkpoint(path, trained, opt, acc.scaler)
        log.info(f"resumed from {path} (step {start} of {steps})")

    alphas = sd.alphas_cumprod.to(acc.device, torch.float32)
    v_pred = sd.prediction_type == "v_prediction"
    folder = checkpoint_folder(out)
    bar = progress(total=steps, initial=start, enabled=show_progress and acc.is_main_process, desc="personalize",
                   unit="step")
    batches = iter(loader)
    with stop_after_step(acc.num_processes == 1) as stop:
        _steps(model, sd, opt, trained, batches, alphas, v_pred, cfg, acc, bar, folder, fp, out, start, steps, stop)
    bar.close()
    acc.wait_for_everyone()

    # Write format A + concept.json (main process).
    if acc.is_main_process:
        attn2 = {n: params[n].detach().float().cpu() for n in names}
        info = {"class": cfg.class_name, "base_model": {k: v for k, v in sd.info.items() if k != "device"},
                "settings": {**asdict(cfg), "steps": steps, "learning_rate": lr, "processes": acc.num_processes,
                             "prior_preservation": bool(prior), "instance_photos": len(instance),
                             "fingerprint_sha256": fingerprint_digest(fp)}}
        save_concept(out, [cfg.token], model_row(acc, model), attn2, info)
    acc.wait_for_everyone()
    return out


def _steps(model, sd, opt, trained, batches, alphas, v_pred, cfg, acc, bar, folder, fp, out, start, steps,
           stop) -> None:
    """Steps ``start..steps`` of ``train_concept``; on a stop request (Ctrl-C), the step in
    progress is finished and checkpointed, then ``KeyboardInterrupt`` is raised."""
    for step in range(start, steps):
        for micro in range(cfg.accumulation):
            batch = next(batches)
            gen = torch.Generator().manual_seed(image_seed(cfg.seed, f"personalize:{step}:{micro}:{acc.process_index}"))
            with acc.accumulate(model):
                loss = _loss(model, sd, batch, alphas, v_pred, cfg, gen)
                if not torch.isfinite(loss):
                    raise TrainingDiverged(f"personalize {out}: step {step + 1}: the loss is {loss.item()} "
                                           "(non-finite); training stopped and no concept was written "
                                           "(lower --base-lr; the last good checkpoint stays)")
                acc.backward(loss)
                if acc.sync_gradients:
                    acc.clip_grad_norm_(list(trained.values()), cfg.max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
        bad = next((k for k, p in trained.items() if not torch.isfinite(p).all()), None)
        if bad is not None:
            raise TrainingDiverged(f"personalize {out}: step {step + 1}: parameter {bad!r} became non-finite; "
                                   "training stopped and no concept was written (lower --base-lr)")
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        done = step + 1
        if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < steps:
            if acc.is_main_process:
                _save_checkpoint(folder, done, trained, opt, acc.scaler, fp)
            acc.wait_for_everyone()
        elif stop.requested and done < steps:
            _save_checkpoint(folder, done, trained, opt, acc.scaler, fp)
        if stop.requested and done < steps:
            log.info(f"stopped after step {done} of {steps}; its checkpoint is kept: rerun the command to resume")
            raise KeyboardInterrupt


def model_row(acc, model) -> torch.Tensor:
    return acc.unwrap_model(model).row.detach().float().cpu()[None]


def instance_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """diffusers' Custom Diffusion instance loss: per photo, the squared error summed over
    the latent channels and the valid cells, divided by the number of valid cells (the
    mask has one channel); then the batch mean. pred/target (B, C, h, w), mask (B, h, w).
    An empty mask (possible only below 72 px) gives 0, not diffusers' 0/0."""
    err = (pred.float() - target.float()) ** 2
    m = mask.to(err.dtype)[:, None]
    return ((err * m).sum(dim=(1, 2, 3)) / m.sum(dim=(1, 2, 3)).clamp_min(1)).mean()


def _loss(model, sd, batch, alphas, v_pred, cfg: TrainConfig, gen: torch.Generator) -> torch.Tensor:
    device = alphas.device
    pixels, prompts = batch["pixels"], list(batch["prompt"])
    mask = batch["mask"].to(device)
    n = len(pixels)
    if "class_pixels" in batch:
        pixels = torch.cat([pixels, batch["class_pixels"]])
        prompts += [cfg.class_name] * n
    with torch.no_grad():
        mean, std = posterior(sd.vae, pixels.to(device, sd.vae.dtype))
    # Every draw from this step's generator (CPU, then moved): the same on any device and after a resume.
    eps0 = torch.randn(mean.shape, generator=gen).to(device)
    noise = torch.randn(mean.shape, generator=gen).to(device)
    t = torch.randint(0, len(alphas), (len(mean),), generator=gen).to(device)
    z = latent_sample(mean, std, eps0, sd.latent_scale)
    a = alphas[t].view(-1, 1, 1, 1)
    z_t = q_sample(z, a, noise)
    target = a.sqrt() * noise - (1 - a).sqrt() * z if v_pred else noise
    ids = sd.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    pred = model(z_t.to(sd.unet.dtype), t, ids.to(device)).float()
    loss = instance_loss(pred[:n], target[:n], mask)
    if len(pred) > n:
        loss = loss + cfg.prior_weight * ((pred[n:] - target[n:].float()) ** 2).mean()
    return loss
