"""Loading the parts of Stable Diffusion 1.x / 2.x / XL the methods use (model I/O lives here only).

VAE, UNet, CLIP text encoder(s), tokenizer(s) and the DDPM noise schedule — no safety
checker, no feature extractor, no sampler, no watermarker. ``model`` is

- a Hugging Face id (``CompVis/stable-diffusion-v1-4``, ``stabilityai/stable-diffusion-2-1-base``,
  ``stabilityai/stable-diffusion-xl-base-1.0``),
- a local diffusers folder (the layout ``save_pretrained`` writes),
- a single ``.ckpt``/``.safetensors`` checkpoint (original ldm key layout, e.g. ``sd-v1-4.ckpt``)
  or SDXL's sgm layout, e.g. ``sd_xl_base_1.0.safetensors``) read by diffusers' ``from_single_file``:
  ``config`` (folder or hub id of a diffusers model of the same architecture) supplies the
  component configs and the tokenizers offline, and ``original_config`` (ldm YAML) a
  non-standard architecture, as diffusers names them;
- or, through ``StableDiffusion.from_pipe``, a pipeline already in memory (no reload, no copy).

Every load is checked before any work: the family (``families``; SD 1.x: OpenAI CLIP text
encoder, conv projections; SD 2.x: OpenCLIP, linear projections, per-block head counts;
SDXL: both, 2/10-layer blocks, pooled text and time ids) and the tokenizer
(``check_tokenizer``, issue 15: transformers 5 silently returns a 2-token tokenizer when
the vocabulary files are missing). ``families`` says which families a caller takes: SD
1.x/2.x by default (every method), SDXL too for WSSS ``generate``/``segment``.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..errors import ModelLoadError
from ..log import get
from . import sdxl
from .capture import check_layout
from .families import FAMILIES, SD_FAMILIES, Family, TextCondition, refuse_transformer, transformer_name
from .latents import posterior

log = get(__name__)

DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"
# A file the test/demo model builder leaves in its folder: runs on it say their masks mean nothing.
RANDOM_WEIGHTS_MARKER = "RANDOM_WEIGHTS.txt"
SINGLE_FILE_SUFFIXES = (".ckpt", ".safetensors")
# Seconds the hub may take to answer the one metadata request made before a download: an
# unreachable hub fails within seconds, not after minutes of retries.
HUB_PROBE_TIMEOUT = 5.0
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_START, _END = "<|startoftext|>", "<|endoftext|>"
# CLIP's byte-level BPE vocabulary: 256 byte tokens, 256 end-of-word byte tokens, one token
# per merge, then start and end of text.
_BPE_BASE_TOKENS = 2 * 256 + 2
_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json")
_PROBE = "a photo of a cat"

_HOW_TO = ("Pass --model with a local diffusers folder (with vae/, unet/, text_encoder/, tokenizer/, scheduler/), "
           "e.g. one saved by StableDiffusionPipeline.save_pretrained or downloaded on a connected machine with "
           "`hf download CompVis/stable-diffusion-v1-4 --local-dir DIR`; or a single .ckpt/.safetensors file "
           "with --config DIR_OR_ID naming a diffusers model of the same architecture.")


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
    prediction_type: str = "epsilon"   # the scheduler's: "epsilon" or "v_prediction" (SD 2.x 768)
    vae_encode: Callable | None = None  # compiled VAE encoder (kernels.compile_vae_encoder); None: eager
    scheduler: object = None            # the model's own sampler (refer's class images); None: not loaded
    tokenizer_2: object = None          # SDXL: OpenCLIP bigG's tokenizer (the same BPE, pads with "!")
    text_encoder_2: torch.nn.Module | None = None  # SDXL: CLIPTextModelWithProjection (pooled embedding)

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of the VAE posterior of x (B, 3, H, W) in [-1, 1], in float32. An
        fp16 SDXL keeps its VAE in fp32 (``force_upcast``: SDXL's VAE overflows in fp16)."""
        if x.dtype != self.vae.dtype:
            x = x.to(self.vae.dtype)
        return posterior(self.vae, x, self.vae_encode)

    @property
    def latent_scale(self) -> float:
        return float(getattr(self.vae.config, "scaling_factor", 0.18215))

    @property
    def family(self) -> str:
        return self.info["family"]

    @property
    def spec(self) -> Family:
        """The family's description: capture layout, text conditioning, WSSS input size."""
        return FAMILIES[self.family]

    def encode_prompt(self, text: str) -> TextCondition:
        """The UNet's text conditioning of one prompt (padded to 77 tokens, never truncated)."""
        return self.spec.condition(self, text)

    def added_conditions(self, pooled: torch.Tensor | None, pixel_hw: tuple[int, int]) -> dict | None:
        """SDXL's ``added_cond_kwargs`` for rows of pooled embeddings at a UNet input of
        ``pixel_hw``; None for SD 1.x/2.x."""
        return None if self.spec.added is None else self.spec.added(self, pooled, pixel_hw)

    @classmethod
    def from_pipe(cls, pipe, *, info: dict | None = None,
                  families: tuple[str, ...] = SD_FAMILIES) -> "StableDiffusion":
        """Wrap a diffusers pipeline already in memory (e.g. a notebook's
        ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline``): the very same module
        objects, not reloaded, not copied, not moved. Device and dtype are the UNet's."""
        name = str(getattr(pipe, "name_or_path", None) or type(pipe).__name__)
        unet = getattr(pipe, "unet", None)
        if unet is None and getattr(pipe, "transformer", None) is not None:
            raise refuse_transformer(transformer_name(pipe.transformer.config) or
                                     f"a transformer model ({type(pipe.transformer).__name__})",
                                     f"pipeline {type(pipe).__name__}")
        text_config = getattr(getattr(pipe, "text_encoder", None), "config", {})
        family = FAMILIES[model_family(unet.config, text_config, f"pipeline {type(pipe).__name__}", families)] \
            if unet is not None else FAMILIES["sd1"]
        missing = [n for n in family.components if getattr(pipe, n, None) is None]
        if missing:
            raise ModelLoadError(f"pipeline {type(pipe).__name__} has no {', '.join(missing)}: text2mask needs "
                                 f"the {', '.join(family.components)} of {family.title}")
        base = {"model": name, "source": "pipeline", "pipeline_class": type(pipe).__name__}
        return _assemble({n: getattr(pipe, n) for n in family.components}, pipe.unet.device, pipe.unet.dtype,
                         {**base, **(info or {})}, name, families=families)


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def native_bf16_cpu() -> bool:
    """The CPU multiplies bf16 natively (x86 AVX512-BF16 or AMX). Without it PyTorch's CPU
    bf16 kernels are 10-100x slower than fp32 (scripts/benchmark.py)."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


_BF16_HINTED = False


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """``auto``: fp32 on every device, because the official evaluation of every method here
    runs fp32 (Text2Mask, SLiMe, DiffewS and the personalized-segmentation code), so the
    default reproduces their numbers. fp16/bf16 stay one flag away: on the benchmark's two
    photos bf16 kept 99.6 % and 87.5 % of the initial labels and 99.99 % and 98.8 % of the
    CRF labels of fp32 (README, Performance). A CPU with native bf16 gets a hint in the log,
    once per process (``--dtype bf16``: about 1.8x faster there)."""
    global _BF16_HINTED
    if dtype in (None, "", "auto"):
        if device.type == "cpu" and not _BF16_HINTED and native_bf16_cpu():
            _BF16_HINTED = True
            log.info("this CPU computes bf16 natively: --dtype bf16 is about 1.8x faster, with slightly "
                     "different masks (README, Performance); keeping fp32")
        return torch.float32
    table = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
             "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; use fp32, fp16 or bf16")
    return table[dtype]


def _sha256(h, path: Path) -> None:
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)


def folder_digest(path: Path) -> str:
    """sha256 over the relative paths and bytes of every file of a local model folder,
    so run.json identifies exactly which weights made the masks."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        _sha256(h, f)
    return h.hexdigest()


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    _sha256(h, path)
    return h.hexdigest()


