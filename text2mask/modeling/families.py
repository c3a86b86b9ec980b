"""Model families behind one description (issue 24): how a family is recognised from its
UNet config, how one prompt becomes the UNet's text conditioning, where its attention is
read, and the WSSS input size.

    family       text conditioning of one prompt                          capture layout
    sd1          CLIP ViT-L/14 last states (77, 768)                      16 blocks x 1 layer
    sd2          OpenCLIP ViT-H/14 last states (77, 1024)                 16 blocks x 1 layer
    sdxl         [CLIP-L ; OpenCLIP-bigG] penultimate states (77, 2048)   11 blocks x 2/10 layers
                 + pooled bigG embedding and time ids (added_cond_kwargs)
    kandinsky22  a CLIP image embedding: no text (modeling.kandinsky)     its own added-KV attention

Kandinsky 2.2 is registered for recognition only: the Stable Diffusion loader names it and
points at the command that reads it. SD3 and Flux have no UNet (a DiT / MMDiT
``transformer/``): ``refuse_transformer`` names them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import ModelLoadError
from . import sdxl
from .capture import SD_LAYOUT, CaptureLayout

SD_FAMILIES = ("sd1", "sd2")                 # every method
WSSS_FAMILIES = ("sd1", "sd2", "sdxl")       # generate / segment (and the Python API Text2Mask)
MAX_TOKENS = 77                               # CLIP's context: start token + 75 + end token


@dataclass(frozen=True)
class TextCondition:
    """One prompt as the UNet reads it."""

    hidden: torch.Tensor                 # (tokens, width): the cross-attention's keys and values
    pooled: torch.Tensor | None = None   # (width,): SDXL's pooled text embedding; None for SD 1.x/2.x


def _get(config):
    if isinstance(config, dict):
        return lambda k, d=None: config.get(k, d)
    return lambda k, d=None: getattr(config, k, d)


def prompt_ids(tokenizer, text: str) -> torch.Tensor:
    """(1, 77) ids of a prompt padded with the tokenizer's own pad token; never truncated."""
    ids = tokenizer(text, padding="max_length", max_length=MAX_TOKENS, truncation=False,
                    return_tensors="pt").input_ids
    if ids.shape[1] != MAX_TOKENS:
        raise ValueError(f"prompt does not fit in {MAX_TOKENS} tokens: {text!r}")
    return ids


def _clip_condition(sd, text: str) -> TextCondition:
    """SD 1.x/2.x: the last hidden states of the one text encoder."""
    emb = sd.text_encoder(prompt_ids(sd.tokenizer, text).to(sd.device))[0]
    return TextCondition(emb[0])


def _sdxl_condition(sd, text: str) -> TextCondition:
    hidden, pooled = sdxl.encode_prompt((sd.tokenizer, sd.tokenizer_2), (sd.text_encoder, sd.text_encoder_2),
                                        text, sd.device)
    return TextCondition(hidden, pooled)


def _sdxl_added(sd, pooled: torch.Tensor, pixel_hw: tuple[int, int]) -> dict:
    return {"text_embeds": pooled, "time_ids": sdxl.time_ids(pixel_hw, pooled.shape[0], pooled.dtype, pooled.device)}


def _is_kandinsky22(unet_config) -> bool:
    try:
        from .kandinsky import is_kandinsky22
    except ImportError:   # the Kandinsky module is optional to this one
        return False
    return is_kandinsky22(unet_config)


@dataclass(frozen=True)
class Family:
    name: str
    title: str
    detect: Callable[[object], bool]                  # from the UNet config (dict or diffusers FrozenDict)
    layout: CaptureLayout | None                      # None: not read through modeling.capture
    condition: Callable[[object, str], TextCondition] | None = None  # (sd, prompt) -> its conditioning
    added: Callable | None = None                     # (sd, pooled rows, (h, w) pixels) -> added_cond_kwargs
    wsss_side: int | None = None                      # WSSS long side; None: the reference's bands (704..1024)
    components: tuple[str, ...] = ("vae", "unet", "text_encoder", "tokenizer", "scheduler")
    refusal: str | None = None                        # why the Stable Diffusion loader refuses it


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("sd1", "Stable Diffusion 1.x",
           lambda c: not _get(c)("addition_embed_type") and not _get(c)("use_linear_projection", False),
           SD_LAYOUT, _clip_condition),
    Family("sd2", "Stable Diffusion 2.x",
           lambda c: not _get(c)("addition_embed_type") and bool(_get(c)("use_linear_projection", False)),
           SD_LAYOUT, _clip_condition),
    Family("sdxl", "Stable Diffusion XL", lambda c: _get(c)("addition_embed_type") == sdxl.TEXT_TIME,
           sdxl.LAYOUT, _sdxl_condition, _sdxl_added, wsss_side=sdxl.NATIVE_SIZE, components=sdxl.COMPONENTS),
    Family("kandinsky22", "Kandinsky 2.2 decoder", _is_kandinsky22, None,
           refusal="its UNet attends to a CLIP image embedding, not to a prompt, through added-KV attention; "
                   "text2mask reads it only for few-shot segmentation: `text2mask fewshot train --method diffseg --model <its folder>`"),
)}


def family_of_unet(unet_config) -> Family:
    """The family whose UNet a config describes, by the feature that sets it apart (SD
    1.x's for a config that is none of them: its checks then say what was found)."""
    for name in ("kandinsky22", "sdxl", "sd2"):
        if FAMILIES[name].detect(unet_config):
            return FAMILIES[name]
    return FAMILIES["sd1"]


# diffusers' transformer (DiT / MMDiT) classes of the models without a UNet.
_TRANSFORMERS = {"SD3Transformer2DModel": "Stable Diffusion 3 (MMDiT)", "FluxTransformer2DModel": "Flux (MMDiT)"}


def transformer_name(config) -> str | None:
    """'Stable Diffusion 3 (MMDiT)', 'Flux (MMDiT)' or 'a DiT transformer (<class>)' for the
    config of a diffusers ``transformer/``; None for anything else (a UNet's config)."""
    g = _get(config)
    cls = g("_class_name")
    if cls in _TRANSFORMERS:
        return _TRANSFORMERS[cls]
    if g("joint_attention_dim") is not None and g("down_block_types") is None:
        return f"a DiT/MMDiT transformer ({cls or 'joint_attention_dim in its config'})"
    return None


def refuse_transformer(name: str, where: str) -> ModelLoadError:
    return ModelLoadError(
        f"{where} is {name}: a transformer (DiT/MMDiT) with joint text-image attention and no UNet. text2mask "
        "reads the cross- and self-attention of a UNet: Stable Diffusion 1.x, 2.x and (generate, segment) SDXL base. "
        "SD3 and Flux are not supported.")
