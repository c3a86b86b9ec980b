#!/usr/bin/env python
"""Speed/memory/precision benchmark of text2mask on the FULL Stable Diffusion v1 architecture.

A benchmark, not a test: it builds SD v1.4's architecture with random weights offline
(UNet 860M, VAE 84M, CLIP ViT-L/14 text encoder 123M; the real CLIP tokenizer; DDPM
scaled_linear schedule) and measures, on real VOC photos, per padded size:

  floor     the truncated floor: VAE encode + the UNet with its default fused attention,
            stopped right after block 11's self-attention (the pipeline's own stop). No
            implementation of the method can do less model work.
  pipeline  Text2Mask.attend, 1 sample, vs that floor: --rounds pairs back to back
            (alternating which goes first), the median of the pair ratios
  ten       10 samples: attend vs VAE encode + a 10-row truncated UNet, the same way
  runner    the real batch runner (text2mask.wsss.run.generate), CRF on in 1 worker
            process: wall per image vs the floor; the model's wait for the CRF queue
  crf       CRF + PNG rate (text2mask.wsss.write.finish) in 1 and 2 worker processes ->
            the pool size that keeps up with a given model-side rate
  dtype     bf16 and fp16 vs fp32 per stage (VAE, text, UNet, propagation, CRF) and their
            fidelity on the same photos and draws: label agreement of initial/ and crf/
            with fp32, maximum difference of the score maps. Run natively where the CPU
            has the instructions (avx512_bf16/amx_bf16; avx512_fp16/amx_fp16); elsewhere
            PyTorch's fallback kernels are 10-100x slower, so the numerics are emulated:
            tensors stored in the low precision, every matrix product / convolution /
            normalisation / fused attention computed in fp32 and rounded to it, which is
            what the native kernels compute (fp32 accumulation, rounded result).
  kernels   channels_last (NHWC, oneDNN's native convolution layout) for the fp32 VAE
            and UNet, and --compile (the VAE encoder through torch.compile): time vs
            eager, cold compile time and break-even, relative difference of the captured
            attention maps and of the score maps, label agreement (kept only if faster
            with attention maps within 1e-5 relative of eager)
  memory    peak resident memory of the 1024-pixel case vs the model weights
  fewshot   per-episode model cost of DiffewS (SD 2.1) and DiffSeg (Kandinsky 2.2 + SCM + PAM) at
            full architecture, random weights on the meta device: TFLOP per 1- and 5-shot
            episode at 512², DiffSeg's training step on cached features, parameter counts
            (scripts/fewshot_cost.py; counted, not timed: no weights are built)

Targets (issue 11): 1 sample <= 1.05 x truncated floor; 10 samples <= 1.05 x (VAE + 10-row
truncated UNet); peak memory at 1024 px <= weights + 3 GB; model-side wait for the CRF
queue < 5 % of wall time.

    python scripts/benchmark.py                        # every step, 1 photo per size
    python scripts/benchmark.py --only floor,pipeline --sizes 768 --dtypes bfloat16   # a subset

Timings on a shared machine are noisy: every figure is a ratio of steps measured in the
same run (floors and pipeline runs interleaved), also given in CPU seconds of this process.
"""
from __future__ import annotations

# Keep the module top light: the runner's CRF workers are spawned processes, and spawn
# imports the parent's __main__ module (this file) in each of them.
import argparse
import itertools
import json
import math
import os
import platform
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VOC = ROOT / "samples" / "voc-mini" / "VOC2012"
STEPS = ("memory", "floor", "pipeline", "ten", "runner", "crf", "dtype", "kernels", "fewshot")
GB = 1e9
RELATIVE_TOLERANCE = 1e-5          # a kernel is exact if its score maps are within this of eager
TARGET_ONE, TARGET_TEN = 1.05, 1.05

# 500x375 photos -> 768x576 input (latent 96x72).
IMAGES_768 = ("2007_000039", "2007_000063")            # tvmonitor; chair + dog
# Real photos cropped to 500x200 rows (aspect 2.5 > 16/7) -> 1024x448 input (latent 128x56).
CROPS_1024 = (("2007_000392", 64), ("2007_006241", 153))  # horse + person; bottle, chair, table
CROP_HEIGHT = 200
# CPU flags that matter for the low-precision paths.
FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16",
         "amx_tile", "amx_bf16", "amx_fp16", "avx_vnni", "avx_ne_convert")
NATIVE = {"bfloat16": ("avx512_bf16", "amx_bf16"), "float16": ("avx512_fp16", "amx_fp16")}


def log(*a) -> None:
    print(*a, flush=True)


def ru_maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def cpu_info() -> dict:
    """CPU model and the flags of FLAGS it has (Linux /proc/cpuinfo)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return {"model": model, "flags": [f for f in FLAGS if f in flags],
            "native": {dt: any(f in flags for f in fl) for dt, fl in NATIVE.items()}}


class RssSampler:
    """Peak RSS of this process inside a window, sampled every ``interval`` seconds."""

    def __init__(self, interval: float = 0.02):
        import psutil
        self.proc, self.interval, self.peak = psutil.Process(), interval, 0
        self._stop = threading.Event()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> "RssSampler":
        self.peak = self.proc.memory_info().rss
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


class Clock:
    """Wall and process-CPU seconds of a block."""

    def __enter__(self) -> "Clock":
        self.load = os.getloadavg()[0]
        self._w, self._c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self._w
        self.cpu = time.process_time() - self._c


# --------------------------------------------------------------------------------------
# Model: SD v1.4's architecture, random weights, built offline.
# --------------------------------------------------------------------------------------

def build_full_sd(tokenizer_dir: Path, seed: int = 0, smoke: bool = False):
    """SD v1.4's architecture; ``smoke`` shrinks the widths (only to check this script)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from tiny_models import build_clip_tokenizer
    from transformers import CLIPTextConfig, CLIPTextModel

    from text2mask.modeling.loading import StableDiffusion

    # Default initialisation keeps activations in a sane range (no NaN/denormals that
    # would distort the timings).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(  # CompVis/stable-diffusion-v1-4 unet/config.json
            sample_size=64, in_channels=4, out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                              "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(32, 64, 64, 64) if smoke else (320, 640, 1280, 1280),
            layers_per_block=2, attention_head_dim=8,
            cross_attention_dim=64 if smoke else 768, norm_num_groups=8 if smoke else 32, norm_eps=1e-5,
            act_fn="silu", downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, mid_block_scale_factor=1,
        )
        vae = AutoencoderKL(  # vae/config.json
            in_channels=3, out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(16, 32, 32, 32) if smoke else (128, 256, 512, 512),
            layers_per_block=2, latent_channels=4, norm_num_groups=8 if smoke else 32, sample_size=512,
            scaling_factor=0.18215, act_fn="silu",
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(  # text_encoder/config.json (ViT-L/14 text)
            vocab_size=49408, hidden_size=64 if smoke else 768,
            intermediate_size=128 if smoke else 3072, num_hidden_layers=2 if smoke else 12,
            num_attention_heads=4 if smoke else 12, max_position_embeddings=77, hidden_act="quick_gelu",
            projection_dim=768, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        ))
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", steps_offset=1, clip_sample=False)
    tokenizer = build_clip_tokenizer(tokenizer_dir)
    for m in (vae, unet, text_encoder):
        m.eval().requires_grad_(False)
    info = {"model": "full-size SD v1.4 architecture, random weights (benchmark)",
            "local": True, "device": "cpu", "dtype": "float32", "random_weights": True}
    return StableDiffusion(vae, unet, text_encoder, tokenizer,
                           scheduler.alphas_cumprod.to(torch.float64).cpu(),
                           torch.device("cpu"), torch.float32, info)


