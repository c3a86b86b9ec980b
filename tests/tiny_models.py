"""A tiny, randomly initialised Stable Diffusion v1 for tests and demos without the hub.

The layout matches SD v1 exactly where the attention-extraction code depends on it
(16 cross-attention transformer blocks with 8 heads, x8 VAE downsampling, 77-token
CLIP prompts with the real 49,408-entry vocabulary); only the channel widths shrink.
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


def build_clip_tokenizer(out_dir: str | os.PathLike) -> CLIPTokenizer:
    """The SD v1 (OpenAI CLIP ViT-L/14) tokenizer, built offline and saved to `out_dir`."""
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
        pad_token=_EOS,
        model_max_length=_MAX_LENGTH,
    )
    if len(tokenizer) != _VOCAB_SIZE:
        raise RuntimeError(f"CLIP tokenizer has {len(tokenizer)} tokens, expected {_VOCAB_SIZE}")
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def make_tiny_model(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Save a tiny random SD v1-layout model in diffusers format to `out_dir` and return it."""
    # Deferred: importing the diffusers pipelines costs seconds and is only needed here.
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )

    out_dir = Path(out_dir)
    text_hidden = 32
    # Fork so building a model never disturbs the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
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
            # diffusers' SD v1 config calls the head count "attention_head_dim".
            attention_head_dim=8,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 16, 16),
            layers_per_block=2,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=512,
            scaling_factor=0.18215,
        )
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
    # steps_offset/clip_sample as in the released SD v1 scheduler configs; other values
    # make StableDiffusionPipeline warn and rewrite the config.
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        clip_sample=False,
    )
    tokenizer = build_clip_tokenizer(out_dir / "tokenizer")
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
        "Randomly initialised tiny SD v1-layout model for tests and offline smoke runs.\n"
        "Masks made with it are meaningless.\n")
    return out_dir