def _resolved_revision(module) -> str | None:
    """Commit hash of a hub snapshot (…/snapshots/<sha>/unet), if loaded from the cache."""
    parts = Path(str(getattr(module.config, "_name_or_path", ""))).parts
    if "snapshots" in parts:
        i = parts.index("snapshots")
        if i + 1 < len(parts):
            return parts[i + 1]
    return None


# -- checks ---------------------------------------------------------------------------------

def model_family(unet_config, text_config, where: str, families: tuple[str, ...] = SD_FAMILIES) -> str:
    """The family ("sd1", "sd2" or, if ``families`` has it, "sdxl") from the UNet's and the
    (first) text encoder's configs, or ModelLoadError naming what was found (SDXL for a
    method that does not read it, Kandinsky, SD3/Flux, inpainting, upscalers, refiners, a
    mix of families...)."""
    name = transformer_name(unet_config)
    if name:
        raise refuse_transformer(name, where)
    get_u = (lambda k, d=None: unet_config.get(k, d)) if isinstance(unet_config, dict) else (
        lambda k, d=None: getattr(unet_config, k, d))
    get_t = (lambda k, d=None: text_config.get(k, d)) if isinstance(text_config, dict) else (
        lambda k, d=None: getattr(text_config, k, d))
    kandinsky = FAMILIES["kandinsky22"]
    if kandinsky.detect(unet_config):
        raise ModelLoadError(f"{where} is a {kandinsky.title}: {kandinsky.refusal}.")
    xl = FAMILIES["sdxl"].detect(unet_config)
    if xl and "sdxl" in families:
        found = sdxl.problems(unet_config, text_config)
        if found:
            raise ModelLoadError(f"{where} has SDXL's added text/time conditioning but is not an SDXL base model: "
                                 f"found {'; '.join(found)}. text2mask reads SD 1.x, 2.x and SDXL base (not the "
                                 "refiner, inpainting or other SDXL variants).")
        return "sdxl"
    found = []
    if get_u("addition_embed_type"):
        found.append(f"addition_embed_type={get_u('addition_embed_type')!r} (SDXL-style conditioning)")
    layers = get_u("transformer_layers_per_block", 1)
    if any(n != 1 for n in (layers if isinstance(layers, (list, tuple)) else [layers])):
        found.append(f"transformer_layers_per_block={layers!r}")
    if get_u("in_channels") != 4:
        found.append(f"in_channels={get_u('in_channels')} (inpainting/depth models take extra channels)")
    if get_u("class_embed_type"):
        found.append(f"class_embed_type={get_u('class_embed_type')!r} (upscaler/unCLIP)")
    act, linear = get_t("hidden_act"), bool(get_u("use_linear_projection", False))
    family = {("quick_gelu", False): "sd1", ("gelu", True): "sd2"}.get((act, linear))
    if family is None:
        found.append(f"text encoder activation {act!r} with use_linear_projection={linear} (SD 1.x has "
                     "quick_gelu without, SD 2.x gelu with linear projections)")
    if found:
        xl_hint = (" SDXL base is read by `text2mask generate` and `segment` (and the Python API Text2Mask) only."
                   if xl else "")
        raise ModelLoadError(
            f"{where} is not a Stable Diffusion 1.x or 2.x model: found {'; '.join(found)}. "
            f"This supports SD 1.x and 2.x (SD3, Flux and others are not supported).{xl_hint}")
    return family


