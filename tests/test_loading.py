"""Model layer: SD 1.x / 2.x folders, single-file ldm checkpoints, pipelines in memory,
family checks, what ``sd.info`` records, and hub failures (real subprocesses, a closed port)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from text2mask.errors import ModelLoadError
from text2mask.io import read_image
from text2mask.modeling.loading import folder_digest, file_digest, load
from text2mask.wsss.predictor import MaskConfig, Text2Mask

ROOT = Path(__file__).resolve().parent.parent
PHOTO = ROOT / "samples/voc-mini/VOC2012/JPEGImages/2007_000039.jpg"  # horse + person
LABELS = [13, 15]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def rgb():
    return read_image(PHOTO)


@pytest.fixture(scope="module")
def folder_result(tiny_model_dir, rgb):
    """Masks of the photo (MEANINGLESS: random weights) from the tiny SD1 folder."""
    t2m = Text2Mask.from_pretrained(str(tiny_model_dir), "voc", MaskConfig(), device="cpu", dtype="fp32")
    return t2m(rgb, LABELS, key=PHOTO.stem)


def assert_same_result(a, b):
    for field in ("scores", "labels", "crf", "mask"):
        x, y = getattr(a, field), getattr(b, field)
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), field


def test_sd1_folder_info(sd, tiny_model_dir):
    assert sd.info["family"] == "sd1" and sd.family == "sd1"
    assert sd.info["source"] == "folder" and sd.info["random_weights"] is True
    assert sd.info["folder_sha256"] == folder_digest(tiny_model_dir)
    assert sd.prediction_type == sd.info["prediction_type"] == "epsilon"
    assert sd.alphas_cumprod.dtype == torch.float64 and sd.alphas_cumprod.shape == (1000,)


def test_sd2_folder_family_and_v_prediction(sd2, tmp_path):
    from tiny_models import make_tiny_model

    assert sd2.info["family"] == "sd2" and sd2.prediction_type == "epsilon"
    assert sd2.text_encoder.config.hidden_act == "gelu"
    assert sd2.tokenizer.pad_token == "!" and sd2.tokenizer.pad_token_id == 0
    v = load(str(make_tiny_model(tmp_path / "v", family="sd2", prediction_type="v_prediction")),
             device="cpu", dtype="fp32")
    assert (v.family, v.prediction_type, v.info["prediction_type"]) == ("sd2", "v_prediction", "v_prediction")
    torch.testing.assert_close(v.alphas_cumprod, sd2.alphas_cumprod, rtol=0, atol=0)


def test_wsss_runs_on_sd2(sd2, rgb):
    """MEANINGLESS masks (random weights): the pipeline runs end to end on the SD2 layout."""
    r = Text2Mask(sd2, "voc", MaskConfig(crf=False))(rgb, LABELS, key=PHOTO.stem)
    assert r.labels.shape == rgb.shape[:2] and set(np.unique(r.labels)) <= {0, *LABELS}
    assert r.scores.shape == (3, *rgb.shape[:2]) and np.isfinite(r.scores).all()


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_ldm_checkpoint_gives_the_folder_masks(tiny_model_dir, tmp_path, rgb, folder_result, suffix):
    from tiny_models import write_ldm_checkpoint

    path = write_ldm_checkpoint(tiny_model_dir, tmp_path / f"tiny-sd1{suffix}")
    t2m = Text2Mask.from_pretrained(str(path), "voc", MaskConfig(), device="cpu", dtype="fp32",
                                    config_source=str(tiny_model_dir))
    info = t2m.sd.info
    assert (info["source"], info["family"], info["file_sha256"]) == ("single_file", "sd1", file_digest(path))
    assert_same_result(t2m(rgb, LABELS, key=PHOTO.stem), folder_result)


def test_ldm_layout_round_trips_through_diffusers_conversion(tiny_model_dir):
    """Our ldm writer is the inverse of diffusers' own ldm -> diffusers conversion."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint)
    from transformers import CLIPTextModel

    from tiny_models import ldm_state_dict

    ldm = ldm_state_dict(tiny_model_dir)
    # the key names of CompVis' sd-v1-4.ckpt
    for key in ("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
                "model.diffusion_model.output_blocks.11.0.skip_connection.weight",
                "model.diffusion_model.middle_block.1.proj_in.weight",
                "first_stage_model.encoder.mid.attn_1.q.weight",
                "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"):
        assert key in ldm, key
    assert ldm["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4
    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(tiny_model_dir, subfolder="vae")
    clip = CLIPTextModel.from_pretrained(tiny_model_dir, subfolder="text_encoder")
    for back, module in ((convert_ldm_unet_checkpoint(ldm, dict(unet.config)), unet),
                         (convert_ldm_vae_checkpoint(ldm, dict(vae.config)), vae),
                         (convert_ldm_clip_checkpoint(ldm), clip)):
        ref = module.state_dict()
        ref = {k.removeprefix("text_model."): v for k, v in ref.items()}
        back = {k.removeprefix("text_model."): v for k, v in back.items()}
        assert back.keys() == ref.keys()
        assert all(torch.equal(back[k], ref[k]) for k in ref)


def test_from_pipe_shares_modules_and_gives_the_folder_masks(tiny_model_dir, rgb, folder_result):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model_dir), safety_checker=None,
                                                   requires_safety_checker=False)
    before = {n: p.data_ptr() for n, p in pipe.unet.named_parameters()}
    t2m = Text2Mask.from_pipe(pipe, "voc", MaskConfig())
    sd = t2m.sd
    assert sd.unet is pipe.unet and sd.vae is pipe.vae and sd.text_encoder is pipe.text_encoder
    assert sd.tokenizer is pipe.tokenizer
    assert sd.info["source"] == "pipeline" and sd.family == "sd1"
    assert_same_result(t2m(rgb, LABELS, key=PHOTO.stem), folder_result)
    assert {n: p.data_ptr() for n, p in pipe.unet.named_parameters()} == before
    for a, b in ((sd.vae, pipe.vae), (sd.text_encoder, pipe.text_encoder)):
        assert all(x.data_ptr() == y.data_ptr() for x, y in zip(a.parameters(), b.parameters()))


