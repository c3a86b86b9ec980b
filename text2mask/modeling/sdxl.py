"""SDXL base as the WSSS methods read it (issue 24): its capture layout, its text
conditioning and the checks of its parts. Loading itself goes through ``loading`` (hub id,
folder, single file, ``from_pipe``), like SD 1.x/2.x.

Text conditioning, as diffusers' ``StableDiffusionXLPipeline.encode_prompt`` and
``_get_add_time_ids`` compute it for one prompt:

    hidden   = [CLIP ViT-L/14 penultimate states ; OpenCLIP ViT-bigG/14 penultimate states]   (77, 768 + 1280)
    pooled   = bigG's projected end-of-text state (``text_embeds``)                          (1280,)
    time_ids = original_size + crops_coords_top_left + target_size = (H, W, 0, 0, H, W)

``hidden`` is what every cross-attention reads (keys and values); ``pooled`` and
``time_ids`` enter the UNet's time embedding (``added_cond_kwargs``), not the attention.
(H, W) is the UNet input in pixels: the photo as the UNet sees it, uncropped. Saying it
was this size originally is what the pipeline says when it generates at (H, W), so the
micro-conditioning asks for a sharp image of this size (a smaller ``original_size`` asks
SDXL for the look of an upscaled photo).

The two tokenizers share the CLIP BPE; only their padding differs (``tokenizer`` pads with
the end-of-text token 49407, ``tokenizer_2`` with "!" = id 0). A prompt's ids up to its end
token are therefore the same in both, so one set of token spans (counted with
``tokenizer``) indexes both halves of ``hidden``; ``encode_prompt`` checks that, prompt by
prompt, and ``check_parts`` checks at load that the two vocabularies and merge lists are
identical.
"""
from __future__ import annotations

import json

import torch

from ..errors import ModelLoadError
from .capture import CaptureLayout

TEXT_TIME = "text_time"       # UNet addition_embed_type of SDXL's added text/time conditioning
TIME_IDS = 6                  # original (h, w), crop top-left (y, x), target (h, w)
# The long side of the WSSS input (every aspect ratio): SDXL's native resolution. SD 1.x/2.x
# use the reference's aspect-ratio bands, 704..1024, i.e. 1.4-2x their native 512; SDXL was
# trained on ~1-megapixel buckets, where the 1024 band already is its native size and its
# attention grids (Self 64x64, Cross 32x32 for a square photo) match the paper's largest.
# Twice that (2048) would be outside SDXL's training sizes and cost 16x the Self memory.
NATIVE_SIZE = 1024
COMPONENTS = ("vae", "unet", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
LAYOUT_TEXT = ("SDXL base UNet: 11 transformer blocks (2 down at latent/2, 2 down at /4, 1 mid at /4, 3 up at "
               "/4, 3 up at /2; 2 transformer layers each at /2 and 10 at /4 in the released model), every "
               "layer with a self-attention attn1 and a cross-attention attn2")

# The paper's layers on SD 1.x (ALGORITHM.md section 3), by their place in the UNet:
#   Cross = the two down blocks of the 1/4 level, the mid block (1/8) and the first two up
#           blocks of the 1/4 level: blocks 4, 5, 6, 7, 8, i.e. every cross-attention of the
#           two coarsest levels except the last up block there;
#   Self  = the middle up block of the 1/2 level: block 11.
# SDXL has no 1/8 level: its coarsest level (1/4) holds the mid block, so the same places are
#   Cross = down_blocks.2.attentions.0/1, mid_block, up_blocks.0.attentions.0/1: blocks 2-6,
#           every cross-attention of the coarsest level except the last up block there;
#   Self  = up_blocks.1.attentions.1, the middle up block of the 1/2 level: block 9, which
#           is also SDXL's highest-resolution attention (it has none at 1/1).
# At 1024x1024 the Cross grids are all 32x32 (SD 1.x at its 1024 band: 32x32 and 16x16)
# and Self is 64x64 (SD 1.x: 64x64). A block of several transformer layers gives the mean of
# its layers' head-mean maps; the blocks are then averaged with equal weight as in SD 1.x.
# docs/sdxl.md gives the reasoning and the alternatives.
LAYOUT = CaptureLayout(factors=(2, 2, 4, 4, 4, 4, 4, 4, 2, 2, 2), single_layer=False,
                       cross_blocks=(2, 3, 4, 5, 6), self_blocks=(9,), description=LAYOUT_TEXT)

# Keys of an SDXL single-file checkpoint (Stability's sgm layout): the second text encoder.
SINGLE_FILE_MARKER = "conditioner.embedders.1"


def _getter(config):
    if isinstance(config, dict):
        return lambda k, d=None: config.get(k, d)
    return lambda k, d=None: getattr(config, k, d)


def problems(unet_config, text_config) -> list[str]:
    """What keeps an UNet / first text encoder config with SDXL's added conditioning from
    being SDXL base, in words ([] for SDXL base)."""
    u, t = _getter(unet_config), _getter(text_config)
    found = []
    if u("in_channels") != 4:
        found.append(f"in_channels={u('in_channels')} (SDXL inpainting takes 9)")
    if u("class_embed_type"):
        found.append(f"class_embed_type={u('class_embed_type')!r}")
    if not u("use_linear_projection", False):
        found.append("use_linear_projection=False (SDXL has linear projections)")
    if t("hidden_act") != "quick_gelu":
        found.append(f"text encoder activation {t('hidden_act')!r} (SDXL's first text encoder, OpenAI CLIP "
                     "ViT-L/14, has quick_gelu)")
    if list(u("down_block_types") or ()) != ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]:
        found.append(f"down block types {list(u('down_block_types') or ())} (SDXL base: DownBlock2D, "
                     "CrossAttnDownBlock2D, CrossAttnDownBlock2D; the refiner has 4 levels)")
    return found