def _tokenizer_files(folder: Path | None) -> str:
    if folder is None:
        return "the tokenizer files"
    present = {f for f in _TOKENIZER_FILES if (folder / f).is_file()}
    if not folder.is_dir():
        return f"{folder} (missing)"
    absent = [f for f in _TOKENIZER_FILES if f not in present]
    return f"{folder} (has {', '.join(sorted(present)) or 'no files'}; missing {', '.join(absent) or 'nothing'})"


def check_tokenizer(tokenizer, vocab_size: int, where: str, folder: Path | None = None) -> None:
    """The tokenizer really loaded: as many tokens as the text encoder's vocabulary, the
    complete CLIP BPE (one merge per merged token), start/end of text as the last two BPE
    tokens, a pad token in the vocabulary, and a probe prompt framed by them.

    transformers 5 returns a 2-token tokenizer when the vocabulary files are missing and a
    character-level one when merges.txt is truncated; both would turn every class word into
    end-of-text tokens without an error."""
    problems = []
    if len(tokenizer) != vocab_size:
        problems.append(f"it has {len(tokenizer)} tokens, the text encoder expects {vocab_size}")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    bpe = json.loads(backend.to_str())["model"] if backend is not None else {}
    if bpe.get("type") != "BPE":
        problems.append(f"it is not a CLIP BPE tokenizer ({type(tokenizer).__name__}, model {bpe.get('type')!r})")
    else:
        n_vocab, n_merges = len(bpe["vocab"]), len(bpe["merges"])
        if n_merges != n_vocab - _BPE_BASE_TOKENS:
            problems.append(f"its BPE has {n_merges} merges for {n_vocab} tokens "
                            f"(CLIP needs {n_vocab - _BPE_BASE_TOKENS}: merges.txt is truncated or does not match vocab.json)")
        ends = (bpe["vocab"].get(_START), bpe["vocab"].get(_END))
        if ends != (n_vocab - 2, n_vocab - 1) or (tokenizer.bos_token_id, tokenizer.eos_token_id) != ends:
            problems.append(f"start/end of text are ids {tokenizer.bos_token_id}/{tokenizer.eos_token_id} "
                            f"(vocabulary: {ends[0]}/{ends[1]}, CLIP: {n_vocab - 2}/{n_vocab - 1})")
    pad = tokenizer.pad_token_id
    if pad is None or not 0 <= pad < vocab_size:
        problems.append(f"its pad token {tokenizer.pad_token!r} (id {pad}) is not in the vocabulary")
    if not problems:
        ids = tokenizer(_PROBE).input_ids
        inner = ids[1:-1]
        if ids[:1] != [tokenizer.bos_token_id] or ids[-1:] != [tokenizer.eos_token_id] or not inner or any(
                i in (tokenizer.eos_token_id, tokenizer.unk_token_id) for i in inner):
            problems.append(f"it encodes {_PROBE!r} as {ids}")
    if problems:
        raise ModelLoadError(
            f"the tokenizer of {where} did not load correctly: {'; '.join(problems)}. "
            f"Files: {_tokenizer_files(folder)}. Masks made with it would come from empty prompts. "
            "Fix: give the model folder a complete tokenizer/ (vocab.json and merges.txt, or tokenizer.json, "
            "as in the original model's tokenizer/ folder), or pass a model whose tokenizer is cached or reachable.")


