#!/usr/bin/env python
"""Speed/memory benchmark of text2mask on the FULL Stable Diffusion v1 architecture.

A benchmark, not a test: it builds SD v1.4's architecture with random weights offline
(UNet 860M, VAE 84M, CLIP ViT-L/14 text encoder 123M; the real CLIP tokenizer; DDPM
scaled_linear schedule) and measures, on real VOC photos:

  floor     VAE encode + ONE full conditional UNet forward (default fused attention,
            batch 1) at the image's input size: the cost no implementation can beat
  runner    the real batch runner (text2mask.wsss.run.generate), 1 sample, CRF on,
            overlapped in workers=1 process: wall / images vs the floor; the model part
            alone (Text2Mask.attend, per call) vs the floor; queue-wait fraction
  memory    peak resident memory of the 1024-pixel case vs the model weights
  ten       10 samples: attend vs VAE encode + a 10-row batched full UNet forward
  crf       CRF + PNG writing throughput (text2mask.wsss.write.finish) with 1 and 2 workers

Targets (from the issue): per image, 1 sample <= 1.10 x floor; 10 samples <= 1.05 x
(VAE encode + 10 UNet rows); peak memory at 1024 px <= weights + 3 GB; model-side wait
for the CRF queue < 5 % of wall time.

    python scripts/benchmark.py [--quick] [--only floor,runner,...] [--json runs/benchmark.json]

Timings on a shared machine are noisy: every step also records CPU seconds of this
process and the load average, and floors and pipeline runs are interleaved.
"""
from __future__ import annotations

# Keep the module top light: the runner's CRF workers are spawned processes, and spawn
# imports the parent's __main__ module (this file) in each of them.
import argparse
import json
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
STEPS = ("memory", "floor", "runner", "crf", "ten")
GB = 1e9

# 500x375 photos -> 768x576 input (latent 96x72).
IMAGES_768 = ("2007_000039", "2007_000063")            # tvmonitor; chair + dog
# Real photos cropped to 500x200 rows (aspect 2.5 > 16/7) -> 1024x448 input (latent 128x56).
CROPS_1024 = (("2007_000392", 64), ("2007_006241", 153))  # horse + person; bottle, chair, table
CROP_HEIGHT = 200


def log(*a) -> None:
    print(*a, flush=True)