def check_parts(unet, text_encoder, text_encoder_2, tokenizer, tokenizer_2, where: str) -> None:
    """The widths that tie SDXL's parts together, and two tokenizers with one BPE."""
    if text_encoder_2 is None or tokenizer_2 is None:
        raise ModelLoadError(f"{where}: SDXL needs text_encoder_2/ and tokenizer_2/ (OpenCLIP ViT-bigG); "
                             "they are missing")
    w1, w2 = text_encoder.config.hidden_size, text_encoder_2.config.hidden_size
    cross = unet.config.cross_attention_dim
    if w1 + w2 != cross:
        raise ModelLoadError(f"{where}: the text encoders give {w1} + {w2}-wide token states but the UNet's "
                             f"cross-attention reads {cross}-wide ones; use the components of one model")
    pooled = text_encoder_2.config.projection_dim
    want = unet.add_embedding.linear_1.in_features
    have = unet.config.addition_time_embed_dim * TIME_IDS + pooled
    if have != want:
        raise ModelLoadError(f"{where}: the UNet's added embedding takes {want} values, but {TIME_IDS} time ids x "
                             f"{unet.config.addition_time_embed_dim} + the {pooled}-wide pooled text embedding give "
                             f"{have} (an SDXL refiner has 5 time ids; text2mask reads SDXL base)")
    if not hasattr(text_encoder_2, "text_projection"):
        raise ModelLoadError(f"{where}: text_encoder_2 is a {type(text_encoder_2).__name__}, SDXL's is a "
                             "CLIPTextModelWithProjection (the pooled embedding comes from its projection)")
    bpe = [json.loads(t.backend_tokenizer.to_str())["model"] for t in (tokenizer, tokenizer_2)]
    if bpe[0]["vocab"] != bpe[1]["vocab"] or bpe[0]["merges"] != bpe[1]["merges"]:
        raise ModelLoadError(f"{where}: tokenizer/ and tokenizer_2/ hold different BPE vocabularies or merges; "
                             "SDXL's two tokenizers share the CLIP BPE, and one set of token spans must index both")


def encode_prompt(tokenizers, text_encoders, text: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden (77, D1 + D2), pooled (P,)) of one prompt, as ``StableDiffusionXLPipeline``
    computes them (clip_skip None: the penultimate hidden states of both encoders)."""
    from .families import prompt_ids  # families registers this module: imported on use

    ids = [prompt_ids(tok, text) for tok in tokenizers]
    n = len(tokenizers[0](text).input_ids)  # up to and with the end token
    if not torch.equal(ids[0][:, :n], ids[1][:, :n]):
        raise ValueError(f"SDXL's two tokenizers split {text!r} differently; its token spans would not index both "
                         "text encoders' states")
    states, pooled = [], None
    for i, enc in zip(ids, text_encoders):
        out = enc(i.to(device), output_hidden_states=True)
        states.append(out.hidden_states[-2])
        pooled = out[0]   # the last encoder's: CLIPTextModelWithProjection.text_embeds (1, P)
    return torch.cat(states, dim=-1)[0], pooled[0]


def time_ids(pixel_hw: tuple[int, int], rows: int, dtype, device) -> torch.Tensor:
    """(rows, 6) micro-conditioning: original size = target size = the UNet input (h, w)
    in pixels, crop top-left (0, 0)."""
    h, w = pixel_hw
    return torch.tensor([[h, w, 0, 0, h, w]], dtype=dtype, device=device).repeat(rows, 1)