def check_components(unet, text_encoder, tokenizer, where: str, tokenizer_folder: Path | None = None, *,
                     families: tuple[str, ...] = SD_FAMILIES, text_encoder_2=None, tokenizer_2=None) -> str:
    """Family, UNet layout, tokenizer(s) and the text width the UNet's cross-attention reads."""
    family = model_family(unet.config, text_encoder.config, where, families)
    check_layout(unet, FAMILIES[family].layout)
    check_tokenizer(tokenizer, text_encoder.config.vocab_size, where, tokenizer_folder)
    if family == "sdxl":
        if tokenizer_2 is not None and text_encoder_2 is not None:
            check_tokenizer(tokenizer_2, text_encoder_2.config.vocab_size, f"{where} (tokenizer_2)",
                            tokenizer_folder.parent / "tokenizer_2" if tokenizer_folder else None)
        sdxl.check_parts(unet, text_encoder, text_encoder_2, tokenizer, tokenizer_2, where)
        return family
    hidden, cross = text_encoder.config.hidden_size, unet.config.cross_attention_dim
    if hidden != cross:
        raise ModelLoadError(
            f"{where}: the text encoder gives {hidden}-wide token states but the UNet's cross-attention "
            f"reads {cross}-wide ones; text_encoder/ and unet/ come from different models. Use the "
            "components of one model.")
    return family


# -- hub access ------------------------------------------------------------------------------