def ru_maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


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
    from transformers import CLIPTextConfig, CLIPTextModel

    from text2mask.modeling.loading import StableDiffusion
    from tiny_models import build_clip_tokenizer

    # Default initialisation takes ~15 s for 1.07B parameters on 2 cores, so no tricks
    # are needed; it also keeps activations in a sane range (no NaN/denormals that
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
            cross_attention_dim=64 if smoke else 768, norm_num_groups=8 if smoke else 32, norm_eps=1e-5, act_fn="silu",
            downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, mid_block_scale_factor=1,
        )
        vae = AutoencoderKL(  # vae/config.json
            in_channels=3, out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(16, 32, 32, 32) if smoke else (128, 256, 512, 512),
            layers_per_block=2, latent_channels=4, norm_num_groups=8 if smoke else 32, sample_size=512, scaling_factor=0.18215, act_fn="silu",
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


# --------------------------------------------------------------------------------------
# Profiling hooks (in this process only; no package file is modified).
# --------------------------------------------------------------------------------------

class Profile:
    """Accumulated seconds of the stages inside Text2Mask.attend."""

    STAGES = ("vae_encode", "text_encode", "unet_capture", "class_cross", "propagate", "to_image")

    def __init__(self):
        self.acc = {k: 0.0 for k in self.STAGES}

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
        from text2mask.wsss import propagate as P
        from text2mask.modeling import capture

        sd.vae.encode = self._timed("vae_encode", sd.vae.encode)
        te = sd.text_encoder
        te.forward = self._timed("text_encode", te.forward)
        if not hasattr(capture.AttentionCapture.run, "__wrapped__"):
            capture.AttentionCapture.run = self._timed("unet_capture", capture.AttentionCapture.run)
        for name in ("class_cross", "propagate", "to_image"):
            if not hasattr(getattr(P, name), "__wrapped__"):
                setattr(P, name, self._timed(name, getattr(P, name)))


# --------------------------------------------------------------------------------------
# The benchmark.
# --------------------------------------------------------------------------------------

def mean(xs):
    return sum(xs) / len(xs) if xs else None


class Bench:
    def __init__(self, args):
        self.args = args
        self.quick = args.quick
        self.steps = set(args.only.split(",")) if args.only else set(STEPS)
        if self.quick:
            self.steps.discard("ten")
        self.json_path = Path(args.json)
        self.work = Path(tempfile.mkdtemp(prefix="t2m-bench-"))
        self.doc: dict = {"status": "running", "quick": self.quick, "steps": sorted(self.steps),
                          "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": sys.argv,
                          "floor": {}, "attend": {}, "notes": []}
        self.prof = Profile()
        self.rgb: dict = {}       # key -> RGB array
        self.labels: dict = {}    # key -> classes
        self.atts: dict = {}      # key -> Attention (for the CRF step)

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

        n768 = 1 if self.quick else len(IMAGES_768)
        n1024 = 1 if self.quick else len(CROPS_1024)
        self.keys768 = list(IMAGES_768[:n768])
        self.keys1024 = []
        for key in self.keys768:
            self.rgb[key] = read_image(VOC / "JPEGImages" / f"{key}.jpg")
            self.labels[key] = labels_from_mask(VOC / "SegmentationClass" / f"{key}.png", 21)
        crop_dir = self.work / "crops"
        crop_dir.mkdir()
        for src, y in CROPS_1024[:n1024]:
            rgb = read_image(VOC / "JPEGImages" / f"{src}.jpg")[y:y + CROP_HEIGHT]
            gt = read_index_png(VOC / "SegmentationClass" / f"{src}.png")[y:y + CROP_HEIGHT]
            key = f"{src}_crop{rgb.shape[1]}x{rgb.shape[0]}"
            # The runner reads images from files: write the crop losslessly.
            Image.fromarray(np.ascontiguousarray(rgb)).save(crop_dir / f"{key}.png")
            self.rgb[key] = read_image(crop_dir / f"{key}.png")
            self.labels[key] = tuple(int(v) for v in np.unique(gt) if 0 < v < 21)
            self.keys1024.append(key)
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
        log(f"torch {torch.__version__}, threads {torch.get_num_threads()} "
            f"(interop {torch.get_num_interop_threads()}), cpu_count {os.cpu_count()}")
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
        procs = sorted({type(p).__name__ for p in self.sd.unet.attn_processors.values()})
        self.doc.update({
            "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                        "interop_threads": torch.get_num_interop_threads(),
                        "platform": platform.platform(), "python": platform.python_version()},
            "versions": _versions(),
            "params": stats, "build_seconds": round(c.wall, 2),
            "rss_after_build_bytes": ru_maxrss_bytes(),
            "default_attention_processors": procs,
        })
        log(f"  built in {c.wall:.1f} s; ru_maxrss after build {ru_maxrss_bytes() / GB:.2f} GB; "
            f"UNet processors {procs}")
        self.save()

    # -- floor: VAE encode + one full conditional UNet forward -------------------------
    def floor(self, key: str, rows: int = 1) -> dict:
        import torch

        from text2mask.preprocess import geometry, prepare

        sd = self.sd
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
            t = torch.tensor(150)
            with RssSampler() as mem, Clock() as cu:
                out = sd.unet(z_t, t, encoder_hidden_states=emb.expand(rows, -1, -1)).sample
            del out
        rec = {"key": key, "size": self.size_of[key], "rows": rows,
               "vae_seconds": cv.wall, "unet_seconds": cu.wall, "seconds": cv.wall + cu.wall,
               "cpu_seconds": cv.cpu + cu.cpu, "load": cv.load, "unet_window_peak_rss": mem.peak}
        log(f"  floor {key} {self.size_of[key]} rows={rows}: VAE {cv.wall:.1f} s + UNet {cu.wall:.1f} s "
            f"= {rec['seconds']:.1f} s (cpu {rec['cpu_seconds']:.0f} s, load {cv.load:.1f})")
        if rows == 1:
            self.doc["floor"].setdefault(self.size_of[key], []).append(rec)
        self.save()
        return rec

    def floor_mean(self, size: str, field: str = "seconds") -> float | None:
        return mean([r[field] for r in self.doc["floor"].get(size, [])])

    # -- attend directly ---------------------------------------------------------------
    def attend(self, key: str, predictor=None, label: str = "attend") -> dict:
        predictor = predictor or self.predictor
        plan = predictor.plan(self.labels[key])
        predictor._text_cache.clear()          # count the text encoder every time
        before = self.prof.snapshot()
        with RssSampler() as mem, Clock() as c:
            att = predictor.attend([(key, self.rgb[key], plan)])[0]
        rec = {"key": key, "size": self.size_of[key], "samples": predictor.config.samples,
               "seconds": c.wall, "cpu_seconds": c.cpu, "load": c.load,
               "breakdown": self.prof.delta(before), "window_peak_rss": mem.peak,
               "ru_maxrss_after": ru_maxrss_bytes()}
        if predictor.config.samples == 1:
            self.atts[key] = att
        log(f"  {label} {key} {self.size_of[key]} samples={rec['samples']}: {c.wall:.1f} s "
            f"(cpu {c.cpu:.0f} s, load {c.load:.1f})  " + _fmt_breakdown(rec["breakdown"], c.wall))
        return rec

    # -- steps -------------------------------------------------------------------------
    def step_memory(self) -> None:
        """First heavy operation after the build, so ru_maxrss is this case's peak."""
        key = self.keys1024[0]
        log(f"[memory] attend at {self.size_of[key]} (also the warm-up at this size)")
        base = ru_maxrss_bytes()
        rec = self.attend(key, label="attend(warm-up)")
        peak = rec["ru_maxrss_after"]
        target = self.weights_bytes + 3 * GB
        self.doc["memory"] = {
            "key": key, "size": self.size_of[key], "weights_bytes": self.weights_bytes,
            "ru_maxrss_before_bytes": base, "ru_maxrss_after_attend_bytes": peak,
            "attend_window_peak_rss_bytes": rec["window_peak_rss"],
            "target_bytes": target, "pass": peak <= target, "attend": rec}
        self.doc["attend"].setdefault("warmup", []).append(rec)
        log(f"  peak RSS {peak / GB:.2f} GB (window {rec['window_peak_rss'] / GB:.2f} GB) vs weights "
            f"{self.weights_bytes / GB:.2f} GB + 3 GB = {target / GB:.2f} GB")
        if "floor" in self.steps:
            f = self.floor(key)
            self.doc["memory"]["floor_unet_window_peak_rss_bytes"] = f["unet_window_peak_rss"]
            self.doc["memory"]["ru_maxrss_after_floor_bytes"] = ru_maxrss_bytes()
        self.save()

    def step_floor(self, which: str) -> None:
        if "floor" not in self.steps:
            return
        log(f"[floor] {which}")
        if which == "768":
            self.floor(self.keys768[0])
        else:
            self.floor(self.keys1024[0])

    def step_runner(self) -> None:
        from text2mask.data.base import Dataset, Sample
        from text2mask.wsss.run import RunOptions, generate

        p = self.predictor
        keys = [k for pair in zip(self.keys768, self.keys1024) for k in pair]
        keys += [k for k in self.keys768 + self.keys1024 if k not in keys]
        samples = [Sample(k, self.paths[k], tuple(self.labels[k])) for k in keys]
        ds = Dataset("voc", "benchmark", p.class_set, samples,
                     "benchmark: image-level labels from the ground-truth masks")
        calls = []
        inner = p.attend

        def timed_attend(batch):
            p._text_cache.clear()
            before = self.prof.snapshot()
            with Clock() as c:
                res = inner(batch)
            calls.append({"keys": [b[0] for b in batch], "size": self.size_of[batch[0][0]],
                          "seconds": c.wall, "cpu_seconds": c.cpu, "load": c.load,
                          "breakdown": self.prof.delta(before)})
            log(f"  [runner] attend {batch[0][0]} {self.size_of[batch[0][0]]}: {c.wall:.1f} s "
                f"(cpu {c.cpu:.0f} s, load {c.load:.1f})  " + _fmt_breakdown(calls[-1]["breakdown"], c.wall))
            for att in res:
                self.atts[att.key] = att
            return res

        p.attend = timed_attend
        opts = RunOptions(out=self.work / "run", batch_size=1, workers=1, evaluate=False,
                          progress=False, overwrite=True)
        log(f"[runner] generate() on {len(samples)} images, 1 sample, CRF on, workers=1: {keys}")
        try:
            with Clock() as c:
                s = generate(p, ds, opts, log=lambda m: log("  [runner]", m))
        finally:
            del p.attend
        if s.done != len(samples) or s.failed:
            raise RuntimeError(f"runner: {s.done} done, {s.failed} failed: {s.failures}")
        floors = [self.floor_mean(self.size_of[k]) for k in keys]
        floor_sum = sum(floors) if all(f is not None for f in floors) else None
        self.doc["runner"] = {
            "keys": keys, "images": len(keys), "wall_seconds": s.seconds, "outer_wall_seconds": c.wall,
            "cpu_seconds": c.cpu, "model_seconds": s.model_seconds,
            "queue_wait_seconds": s.queue_wait_seconds,
            "queue_wait_fraction": s.queue_wait_seconds / s.seconds,
            "per_image_seconds": s.seconds / len(keys), "floor_sum_seconds": floor_sum,
            "attend_calls": calls}
        self.save()
        log(f"  runner: {s.seconds:.1f} s for {len(keys)} images = {s.seconds / len(keys):.1f} s/image; "
            f"model {s.model_seconds:.1f} s; queue wait {s.queue_wait_seconds:.2f} s")

    def step_crf(self) -> None:
        from concurrent.futures import ProcessPoolExecutor, wait
        from multiprocessing import get_context

        from text2mask.wsss.result import refine
        from text2mask.wsss.write import finish

        if not self.atts:
            for k in self.keys768 + self.keys1024:
                self.attend(k)
        keys = list(self.atts)
        cfg = self.predictor.config
        reps = 1 if self.quick else 2
        serial = []
        for k in keys:   # in this process, for the per-image cost
            with Clock() as c:
                refine(self.atts[k], self.rgb[k], cfg)
            serial.append({"key": k, "seconds": c.wall, "classes": len(self.atts[k].classes)})
            log(f"  [crf] refine {k} ({self.rgb[k].shape[1]}x{self.rgb[k].shape[0]}, "
                f"{len(self.atts[k].classes)} channels): {c.wall:.2f} s")
        out = {"serial": serial, "workers": {}}
        for w in (1, 2):
            tasks = [k for _ in range(reps * w) for k in keys]
            dest = self.work / f"crf-w{w}"
            with ProcessPoolExecutor(w, mp_context=get_context("spawn")) as pool:
                wait([pool.submit(finish, self.atts[keys[0]], self.rgb[keys[0]], cfg, dest)
                      for _ in range(w)])                      # start the workers
                with Clock() as c:
                    wait([pool.submit(finish, self.atts[k], self.rgb[k], cfg, dest) for k in tasks])
            out["workers"][str(w)] = {"images": len(tasks), "seconds": c.wall,
                                      "images_per_second": len(tasks) / c.wall, "load": c.load}
            log(f"  [crf] W={w}: {len(tasks)} images in {c.wall:.1f} s = {len(tasks) / c.wall:.2f} img/s")
        self.doc["crf"] = out
        self.save()

    def step_ten(self) -> None:
        from text2mask.wsss.predictor import Text2Mask
        from text2mask.wsss.result import MaskConfig

        key = self.keys768[0]
        p10 = Text2Mask(self.sd, self.predictor.class_set, MaskConfig(samples=10))
        log(f"[ten] 10 samples at {self.size_of[key]}: attend vs VAE encode + 10-row UNet forward")
        rec = self.attend(key, predictor=p10, label="attend")
        fl = self.floor(key, rows=10)
        self.doc["ten"] = {"attend": rec, "floor": fl, "ratio": rec["seconds"] / fl["seconds"]}
        self.save()

    # -- report ------------------------------------------------------------------------
    def report(self) -> None:
        rows, d = [], self.doc
        verdicts = []

        def add(step, seconds, ratio=None, target=None, ok=None, extra=""):
            rows.append((step, seconds, ratio, target, ok, extra))
            if ok is not None:
                verdicts.append(ok)

        for size, recs in sorted(d["floor"].items()):
            s = [r["seconds"] for r in recs]
            add(f"floor {size} (VAE {mean([r['vae_seconds'] for r in recs]):.1f} + UNet "
                f"{mean([r['unet_seconds'] for r in recs]):.1f})", mean(s), 1.0,
                extra=f"n={len(s)} min {min(s):.1f}")
        for rec in d["attend"].get("warmup", []):
            f = self.floor_mean(rec["size"])
            add(f"attend {rec['size']} warm-up (1st call)", rec["seconds"], f and rec["seconds"] / f)
        r = d.get("runner")
        if r:
            by_size: dict = {}
            for call in r["attend_calls"]:
                by_size.setdefault(call["size"], []).append(call)
            for size, calls in sorted(by_size.items()):
                s = [c["seconds"] for c in calls]
                f, fc = self.floor_mean(size), self.floor_mean(size, "cpu_seconds")
                ratio = f and mean(s) / f
                cpu = f" cpu-ratio {mean([c['cpu_seconds'] for c in calls]) / fc:.3f}" if fc else ""
                add(f"model part: attend/image {size}", mean(s), ratio, "<= 1.10",
                    None if ratio is None else ratio <= 1.10, f"n={len(s)} min {min(s):.1f}{cpu}")
            ratio = r["floor_sum_seconds"] and r["wall_seconds"] / r["floor_sum_seconds"]
            fcs = [self.floor_mean(self.size_of[k], "cpu_seconds") for k in r["keys"]]
            cpu = (f"; cpu-ratio {r['cpu_seconds'] / sum(fcs):.3f} (this process)"
                   if all(x is not None for x in fcs) else "")
            add(f"runner wall/image, 1 sample, CRF, W=1 ({r['images']} img)", r["per_image_seconds"],
                ratio, "<= 1.10", None if ratio is None else ratio <= 1.10,
                "vs mean floor of each image's size" + cpu)
            add("model-side wait for CRF queue / wall", r["queue_wait_seconds"],
                r["queue_wait_fraction"], "< 0.05", r["queue_wait_fraction"] < 0.05, "ratio = fraction")
        t = d.get("ten")
        if t:
            add("attend, 10 samples (768x576)", t["attend"]["seconds"], t["ratio"], "<= 1.05",
                t["ratio"] <= 1.05, f"cpu-ratio {t['attend']['cpu_seconds'] / t['floor']['cpu_seconds']:.3f}; "
                f"floor10 = VAE {t['floor']['vae_seconds']:.1f} + "
                f"UNet(10 rows) {t['floor']['unet_seconds']:.1f} = {t['floor']['seconds']:.1f} s")
        m = d.get("memory")
        if m:
            add(f"peak RSS GB, {m['size']} (ru_maxrss)", m["ru_maxrss_after_attend_bytes"] / GB,
                m["ru_maxrss_after_attend_bytes"] / m["target_bytes"],
                f"<= {m['target_bytes'] / GB:.2f} GB", m["pass"],
                f"weights {m['weights_bytes'] / GB:.2f} GB + 3 GB; ratio to target")
        c = d.get("crf")
        if c:
            for w, v in c["workers"].items():
                add(f"CRF+write throughput W={w} (img/s)", v["images_per_second"],
                    extra=f"{v['images']} images in {v['seconds']:.1f} s")

        log("")
        log(f"{'step':58s} {'value':>9s} {'ratio':>7s} {'target':>14s} {'result':>6s}  notes")
        log("-" * 120)
        for step, sec, ratio, target, ok, extra in rows:
            log(f"{step:58s} {_num(sec):>9s} {_num(ratio, 3):>7s} {target or '':>14s} "
                f"{'' if ok is None else ('PASS' if ok else 'FAIL'):>6s}  {extra}")
        log("(value: seconds unless stated; ratio: to the floor at the same size unless stated)")
        d["table"] = [{"step": s, "value": v, "ratio": ra, "target": t, "pass": ok, "notes": e}
                      for s, v, ra, t, ok, e in rows]
        d["all_pass"] = all(verdicts) if verdicts else None


