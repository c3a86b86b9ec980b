"""Loading the parts of Stable Diffusion v1 the method uses (model I/O lives here only).

VAE, UNet, CLIP text encoder, tokenizer and the DDPM noise schedule — no safety checker,
no feature extractor, no sampler. ``model`` is a Hugging Face id or a local diffusers
folder (the layout ``save_pretrained`` writes).
"""
from __future__ import annotations

import hashlib
import re
import socket
from urllib.parse import urlparse
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ModelLoadError

DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"
# A file the test/demo model builder leaves in its folder: runs on it say their masks mean nothing.
RANDOM_WEIGHTS_MARKER = "RANDOM_WEIGHTS.txt"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


_HOW_TO = ("Pass --model with a local diffusers folder (with vae/, unet/, text_encoder/, tokenizer/, scheduler/), "
           "e.g. one saved by StableDiffusionPipeline.save_pretrained or downloaded on a connected machine with "
           "`huggingface-cli download CompVis/stable-diffusion-v1-4 --local-dir DIR`.")


@dataclass
class StableDiffusion:
    vae: torch.nn.Module
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    alphas_cumprod: torch.Tensor   # (1000,) float64, on the CPU
    device: torch.device
    dtype: torch.dtype
    info: dict = field(default_factory=dict)

    @property
    def latent_scale(self) -> float:
        return float(getattr(self.vae.config, "scaling_factor", 0.18215))


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype in (None, "", "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    table = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
             "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; use fp32, fp16 or bf16")
    return table[dtype]


def folder_digest(path: Path) -> str:
    """sha256 over the relative paths and bytes of every file of a local model folder,
    so run.json identifies exactly which weights made the masks."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def _resolved_revision(module) -> str | None:
    """Commit hash of a hub snapshot (…/snapshots/<sha>/unet), if loaded from the cache."""
    parts = Path(str(getattr(module.config, "_name_or_path", ""))).parts
    if "snapshots" in parts:
        i = parts.index("snapshots")
        if i + 1 < len(parts):
            return parts[i + 1]
    return None


def _hub_kwargs(model: str, revision: str | None) -> dict:
    """Cached models load without touching the network; an uncached one with the hub out of
    reach fails at once instead of after minutes of retries."""
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(model, "unet/config.json", revision=revision), str):
        return {"revision": revision, "local_files_only": True}
    if constants.HF_HUB_OFFLINE:
        return {"revision": revision, "local_files_only": True}
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError as e:
        raise ModelLoadError(
            f"cannot load the Stable Diffusion v1 model {model!r}: it is not in the local Hugging Face cache "
            f"and {host} is out of reach ({e.strerror or e}).\n{_HOW_TO}") from None
    return {"revision": revision}


def load(model: str = DEFAULT_MODEL, device: str | None = None, dtype: str | None = None,
         revision: str | None = None) -> StableDiffusion:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer


    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    local = Path(model).expanduser()
    is_local = local.exists()
    if is_local and not local.is_dir():
        raise ModelLoadError(f"--model {model!r} is a file; pass a diffusers model folder or a Hugging Face id")
    if not is_local and not _HUB_ID.fullmatch(model):
        raise ModelLoadError(f"--model {model!r}: no such local folder, and not a Hugging Face id like "
                             f"{DEFAULT_MODEL!r}")
    src = str(local) if is_local else model
    kw = {} if is_local else _hub_kwargs(model, revision)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(src, subfolder="tokenizer", **kw)
        text_encoder = CLIPTextModel.from_pretrained(src, subfolder="text_encoder", torch_dtype=dt, **kw)
        vae = AutoencoderKL.from_pretrained(src, subfolder="vae", torch_dtype=dt, **kw)
        unet = UNet2DConditionModel.from_pretrained(src, subfolder="unet", torch_dtype=dt, **kw)
        scheduler = DDPMScheduler.from_pretrained(src, subfolder="scheduler", **kw)
    except Exception as e:
        where = f"local folder {src}" if is_local else f"Hugging Face model {src!r}"
        raise ModelLoadError(
            f"cannot load the Stable Diffusion v1 model from {where}: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}\n{_HOW_TO}") from e
    for m in (vae, unet, text_encoder):
        m.to(dev).eval().requires_grad_(False)
    cfg = scheduler.config
    if (cfg.num_train_timesteps, cfg.beta_schedule) != (1000, "scaled_linear"):
        raise ModelLoadError(f"{src}: expected SD v1's 1000-step scaled_linear schedule, got "
                             f"{cfg.num_train_timesteps}-step {cfg.beta_schedule}")
    info = {"model": model, "local": is_local, "device": str(dev), "dtype": str(dt).replace("torch.", "")}
    if is_local:
        info["folder_sha256"] = folder_digest(local)
        if (local / RANDOM_WEIGHTS_MARKER).is_file():
            info["random_weights"] = True
    else:
        info["revision"] = revision or "main"
        info["resolved_revision"] = _resolved_revision(unet)
    return StableDiffusion(vae, unet, text_encoder, tokenizer,
                           scheduler.alphas_cumprod.to(torch.float64).cpu(), dev, dt, info)