def _hub_probe(model: str, revision: str | None, what: str = "the model") -> None:
    """One bounded metadata request (HEAD of unet/config.json, no retries) before any
    download, so an unreachable hub or a wrong id fails within seconds with a clear message.
    It goes through huggingface_hub's own session: HF_ENDPOINT, proxies and the token apply."""
    from huggingface_hub import constants, get_session, hf_hub_url
    from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError,
                                         RevisionNotFoundError)
    from huggingface_hub.utils import build_hf_headers, hf_raise_for_status

    url = hf_hub_url(model, "unet/config.json", revision=revision)
    try:
        response = get_session().head(url, headers=build_hf_headers(), timeout=HUB_PROBE_TIMEOUT,
                                      follow_redirects=True)
    except Exception as e:  # connection refused, timeouts, proxy errors: all say "unreachable"
        raise ModelLoadError(
            f"cannot load {what} {model!r}: it is not (completely) in the local Hugging Face cache and "
            f"the hub at {constants.ENDPOINT} is out of reach ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}).\n{_HOW_TO}") from None
    try:
        hf_raise_for_status(response)
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as e:
        raise ModelLoadError(f"cannot load {what} {model!r}{f' at revision {revision!r}' if revision else ''}: "
                             f"{type(e).__name__} (no diffusers model with unet/ there: SD3 and Flux keep a "
                             f"transformer/ instead and are not supported; or it is gated or private and no token "
                             f"is set).\n{_HOW_TO}") from None
    except HfHubHTTPError as e:
        raise ModelLoadError(f"cannot load {what} {model!r}: the hub answered {response.status_code} "
                             f"({str(e).splitlines()[0]}).\n{_HOW_TO}") from None


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


# -- loading ---------------------------------------------------------------------------------

def _load_folder_components(src: str, dt: torch.dtype, family: str = "sd1", **kw) -> dict:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(src, subfolder="tokenizer", **kw)
    text_encoder = CLIPTextModel.from_pretrained(src, subfolder="text_encoder", torch_dtype=dt, **kw)
    vae = AutoencoderKL.from_pretrained(src, subfolder="vae", torch_dtype=dt, **kw)
    unet = UNet2DConditionModel.from_pretrained(src, subfolder="unet", torch_dtype=dt, **kw)
    scheduler = DDPMScheduler.from_pretrained(src, subfolder="scheduler", **kw)
    parts = {"vae": vae, "unet": unet, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler}
    if family == "sdxl":
        from transformers import CLIPTextModelWithProjection

        parts["tokenizer_2"] = CLIPTokenizer.from_pretrained(src, subfolder="tokenizer_2", **kw)
        parts["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(src, subfolder="text_encoder_2",
                                                                              torch_dtype=dt, **kw)
    return parts


