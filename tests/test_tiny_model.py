import gzip
import importlib.metadata
import json

import pytest
import regex
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from tiny_models import build_clip_tokenizer, clip_bpe_path, make_tiny_model

BOS, EOS = 49406, 49407

# Verified against OpenAI's SimpleTokenizer algorithm (see openai_encode below) and the
# ids the released SD v1 tokenizer gives.
KNOWN_IDS = {
    "a photo of a cat": [BOS, 320, 1125, 539, 320, 2368, EOS],
    "a photograph of a dog and a person": [BOS, 320, 8853, 539, 320, 1929, 537, 320, 2533, EOS],
    "tvmonitor pottedplant diningtable sofa": [BOS, 3197, 10198, 3547, 4841, 3912, 1462, 653, 2175,
                                               15723, EOS],
}
PROMPTS = [
    *KNOWN_IDS,
    "A Photo of an AEROPLANE, bicycle; bird!",
    "a photo of a person riding a motorbike in 2024",
    "don't they're it's",
    "café naïve über 東京",
    "  hot-dog,   teddy bear\t& hair drier ??!",
]


def openai_encode(text):
    """Minimal independent re-implementation of OpenAI CLIP's SimpleTokenizer.encode."""
    bs = [*range(33, 127), *range(161, 173), *range(174, 256)]
    cs = bs + [256 + i for i in range(256 - len(bs))]
    bs = bs + [b for b in range(256) if b not in bs]
    byte_encoder = dict(zip(bs, map(chr, cs)))
    lines = gzip.decompress(clip_bpe_path().read_bytes()).decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    ranks = {m: i for i, m in enumerate(merges)}
    vocab = list(byte_encoder.values())
    vocab += [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    encoder = {t: i for i, t in enumerate(vocab)}

    def bpe(token):
        word = list(token[:-1]) + [token[-1] + "</w>"]
        while len(word) > 1:
            pairs = set(zip(word[:-1], word[1:]))
            first, second = min(pairs, key=lambda p: ranks.get(p, float("inf")))
            if (first, second) not in ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return word

    pat = regex.compile(
        r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
        regex.IGNORECASE,
    )
    text = regex.sub(r"\s+", " ", text).strip().lower()
    ids = [BOS]
    for token in pat.findall(text):
        ids += [encoder[t] for t in bpe("".join(byte_encoder[b] for b in token.encode("utf-8")))]
    return ids + [EOS]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return CLIPTokenizer.from_pretrained(tiny_model_dir, subfolder="tokenizer")


def test_bpe_file_is_found():
    path = clip_bpe_path()
    assert path.name == "bpe_simple_vocab_16e6.txt.gz" and path.stat().st_size > 1_000_000


def test_missing_open_clip_names_the_fix(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", not_installed)
    with pytest.raises(RuntimeError, match="pip install --no-deps open_clip_torch==3.3.0"):
        clip_bpe_path()


def test_tokenizer_has_sd_v1_vocab_and_specials(tokenizer):
    assert len(tokenizer) == 49408
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (BOS, EOS, EOS)
    assert tokenizer.unk_token == "<|endoftext|>"
    assert tokenizer.model_max_length == 77
    assert tokenizer.convert_ids_to_tokens([320, 1125, 2368]) == ["a</w>", "photo</w>", "cat</w>"]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_tokenizer_matches_openai_bpe(tokenizer, prompt):
    ids = tokenizer(prompt).input_ids
    assert ids == openai_encode(prompt)
    if prompt in KNOWN_IDS:
        assert ids == KNOWN_IDS[prompt]


def test_tokenizer_pads_and_truncates_to_77(tokenizer):
    padded = tokenizer("a photo of a cat", padding="max_length", truncation=True,
                       max_length=tokenizer.model_max_length).input_ids
    assert padded == KNOWN_IDS["a photo of a cat"] + [EOS] * 70
    long = tokenizer(" ".join(["cat"] * 100), padding="max_length", truncation=True,
                     max_length=tokenizer.model_max_length).input_ids
    assert long == [BOS] + [2368] * 75 + [EOS]


def test_build_clip_tokenizer_reloads_from_its_folder(tmp_path):
    built = build_clip_tokenizer(tmp_path)
    assert {"vocab.json", "merges.txt", "tokenizer_config.json"} <= {
        p.name for p in tmp_path.iterdir()}
    reloaded = CLIPTokenizer.from_pretrained(tmp_path)
    assert len(reloaded) == len(built) == 49408
    assert reloaded("a photo of a cat").input_ids == KNOWN_IDS["a photo of a cat"]


def test_folder_is_an_sd_v1_diffusers_layout(tiny_model_dir):
    index = json.loads((tiny_model_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    weights = sorted(p.relative_to(tiny_model_dir).as_posix() for p in tiny_model_dir.rglob("*")
                     if p.suffix in {".safetensors", ".bin", ".pt", ".ckpt"})
    assert weights == ["text_encoder/model.safetensors",
                       "unet/diffusion_pytorch_model.safetensors",
                       "vae/diffusion_pytorch_model.safetensors"]
    total = sum(p.stat().st_size for p in tiny_model_dir.rglob("*") if p.is_file())
    assert total < 30_000_000


def test_vae_downsamples_by_8_to_4_channels(tiny_model_dir):
    vae = AutoencoderKL.from_pretrained(tiny_model_dir, subfolder="vae")
    assert vae.config.scaling_factor == pytest.approx(0.18215)
    with torch.no_grad():
        latents = vae.encode(torch.zeros(1, 3, 64, 48)).latent_dist.mean
        image = vae.decode(latents).sample
    assert latents.shape == (1, 4, 8, 6)
    assert image.shape == (1, 3, 64, 48)


def test_text_encoder_gives_77_token_states(tiny_model_dir, tokenizer):
    text_encoder = CLIPTextModel.from_pretrained(tiny_model_dir, subfolder="text_encoder")
    ids = tokenizer("a photo of a cat", padding="max_length", max_length=77,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        states = text_encoder(ids).last_hidden_state
    assert states.shape == (1, 77, 32)
    assert torch.isfinite(states).all()


def test_scheduler_is_sd_v1(tiny_model_dir):
    scheduler = DDPMScheduler.from_pretrained(tiny_model_dir, subfolder="scheduler")
    assert scheduler.config.num_train_timesteps == 1000
    assert scheduler.config.beta_schedule == "scaled_linear"
    assert scheduler.betas[0].item() == pytest.approx(0.00085)
    assert scheduler.betas[-1].item() == pytest.approx(0.012)


def test_unet_has_sd_v1_attention_layout(tiny_model_dir):
    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    blocks = {name: m for name, m in unet.named_modules()
              if name.rsplit(".", 2)[-2:-1] == ["transformer_blocks"]}
    expected = (
        [f"down_blocks.{b}.attentions.{a}.transformer_blocks.0" for b in range(3) for a in range(2)]
        + ["mid_block.attentions.0.transformer_blocks.0"]
        + [f"up_blocks.{b}.attentions.{a}.transformer_blocks.0" for b in (1, 2, 3) for a in range(3)]
    )
    assert sorted(blocks) == sorted(expected)  # 6 down + 1 mid + 9 up = 16, as in SD v1
    for block in blocks.values():
        assert block.attn1.heads == 8 and block.attn2.heads == 8
        assert block.attn1.is_cross_attention is False
        assert block.attn2.is_cross_attention is True
        assert block.attn2.to_k.in_features == 32

    # Each level halves the resolution, as in SD v1 (64 -> 32 -> 16 -> 8 for a 512px image).
    query_lengths, context_lengths = {}, {}

    def record(name):
        def hook(module, args, kwargs):
            query_lengths[name] = args[0].shape[1]
            context_lengths[name] = kwargs["encoder_hidden_states"].shape[1]
        return hook

    for name, block in blocks.items():
        block.attn2.register_forward_pre_hook(record(name), with_kwargs=True)
    with torch.no_grad():
        out = unet(torch.zeros(1, 4, 32, 32), 10, encoder_hidden_states=torch.zeros(1, 77, 32)).sample
    assert out.shape == (1, 4, 32, 32)
    assert [query_lengths[n] for n in expected] == (
        [1024] * 2 + [256] * 2 + [64] * 2 + [16] + [64] * 3 + [256] * 3 + [1024] * 3)
    assert set(context_lengths.values()) == {77}


def test_weights_are_deterministic_per_seed_and_keep_global_rng(tiny_model_dir, tmp_path):
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    again = make_tiny_model(tmp_path / "seed0", seed=0)
    assert torch.equal(torch.rand(3), expected_draw)
    other = make_tiny_model(tmp_path / "seed1", seed=1)
    for part in ("unet/diffusion_pytorch_model.safetensors",
                 "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        assert (again / part).read_bytes() == (tiny_model_dir / part).read_bytes()
        assert (other / part).read_bytes() != (tiny_model_dir / part).read_bytes()


# --- SD1 bytes are pinned; the SD2 layout -----------------------------------------------

SD1_SEED0_SHA256 = {  # the tiny SD1 model as built before the SD2 variant existed
    "unet/diffusion_pytorch_model.safetensors": "d79c005eae4721703c583672fbca328a4da9b9b0e86c1091a8b073a693b2fc23",
    "vae/diffusion_pytorch_model.safetensors": "19edf3d2e04f0b48fa703be3006ca3b6a3927a005ab4311658d825fd08e729ff",
    "text_encoder/model.safetensors": "874cbddc39af23eca55590ab033340e04e78a1edd42a2f99540df53d96d5a9d5",
    "tokenizer/vocab.json": "3f0c4f7d2086b61b38487075278ea9ed04edb53a03cbb045b86c27190fa8fb69",
    "tokenizer/merges.txt": "9fd691f7c8039210e0fced15865466c65820d09b63988b0174bfe25de299051a",
}


def test_sd1_seed0_bytes_are_unchanged(tiny_model_dir):
    import hashlib

    for part, digest in SD1_SEED0_SHA256.items():
        assert hashlib.sha256((tiny_model_dir / part).read_bytes()).hexdigest() == digest, part


def test_sd2_text_encoder_and_tokenizer_are_openclip_style(tiny_sd2_dir):
    cfg = json.loads((tiny_sd2_dir / "text_encoder/config.json").read_text())
    assert cfg["hidden_act"] == "gelu" and cfg["hidden_size"] == 48 and cfg["vocab_size"] == 49408
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (0, 2, 1)  # as SD 2.x's config
    tok = CLIPTokenizer.from_pretrained(tiny_sd2_dir, subfolder="tokenizer")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token, tok.pad_token_id) == (BOS, EOS, "!", 0)
    padded = tok("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert padded == KNOWN_IDS["a photo of a cat"] + [0] * 70


def test_sd2_unet_has_per_block_heads_and_linear_projections(tiny_sd2_dir):
    from tiny_models import SD2_HEADS

    unet = UNet2DConditionModel.from_pretrained(tiny_sd2_dir, subfolder="unet")
    assert list(unet.config.attention_head_dim) == list(SD2_HEADS) and unet.config.use_linear_projection
    assert unet.config.cross_attention_dim == 48
    down = [unet.down_blocks[i].attentions[0].transformer_blocks[0].attn1.heads for i in range(3)]
    up = [unet.up_blocks[i].attentions[0].transformer_blocks[0].attn2.heads for i in (1, 2, 3)]
    assert down == [2, 4, 8] and up == [8, 4, 2] and unet.mid_block.attentions[0].transformer_blocks[0].attn1.heads == 8
    assert isinstance(unet.down_blocks[0].attentions[0].proj_in, torch.nn.Linear)
    with torch.no_grad():
        out = unet(torch.zeros(1, 4, 16, 16), 10, encoder_hidden_states=torch.zeros(1, 77, 48)).sample
    assert out.shape == (1, 4, 16, 16)


def test_sd2_v_prediction_option_and_family_check(tmp_path):
    path = make_tiny_model(tmp_path / "v", family="sd2", prediction_type="v_prediction")
    scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    assert scheduler.config.prediction_type == "v_prediction"
    with pytest.raises(ValueError, match="family must be one of"):
        make_tiny_model(tmp_path / "xl", family="sdxl")      # SDXL has its own builder, make_tiny_sdxl_model
