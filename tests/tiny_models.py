"""Tiny, randomly initialised Stable Diffusion models (v1 and v2 layouts) for tests and
demos without the hub.

The layouts match SD where the attention-extraction code depends on them (16
cross-attention transformer blocks, x8 VAE downsampling, 77-token CLIP prompts with the
real 49,408-entry vocabulary); only the channel widths shrink.

- ``family="sd1"``: 8 heads in every block, conv projections in and out of the
  transformer blocks, OpenAI-CLIP text encoder (quick_gelu), pad token = end of text.
- ``family="sd2"``: per-block head counts (diffusers' ``attention_head_dim`` tuple, as in
  SD 2.x's 5/10/20/20), linear projections, OpenCLIP-style text encoder (gelu; its config
  keeps the placeholder bos/eos/pad ids 0/2/1 that SD 2.x's text_encoder config has), pad
  token ``!`` (id 0) as SD 2.x's tokenizer, and an epsilon (512-base) or v-prediction
  (768) scheduler.

``ldm_checkpoint`` writes a tiny SD1 folder as one single-file checkpoint in the original
(CompVis ldm) key layout, the format of ``sd-v1-4.ckpt``.

- ``make_tiny_sdxl_model``: SDXL base's layout scaled down: 3 levels
  (DownBlock2D, then two cross-attention levels at latent/2 and /4: 11 transformer blocks),
  transformer depth 2 at /2 and 3 at /4 (SDXL: 2 and 10), linear projections, head counts
  per level, the "text_time" added conditioning (6 time ids + the pooled embedding), two
  text encoders (OpenAI-CLIP CLIPTextModel, OpenCLIP-style CLIPTextModelWithProjection)
  whose token states concatenate into the cross-attention width, both tokenizers with the
  real CLIP BPE (``tokenizer`` pads with the end-of-text token, ``tokenizer_2`` with "!"),
  and SDXL's Euler scheduler config. ``write_sgm_checkpoint`` writes it as one single file
  in Stability's layout (``sd_xl_base_1.0.safetensors``).
"""
from __future__ import annotations

import gzip
import importlib.metadata
import json
import os
from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from text2mask.modeling.loading import RANDOM_WEIGHTS_MARKER

_BPE_FILE = "open_clip/bpe_simple_vocab_16e6.txt.gz"
# OpenAI CLIP keeps the first 49152 - 256 - 2 merges so that bytes, bytes + '</w>',
# merges and the two special tokens add up to a 49,408-entry vocabulary.
_N_MERGES = 49152 - 256 - 2
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"
_VOCAB_SIZE = 49408
_MAX_LENGTH = 77


def clip_bpe_path() -> Path:
    """The CLIP BPE merges file shipped inside the installed open_clip_torch wheel."""
    # open_clip is located, not imported: importing it pulls in torchvision.
    try:
        files = importlib.metadata.files("open_clip_torch") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if str(f).replace(os.sep, "/") == _BPE_FILE:
            path = Path(f.locate())
            if path.is_file():
                return path
    raise RuntimeError(
        f"CLIP BPE file {_BPE_FILE} not found: install it with "
        "`pip install --no-deps open_clip_torch==3.3.0`"
    )