def _read_config(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: unreadable config ({e})") from None


def _read_configs(folder: Path) -> tuple[dict, dict]:
    """unet/ and text_encoder/ configs of a local folder, read before any weights. A folder
    with a transformer/ instead of a unet/ (SD3, Flux) and a Kandinsky decoder (no text
    encoder) are named before the text encoder is looked for."""
    if not (folder / "unet" / "config.json").is_file() and (folder / "transformer" / "config.json").is_file():
        cfg = _read_config(folder / "transformer" / "config.json")
        raise refuse_transformer(transformer_name(cfg) or f"a transformer model ({cfg.get('_class_name')})",
                                 f"local folder {folder}")
    if (folder / "unet" / "config.json").is_file():
        kandinsky = FAMILIES["kandinsky22"]
        if kandinsky.detect(_read_config(folder / "unet" / "config.json")):
            raise ModelLoadError(f"local folder {folder} is a {kandinsky.title}: {kandinsky.refusal}.")
    out = []
    for sub in ("unet", "text_encoder"):
        path = folder / sub / "config.json"
        if not path.is_file():
            raise ModelLoadError(f"{folder} has no {sub}/config.json: not a diffusers Stable Diffusion folder. "
                                 f"{_describe_folder(folder)}\n{_HOW_TO}")
        out.append(_read_config(path))
    return out[0], out[1]


def _describe_folder(folder: Path) -> str:
    index = folder / "model_index.json"
    subs = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    what = f"It holds {', '.join(f'{s}/' for s in subs) or 'no subfolders'}"
    if index.is_file():
        try:
            what += f"; model_index.json names {json.loads(index.read_text())['_class_name']}"
        except (OSError, ValueError, KeyError):
            pass
    return what + "."


def _load_error(where: str, e: Exception) -> ModelLoadError:
    return ModelLoadError(f"cannot load the model from {where}: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}\n{_HOW_TO}")


def _assemble(parts: dict, dev, dt, info: dict, where: str, tokenizer_folder: Path | None = None, *,
              families: tuple[str, ...] = SD_FAMILIES) -> StableDiffusion:
    vae, unet, text_encoder, tokenizer, scheduler = (parts[n] for n in
                                                     ("vae", "unet", "text_encoder", "tokenizer", "scheduler"))
    family = check_components(unet, text_encoder, tokenizer, where, tokenizer_folder, families=families,
                              text_encoder_2=parts.get("text_encoder_2"), tokenizer_2=parts.get("tokenizer_2"))
    cfg = scheduler.config
    if (cfg.num_train_timesteps, cfg.beta_schedule) != (1000, "scaled_linear"):
        raise ModelLoadError(f"{where}: expected SD's 1000-step scaled_linear schedule, got "
                             f"{cfg.num_train_timesteps}-step {cfg.beta_schedule}")
    prediction = getattr(cfg, "prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction"):
        raise ModelLoadError(f"{where}: prediction_type {prediction!r} is neither epsilon nor v_prediction")
    # The DDPM schedule of the scheduler's config: any SD scheduler class (PNDM, DDIM, Euler...)
    # may come with a pipeline; all compute alphas_cumprod from the betas as DDPM does.
    from diffusers import DDPMScheduler

    alphas_cumprod = DDPMScheduler.from_config(cfg).alphas_cumprod.to(torch.float64).cpu()
    info = {**info, "family": family, "prediction_type": prediction,
            "device": str(dev), "dtype": str(dt).replace("torch.", "")}
    return StableDiffusion(vae, unet, text_encoder, tokenizer, alphas_cumprod, dev, dt, info, prediction,
                           scheduler=scheduler, tokenizer_2=parts.get("tokenizer_2"),
                           text_encoder_2=parts.get("text_encoder_2"))


def load(model: str = DEFAULT_MODEL, *, device: str | None = None, dtype: str | None = None,
         revision: str | None = None, config: str | None = None,
         original_config: str | None = None, families: tuple[str, ...] = SD_FAMILIES) -> StableDiffusion:
    """Load SD 1.x/2.x (and SDXL base, if ``families`` has "sdxl") from a hub id, a
    diffusers folder or a single checkpoint file."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    local = Path(model).expanduser()
    if local.is_file():
        return _load_single_file(local, dev, dt, config, original_config, families)
    if config or original_config:
        raise ModelLoadError(f"--config/--original-config apply to a single checkpoint file; {model!r} is not one")
    if local.is_dir():
        return _load_folder(local, dev, dt, model, families)
    if not _HUB_ID.fullmatch(model):
        raise ModelLoadError(f"--model {model!r}: no such local folder or file, and not a Hugging Face id like "
                             f"{DEFAULT_MODEL!r}")
    return _load_hub(model, revision, dev, dt, families)


def _finish(sd: StableDiffusion) -> StableDiffusion:
    for m in (sd.vae, sd.unet, sd.text_encoder, sd.text_encoder_2):
        if m is not None:
            m.to(sd.device).eval().requires_grad_(False)
    if sd.dtype == torch.float16 and getattr(sd.vae.config, "force_upcast", False) and sd.family == "sdxl":
        sd.vae.to(torch.float32)  # SDXL's VAE overflows in fp16 (its config says force_upcast)
    log.info("%s (%s) on %s in %s", sd.info.get("model"), sd.info.get("family"), sd.device,
             str(sd.dtype).replace("torch.", ""))
    return sd


def _load_folder(folder: Path, dev, dt, model: str, families: tuple[str, ...] = SD_FAMILIES) -> StableDiffusion:
    where = f"local folder {folder}"
    unet_cfg, text_cfg = _read_configs(folder)
    family = model_family(unet_cfg, text_cfg, where, families)  # refuse other families before reading weights
    try:
        parts = _load_folder_components(str(folder), dt, family)
    except Exception as e:
        raise _load_error(where, e) from e
    info = {"model": model, "source": "folder", "local": True, "folder_sha256": folder_digest(folder)}
    if (folder / RANDOM_WEIGHTS_MARKER).is_file():
        info["random_weights"] = True
    return _finish(_assemble(parts, dev, dt, info, where, folder / "tokenizer", families=families))


def _hub_configs(model: str, revision: str | None, **kw) -> tuple[dict, dict]:
    """unet/ and text_encoder/ configs of a hub model (``local_files_only=True``: from the cache)."""
    from huggingface_hub import hf_hub_download

    out = []
    for sub in ("unet", "text_encoder"):
        with open(hf_hub_download(model, f"{sub}/config.json", revision=revision, **kw), encoding="utf-8") as f:
            out.append(json.load(f))
    return out[0], out[1]


def _load_hub(model: str, revision: str | None, dev, dt, families: tuple[str, ...] = SD_FAMILIES) -> StableDiffusion:
    """Cached models load without touching the network; otherwise one bounded probe, then
    huggingface_hub downloads what is missing (resuming partial files)."""
    where = f"Hugging Face model {model!r}"
    try:
        cached = _hub_configs(model, revision, local_files_only=True)
    except Exception:
        cached = None
    # A cached model of a family this caller does not take is refused here, not downloaded again.
    family = model_family(*cached, where, families) if cached else None
    try:
        if family is None:
            raise FileNotFoundError("unet/ or text_encoder/ config not in the cache")
        parts = _load_folder_components(model, dt, family, revision=revision, local_files_only=True)
        sd = _assemble(parts, dev, dt, {}, where, families=families)
    except Exception as e:
        if _hub_offline():
            raise ModelLoadError(f"cannot load {where}: HF_HUB_OFFLINE is set and it is not (completely) in the "
                                 f"local Hugging Face cache ({type(e).__name__}).\n{_HOW_TO}") from None
        log.debug("%s is not complete in the cache (%s); downloading", model, e)
        _hub_probe(model, revision)
        family = model_family(*_hub_configs(model, revision), where, families)
        try:
            parts = _load_folder_components(model, dt, family, revision=revision)
        except Exception as e2:
            raise _load_error(where, e2) from e2
        sd = _assemble(parts, dev, dt, {}, where, families=families)
    sd.info.update({"model": model, "source": "hub", "local": False, "revision": revision or "main",
                    "resolved_revision": _resolved_revision(sd.unet)})
    return _finish(sd)


def _load_single_file(path: Path, dev, dt, config: str | None, original_config: str | None,
                      families: tuple[str, ...] = SD_FAMILIES) -> StableDiffusion:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    where = f"checkpoint file {path}"
    if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise ModelLoadError(f"--model {str(path)!r} is a file but not a {' or '.join(SINGLE_FILE_SUFFIXES)} "
                             "checkpoint; pass a diffusers model folder, a Hugging Face id or a checkpoint file")
    xl = path.suffix.lower() == ".safetensors" and _refuse_other_architectures(path, families) == "sdxl"
    kw: dict = {"torch_dtype": dt}
    if config:
        config_dir = Path(config).expanduser()
        kw["config"] = str(config_dir) if config_dir.is_dir() else config
        if config_dir.is_dir():
            unet_cfg, text_cfg = _read_configs(config_dir)
            family = model_family(unet_cfg, text_cfg, f"--config {config_dir}", families)
            if (family == "sdxl") != xl and path.suffix.lower() == ".safetensors":
                raise ModelLoadError(f"{where} is {'an SDXL' if xl else 'an SD 1.x/2.x'} checkpoint but --config "
                                     f"{config_dir} is {FAMILIES[family].title}; pass the configs of its own family")
            xl = family == "sdxl"
    if original_config:
        kw["original_config"] = str(Path(original_config).expanduser())
    local_only = _hub_offline() or (config is not None and Path(config).expanduser().is_dir())
    try:
        if xl:
            # No watermarker (it needs invisible-watermark and only marks generated images).
            pipe = StableDiffusionXLPipeline.from_single_file(str(path), local_files_only=local_only,
                                                              add_watermarker=False, **kw)
        else:
            # safety_checker=None: never fetched (passing load_safety_checker at all makes
            # diffusers 0.42 take its legacy path, which downloads the checker).
            pipe = StableDiffusionPipeline.from_single_file(str(path), local_files_only=local_only,
                                                            safety_checker=None, feature_extractor=None, **kw)
    except Exception as e:
        example = "stabilityai/stable-diffusion-xl-base-1.0 for an SDXL" if xl else \
            "CompVis/stable-diffusion-v1-4 for an SD 1.x"
        hint = ("" if config else " Offline, pass --config with a diffusers folder (or cached hub id) of the same "
                f"architecture, e.g. {example} checkpoint.")
        raise ModelLoadError(f"cannot load {where}: {type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}.{hint}") from e
    info = {"model": str(path), "source": "single_file", "local": True, "file_sha256": file_digest(path)}
    if config:
        info["config"] = config
    if original_config:
        info["original_config"] = original_config
    sd = StableDiffusion.from_pipe(pipe, info=info, families=families)
    sd.device, sd.dtype = dev, dt
    sd.info.update({"device": str(dev), "dtype": str(dt).replace("torch.", "")})
    return _finish(sd)


def _refuse_other_architectures(path: Path, families: tuple[str, ...] = SD_FAMILIES) -> str | None:
    """SDXL/SD3/Flux single files are recognised from their key names (header only):
    "sdxl" for an SDXL checkpoint when ``families`` takes it, None for SD 1.x/2.x keys."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception as e:
        raise ModelLoadError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    for marker, name in (("model.diffusion_model.joint_blocks", "Stable Diffusion 3 (MMDiT)"),
                         ("joint_blocks.", "Stable Diffusion 3 (MMDiT)"), ("double_blocks.", "Flux (MMDiT)")):
        if any(k.startswith(marker) for k in keys):
            raise refuse_transformer(name, f"checkpoint file {path} (keys {marker}*)")
    if any(k.startswith(sdxl.SINGLE_FILE_MARKER) for k in keys):
        if "sdxl" in families:
            return "sdxl"
        raise ModelLoadError(f"{path} is an SDXL checkpoint (keys {sdxl.SINGLE_FILE_MARKER}*); this supports "
                             "Stable Diffusion 1.x and 2.x only. SDXL base is read by `text2mask generate` and "
                             "`segment` (and the Python API Text2Mask).")
    return None


def load_tokenizer(model: str = DEFAULT_MODEL, revision: str | None = None):
    """The model's tokenizer alone (for ``text2mask prompts``), checked like a full load
    against the text encoder's config: no weights are read."""
    from transformers import CLIPTextConfig, CLIPTokenizer

    local = Path(model).expanduser()
    if local.is_file():
        raise ModelLoadError(f"{model}: a single checkpoint file holds no tokenizer; pass the diffusers folder "
                             "or hub id given as its --config")
    if local.is_dir():
        where, src, kw, folder = f"local folder {local}", str(local), {"local_files_only": True}, local / "tokenizer"
    elif _HUB_ID.fullmatch(model):
        where, src, kw, folder = f"Hugging Face model {model!r}", model, {"revision": revision}, None
    else:
        raise ModelLoadError(f"--model {model!r}: no such local folder, and not a Hugging Face id like "
                             f"{DEFAULT_MODEL!r}")

    def attempt(**extra):
        try:
            tok = CLIPTokenizer.from_pretrained(src, subfolder="tokenizer", **kw, **extra)
            text_cfg = CLIPTextConfig.from_pretrained(src, subfolder="text_encoder", **kw, **extra)
        except Exception as e:
            raise _load_error(where, e) from e
        check_tokenizer(tok, text_cfg.vocab_size, where, folder)
        return tok

    if folder is not None:
        return attempt()
    try:    # a hub id: the local cache first, then the hub
        return attempt(local_files_only=True)
    except ModelLoadError as e:
        if _hub_offline():
            cause = type(e.__cause__).__name__ if e.__cause__ is not None else "not usable"
            raise ModelLoadError(f"cannot load the tokenizer of {where}: HF_HUB_OFFLINE is set and it is not in "
                                 f"the local Hugging Face cache ({cause}).\n{_HOW_TO}") from None
    _hub_probe(model, revision, "the tokenizer of")
    return attempt()