def cast_copy(module, dtype):
    """A copy of ``module`` with its floating parameters and buffers in ``dtype``, made
    tensor by tensor (peak memory: the copy, not a second fp32 model)."""
    import copy

    import torch

    memo = {}
    for t in list(module.parameters()) + list(module.buffers()):
        low = t.detach().to(dtype) if t.is_floating_point() else t.detach().clone()
        memo[id(t)] = torch.nn.Parameter(low, requires_grad=False) if isinstance(t, torch.nn.Parameter) else low
    clone = copy.deepcopy(module, memo)
    for name, value in list(vars(clone).items()):   # the Profile's wrappers call the original
        if hasattr(value, "__wrapped__"):
            delattr(clone, name)
    return clone


def low_precision_copy(sd, dtype):
    from dataclasses import replace

    info = {**sd.info, "dtype": str(dtype).replace("torch.", "")}
    return replace(sd, vae=cast_copy(sd.vae, dtype), unet=cast_copy(sd.unet, dtype),
                   text_encoder=cast_copy(sd.text_encoder, dtype), dtype=dtype, info=info)


def param_stats(sd) -> dict:
    def count(m):
        n = sum(p.numel() for p in m.parameters())
        b = sum(p.numel() * p.element_size() for p in m.parameters())
        b += sum(x.numel() * x.element_size() for x in m.buffers())
        return n, b
    out = {}
    for name in ("unet", "vae", "text_encoder"):
        n, b = count(getattr(sd, name))
        out[name] = {"params": n, "bytes": b}
    out["total"] = {"params": sum(v["params"] for v in out.values()),
                    "bytes": sum(v["bytes"] for v in out.values())}
    return out


def emulated_low_precision(dtype):
    """A dispatch mode running the heavy ops of ``dtype`` tensors in fp32 and rounding
    their results to ``dtype``: the numerics of native bf16/fp16 kernels (exact products,
    fp32 accumulation, rounded output) at fp32 speed on CPUs without them. Cheap ops
    (elementwise, views, copies) run in ``dtype`` as they would natively."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_map

    aten = torch.ops.aten
    # Both the composite ops (which reach a dispatch mode undecomposed under inference
    # mode) and what they decompose to.
    heavy = {aten.conv2d.default, aten.convolution.default, aten.linear.default, aten.matmul.default,
             aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default,
             aten.group_norm.default, aten.native_group_norm.default, aten.layer_norm.default,
             aten.native_layer_norm.default, aten.scaled_dot_product_attention.default,
             aten._scaled_dot_product_flash_attention_for_cpu.default}

    class Emulated(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            low = [a for a in args if isinstance(a, torch.Tensor) and a.dtype == dtype]
            if func not in heavy or not low:
                return func(*args, **kwargs)
            up = lambda a: a.float() if isinstance(a, torch.Tensor) and a.dtype == dtype else a
            down = lambda o: o.to(dtype) if isinstance(o, torch.Tensor) and o.dtype == torch.float32 else o
            return tree_map(down, func(*tree_map(up, args), **tree_map(up, kwargs)))

    return Emulated()


def emulation_check(dtype) -> dict:
    """Emulated vs PyTorch's own ``dtype`` kernels on a small convolution and matrix
    product: the largest difference, in units of ``dtype``'s epsilon of the result scale."""
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 64, 24, 24, generator=g).to(dtype)
    conv = torch.nn.Conv2d(64, 64, 3, padding=1).to(dtype).requires_grad_(False)
    a, b = torch.randn(96, 320, generator=g).to(dtype), torch.randn(320, 96, generator=g).to(dtype)
    out = {}
    with torch.inference_mode():
        for name, fn in (("conv", lambda: conv(x)), ("matmul", lambda: a @ b)):
            native = fn().float()
            with emulated_low_precision(dtype):
                emul = fn()
            assert emul.dtype == dtype
            ulp = torch.finfo(dtype).eps * native.abs().max().item()
            out[name] = (native - emul.float()).abs().max().item() / ulp
    return out


# --------------------------------------------------------------------------------------
# Profiling hooks (in this process only; no package file is modified).
# --------------------------------------------------------------------------------------

