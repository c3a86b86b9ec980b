"""Loading Kandinsky 2.2: the decoder UNet, MoVQ and the prior's CLIP image tower
(model I/O lives here only; DIFFSEG.md §2).

The parts DiffSeg uses, and nothing else (no prior transformer, no text encoder, no
sampler):

- **UNet** (``kandinsky-2-2-decoder/unet``): conditioned on an image embedding only.
  ``encoder_hid_dim_type="image_proj"`` turns the embedding E into 32 context tokens
  (Linear → reshape → LayerNorm) and ``addition_embed_type="image"`` adds E to the time
  embedding. Every attention layer (22 in the real model: 9 down, 1 mid, 12 up, at the
  latent's /2, /4, /8 grids) is an *added-KV* layer: one softmax over [context; spatial]
  keys (``modeling.added_kv``).
- **MoVQ** (``…/movq``, a ``VQModel`` with spatial norm): ``encode(x).latents`` is
  deterministic and is used **without a scaling factor** (the config's 0.18215 is
  unused by every Kandinsky 2.2 pipeline); decoding skips the quantiser
  (``decode(z, force_not_quantize=True)``, as the pipeline). Not the SD VAE: the SD
  ``encode()`` (posterior × scale) must not be used here.
- **CLIP image tower** (``kandinsky-2-2-prior/image_encoder``, ViT-bigG/14,
  ``image_embeds`` 1280-d) and the prior's image-processor settings (224 px, OpenAI CLIP
  normalisation), applied by ``clip_pixels`` with PIL, so the pixels do not depend on
  which backend transformers picks.
- the decoder's **DDPM schedule** (linear β 0.00085–0.012, ε) for ᾱ_t.

Sources: a hub id of the decoder (the prior defaults to ``kandinsky-community/
kandinsky-2-2-prior``), a local folder holding ``decoder/`` and ``prior/`` (what the
tiny-model builder writes), a local decoder folder plus a prior folder or id, or
pipelines already in memory (``Kandinsky22.from_pipes``). Every load is checked
(``check_layout``) before any work, and the error names what was found.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import ModelLoadError
from ..log import get

log = get(__name__)

DECODER_ID = "kandinsky-community/kandinsky-2-2-decoder"
PRIOR_ID = "kandinsky-community/kandinsky-2-2-prior"
DECODER_PARTS = ("unet", "movq", "scheduler")
PRIOR_PARTS = ("image_encoder", "image_processor")
LAYOUT = ("Kandinsky 2.2 decoder: UNet with encoder_hid_dim_type 'image_proj' and addition_embed_type 'image', "
          "every attention an added-KV layer (22 in the real model); MoVQ (VQModel, spatial norm); the 2.2 "
          "prior's CLIPVisionModelWithProjection whose projection_dim equals the UNet's encoder_hid_dim")
_HOW_TO = (f"Pass --model with a Kandinsky 2.2 decoder hub id ({DECODER_ID}) and, if needed, --prior "
           f"({PRIOR_ID}); or a local folder with decoder/{{unet,movq,scheduler}} and "
           "prior/{image_encoder,image_processor} (e.g. downloaded on a connected machine with "
           f"`hf download {DECODER_ID} --local-dir DIR/decoder` and `hf download {PRIOR_ID} --include "
           "'image_encoder/*' 'image_processor/*' --local-dir DIR/prior`).")


def is_kandinsky22(unet_config: dict) -> bool:
    """A UNet config of the Kandinsky 2.2 decoder family (image-embedding conditioning)."""
    get_ = unet_config.get if isinstance(unet_config, dict) else (lambda k, d=None: getattr(unet_config, k, d))
    return get_("encoder_hid_dim_type") == "image_proj" and get_("addition_embed_type") == "image"


# -- the CLIP image processor's pixels ----------------------------------------------------------

@dataclass(frozen=True)
class ClipPreprocess:
    """The prior's CLIPImageProcessor settings (preprocessor_config.json)."""

    shortest_edge: int = 224
    crop: tuple[int, int] = (224, 224)          # (height, width)
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    resample: int = 3                           # PIL bicubic

    @classmethod
    def from_config(cls, cfg: dict, where: str) -> "ClipPreprocess":
        try:
            size, crop = cfg.get("size", {}), cfg.get("crop_size", {})
            edge = int(size["shortest_edge"] if isinstance(size, dict) else size)
            if isinstance(crop, dict):
                crop_hw = (int(crop["height"]), int(crop["width"]))
            else:
                crop_hw = (int(crop), int(crop))
            out = cls(edge, crop_hw, tuple(map(float, cfg["image_mean"])), tuple(map(float, cfg["image_std"])),
                      int(cfg.get("resample", 3)))
        except (KeyError, TypeError, ValueError) as e:
            raise ModelLoadError(f"{where}: not a CLIP image-processor config ({type(e).__name__}: {e})") from None
        crop_fits = edge >= 1 and min(crop_hw) >= 1 and max(crop_hw) <= edge
        if not (crop_fits and len(out.mean) == 3 and len(out.std) == 3 and all(s > 0 for s in out.std)):
            raise ModelLoadError(f"{where}: CLIP image-processor config with size {edge}, crop {crop_hw}, "
                                 f"mean {out.mean}, std {out.std}")
        return out


