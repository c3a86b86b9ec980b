"""Latents: the VAE posterior, the random draws, the forward noising (q-sample).

For an image x the VAE gives a diagonal Gaussian posterior N(mean, std^2), std =
exp(0.5 * logvar). One draw eps0 ~ N(0, I) picks its latent and one draw eps ~ N(0, I)
per ensemble sample noises it to step t:

    z_0 = (mean + std * eps0) * scale                  (scale = vae.config.scaling_factor)
    z_t = sqrt(a_t) * z_0 + sqrt(1 - a_t) * eps        (a_t = alphas_cumprod[t])

The draws are data (``Draws``): by default they come from (seed, image id), so a mask does
not depend on order, batching, workers or shards; a caller may pass its own and save them
(safetensors) to replay a run exactly.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InputError
from ..io import write_bytes

_EPS0, _NOISE = "posterior_eps", "q_sample_noise"


def image_seed(seed: int, key: str) -> int:
    """Per-image seed from (global seed, image id): masks do not depend on order,
    batching, workers or shards."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def posterior(vae, x: torch.Tensor, encode=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the VAE posterior of images x (B, 3, H, W) in [-1, 1], in float32.
    ``encode``: a compiled x -> posterior parameters of this VAE (``modeling.kernels``);
    the posterior's own arithmetic (clamp, exp) stays eager either way."""
    if encode is None:
        dist = vae.encode(x).latent_dist
    else:
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        dist = DiagonalGaussianDistribution(encode(x))
    return dist.mean.float(), dist.std.float()


def latent_sample(mean: torch.Tensor, std: torch.Tensor, eps0: torch.Tensor, scale: float) -> torch.Tensor:
    """z_0 = (mean + std * eps0) * scale."""
    return (mean + std * eps0) * scale


def q_sample(z0: torch.Tensor, alpha_bar: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """z_t = sqrt(a_t) * z_0 + sqrt(1 - a_t) * noise (DDPM forward process; noise may carry
    a leading sample axis that broadcasts over z_0)."""
    return alpha_bar.sqrt() * z0 + (1 - alpha_bar).sqrt() * noise


@dataclass
class Draws:
    """The random draws of one image: ``eps0`` (4, h, w) picks the posterior sample and
    ``noise`` (samples, 4, h, w) noises it, one row per ensemble sample (float32, CPU)."""

    eps0: torch.Tensor
    noise: torch.Tensor

    @classmethod
    def default(cls, seed: int, key: str, latent_shape: tuple[int, ...], samples: int) -> "Draws":
        """The draws of image ``key`` under global ``seed``: eps0 first, then the noise,
        from one generator seeded by ``image_seed(seed, key)``."""
        gen = torch.Generator().manual_seed(image_seed(seed, key))
        eps0 = torch.randn(tuple(latent_shape), generator=gen)
        noise = torch.randn((samples, *latent_shape), generator=gen)
        return cls(eps0, noise)

    def check(self, latent_shape: tuple[int, ...], samples: int, key: str) -> None:
        want = (tuple(latent_shape), (samples, *latent_shape))
        got = (tuple(self.eps0.shape), tuple(self.noise.shape))
        if got != want:
            raise InputError(f"draws for {key!r}: eps0 {got[0]} and noise {got[1]} do not fit the image's latent "
                             f"{tuple(latent_shape)} with {samples} sample(s) (need {want[0]} and {want[1]})")

    def save(self, path: str | os.PathLike) -> None:
        save_draws(path, {"": self})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Draws":
        draws = load_draws(path)
        if list(draws) != [""]:
            raise InputError(f"{path}: holds the draws of {len(draws)} images; use load_draws()")
        return draws[""]


def save_draws(path: str | os.PathLike, draws: dict[str, Draws]) -> None:
    """Write {image id: Draws} to one safetensors file (atomically), exact float32 bytes."""
    from safetensors.torch import save

    tensors = {}
    for key, d in draws.items():
        tensors[f"{key}/{_EPS0}"] = d.eps0.detach().to("cpu", torch.float32).contiguous()
        tensors[f"{key}/{_NOISE}"] = d.noise.detach().to("cpu", torch.float32).contiguous()
    blob = save(tensors, metadata={"format": "text2mask-draws", "images": str(len(draws))})
    write_bytes(path, blob)


def load_draws(path: str | os.PathLike) -> dict[str, Draws]:
    """{image id: Draws} from a file written by ``save_draws``/``Draws.save``."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        tensors = load_file(str(path))
    except Exception as e:
        raise InputError(f"{path}: cannot read draws ({type(e).__name__}: {e})") from None
    keys = {name.rsplit("/", 1)[0] for name in tensors}
    out = {}
    for key in sorted(keys):
        try:
            out[key] = Draws(tensors[f"{key}/{_EPS0}"], tensors[f"{key}/{_NOISE}"])
        except KeyError as e:
            raise InputError(f"{path}: draws of {key!r} lack {e.args[0]}") from None
    return out
