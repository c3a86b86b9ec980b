"""A tiny random Kandinsky 2.2-layout model (decoder UNet, MoVQ, DDPM schedule, the prior's
CLIP image tower and its image processor), built offline for tests and demos.

The layout follows DIFFSEG.md §7: diffusers' own dummy Kandinsky 2.2 decoder widened to
four levels so that three attention grids exist (latent/2, /4, /8 as the real 32², 16²,
8² at a 64² latent), every attention an added-KV layer fed by ``image_proj`` (32 context
tokens), the image embedding also added to the time embedding (``addition_embed_type``
"image"); MoVQ with spatial norm; the prior test's CLIPVisionConfig. Only the widths
shrink. Saved as::

    decoder/{unet,movq,scheduler}/
    prior/{image_encoder,image_processor}/
    RANDOM_WEIGHTS.txt

Its masks are MEANINGLESS.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from text2mask.modeling.loading import RANDOM_WEIGHTS_MARKER

RESOLUTION = 128           # tests run at 128²: latent 16², attention grids 8, 4, 2


def tiny_components(seed: int = 0):
    """(unet, movq, image_encoder, image_processor, scheduler), random, in float32."""
    from diffusers import DDPMScheduler, UNet2DConditionModel, VQModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=8,
            down_block_types=("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * 3,
            up_block_types=("SimpleCrossAttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",),
            mid_block_type="UNetMidBlock2DSimpleCrossAttn",
            block_out_channels=(32, 32, 64, 64),
            layers_per_block=1,
            attention_head_dim=8,
            cross_attention_dim=32,
            encoder_hid_dim=16,
            encoder_hid_dim_type="image_proj",
            addition_embed_type="image",
            resnet_time_scale_shift="scale_shift",
            norm_num_groups=8,
            class_embed_type=None,
        )
        movq = VQModel(
            in_channels=3,
            out_channels=3,
            # SpatialNorm hard-codes 32 groups: every width is a multiple of 32.
            block_out_channels=(32, 32, 32, 32),
            down_block_types=("DownEncoderBlock2D",) * 3 + ("AttnDownEncoderBlock2D",),
            up_block_types=("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * 3,
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            norm_type="spatial",
            num_vq_embeddings=12,
            vq_embed_dim=4,
        )
        image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=32, image_size=224, projection_dim=16, intermediate_size=37, num_attention_heads=4,
            num_channels=3, num_hidden_layers=5, patch_size=14))
    # The 2.2 prior's preprocessor_config.json values (OpenAI CLIP normalisation, 224 px).
    image_processor = CLIPImageProcessor(
        crop_size=224, size={"shortest_edge": 224}, do_center_crop=True, do_normalize=True, do_resize=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
        resample=3)
    # kandinsky-2-2-decoder/scheduler: DDPM, linear betas 0.00085..0.012, epsilon.
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.00085,
                              beta_end=0.012, clip_sample=False, prediction_type="epsilon", steps_offset=1)
    return unet, movq, image_encoder, image_processor, scheduler


def make_tiny_kandinsky(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Save the tiny model in the decoder/ + prior/ layout text2mask loads; returns ``out_dir``."""
    out = Path(out_dir)
    unet, movq, image_encoder, image_processor, scheduler = tiny_components(seed)
    unet.save_pretrained(out / "decoder" / "unet", safe_serialization=True)
    movq.save_pretrained(out / "decoder" / "movq", safe_serialization=True)
    scheduler.save_pretrained(out / "decoder" / "scheduler")
    image_encoder.save_pretrained(out / "prior" / "image_encoder", safe_serialization=True)
    image_processor.save_pretrained(out / "prior" / "image_processor")
    (out / RANDOM_WEIGHTS_MARKER).write_text(
        "Randomly initialised tiny Kandinsky 2.2-layout model (decoder + prior image tower) for tests and "
        "offline smoke runs.\nMasks made with it are meaningless.\n")
    return out


def perturb(module: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """Every parameter of ``module`` plus scale·N(0, 1) noise (in place): SCM's zero-initialised
    outputs become non-zero, so that tests see it act."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module