def clip_pixels(images: list[np.ndarray], pre: ClipPreprocess) -> torch.Tensor:
    """(N, 3, h, w) CLIP pixel values of uint8 RGB images (H, W, 3), as the CLIP image
    processor computes them: shortest edge resized (PIL, ``resample``), centre crop,
    /255, normalised. DiffSeg's masked supports are square, so nothing is cropped."""
    from PIL import Image

    out = []
    for a in images:
        im = Image.fromarray(np.asarray(a, np.uint8))
        w, h = im.size
        s = pre.shortest_edge
        nw, nh = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
        im = im.resize((nw, nh), resample=pre.resample)
        ch, cw = pre.crop
        top, left = (nh - ch) // 2, (nw - cw) // 2
        px = np.asarray(im, np.float32)[top:top + ch, left:left + cw] / 255.0
        out.append(torch.from_numpy((px - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)))
    return torch.stack(out).permute(0, 3, 1, 2).contiguous()


# -- the model --------------------------------------------------------------------------------

@dataclass
class Kandinsky22:
    unet: torch.nn.Module
    movq: torch.nn.Module
    image_encoder: torch.nn.Module
    clip: ClipPreprocess
    alphas_cumprod: torch.Tensor     # (T,) float64, CPU
    device: torch.device
    dtype: torch.dtype
    info: dict = field(default_factory=dict)

    @property
    def context_tokens(self) -> int:
        """Context tokens the image embedding becomes (32 in Kandinsky 2.2)."""
        return int(self.unet.encoder_hid_proj.num_image_text_embeds)

    @property
    def latent_factor(self) -> int:
        """Pixels per latent cell along each side (8)."""
        return 2 ** (len(self.movq.config.block_out_channels) - 1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """MoVQ latents of images x (N, 3, R, R) in [−1, 1]: ``movq.encode(x).latents``, no
        scaling factor (the Kandinsky 2.2 pipelines and training script use none)."""
        return self.movq.encode(x.to(self.device, self.dtype)).latents

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, R, R), about [−1, 1], of latents z, past the quantiser (as the pipeline)."""
        return self.movq.decode(z.to(self.dtype), force_not_quantize=True).sample

    def image_embeds(self, images: list[np.ndarray]) -> torch.Tensor:
        """(N, P) CLIP image embeddings (``image_embeds``) of uint8 RGB images."""
        px = clip_pixels(images, self.clip).to(self.device, self.image_encoder.dtype)
        return self.image_encoder(px).image_embeds

    @classmethod
    def from_pipes(cls, decoder, prior=None, *, info: dict | None = None) -> "Kandinsky22":
        """Wrap pipelines already in memory: a ``KandinskyV22Pipeline`` (unet, movq,
        scheduler) and a ``KandinskyV22PriorPipeline`` (image_encoder, image_processor),
        or one ``KandinskyV22CombinedPipeline``. The same module objects: not reloaded,
        not copied, not moved. Device and dtype are the UNet's."""
        prior = prior if prior is not None else decoder
        encoder = getattr(prior, "image_encoder", None) or getattr(prior, "prior_image_encoder", None)
        processor = getattr(prior, "image_processor", None) or getattr(prior, "prior_image_processor", None)
        missing = [n for n, v in (("unet", getattr(decoder, "unet", None)), ("movq", getattr(decoder, "movq", None)),
                                  ("scheduler", getattr(decoder, "scheduler", None)), ("image_encoder", encoder),
                                  ("image_processor", processor)) if v is None]
        if missing:
            raise ModelLoadError(f"pipelines {type(decoder).__name__}/{type(prior).__name__} lack "
                                 f"{', '.join(missing)}: DiffSeg needs the Kandinsky 2.2 decoder's unet, movq and "
                                 "scheduler and the prior's image_encoder and image_processor")
        name = str(getattr(decoder, "name_or_path", None) or type(decoder).__name__)
        where = f"pipeline {type(decoder).__name__}"
        clip = ClipPreprocess.from_config(processor.to_dict(), where)
        base = {"model": name, "prior": str(getattr(prior, "name_or_path", "") or type(prior).__name__),
                "source": "pipeline"}
        return _assemble(decoder.unet, decoder.movq, encoder, clip, decoder.scheduler, decoder.unet.device,
                         decoder.unet.dtype, {**base, **(info or {})}, where)


