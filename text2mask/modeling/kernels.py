"""Compiled kernels (``--compile``): the one speed-up measured faster and exact enough.

``scripts/benchmark.py --only kernels`` tried, on the full SD v1 architecture at 768x576
(issue 11): ``channels_last`` for the VAE and UNet (not faster), ``torch.compile`` of the
UNet's ResNet and transformer blocks (not faster: oneDNN's convolutions and the fused
attention already are the kernels inductor would call) and of the VAE encoder, which
takes 0.85-0.92x its eager time (median of alternating pairs in three runs): inductor
fuses each GroupNorm with its SiLU, passes the eager encoder makes separately over
128-512-channel full-resolution activations. The VAE encode is about two thirds of a
photo's time, so a photo takes about 0.95x; a cold compile costs 15-35 s per padded
size, about 10-30 photos of that size to break even.

The compiled encoder is one static-shape graph per padded input size, cached by
inductor on disk (``TORCHINDUCTOR_CACHE_DIR``, default under the temp folder), so the
next process compiles a size it has seen in seconds. Its posterior differs from eager by
float32 summation order (about 1e-5 relative), so a compiled run is a different
configuration: ``info["compiled"]`` enters the run's fingerprint and a folder is never
resumed across the switch.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import replace

from ..errors import ConfigError

COMPILED_VAE = "vae-encoder"
# Padded sizes one process may compile (one graph each); dynamo's default of 8 is below
# the number of sizes a VOC or COCO run meets. Past it, new sizes run eager.
SIZES_PER_PROCESS = 64


def check_compiler(device_type: str) -> None:
    """Inductor writes C++ on the CPU (and Triton on CUDA): refuse before any work
    when the toolchain is missing, not at the first photo."""
    if device_type == "cuda":
        if importlib.util.find_spec("triton") is None:
            raise ConfigError("--compile on CUDA needs the triton package (pip install triton), or drop --compile")
        return
    if device_type != "cpu":
        raise ConfigError(f"--compile supports cpu and cuda devices, not {device_type}")
    compilers = [c for c in (os.environ.get("CXX"), "g++", "c++", "clang++") if c and shutil.which(c)]
    if not compilers:
        raise ConfigError("--compile needs a C++ compiler on the CPU (g++ or clang++, or $CXX): PyTorch's inductor "
                          "compiles the VAE encoder to C++; install one or run without --compile")


def compile_vae_encoder(sd):
    """The same model (no copy: the very same modules) whose VAE posterior runs through
    ``torch.compile``; the modules themselves are left untouched (a pipeline given to
    ``from_pipe`` keeps its eager VAE)."""
    import torch
    import torch._dynamo

    check_compiler(sd.device.type)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, SIZES_PER_PROCESS)
    vae = sd.vae

    def moments(x: torch.Tensor) -> torch.Tensor:
        return vae.encode(x).latent_dist.parameters

    return replace(sd, vae_encode=torch.compile(moments, dynamic=False),
                   info={**sd.info, "compiled": COMPILED_VAE})