class Profile:
    """Accumulated seconds of the stages inside Text2Mask.attend."""

    STAGES = ("vae_encode", "text_encode", "unet_capture", "class_cross", "propagate", "to_image")

    def __init__(self):
        self.acc = {k: 0.0 for k in self.STAGES}
        self.last_maps = None
        self.hooked = 0.0       # seconds inside the capture's probability processors (part of unet_capture)

    def snapshot(self) -> dict:
        return dict(self.acc)

    def delta(self, before: dict) -> dict:
        return {k: self.acc[k] - before[k] for k in self.STAGES}

    def _timed(self, name, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.acc[name] += time.perf_counter() - t
        wrapper.__wrapped__ = fn
        return wrapper

    def install(self, sd) -> None:
        from text2mask.modeling import capture
        from text2mask.wsss import propagate as P

        from text2mask.modeling.loading import StableDiffusion

        # At the posterior, outside any compiled region: a timer inside one would be traced
        # by torch.compile (a Python float it guards on: a recompile at every call).
        if not hasattr(StableDiffusion.posterior, "__wrapped__"):
            StableDiffusion.posterior = self._timed("vae_encode", StableDiffusion.posterior)
        sd.text_encoder.forward = self._timed("text_encode", sd.text_encoder.forward)
        if not hasattr(capture._ProbabilityProcessor.__call__, "__wrapped__"):
            call = capture._ProbabilityProcessor.__call__

            def timed_call(proc, *a, **k):
                t = time.perf_counter()
                try:
                    return call(proc, *a, **k)
                finally:
                    self.hooked += time.perf_counter() - t
            timed_call.__wrapped__ = call
            capture._ProbabilityProcessor.__call__ = timed_call
        if not hasattr(capture.AttentionCapture.run, "__wrapped__"):
            run = capture.AttentionCapture.run

            def keep(cap, *a, **k):          # the captured maps of the last call, for the kernels step
                self.last_maps = run(cap, *a, **k)
                return self.last_maps
            capture.AttentionCapture.run = self._timed("unet_capture", keep)
        for name in ("class_cross", "propagate", "to_image"):
            if not hasattr(getattr(P, name), "__wrapped__"):
                setattr(P, name, self._timed(name, getattr(P, name)))


def stages(breakdown: dict) -> dict:
    """The issue's stages from a Profile breakdown: VAE, text, UNet, propagation."""
    return {"vae": breakdown["vae_encode"], "text": breakdown["text_encode"], "unet": breakdown["unet_capture"],
            "propagation": breakdown["class_cross"] + breakdown["propagate"] + breakdown["to_image"]}


class _Stop(Exception):
    """Raised after block 11's self-attention in the truncated floor."""


class _TimedStock:
    """The layer's own (fused) processor, timed: the floor's cost of the layers the
    capture replaces."""

    def __init__(self, inner, sink: list):
        self.inner, self.sink = inner, sink

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        t = time.perf_counter()
        try:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        finally:
            self.sink[0] += time.perf_counter() - t


def truncated_unet(sd, z_t, t, emb) -> float:
    """The UNet with its default (fused) attention, stopped right after the self-attention
    of block 11: the same stop as AttentionCapture, without computing any probabilities.
    Returns the seconds spent in the layers the capture hooks (blocks 4-8 attn2, 11 attn1)."""
    from text2mask.modeling.capture import CROSS_BLOCKS, SELF_BLOCK, swap_processors, transformer_blocks

    blocks = transformer_blocks(sd.unet)
    attn1 = sd.unet.get_submodule(f"{blocks[SELF_BLOCK].name}.transformer_blocks.0.attn1")
    keys = [blocks[i].processor_key("attn2") for i in CROSS_BLOCKS] + [blocks[SELF_BLOCK].processor_key("attn1")]
    current = sd.unet.attn_processors
    sink = [0.0]

    def stop(*_):
        raise _Stop

    hook = attn1.register_forward_hook(stop)
    try:
        with swap_processors(sd.unet, {k: _TimedStock(current[k], sink) for k in keys}):
            sd.unet(z_t, t, encoder_hidden_states=emb)
    except _Stop:
        return sink[0]
    finally:
        hook.remove()
    raise RuntimeError("the UNet ran to the end: block 11's self-attention was never reached")


# --------------------------------------------------------------------------------------
# The benchmark.
# --------------------------------------------------------------------------------------

def mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def median(xs):
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def _round(attend: dict, floor: dict) -> dict:
    """One floor/attend pair measured back to back. The work attend does beyond the floor's,
    timed where it happens: ``extra_seconds`` (text encode and the propagation stages) and
    ``probabilities_seconds`` (the six hooked layers with explicit probabilities minus the
    same layers fused in the floor). ``accounted_share`` is their sum over the floor: the
    ratio without the noise of the identical VAE and UNet work around them."""
    b = attend["breakdown"]
    extra = b["text_encode"] + b["class_cross"] + b["propagate"] + b["to_image"]
    probabilities = attend["hooked_seconds"] - floor["hooked_seconds"]
    return {"probabilities_seconds": probabilities, "accounted_share": (extra + probabilities) / floor["seconds"],"key": attend["key"], "size": attend["size"], "rows": floor["rows"],
            "attend_seconds": attend["seconds"], "floor_seconds": floor["seconds"],
            "ratio": attend["seconds"] / floor["seconds"], "cpu_ratio": attend["cpu_seconds"] / floor["cpu_seconds"],
            "unet_ratio": b["unet_capture"] / floor["unet_seconds"], "vae_ratio": b["vae_encode"] / floor["vae_seconds"],
            "extra_seconds": extra, "extra_share": extra / floor["seconds"]}


def relative_difference(a, b) -> float:
    """max |a - b| / max |b| (0 when both are 0)."""
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = np.abs(b).max()
    return float(np.abs(a - b).max() / scale) if scale > 0 else float(np.abs(a).max())


class Bench:
    def __init__(self, args):
        self.args = args
        self.steps = set(args.only.split(",")) if args.only else set(STEPS)
        self.json_path = Path(args.json)
        self.work = Path(tempfile.mkdtemp(prefix="t2m-bench-"))
        self.doc: dict = {"status": "running", "steps": sorted(self.steps),
                          "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": sys.argv,
                          "floor": {}, "attend": {}, "notes": []}
        self.prof = Profile()
        self.rgb: dict = {}       # key -> RGB array
        self.labels: dict = {}    # key -> classes
        self.atts: dict = {}      # key -> fp32 eager Attention, 1 sample

    # -- bookkeeping -------------------------------------------------------------------
    def save(self) -> None:
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.json_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.doc, indent=2, default=str))
        tmp.replace(self.json_path)

    def note(self, msg: str) -> None:
        log("note:", msg)
        self.doc["notes"].append(msg)

    # -- inputs ------------------------------------------------------------------------
    def load_images(self) -> None:
        import numpy as np
        from PIL import Image

        from text2mask.data.voc import labels_from_mask
        from text2mask.io import read_image, read_index_png
        from text2mask.preprocess import geometry

        n = self.args.images
        sizes = self.args.sizes.split(",")
        self.keys768 = list(IMAGES_768[:n]) if "768" in sizes else []
        self.keys1024 = []
        for key in self.keys768:
            self.rgb[key] = read_image(VOC / "JPEGImages" / f"{key}.jpg")
            self.labels[key] = labels_from_mask(VOC / "SegmentationClass" / f"{key}.png", 21)
        crop_dir = self.work / "crops"
        crop_dir.mkdir()
        for src, y in CROPS_1024[:n] if "1024" in sizes else ():
            rgb = read_image(VOC / "JPEGImages" / f"{src}.jpg")[y:y + CROP_HEIGHT]
            gt = read_index_png(VOC / "SegmentationClass" / f"{src}.png")[y:y + CROP_HEIGHT]
            key = f"{src}_crop{rgb.shape[1]}x{rgb.shape[0]}"
            # The runner reads images from files: write the crop losslessly.
            Image.fromarray(np.ascontiguousarray(rgb)).save(crop_dir / f"{key}.png")
            self.rgb[key] = read_image(crop_dir / f"{key}.png")
            self.labels[key] = tuple(int(v) for v in np.unique(gt) if 0 < v < 21)
            self.keys1024.append(key)
        self.keys = self.keys768 + self.keys1024
        self.paths = {k: VOC / "JPEGImages" / f"{k}.jpg" for k in self.keys768}
        self.paths.update({k: crop_dir / f"{k}.png" for k in self.keys1024})
        self.size_of = {}
        for k, rgb in self.rgb.items():
            g = geometry(*rgb.shape[:2])
            self.size_of[k] = f"{g.padded_width}x{g.padded_height}"
        names = self.predictor.class_set.names
        self.doc["images"] = {k: {"original": f"{self.rgb[k].shape[1]}x{self.rgb[k].shape[0]}",
                                  "input": self.size_of[k],
                                  "classes": [names[c] for c in self.labels[k]]} for k in self.rgb}
        for k, v in self.doc["images"].items():
            log(f"  image {k}: {v['original']} -> {v['input']}  classes {v['classes']}")

    # -- model -------------------------------------------------------------------------
    def build(self) -> None:
        import torch

        from text2mask.wsss.predictor import Text2Mask
        from text2mask.wsss.result import MaskConfig

        if self.args.threads:
            torch.set_num_threads(self.args.threads)
        cpu = cpu_info()
        log(f"CPU: {cpu['model']}; {os.cpu_count()} logical CPUs; flags: {' '.join(cpu['flags']) or '-'}")
        log(f"  native bf16: {'yes' if cpu['native']['bfloat16'] else 'no'}, native fp16: "
            f"{'yes' if cpu['native']['float16'] else 'no'}; torch {torch.__version__}, "
            f"capability {torch.backends.cpu.get_cpu_capability()}, threads {torch.get_num_threads()} "
            f"(interop {torch.get_num_interop_threads()})")
        with Clock() as c:
            self.sd = build_full_sd(self.work / "tokenizer", smoke=self.args.smoke)
        if self.args.smoke:
            self.note("--smoke: shrunken widths, the numbers mean NOTHING (script check only)")
        stats = param_stats(self.sd)
        for name, v in stats.items():
            log(f"  {name:13s} {v['params'] / 1e6:8.1f}M params  {v['bytes'] / GB:6.2f} GB")
        self.weights_bytes = stats["total"]["bytes"]
        self.predictor = Text2Mask(self.sd, "voc", MaskConfig(samples=1))
        self.prof.install(self.sd)
        self.doc.update({
            "machine": {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                        "capability": torch.backends.cpu.get_cpu_capability(),
                        "platform": platform.platform(), "python": platform.python_version()},
            "versions": _versions(), "params": stats, "build_seconds": round(c.wall, 2),
        })
        log(f"  built in {c.wall:.1f} s; ru_maxrss after build {ru_maxrss_bytes() / GB:.2f} GB")
        self.save()

    # -- floor: VAE encode + the UNet up to block 11's self-attention -------------------
    def floor(self, key: str, rows: int = 1, sd=None) -> dict:
        import torch

        from text2mask.preprocess import geometry, prepare

        sd = sd or self.sd
        rgb = self.rgb[key]
        plan = self.predictor.plan(self.labels[key])
        with torch.inference_mode():
            emb = self.predictor._embed(plan.prompts[0].text)          # not part of the floor
            x = prepare(rgb, geometry(*rgb.shape[:2]))[None]
            gen = torch.Generator().manual_seed(0)
            with Clock() as cv:
                z = sd.vae.encode(x).latent_dist.sample(generator=gen) * sd.latent_scale
            a = sd.alphas_cumprod[150]
            noise = torch.randn((rows, *z.shape[1:]), generator=gen)
            z_t = (a.sqrt() * z + (1 - a).sqrt() * noise).float()
            with RssSampler() as mem, Clock() as cu:
                hooked = truncated_unet(sd, z_t, torch.tensor(150), emb.expand(rows, -1, -1))
        rec = {"key": key, "size": self.size_of[key], "rows": rows, "hooked_seconds": hooked,
               "vae_seconds": cv.wall, "unet_seconds": cu.wall, "seconds": cv.wall + cu.wall,
               "cpu_seconds": cv.cpu + cu.cpu, "load": cv.load, "unet_window_peak_rss": mem.peak}
        log(f"  floor {key} {self.size_of[key]} rows={rows}: VAE {cv.wall:.1f} s + truncated UNet "
            f"{cu.wall:.1f} s = {rec['seconds']:.1f} s (cpu {rec['cpu_seconds']:.0f} s, load {cv.load:.1f})")
        if rows == 1:
            self.doc["floor"].setdefault(self.size_of[key], []).append(rec)
        self.save()
        return rec

    def floor_mean(self, size: str, field: str = "seconds") -> float | None:
        return mean([r[field] for r in self.doc["floor"].get(size, [])])

    # -- attend directly ---------------------------------------------------------------
    def attend(self, key: str, predictor=None, label: str = "attend", keep: bool = True):
        predictor = predictor or self.predictor
        plan = predictor.plan(self.labels[key])
        predictor._text_cache.clear()          # count the text encoder every time
        before, hooked = self.prof.snapshot(), self.prof.hooked
        with RssSampler() as mem, Clock() as c:
            att = predictor.attend([(key, self.rgb[key], plan)])[0]
        rec = {"key": key, "size": self.size_of[key], "samples": predictor.config.samples,
               "hooked_seconds": self.prof.hooked - hooked,
               "seconds": c.wall, "cpu_seconds": c.cpu, "load": c.load,
               "breakdown": self.prof.delta(before), "window_peak_rss": mem.peak,
               "ru_maxrss_after": ru_maxrss_bytes()}
        if keep and predictor is self.predictor:
            self.atts[key] = att
        log(f"  {label} {key} {self.size_of[key]} samples={rec['samples']}: {c.wall:.1f} s "
            f"(cpu {c.cpu:.0f} s, load {c.load:.1f})  " + _fmt_breakdown(rec["breakdown"], c.wall))
        return rec, att

    # -- steps -------------------------------------------------------------------------
    def step_memory(self) -> None:
        """First heavy operation after the build, so ru_maxrss is this case's peak."""
        key = self.keys1024[0]
        log(f"[memory] attend at {self.size_of[key]} (also the warm-up at this size)")
        rec, _ = self.attend(key, label="attend(warm-up)")
        peak = rec["ru_maxrss_after"]
        target = self.weights_bytes + 3 * GB
        self.doc["memory"] = {
            "key": key, "size": self.size_of[key], "weights_bytes": self.weights_bytes,
            "ru_maxrss_after_attend_bytes": peak, "attend_window_peak_rss_bytes": rec["window_peak_rss"],
            "target_bytes": target, "pass": peak <= target}
        self.doc["attend"].setdefault("warmup", []).append(rec)
        log(f"  peak RSS {peak / GB:.2f} GB (window {rec['window_peak_rss'] / GB:.2f} GB) vs weights "
            f"{self.weights_bytes / GB:.2f} GB + 3 GB = {target / GB:.2f} GB")
        self.save()

    def step_pipeline(self) -> None:
        """Per padded size: a warm-up attend, then ``--rounds`` rounds of one floor and one
        attend on the same photo, back to back, alternating which goes first. A round's
        ratio compares two runs a few seconds apart, so a change of the machine's load
        between rounds cancels; the reported ratio is the median over rounds."""
        warm = {r["key"] for r in self.doc["attend"].get("warmup", [])}
        for keys in filter(None, (self.keys768, self.keys1024)):
            size = self.size_of[keys[0]]
            log(f"[floor/pipeline] {size}: {self.args.rounds} round(s) per photo")
            if keys[0] not in warm:
                rec, _ = self.attend(keys[0], label="attend(warm-up)")
                self.doc["attend"].setdefault("warmup", []).append(rec)
            for key in keys:
                for r in range(self.args.rounds):
                    order = ("floor", "attend") if r % 2 == 0 else ("attend", "floor")
                    got = {}
                    for what in order:
                        got[what] = self.floor(key) if what == "floor" else self.attend(key)[0]
                    self.doc["attend"].setdefault("one", []).append(got["attend"])
                    self.doc.setdefault("rounds", {}).setdefault(size, []).append(_round(got["attend"], got["floor"]))
            self.save()

    def step_ten(self) -> None:
        from text2mask.wsss.predictor import Text2Mask
        from text2mask.wsss.result import MaskConfig

        key = self.keys[0]
        p10 = Text2Mask(self.sd, self.predictor.class_set, MaskConfig(samples=10))
        log(f"[ten] 10 samples at {self.size_of[key]}: attend vs VAE encode + 10-row truncated UNet, "
            f"{self.args.rounds} round(s)")
        rounds = []
        for r in range(self.args.rounds):
            order = ("floor", "attend") if r % 2 == 0 else ("attend", "floor")
            got = {}
            for what in order:
                got[what] = self.floor(key, rows=10) if what == "floor" else self.attend(key, predictor=p10)[0]
            rounds.append(_round(got["attend"], got["floor"]))
        self.doc["ten"] = {"size": self.size_of[key], "rounds": rounds,
                           "ratio": median([r["ratio"] for r in rounds]),
                           "cpu_ratio": median([r["cpu_ratio"] for r in rounds])}
        self.save()

    def step_runner(self) -> None:
        from text2mask.data.base import Dataset, Sample
        from text2mask.wsss.run import RunOptions, generate

        p = self.predictor
        keys = [k for pair in itertools.zip_longest(self.keys768, self.keys1024) for k in pair if k]
        samples = [Sample(k, self.paths[k], tuple(self.labels[k])) for k in keys]
        ds = Dataset("voc", "benchmark", p.class_set, samples,
                     "benchmark: image-level labels from the ground-truth masks")
        opts = RunOptions(out=self.work / "run", batch_size=1, workers=1, evaluate=False,
                          progress=False, overwrite=True)
        log(f"[runner] generate() on {len(samples)} images, 1 sample, CRF on, workers=1: {keys}")
        inner = p.attend

        def uncached(batch):   # count the text encoder every time, as the floors' attends do
            p._text_cache.clear()
            return inner(batch)

        p.attend = uncached
        try:
            with Clock() as c:
                s = generate(p, ds, opts, log=lambda m: log("  [runner]", m))
        finally:
            del p.attend
        if s.done != len(samples) or s.failed:
            raise RuntimeError(f"runner: {s.done} done, {s.failed} failed: {s.failures}")
        floors = [self.floor_mean(self.size_of[k]) for k in keys]
        self.doc["runner"] = {
            "keys": keys, "images": len(keys), "wall_seconds": s.seconds, "cpu_seconds": c.cpu,
            "model_seconds": s.model_seconds, "queue_wait_seconds": s.queue_wait_seconds,
            "queue_wait_fraction": s.queue_wait_seconds / s.seconds,
            "per_image_seconds": s.seconds / len(keys),
            "floor_sum_seconds": sum(floors) if None not in floors else None}
        self.save()
        log(f"  runner: {s.seconds:.1f} s for {len(keys)} images = {s.seconds / len(keys):.1f} s/image; "
            f"model {s.model_seconds:.1f} s; queue wait {s.queue_wait_seconds:.2f} s")

    def ensure_atts(self) -> None:
        for k in self.keys:
            if k not in self.atts:
                self.attend(k, label="attend(fp32 reference)")

    def step_crf(self) -> None:
        from concurrent.futures import ProcessPoolExecutor, wait
        from multiprocessing import get_context

        from text2mask.wsss.result import refine
        from text2mask.wsss.write import finish

        self.ensure_atts()
        keys, cfg = list(self.keys), self.predictor.config
        serial = []
        for k in keys:   # in this process, for the per-image cost
            with Clock() as c:
                refine(self.atts[k], self.rgb[k], cfg)
            serial.append({"key": k, "seconds": c.wall, "cpu_seconds": c.cpu})
            log(f"  [crf] refine {k} ({self.rgb[k].shape[1]}x{self.rgb[k].shape[0]}, "
                f"{len(self.atts[k].classes)} channels): {c.wall:.2f} s (cpu {c.cpu:.2f} s)")
        out = {"serial": serial, "workers": {}}
        for w in (1, 2):
            tasks = [k for _ in range(2 * w) for k in keys]
            dest = self.work / f"crf-w{w}"
            with ProcessPoolExecutor(w, mp_context=get_context("spawn")) as pool:
                wait([pool.submit(finish, self.atts[keys[0]], self.rgb[keys[0]], cfg, dest)
                      for _ in range(w)])                      # start the workers
                with Clock() as c:
                    wait([pool.submit(finish, self.atts[k], self.rgb[k], cfg, dest) for k in tasks])
            out["workers"][str(w)] = {"images": len(tasks), "seconds": c.wall,
                                      "images_per_second": len(tasks) / c.wall, "load": c.load}
            log(f"  [crf] W={w}: {len(tasks)} images in {c.wall:.1f} s = {len(tasks) / c.wall:.2f} img/s")
        # Pool size: one worker per CRF-rate's worth of model rate. The CRF worker's rate
        # per core is the serial one (CPU seconds, not wall: other load does not count).
        per_core = len(serial) / sum(r["cpu_seconds"] for r in serial)
        model = [r for r in self.doc["attend"].get("one", [])]
        model_rate = len(model) / sum(r["seconds"] for r in model) if model else None
        out["crf_images_per_cpu_second"] = per_core
        out["pool"] = {"this_machine_model_rate": model_rate,
                       "this_machine_workers": model_rate and math.ceil(model_rate / per_core),
                       "per_model_rate": {str(r): math.ceil(r / per_core) for r in (0.5, 1, 2, 5, 10)}}
        log(f"  [crf] {per_core:.2f} images per CPU-second -> workers needed for a model side at "
            + ", ".join(f"{r} img/s: {n}" for r, n in out["pool"]["per_model_rate"].items()))
        self.doc["crf"] = out
        self.save()

    def step_dtype(self) -> None:
        import gc

        import numpy as np
        import torch

        from text2mask.wsss.predictor import Text2Mask
        from text2mask.wsss.result import refine

        self.ensure_atts()
        cfg = self.predictor.config
        native = self.doc["machine"]["cpu"]["native"]
        fp32 = {}
        for k in self.keys:
            with Clock() as c:
                crf = refine(self.atts[k], self.rgb[k], cfg).crf
            fp32[k] = {"crf": crf, "crf_seconds": c.wall}
        result = {}
        for dtype in (getattr(torch, name) for name in self.args.dtypes.split(",")):
            name = str(dtype).replace("torch.", "")
            mode = "native" if native[name] else "emulated"
            check = None if mode == "native" else emulation_check(dtype)
            log(f"[dtype] {name} ({mode}" + (f"; emulated vs PyTorch's own {name} kernels: "
                + ", ".join(f"{op} {v:.2f} eps" for op, v in check.items()) if check else "") + ")")
            low = low_precision_copy(self.sd, dtype)
            self.prof.install(low)
            p = Text2Mask(low, self.predictor.class_set, cfg)
            per_image = []
            for k in self.keys:
                if mode == "native":
                    rec, att = self.attend(k, predictor=p, label=f"attend {name}")
                else:
                    with emulated_low_precision(dtype):
                        rec, att = self.attend(k, predictor=p, label=f"attend {name} (emulated)")
                with Clock() as c:
                    crf = refine(att, self.rgb[k], cfg).crf
                ref = self.atts[k]
                fp32_rec = next((r for r in reversed(self.doc["attend"].get("one", [])) if r["key"] == k), None)
                diff = np.abs(att.scores.astype(np.float64) - ref.scores).max() if np.isfinite(att.scores).all() \
                    else float("inf")
                per_image.append({
                    "key": k, "size": self.size_of[k], "stages": stages(rec["breakdown"]), "crf_seconds": c.wall,
                    "seconds": rec["seconds"], "cpu_seconds": rec["cpu_seconds"],
                    "fp32_seconds": fp32_rec and fp32_rec["seconds"],
                    "fp32_stages": fp32_rec and stages(fp32_rec["breakdown"]),
                    "fp32_crf_seconds": fp32[k]["crf_seconds"],
                    "initial_agreement": float((att.labels == ref.labels).mean()),
                    "crf_agreement": float((crf == fp32[k]["crf"]).mean()),
                    "max_score_difference": float(diff)})
                r = per_image[-1]
                log(f"  {name} {k}: initial agreement {r['initial_agreement']:.4f}, crf agreement "
                    f"{r['crf_agreement']:.4f}, max |score difference| {r['max_score_difference']:.2e}")
            result[name] = {"mode": mode, "emulation_check_eps": check, "images": per_image,
                            "initial_agreement_min": min(r["initial_agreement"] for r in per_image),
                            "crf_agreement_min": min(r["crf_agreement"] for r in per_image),
                            "max_score_difference": max(r["max_score_difference"] for r in per_image)}
            del low, p
            gc.collect()
            self.doc["dtype"] = result
            self.save()

    def step_kernels(self) -> None:
        """Faster fp32 kernels, each against eager on the same photo, in ``--rounds`` rounds
        (eager and variant back to back, alternating order):

        channels_last  NHWC convolution weights, so NHWC activations (oneDNN's native
                       layout), for the VAE and the UNet; converted back after (exact).
        compile        ``--compile``: the VAE encoder through torch.compile (inductor), as
                       text2mask.modeling.kernels ships it. The first call compiles (into an
                       empty inductor cache: the cold cost); break-even = compile seconds /
                       seconds saved per image.

        A variant is kept if faster (by 3 %: the whole attend's CPU time, or for compile the
        VAE stage it changes) and exact: the attention maps it captures are within
        RELATIVE_TOLERANCE of eager's; the score maps are reported too (on random weights their min-max
        normalisation of nearly flat maps magnifies any reordering of fp32 sums)."""
        import torch

        from text2mask.modeling.kernels import compile_vae_encoder
        from text2mask.wsss.predictor import Text2Mask

        self.ensure_atts()
        key = self.keys[0]
        rec, ref = self.attend(key, label="attend(eager reference)", keep=False)
        ref_maps = self.prof.last_maps
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(self.work / "inductor-cache")   # cold compile
        compiled = Text2Mask(compile_vae_encoder(self.sd), self.predictor.class_set, self.predictor.config)
        log(f"[kernels] compile: first call at {self.size_of[key]} (compiles the VAE encoder)")
        first, _ = self.attend(key, predictor=compiled, label="attend compile(first call)", keep=False)

        def channels_last(on: bool) -> None:
            for m in (self.sd.vae, self.sd.unet):
                m.to(memory_format=torch.channels_last if on else torch.contiguous_format)

        variants = {"channels_last": (self.predictor, channels_last), "compile": (compiled, lambda on: None)}
        self.doc["kernels"] = {}
        for name, (predictor, switch) in variants.items():
            log(f"[kernels] {name} vs eager at {self.size_of[key]}, {self.args.rounds} round(s)")
            rounds = []
            for r in range(self.args.rounds):
                order = ("eager", name) if r % 2 == 0 else (name, "eager")
                got = {}
                for what in order:
                    if what == "eager":
                        got[what] = self.attend(key, label="attend eager", keep=False)[0]
                        continue
                    switch(True)
                    try:
                        got[what] = self.attend(key, predictor=predictor, label=f"attend {name}", keep=False)
                    finally:
                        switch(False)
                fast, att = got[name]
                maps = self.prof.last_maps if order[-1] == name else None
                rounds.append({"seconds": fast["seconds"], "cpu_seconds": fast["cpu_seconds"],
                               "eager_seconds": got["eager"]["seconds"], "eager_cpu_seconds": got["eager"]["cpu_seconds"],
                               "vae_ratio": fast["breakdown"]["vae_encode"] / got["eager"]["breakdown"]["vae_encode"],
                               "unet_ratio": fast["breakdown"]["unet_capture"] / got["eager"]["breakdown"]["unet_capture"]})
                if maps is not None:
                    kept = (maps, att)
            maps, att = kept
            attention_diff = max([relative_difference(maps.self_attn, ref_maps.self_attn)]
                                 + [relative_difference(maps.cross[b], ref_maps.cross[b]) for b in ref_maps.cross])
            k = {"rounds": rounds, "ratio": median([r["seconds"] / r["eager_seconds"] for r in rounds]),
                 "cpu_ratio": median([r["cpu_seconds"] / r["eager_cpu_seconds"] for r in rounds]),
                 "vae_ratio": median([r["vae_ratio"] for r in rounds]),
                 "unet_ratio": median([r["unet_ratio"] for r in rounds]),
                 "attention_relative_difference": attention_diff,
                 "score_relative_difference": relative_difference(att.scores, ref.scores),
                 "label_agreement": float((att.labels == ref.labels).mean())}
            if name == "compile":
                eager_s = median([r["eager_seconds"] for r in rounds])
                saved = eager_s - median([r["seconds"] for r in rounds])
                k["compile_seconds"] = first["seconds"] - eager_s
                k["break_even_images"] = k["compile_seconds"] / saved if saved > 0 else None
            # Judged on the stages a variant changes: --compile only touches the VAE encoder,
            # and the whole attend's ratio adds the UNet's noise to its gain.
            speed = k["vae_ratio"] if name == "compile" else k["cpu_ratio"]
            k["keep"] = k["attention_relative_difference"] <= RELATIVE_TOLERANCE and speed < 0.97
            log(f"  {name}: {k['ratio']:.3f} x eager (cpu {k['cpu_ratio']:.3f}; VAE {k['vae_ratio']:.3f}, UNet "
                f"{k['unet_ratio']:.3f}); attention maps rel. diff {attention_diff:.1e}, score maps "
                f"{k['score_relative_difference']:.1e}; labels agree {k['label_agreement']:.4f}"
                + (f"; compile {k['compile_seconds']:.1f} s, break-even {_num(k['break_even_images'])} images"
                   if name == "compile" else "") + f"; {'KEEP' if k['keep'] else 'drop'}")
            self.doc["kernels"][name] = k
            self.save()

    # -- report ------------------------------------------------------------------------
    def report(self) -> None:
        rows, d, verdicts = [], self.doc, []

        def add(step, value, ratio=None, target=None, ok=None, extra=""):
            rows.append((step, value, ratio, target, ok, extra))
            if ok is not None:
                verdicts.append(ok)

        for size, recs in sorted(d["floor"].items()):
            s = [r["seconds"] for r in recs]
            add(f"truncated floor {size} (VAE {mean([r['vae_seconds'] for r in recs]):.1f} + UNet-to-11 "
                f"{mean([r['unet_seconds'] for r in recs]):.1f})", mean(s), 1.0,
                extra=f"n={len(s)} min {min(s):.1f} max {max(s):.1f}")
        for size, rounds in sorted(d.get("rounds", {}).items()):
            ratio = median([r["ratio"] for r in rounds])
            add(f"pipeline (attend) 1 sample {size}", median([r["attend_seconds"] for r in rounds]), ratio,
                f"<= {TARGET_ONE}", ratio <= TARGET_ONE, _fmt_rounds(rounds) + "; "
                + _fmt_breakdown(_mean_breakdown([r for r in d["attend"]["one"] if r["size"] == size]),
                                 mean([r["attend_seconds"] for r in rounds])))
        t = d.get("ten")
        if t:
            add(f"pipeline (attend) 10 samples {t['size']}", median([r["attend_seconds"] for r in t["rounds"]]),
                t["ratio"], f"<= {TARGET_TEN}", t["ratio"] <= TARGET_TEN,
                _fmt_rounds(t["rounds"]) + " (floor: VAE + 10-row truncated UNet)")
        r = d.get("runner")
        if r:
            ratio = r["floor_sum_seconds"] and r["wall_seconds"] / r["floor_sum_seconds"]
            add(f"runner wall/image, 1 sample, CRF in 1 worker ({r['images']} img)", r["per_image_seconds"],
                ratio, f"<= {TARGET_ONE}", None if ratio is None else ratio <= TARGET_ONE,
                "vs the mean floor of each image's size")
            add("model-side wait for the CRF queue / wall", r["queue_wait_seconds"], r["queue_wait_fraction"],
                "< 0.05", r["queue_wait_fraction"] < 0.05, "ratio = fraction")
        m = d.get("memory")
        if m:
            add(f"peak RSS GB, {m['size']} (ru_maxrss)", m["ru_maxrss_after_attend_bytes"] / GB,
                m["ru_maxrss_after_attend_bytes"] / m["target_bytes"], f"<= {m['target_bytes'] / GB:.2f} GB",
                m["pass"], f"weights {m['weights_bytes'] / GB:.2f} GB + 3 GB; ratio to the bound")
        c = d.get("crf")
        if c:
            for w, v in c["workers"].items():
                add(f"CRF+PNG rate, {w} worker(s) (img/s)", v["images_per_second"],
                    extra=f"{v['images']} images in {v['seconds']:.1f} s")
            pool = c["pool"]
            add("CRF images per CPU-second", c["crf_images_per_cpu_second"],
                extra="workers for a model side of " + ", ".join(
                    f"{k} img/s: {n}" for k, n in pool["per_model_rate"].items()))
        for name, v in d.get("dtype", {}).items():
            for im in v["images"]:
                sec = im["seconds"] / im["fp32_seconds"] if im["fp32_seconds"] and v["mode"] == "native" else None
                stage = ", ".join(f"{s} {im['stages'][s]:.1f}/{im['fp32_stages'][s]:.1f}"
                                  for s in im["stages"]) if im["fp32_stages"] else ""
                add(f"{name} ({v['mode']}) {im['size']}: agreement initial / crf", im["initial_agreement"],
                    sec, extra=f"crf {im['crf_agreement']:.4f}; max|dscore| {im['max_score_difference']:.1e}; "
                    + (f"s {name}/fp32: {stage}, crf {im['crf_seconds']:.2f}/{im['fp32_crf_seconds']:.2f}"
                       if v["mode"] == "native" else "time: not native on this CPU"))
        fs = d.get("fewshot")
        if fs:
            for method in ("diffews", "diffseg"):
                for k in (1, 5):
                    c = fs[method][f"{k}-shot"]
                    add(f"{method} {k}-shot episode at {fs['resolution']}² (TFLOP, meta)", c["total"],
                        extra=", ".join(f"{a} {b:.2f}" for a, b in c.items() if a != "total"))
            add("diffseg training step per episode (TFLOP, cached features)", fs["diffseg"]["train_step_per_episode"],
                extra=f"UNet forward + up-path backward, SCM, PAM; batch {fs['diffseg']['train_batch']}")
        for name, k in d.get("kernels", {}).items():
            extra = (f"compile {k['compile_seconds']:.1f} s cold, break-even {_num(k['break_even_images'])} images; "
                     if name == "compile" else "")
            add(f"{name}, fp32 (attend vs eager)", median([r["seconds"] for r in k["rounds"]]), k["ratio"],
                "faster, exact", extra=f"{'KEEP' if k['keep'] else 'drop'}: {extra}cpu-ratio {k['cpu_ratio']:.3f} "
                f"(VAE {k['vae_ratio']:.3f}, UNet {k['unet_ratio']:.3f}); attention maps rel. diff "
                f"{k['attention_relative_difference']:.1e}; score maps {k['score_relative_difference']:.1e}; "
                f"labels agree {k['label_agreement']:.4f}")
        log("")
        if "machine" in d:                   # absent when only the meta-device fewshot step ran
            log(f"CPU: {d['machine']['cpu']['model']}; flags {' '.join(d['machine']['cpu']['flags'])}; "
                f"torch threads {d['machine']['torch_threads']}")
        log(f"{'step':58s} {'value':>9s} {'ratio':>7s} {'target':>14s} {'result':>6s}  notes")
        log("-" * 130)
        for step, value, ratio, target, ok, extra in rows:
            log(f"{step:58s} {_num(value, 3 if value is not None and value < 10 else 1):>9s} {_num(ratio, 3):>7s} "
                f"{target or '':>14s} {'' if ok is None else ('PASS' if ok else 'no'):>6s}  {extra}")
        log("(value: seconds unless stated; ratio: to the truncated floor at the same size unless stated)")
        d["table"] = [{"step": s, "value": v, "ratio": ra, "target": t, "pass": ok, "notes": e}
                      for s, v, ra, t, ok, e in rows]
        d["all_pass"] = all(verdicts) if verdicts else None