# -- checks -----------------------------------------------------------------------------------

def check_layout(unet, movq, image_encoder, where: str) -> None:
    """Refuse anything but the Kandinsky 2.2 decoder layout, naming what was found."""
    from .added_kv import added_kv_layers

    cfg = unet.config
    found = []
    if not is_kandinsky22(dict(cfg)):
        found.append(f"UNet encoder_hid_dim_type={cfg.get('encoder_hid_dim_type')!r}, "
                     f"addition_embed_type={cfg.get('addition_embed_type')!r}"
                     + (" (Kandinsky 2.1: text_image_proj)" if cfg.get("encoder_hid_dim_type") == "text_image_proj"
                        else " (a text-conditioned UNet such as Stable Diffusion)"
                        if cfg.get("encoder_hid_dim_type") is None else ""))
    else:
        try:
            layers = added_kv_layers(unet)
        except ModelLoadError as e:
            found.append(str(e))
        else:
            grids = sorted({layer.factor for layer in layers})
            if len(grids) < 2:
                found.append(f"added-KV attention at one grid only (latent/{grids})")
        proj = getattr(getattr(image_encoder, "config", None), "projection_dim", None)
        if proj != cfg.get("encoder_hid_dim"):
            found.append(f"image tower projection_dim {proj} but the UNet reads {cfg.get('encoder_hid_dim')}-d "
                         "image embeddings (decoder and prior of different models)")
    mcfg = getattr(movq, "config", {})
    if type(movq).__name__ != "VQModel" or mcfg.get("norm_type") != "spatial":
        found.append(f"image autoencoder {type(movq).__name__} with norm_type {mcfg.get('norm_type')!r} "
                     "(MoVQ is a VQModel with spatial norm)")
    elif (mcfg.get("vq_embed_dim") or mcfg.get("latent_channels")) != cfg.get("in_channels"):
        found.append(f"MoVQ latents of {mcfg.get('vq_embed_dim') or mcfg.get('latent_channels')} channels but "
                     f"UNet in_channels {cfg.get('in_channels')}")
    if type(image_encoder).__name__ != "CLIPVisionModelWithProjection":
        found.append(f"image tower {type(image_encoder).__name__} (expected CLIPVisionModelWithProjection)")
    if found:
        raise ModelLoadError(f"{where} is not a Kandinsky 2.2 decoder + prior image tower: found "
                             f"{'; '.join(found)}. Supported: {LAYOUT}.")


# -- loading ----------------------------------------------------------------------------------

