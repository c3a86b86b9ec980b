"""Stable Diffusion as every method uses it: loading (``loading``), attention capture
(``capture``), latents and their random draws (``latents``) and the optional compiled
VAE encoder (``kernels``). Model I/O lives here only.

Importing this package puts MKL in strict conditional-numerical-reproducibility mode
(``MKL_CBWR=AUTO,STRICT``, unless the environment sets it): otherwise MKL's small matrix
products (e.g. the UNet's time embedding, a 1-row x 32 by 32 x 128 product) round
differently depending on the 16-byte alignment of the weights in memory, and that
alignment is wherever the weights file put them (safetensors is memory-mapped). A
single-file checkpoint, a diffusers folder and a pipeline loaded elsewhere then gave
different masks from identical weights. MKL reads the setting at its first call, so it
only takes effect if nothing in the process has used MKL before text2mask.modeling is
imported (true for the CLI and for ``import text2mask`` first).
"""
import os

os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