def edited_copy(src: Path, dst: Path, part: str, **changes) -> Path:
    shutil.copytree(src, dst)
    cfg_path = dst / part / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(changes)
    cfg_path.write_text(json.dumps(cfg))
    return dst


def test_sdxl_like_folder_is_refused_naming_what_was_found(tiny_model_dir, tmp_path):
    folder = edited_copy(tiny_model_dir, tmp_path / "xl", "unet", addition_embed_type="text_time",
                         transformer_layers_per_block=[1, 2, 10, 1])
    with pytest.raises(ModelLoadError, match=r"not a Stable Diffusion 1\.x or 2\.x model.*addition_embed_type="
                                             r"'text_time'.*transformer_layers_per_block"):
        load(str(folder), device="cpu", dtype="fp32")


def test_mixed_family_is_refused(tiny_model_dir, tmp_path):
    folder = edited_copy(tiny_model_dir, tmp_path / "mixed", "text_encoder", hidden_act="gelu")
    with pytest.raises(ModelLoadError, match="activation 'gelu' with use_linear_projection=False"):
        load(str(folder), device="cpu", dtype="fp32")


def test_text_width_must_match_cross_attention(tiny_model_dir, tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = tmp_path / "wide"
    shutil.copytree(tiny_model_dir, folder)
    cfg = CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder")
    cfg.hidden_size = 48
    torch.manual_seed(0)
    CLIPTextModel(cfg).save_pretrained(folder / "text_encoder")
    with pytest.raises(ModelLoadError, match="48-wide token states but the UNet's cross-attention reads 32"):
        load(str(folder), device="cpu", dtype="fp32")


def test_folder_without_unet_names_it(tiny_model_dir, tmp_path):
    folder = tmp_path / "nounet"
    shutil.copytree(tiny_model_dir, folder)
    shutil.rmtree(folder / "unet")
    with pytest.raises(ModelLoadError, match=r"no unet/config\.json.*It holds scheduler/, text_encoder/"):
        load(str(folder), device="cpu", dtype="fp32")


def test_other_file_and_misplaced_config_are_refused(tiny_model_dir, tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a .ckpt or .safetensors checkpoint"):
        load(str(tmp_path / "weights.bin"))
    with pytest.raises(ModelLoadError, match="apply to a single checkpoint file"):
        load(str(tiny_model_dir), config=str(tiny_model_dir))


def run_isolated(code: str, tmp_path, **env) -> subprocess.CompletedProcess:
    """Python in a fresh process with an empty Hugging Face cache and the given settings."""
    full = {**os.environ, "HF_HOME": str(tmp_path / "hf-home"), "OMP_NUM_THREADS": "1", **env}
    if "HF_HUB_OFFLINE" not in env:
        full.pop("HF_HUB_OFFLINE", None)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full,
                          cwd=ROOT, timeout=300)


HUB_CODE = """
from text2mask.errors import ModelLoadError
from text2mask.modeling.loading import load
try:
    load("someorg/uncached-model", device="cpu")
except ModelLoadError as e:
    print("MODEL-LOAD-ERROR", e)
"""


def test_unreachable_hub_fails_with_a_clear_message(tmp_path):
    """HF_ENDPOINT at a closed local port: one refused request, no retries, a clear error."""
    r = run_isolated(HUB_CODE, tmp_path, HF_ENDPOINT="http://127.0.0.1:9")
    assert "MODEL-LOAD-ERROR" in r.stdout, r.stderr[-2000:]
    assert "not (completely) in the local Hugging Face cache" in r.stdout
    assert "http://127.0.0.1:9 is out of reach" in r.stdout and "--model" in r.stdout
    assert "Retrying" not in r.stderr


def test_hub_offline_setting_is_honoured(tmp_path):
    r = run_isolated(HUB_CODE, tmp_path, HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9")
    assert "MODEL-LOAD-ERROR" in r.stdout, r.stderr[-2000:]
    assert "HF_HUB_OFFLINE is set" in r.stdout
    assert "127.0.0.1" not in r.stdout + r.stderr  # not even tried