def _num(x, nd=1) -> str:
    return "" if x is None else f"{x:.{nd}f}"


def _fmt_rounds(rounds: list) -> str:
    """Median ratios of a step's rounds, and where the difference to the floor comes from."""
    each = ", ".join(f"{r['ratio']:.3f}" for r in rounds)
    return (f"median of {len(rounds)} round(s): cpu-ratio {median([r['cpu_ratio'] for r in rounds]):.3f}, "
            f"VAE {median([r['vae_ratio'] for r in rounds]):.3f}, UNet {median([r['unet_ratio'] for r in rounds]):.3f}"
            f" x the floor's; work beyond the floor, timed: text + propagation "
            f"{100 * median([r['extra_share'] for r in rounds]):.1f} % + explicit probabilities "
            f"{100 * median([r['probabilities_seconds'] / r['floor_seconds'] for r in rounds]):.1f} % = "
            f"{100 * median([r['accounted_share'] for r in rounds]):.1f} % of the floor; round ratios {each}")


def _mean_breakdown(recs: list) -> dict:
    return {k: mean([r["breakdown"][k] for r in recs]) for k in Profile.STAGES}


def _fmt_breakdown(b: dict, total: float) -> str:
    other = total - sum(b.values())
    parts = [f"{k} {v:.1f}" for k, v in b.items() if v >= 0.05]
    return "[" + ", ".join(parts + [f"other {other:.1f}"]) + "]"