def _assemble(unet, movq, image_encoder, clip: ClipPreprocess, scheduler, dev, dt, info: dict,
              where: str) -> Kandinsky22:
    from diffusers import DDPMScheduler

    check_layout(unet, movq, image_encoder, where)
    cfg = scheduler.config
    if getattr(cfg, "prediction_type", "epsilon") != "epsilon":
        raise ModelLoadError(f"{where}: scheduler prediction_type {cfg.prediction_type!r}; the Kandinsky 2.2 "
                             "decoder predicts epsilon")
    alphas_cumprod = DDPMScheduler.from_config(cfg).alphas_cumprod.to(torch.float64).cpu()
    from .added_kv import added_kv_layers

    info = {**info, "family": "kandinsky22", "attention_layers": len(added_kv_layers(unet)),
            "device": str(dev), "dtype": str(dt).replace("torch.", "")}
    return Kandinsky22(unet, movq, image_encoder, clip, alphas_cumprod, dev, dt, info)


def _finish(k: Kandinsky22) -> Kandinsky22:
    for m in (k.unet, k.movq, k.image_encoder):
        m.to(k.device).eval().requires_grad_(False)
    log.info("%s (Kandinsky 2.2, %d added-KV attention layers) on %s in %s", k.info.get("model"),
             k.info["attention_layers"], k.device, str(k.dtype).replace("torch.", ""))
    return k


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: missing ({what})") from None
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: unreadable {what} ({e})") from None


def _describe(folder: Path) -> str:
    subs = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    return f"it holds {', '.join(f'{s}/' for s in subs) or 'no subfolders'}"


def _check_folder(folder: Path, parts: tuple[str, ...], what: str) -> None:
    absent = [p for p in parts if not (folder / p).is_dir()]
    if absent:
        raise ModelLoadError(f"{folder}: not a Kandinsky 2.2 {what} folder (no {', '.join(f'{a}/' for a in absent)}; "
                             f"{_describe(folder)}).\n{_HOW_TO}")


def _refuse_other_unet(folder: Path) -> None:
    """Name the family of a UNet that is not Kandinsky 2.2, before reading any weights."""
    cfg = _read_json(folder / "unet" / "config.json", "UNet config")
    if not is_kandinsky22(cfg):
        raise ModelLoadError(f"{folder}: its UNet has encoder_hid_dim_type={cfg.get('encoder_hid_dim_type')!r}, "
                             f"addition_embed_type={cfg.get('addition_embed_type')!r}; not a Kandinsky 2.2 decoder "
                             "(DiffSeg needs one; DiffewS and the other methods take Stable Diffusion).")


def _load_decoder(src: str, dt, **kw):
    from diffusers import DDPMScheduler, UNet2DConditionModel, VQModel

    unet = UNet2DConditionModel.from_pretrained(src, subfolder="unet", torch_dtype=dt, **kw)
    movq = VQModel.from_pretrained(src, subfolder="movq", torch_dtype=dt, **kw)
    scheduler = DDPMScheduler.from_pretrained(src, subfolder="scheduler", **kw)
    return unet, movq, scheduler


def _load_prior(src: str, dt, where: str, **kw):
    from huggingface_hub import hf_hub_download
    from transformers import CLIPVisionModelWithProjection

    encoder = CLIPVisionModelWithProjection.from_pretrained(src, subfolder="image_encoder", dtype=dt, **kw)
    local = Path(src)
    if local.is_dir():
        cfg_path = local / "image_processor" / "preprocessor_config.json"
    else:
        cfg_path = Path(hf_hub_download(src, "image_processor/preprocessor_config.json", **kw))
    return encoder, ClipPreprocess.from_config(_read_json(cfg_path, "image-processor config"), where)