def _bytes_to_unicode() -> dict[int, str]:
    """OpenAI's reversible byte -> printable unicode map that byte-level BPE works on."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


# SD 2.x's tokenizer pads with "!" (id 0) where SD 1.x pads with the end-of-text token.
PAD_TOKEN = {"sd1": _EOS, "sd2": "!"}
FAMILIES = tuple(PAD_TOKEN)
# Per-block head counts of the tiny SD2 UNet (down blocks; diffusers reverses them for
# the up blocks): head widths 16, 8, 4 on 32 channels, as SD 2.x's 5/10/20 heads of 64.
SD2_HEADS = (2, 4, 8, 8)


def build_clip_tokenizer(out_dir: str | os.PathLike, pad_token: str = _EOS) -> CLIPTokenizer:
    """The CLIP BPE tokenizer of SD 1.x (OpenAI CLIP ViT-L/14) and SD 2.x (OpenCLIP ViT-H/14,
    the same BPE, padded with ``!``), built offline and saved to `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = gzip.decompress(clip_bpe_path().read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _N_MERGES + 1]]
    byte_tokens = list(_bytes_to_unicode().values())
    vocab = (
        byte_tokens
        + [t + "</w>" for t in byte_tokens]
        + ["".join(m) for m in merges]
        + [_BOS, _EOS]
    )
    vocab_file, merges_file = out_dir / "vocab.json", out_dir / "merges.txt"
    vocab_file.write_text(
        json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8"
    )
    merges_file.write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    # transformers 5 names these arguments `vocab`/`merges`: passed as
    # `vocab_file=`/`merges_file=` they are silently ignored and a 2-token
    # tokenizer comes back, hence positional arguments and the size check below.
    tokenizer = CLIPTokenizer(
        str(vocab_file),
        str(merges_file),
        bos_token=_BOS,
        eos_token=_EOS,
        unk_token=_EOS,
        pad_token=pad_token,
        model_max_length=_MAX_LENGTH,
    )
    if len(tokenizer) != _VOCAB_SIZE:
        raise RuntimeError(f"CLIP tokenizer has {len(tokenizer)} tokens, expected {_VOCAB_SIZE}")
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def make_tiny_model(out_dir: str | os.PathLike, seed: int = 0, family: str = "sd1",
                    prediction_type: str = "epsilon") -> Path:
    """Save a tiny random SD model of `family` ("sd1" or "sd2") in diffusers format to
    `out_dir` and return it. `prediction_type` ("epsilon" or "v_prediction") goes into the
    scheduler config, where diffusers keeps it."""
    # Deferred: importing the diffusers pipelines costs seconds and is only needed here.
    from diffusers import StableDiffusionPipeline

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    out_dir = Path(out_dir)
    # Fork so building a model never disturbs the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet, vae, text_encoder = (_sd1_modules() if family == "sd1" else _sd2_modules())
    scheduler = _scheduler(prediction_type)
    tokenizer = build_clip_tokenizer(out_dir / "tokenizer", PAD_TOKEN[family])
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    # Lets every run on this model say loudly that its masks mean nothing.
    (out_dir / RANDOM_WEIGHTS_MARKER).write_text(
        f"Randomly initialised tiny {'SD v1' if family == 'sd1' else 'SD v2'}-layout model for tests "
        "and offline smoke runs.\nMasks made with it are meaningless.\n")
    return out_dir


def _vae(scaling_factor: float = 0.18215):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=512,
        scaling_factor=scaling_factor,
    )


def _unet(text_hidden: int, **layout):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        # Constant width keeps the UNet smaller than the CLIP token embedding.
        block_out_channels=(32, 32, 32, 32),
        layers_per_block=2,
        norm_num_groups=8,
        cross_attention_dim=text_hidden,
        **layout,
    )


def _sd1_modules():
    """UNet, VAE, text encoder of the SD1 layout (the order of construction fixes the bytes)."""
    text_hidden = 32
    # diffusers' SD v1 config calls the head count "attention_head_dim".
    unet = _unet(text_hidden, attention_head_dim=8)
    vae = _vae()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=_VOCAB_SIZE,
            hidden_size=text_hidden,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=_MAX_LENGTH,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )
    return unet, vae, text_encoder


def _sd2_modules():
    # A width other than SD1's 32 so that a model mixing the two families' parts fails.
    text_hidden = 48
    unet = _unet(text_hidden, attention_head_dim=SD2_HEADS, use_linear_projection=True)
    vae = _vae()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=_VOCAB_SIZE,
            hidden_size=text_hidden,
            intermediate_size=53,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=_MAX_LENGTH,
            hidden_act="gelu",
            projection_dim=16,
            # The values of SD 2.x's text_encoder/config.json (OpenCLIP's ids are in the tokenizer).
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
        )
    )
    return unet, vae, text_encoder


def _scheduler(prediction_type: str):
    from diffusers import DDPMScheduler

    # steps_offset/clip_sample as in the released SD configs; other values make
    # StableDiffusionPipeline warn and rewrite the config.
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        clip_sample=False,
        prediction_type=prediction_type,
    )


# -- SDXL ---------------------------------------------------------------------------------

# Per level of the tiny SDXL UNet (SDXL base: heads 5/10/20 of width 64, depth 1/2/10; the
# first level has no attention): 2 heads of 16 at latent/2, 4 of 8 at /4; depth 2 and 3.
SDXL_HEADS = (1, 2, 4)
SDXL_DEPTH = (1, 2, 3)
SDXL_TEXT_WIDTHS = (32, 48)   # CLIP ViT-L and OpenCLIP bigG stand-ins (SDXL: 768, 1280)
SDXL_POOLED = 16              # text_encoder_2's projection (SDXL: 1280)
SDXL_TIME_EMBED = 8           # per time id (SDXL: 256)


def _sdxl_modules():
    """UNet, VAE, both text encoders of the tiny SDXL layout (construction order fixes the bytes)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModelWithProjection

    unet = UNet2DConditionModel(
        sample_size=128,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32, 32),
        layers_per_block=2,
        norm_num_groups=8,
        attention_head_dim=SDXL_HEADS,
        transformer_layers_per_block=SDXL_DEPTH,
        use_linear_projection=True,
        cross_attention_dim=sum(SDXL_TEXT_WIDTHS),
        addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_EMBED,
        projection_class_embeddings_input_dim=6 * SDXL_TIME_EMBED + SDXL_POOLED,
    )
    vae = _vae(scaling_factor=0.13025)
    # The ids of SDXL's text_encoder/ and text_encoder_2/ configs (the placeholders 0/2/1;
    # the tokenizers hold the real ones, and the pooled output takes the argmax id = end of text).
    ids = dict(bos_token_id=0, eos_token_id=2, pad_token_id=1)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=_VOCAB_SIZE, hidden_size=SDXL_TEXT_WIDTHS[0], intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=_MAX_LENGTH, hidden_act="quick_gelu", **ids))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=_VOCAB_SIZE, hidden_size=SDXL_TEXT_WIDTHS[1], intermediate_size=53, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=_MAX_LENGTH, hidden_act="gelu",
        projection_dim=SDXL_POOLED, **ids))
    return unet, vae, text_encoder, text_encoder_2


def make_tiny_sdxl_model(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Save a tiny random SDXL-base-layout model in diffusers format to `out_dir`."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    out_dir = Path(out_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet, vae, text_encoder, text_encoder_2 = _sdxl_modules()
    # SDXL base's scheduler/scheduler_config.json
    scheduler = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading",
                                       prediction_type="epsilon", interpolation_type="linear")
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=build_clip_tokenizer(out_dir / "tokenizer", _EOS),
        tokenizer_2=build_clip_tokenizer(out_dir / "tokenizer_2", "!"),
        unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / RANDOM_WEIGHTS_MARKER).write_text(
        "Randomly initialised tiny SDXL-layout model for tests and offline smoke runs.\n"
        "Masks made with it are meaningless.\n")
    return out_dir


# Stability's sgm names (sd_xl_base_1.0.safetensors) of the UNet's added embedding and of the
# OpenCLIP text tower; the first text encoder keeps transformers' names under embedders.0.
_SGM_UNET_TOP = {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
_SGM_CLIP_L, _SGM_BIGG = "conditioner.embedders.0.transformer.text_model.", "conditioner.embedders.1.model."
_OPENCLIP_LAYER = (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                   ("mlp.fc2", "mlp.c_proj"), ("self_attn.out_proj", "attn.out_proj"))


def openclip_state_dict(text_encoder_2) -> dict[str, torch.Tensor]:
    """A CLIPTextModelWithProjection's weights under OpenCLIP's names (q/k/v stacked into
    in_proj, the projection transposed), as SDXL's single files hold the bigG tower."""
    sd = {k.removeprefix("text_model."): v for k, v in text_encoder_2.state_dict().items()}
    out = {"positional_embedding": sd.pop("embeddings.position_embedding.weight"),
           "token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
           "ln_final.weight": sd.pop("final_layer_norm.weight"), "ln_final.bias": sd.pop("final_layer_norm.bias"),
           "text_projection": sd.pop("text_projection.weight").T}
    sd.pop("embeddings.position_ids", None)
    for i in range(text_encoder_2.config.num_hidden_layers):
        pre = f"encoder.layers.{i}."
        for kind in ("weight", "bias"):
            out[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(
                [sd.pop(f"{pre}self_attn.{x}_proj.{kind}") for x in "qkv"])
            for new, old in _OPENCLIP_LAYER:
                out[f"transformer.resblocks.{i}.{old}.{kind}"] = sd.pop(f"{pre}{new}.{kind}")
    if sd:
        raise KeyError(f"unmapped text_encoder_2 weights: {sorted(sd)[:4]}")
    return out


def sgm_state_dict(model_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The weights of a diffusers SDXL folder under Stability's single-file names."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModelWithProjection

    model_dir = Path(model_dir)
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae")
    text_encoder = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder")
    text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(model_dir, subfolder="text_encoder_2")
    up_attention = [hasattr(b, "attentions") for b in unet.up_blocks]
    out = {}
    for k, t in unet.state_dict().items():
        top = k.rsplit(".", 1)[0]
        name = (f"{_SGM_UNET_TOP[top]}.{k.rsplit('.', 1)[1]}" if top in _SGM_UNET_TOP
                else ldm_unet_key(k, unet.config.layers_per_block, up_attention))
        out[_LDM_UNET + name] = t
    for k, t in vae.state_dict().items():
        name = ldm_vae_key(k, len(vae.config.down_block_types))
        if ".mid.attn_1." in name and name.endswith("weight") and t.ndim == 2:
            t = t[:, :, None, None]
        out[_LDM_VAE + name] = t
    for k, t in text_encoder.state_dict().items():
        if not k.endswith("position_ids"):
            out[_SGM_CLIP_L + k.removeprefix("text_model.")] = t
    for k, t in openclip_state_dict(text_encoder_2).items():
        out[_SGM_BIGG + k] = t
    return {k: v.contiguous() for k, v in out.items()}


def write_sgm_checkpoint(model_dir: str | os.PathLike, path: str | os.PathLike) -> Path:
    """A single-file ``.safetensors`` of a tiny SDXL folder in Stability's layout."""
    from safetensors.torch import save_file

    path = Path(path)
    save_file(sgm_state_dict(model_dir), str(path))
    return path


# -- single-file checkpoints in the original ldm key layout ---------------------------------

# sd-v1-4.ckpt nests the CLIP weights as transformers 4 did (text_model.*); transformers 5 flattened them.
_LDM_UNET, _LDM_VAE, _LDM_CLIP = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model."
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
_UNET_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
                ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename_first(name: str, table) -> str:
    for new, old in table:
        if name.startswith(new + "."):
            return old + name[len(new):]
    raise KeyError(name)


def ldm_unet_key(key: str, layers_per_block: int, up_has_attention: list[bool]) -> str:
    """The ldm (CompVis ``openaimodel.UNetModel``) name of a diffusers UNet parameter.

    input_blocks: 0 = conv_in, then per level ``layers_per_block`` (resnet .0, attention .1)
    and a downsampler (.0.op); middle_block: resnet, attention, resnet; output_blocks: per
    level ``layers_per_block + 1`` (resnet .0, attention .1) and the upsampler after the
    last (.1.conv, or .2.conv when the level has attention)."""
    p = key.split(".")
    top = ".".join(p[:-1])
    if top in _UNET_TOP:
        return f"{_UNET_TOP[top]}.{p[-1]}"
    n = layers_per_block + 1
    if p[0] in ("down_blocks", "up_blocks"):
        level, kind, rest = int(p[1]), p[2], ".".join(p[4:])
        j = int(p[3])
        if p[0] == "down_blocks":
            if kind == "downsamplers":
                return f"input_blocks.{1 + level * n + layers_per_block}.0.op.{p[-1]}"
            where = f"input_blocks.{1 + level * n + j}"
        else:
            if kind == "upsamplers":
                return f"output_blocks.{level * n + layers_per_block}.{2 if up_has_attention[level] else 1}.conv.{p[-1]}"
            where = f"output_blocks.{level * n + j}"
        if kind == "resnets":
            return f"{where}.0.{_rename_first(rest, _UNET_RESNET)}"
        return f"{where}.1.{rest}"
    if p[0] == "mid_block":
        j, rest = int(p[2]), ".".join(p[3:])
        if p[1] == "resnets":
            return f"middle_block.{2 * j}.{_rename_first(rest, _UNET_RESNET)}"
        return f"middle_block.1.{rest}"
    raise KeyError(key)


def ldm_vae_key(key: str, num_levels: int) -> str:
    """The ldm (``AutoencoderKL`` of taming/ldm) name of a diffusers VAE parameter; the
    decoder's levels are numbered from the bottom in ldm."""
    p = key.split(".")
    if p[0] in ("quant_conv", "post_quant_conv") or p[1] in ("conv_in", "conv_out"):
        return key
    side = p[0]
    if p[1] == "conv_norm_out":
        return f"{side}.norm_out.{p[-1]}"
    if p[1] == "mid_block":
        rest = ".".join(p[4:])
        if p[2] == "resnets":
            return f"{side}.mid.block_{int(p[3]) + 1}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
        return f"{side}.mid.attn_1.{_rename_first(rest, _VAE_ATTENTION.items())}"
    level = int(p[2]) if side == "encoder" else num_levels - 1 - int(p[2])
    name = "down" if side == "encoder" else "up"
    if p[3] in ("downsamplers", "upsamplers"):
        return f"{side}.{name}.{level}.{'downsample' if side == 'encoder' else 'upsample'}.conv.{p[-1]}"
    rest = ".".join(p[5:]).replace("conv_shortcut", "nin_shortcut")
    return f"{side}.{name}.{level}.block.{p[4]}.{rest}"


def ldm_state_dict(model_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The weights of a diffusers SD 1.x folder under ldm names, as in ``sd-v1-4.ckpt``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    model_dir = Path(model_dir)
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae")
    text_encoder = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder")
    if unet.config.use_linear_projection:
        raise ValueError("ldm_state_dict writes the SD 1.x layout (OpenAI CLIP text encoder) only")
    up_attention = [hasattr(b, "attentions") for b in unet.up_blocks]
    out = {}
    for k, t in unet.state_dict().items():
        out[_LDM_UNET + ldm_unet_key(k, unet.config.layers_per_block, up_attention)] = t
    for k, t in vae.state_dict().items():
        name = ldm_vae_key(k, len(vae.config.down_block_types))
        # ldm's VAE attention projections are 1x1 convolutions.
        if ".mid.attn_1." in name and name.endswith("weight") and t.ndim == 2:
            t = t[:, :, None, None]
        out[_LDM_VAE + name] = t
    for k, t in text_encoder.state_dict().items():
        out[_LDM_CLIP + k] = t
    return {k: v.contiguous() for k, v in out.items()}


def write_ldm_checkpoint(model_dir: str | os.PathLike, path: str | os.PathLike) -> Path:
    """A single-file checkpoint of a tiny SD1 folder: ``.safetensors`` (flat) or ``.ckpt``
    (a pickle {"state_dict": ..., "global_step": 0}, as the CompVis training code saves)."""
    path = Path(path)
    state = ldm_state_dict(model_dir)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save({"state_dict": state, "global_step": 0}, path)
    return path