def _versions() -> dict:
    from importlib import metadata
    out = {}
    for pkg in ("torch", "diffusers", "transformers", "numpy", "pydensecrf2", "psutil"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help=f"comma list of steps among {', '.join(STEPS)} (default: all)")
    ap.add_argument("--images", type=int, default=1, choices=(1, 2), help="photos per padded size (default 1)")
    ap.add_argument("--sizes", default="768,1024", help="padded sizes to measure: 768 (768x576), 1024 (1024x448)")
    ap.add_argument("--dtypes", default="bfloat16,float16", help="low precisions for the dtype step")
    ap.add_argument("--json", default=str(ROOT / "runs" / "benchmark.json"), help="where to write the results")
    ap.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # tiny widths: checks the script
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's default)")
    ap.add_argument("--rounds", type=int, default=3, help="floor/attend pairs per photo for the 1- and "
                    "10-sample ratios (median reported; default 3)")
    args = ap.parse_args(argv)
    bad = set(filter(None, args.only.split(","))) - set(STEPS)
    if bad:
        ap.error(f"unknown step(s) {sorted(bad)}; choose from {STEPS}")

    import warnings
    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]   # text2mask from this checkout; tiny_models
    b = Bench(args)
    t0 = time.perf_counter()
    log(f"text2mask benchmark, steps {sorted(b.steps)}, load average {os.getloadavg()}")
    try:
        st = b.steps
        if st - {"fewshot"}:                 # the SD v1 model and photos: every step but fewshot
            b.build()
            b.load_images()
        if "memory" in st and b.keys1024:
            b.step_memory()                  # the 1024 warm-up and the memory figure
        if {"floor", "pipeline"} & st:
            b.step_pipeline()
        if "ten" in st:
            b.step_ten()
        if "runner" in st:
            b.step_runner()
        if "crf" in st:
            b.step_crf()
        if "dtype" in st:
            b.step_dtype()
        if "kernels" in st:
            b.step_kernels()
        if "fewshot" in st:
            from fewshot_cost import episode_costs

            b.doc["fewshot"] = episode_costs(log=log)
        b.doc["status"] = "complete"
    except BaseException as e:
        b.doc["status"] = f"failed: {type(e).__name__}: {e}"
        raise
    finally:
        b.doc["total_seconds"] = time.perf_counter() - t0
        b.doc["load_average_end"] = os.getloadavg()
        try:
            b.report()
        finally:
            b.save()
            shutil.rmtree(b.work, ignore_errors=True)
            log(f"\nJSON: {b.json_path}   total {b.doc['total_seconds'] / 60:.1f} min")
    return 0 if b.doc.get("all_pass") in (True, None) else 1


if __name__ == "__main__":
    sys.exit(main())