def load(source: str = DECODER_ID, *, device: str | None = None, dtype: str | None = None,
         revision: str | None = None, prior: str | None = None, prior_revision: str | None = None) -> Kandinsky22:
    """Kandinsky 2.2 from ``source``: a local folder with ``decoder/`` and ``prior/``, a
    local decoder folder (``unet/``, ``movq/``, ``scheduler/``) with ``prior`` (folder or
    hub id; default the 2.2 prior on the hub), or a decoder hub id."""
    from .loading import _HUB_ID, _hub_offline, _hub_probe, folder_digest, resolve_device, resolve_dtype
    from .loading import RANDOM_WEIGHTS_MARKER, _resolved_revision

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    local = Path(str(source)).expanduser()
    info: dict = {"model": str(source)}
    if local.is_dir() and (local / "decoder").is_dir() and prior is None:
        decoder_dir, prior_src = local / "decoder", str(local / "prior")
        info.update(source="folder", local=True, folder_sha256=folder_digest(local))
        if (local / RANDOM_WEIGHTS_MARKER).is_file():
            info["random_weights"] = True
    elif local.is_dir():
        decoder_dir, prior_src = local, prior or PRIOR_ID
        info.update(source="folder", local=True, folder_sha256=folder_digest(local))
        if (local / RANDOM_WEIGHTS_MARKER).is_file():
            info["random_weights"] = True
    elif local.exists():
        raise ModelLoadError(f"{source}: a file; a Kandinsky 2.2 model is a folder or a hub id.\n{_HOW_TO}")
    elif not _HUB_ID.fullmatch(str(source)):
        raise ModelLoadError(f"{source!r}: no such local folder, and not a hub id like {DECODER_ID!r}")
    else:
        decoder_dir, prior_src = None, prior or PRIOR_ID
        info.update(source="hub", local=False, revision=revision or "main")
    info["prior"] = prior_src
    where = f"Kandinsky 2.2 model {source}"

    # 1. The decoder.
    if decoder_dir is not None:
        _check_folder(decoder_dir, DECODER_PARTS, "decoder")
        _refuse_other_unet(decoder_dir)
        try:
            unet, movq, scheduler = _load_decoder(str(decoder_dir), dt, local_files_only=True)
        except Exception as e:
            raise ModelLoadError(f"cannot load the decoder from {decoder_dir}: {type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else ''}") from e
    else:
        try:
            unet, movq, scheduler = _load_decoder(str(source), dt, revision=revision, local_files_only=True)
        except Exception as e:
            if _hub_offline():
                raise ModelLoadError(f"cannot load {where}: HF_HUB_OFFLINE is set and it is not (completely) in "
                                     f"the local Hugging Face cache ({type(e).__name__}).\n{_HOW_TO}") from None
            _hub_probe(str(source), revision, "the Kandinsky 2.2 decoder")
            unet, movq, scheduler = _load_decoder(str(source), dt, revision=revision)
        info["resolved_revision"] = _resolved_revision(unet)

    # 2. The prior's image tower.
    prior_dir = Path(prior_src).expanduser()
    if prior_dir.is_dir():
        _check_folder(prior_dir, PRIOR_PARTS, "prior (image tower)")
        if decoder_dir is None or prior is not None:
            info["prior_sha256"] = folder_digest(prior_dir)
        try:
            encoder, clip = _load_prior(str(prior_dir), dt, where, local_files_only=True)
        except ModelLoadError:
            raise
        except Exception as e:
            raise ModelLoadError(f"cannot load the image tower from {prior_dir}: {type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else ''}") from e
    else:
        if not _HUB_ID.fullmatch(prior_src):
            raise ModelLoadError(f"--prior {prior_src!r}: no such local folder, and not a hub id like {PRIOR_ID!r}")
        try:
            encoder, clip = _load_prior(prior_src, dt, where, revision=prior_revision, local_files_only=True)
        except Exception as e:
            if _hub_offline():
                raise ModelLoadError(f"cannot load the prior {prior_src!r}: HF_HUB_OFFLINE is set and its "
                                     f"image_encoder/ is not in the local cache ({type(e).__name__}).\n{_HOW_TO}") from None
            encoder, clip = _load_prior(prior_src, dt, where, revision=prior_revision)
        info["prior_revision"] = prior_revision or "main"
    return _finish(_assemble(unet, movq, encoder, clip, scheduler, dev, dt, info, where))