def _num(x, nd=1) -> str:
    return "" if x is None else f"{x:.{nd}f}"


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
    ap.add_argument("--quick", action="store_true",
                    help="1 floor per size, 1 image per size in the runner, no 768 warm-up, no 10-sample case")
    ap.add_argument("--only", default="", help=f"comma list of steps among {', '.join(STEPS)} (default: all)")
    ap.add_argument("--json", default=str(ROOT / "runs" / "benchmark.json"), help="where to write the results")
    ap.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # tiny widths: checks the script
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's default)")
    args = ap.parse_args(argv)
    bad = set(filter(None, args.only.split(","))) - set(STEPS)
    if bad:
        ap.error(f"unknown step(s) {sorted(bad)}; choose from {STEPS}")

    import warnings
    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    b = Bench(args)
    t0 = time.perf_counter()
    log(f"text2mask benchmark ({'quick' if args.quick else 'full'}), steps {sorted(b.steps)}, "
        f"load average {os.getloadavg()}")
    try:
        b.build()
        b.load_images()
        st = b.steps
        if "memory" in st:
            b.step_memory()                  # 1024 warm-up + memory (+ floor 1024 #1)
        elif {"runner", "ten", "floor"} & st:
            b.doc["attend"].setdefault("warmup", []).append(b.attend(b.keys1024[0], label="attend(warm-up)"))
        if not args.quick and {"runner", "ten", "floor"} & st:
            log("[warm-up] attend at 768x576")
            b.doc["attend"].setdefault("warmup", []).append(b.attend(b.keys768[0], label="attend(warm-up)"))
        b.step_floor("768")
        if "memory" not in st:
            b.step_floor("1024")
        if "runner" in st:
            b.step_runner()
        if not args.quick:
            b.step_floor("768")
            b.step_floor("1024")
        if "crf" in st:
            b.step_crf()
        if "ten" in st:
            b.step_ten()
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
