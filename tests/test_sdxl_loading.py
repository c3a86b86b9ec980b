"""SDXL loading (issue 24): folder, single file in Stability's layout, a pipeline in memory;
the families each caller takes; SD3 / Flux / Kandinsky / SDXL variants refused by name."""
import json

import numpy as np
import pytest
import torch

from text2mask.errors import ModelLoadError
from text2mask.io import read_image
from text2mask.modeling.families import FAMILIES, WSSS_FAMILIES, family_of_unet
from text2mask.modeling.loading import StableDiffusion, file_digest, folder_digest, load
from text2mask.wsss.predictor import MaskConfig, Text2Mask

from test_loading import PHOTO, assert_same_result, edited_copy

LABELS = [13, 15]
COMPONENTS = ("vae", "unet", "text_encoder", "text_encoder_2")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def rgb():
    """The photo shrunk to 250x188: SDXL's input is 1024 on the long side whatever the photo,
    the CRF and the scores work at photo size."""
    from PIL import Image

    return np.asarray(Image.fromarray(read_image(PHOTO)).resize((250, 188), Image.BILINEAR))


@pytest.fixture(scope="module")
def folder_result(tiny_sdxl_dir, rgb):
    """Masks of the photo (MEANINGLESS: random weights) from the tiny SDXL folder."""
    t2m = Text2Mask.from_pretrained(str(tiny_sdxl_dir), "voc", MaskConfig(), device="cpu", dtype="fp32")
    return t2m(rgb, LABELS, key=PHOTO.stem)


def same_weights(a: StableDiffusion, b: StableDiffusion) -> None:
    for name in COMPONENTS:
        x, y = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert x.keys() == y.keys(), name
        assert all(torch.equal(x[k], y[k]) for k in x), name


def test_sdxl_folder_loads_both_encoders_and_records_the_family(sdxl, tiny_sdxl_dir):
    assert sdxl.family == "sdxl" and sdxl.spec is FAMILIES["sdxl"]
    assert sdxl.info["source"] == "folder" and sdxl.info["random_weights"] is True
    assert sdxl.info["folder_sha256"] == folder_digest(tiny_sdxl_dir)
    assert type(sdxl.text_encoder).__name__ == "CLIPTextModel"
    assert type(sdxl.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert sdxl.latent_scale == 0.13025 and sdxl.prediction_type == "epsilon"
    cfg = json.loads((tiny_sdxl_dir / "scheduler" / "scheduler_config.json").read_text())
    assert cfg["_class_name"] == "EulerDiscreteScheduler"   # SDXL base's sampler; its schedule is read
    # SDXL's schedule is SD's: scaled_linear 0.00085..0.012 over 1000 steps
    sd1_like = FAMILIES["sd1"]
    assert sd1_like.wsss_side is None and sdxl.spec.wsss_side == 1024
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod
    torch.testing.assert_close(sdxl.alphas_cumprod, ref.double(), rtol=0, atol=0)


def test_other_methods_refuse_sdxl_naming_generate_and_segment(tiny_sdxl_dir, tmp_path):
    with pytest.raises(ModelLoadError, match=r"not a Stable Diffusion 1\.x or 2\.x model.*addition_embed_type="
                                             r"'text_time'.*`text2mask generate` and `segment`"):
        load(str(tiny_sdxl_dir), device="cpu", dtype="fp32")
    from tiny_models import write_sgm_checkpoint

    path = write_sgm_checkpoint(tiny_sdxl_dir, tmp_path / "xl.safetensors")
    with pytest.raises(ModelLoadError, match=r"is an SDXL checkpoint \(keys conditioner\.embedders\.1\*\).*"
                                             r"`text2mask generate`"):
        load(str(path), device="cpu", dtype="fp32", config=str(tiny_sdxl_dir))


def test_single_file_sgm_checkpoint_loads_equal_to_its_folder(tiny_sdxl_dir, sdxl, tmp_path, rgb, folder_result):
    from tiny_models import write_sgm_checkpoint

    path = write_sgm_checkpoint(tiny_sdxl_dir, tmp_path / "tiny-sdxl.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    for key in ("model.diffusion_model.label_emb.0.0.weight",                     # sd_xl_base_1.0 names
                "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight",
                "model.diffusion_model.middle_block.1.transformer_blocks.2.attn1.to_q.weight",
                "model.diffusion_model.output_blocks.2.2.conv.weight",
                "first_stage_model.encoder.mid.attn_1.q.weight",
                "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight",
                "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight",
                "conditioner.embedders.1.model.text_projection",
                "conditioner.embedders.1.model.positional_embedding"):
        assert key in keys, key
    t2m = Text2Mask.from_pretrained(str(path), "voc", MaskConfig(), device="cpu", dtype="fp32",
                                    config_source=str(tiny_sdxl_dir))
    info = t2m.sd.info
    assert (info["source"], info["family"], info["file_sha256"]) == ("single_file", "sdxl", file_digest(path))
    assert info["pipeline_class"] == "StableDiffusionXLPipeline"
    same_weights(t2m.sd, sdxl)
    assert_same_result(t2m(rgb, LABELS, key=PHOTO.stem), folder_result)


def test_from_pipe_shares_the_sdxl_modules_and_gives_the_folder_masks(tiny_sdxl_dir, rgb, folder_result):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_dir), add_watermarker=False)
    t2m = Text2Mask.from_pipe(pipe, "voc", MaskConfig())
    sd = t2m.sd
    for name in (*COMPONENTS, "tokenizer", "tokenizer_2", "scheduler"):
        assert getattr(sd, name) is getattr(pipe, name), name
    assert sd.family == "sdxl" and sd.info["source"] == "pipeline"
    assert_same_result(t2m(rgb, LABELS, key=PHOTO.stem), folder_result)
    with pytest.raises(ModelLoadError, match="not a Stable Diffusion 1.x or 2.x model"):
        StableDiffusion.from_pipe(pipe)     # a method that reads SD 1.x/2.x only


def transformer_folder(tmp_path, name: str, config: dict):
    folder = tmp_path / name
    (folder / "transformer").mkdir(parents=True)
    (folder / "transformer" / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("cls, title", [("SD3Transformer2DModel", "Stable Diffusion 3"),
                                        ("FluxTransformer2DModel", "Flux")])
def test_sd3_and_flux_are_refused_by_name(tmp_path, cls, title):
    folder = transformer_folder(tmp_path, cls, {"_class_name": cls, "joint_attention_dim": 4096})
    for families in (WSSS_FAMILIES, ("sd1", "sd2")):
        with pytest.raises(ModelLoadError, match=rf"is {title} \(MMDiT\): a transformer .*SD3 and Flux are not "
                                                 "supported"):
            load(str(folder), device="cpu", dtype="fp32", families=families)


@pytest.mark.parametrize("key, title", [("model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight", "Stable Diffusion 3"),
                                        ("double_blocks.0.img_attn.qkv.weight", "Flux")])
def test_sd3_and_flux_single_files_are_refused_by_name(tmp_path, key, title):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({key: torch.zeros(2)}, str(path))
    with pytest.raises(ModelLoadError, match=rf"checkpoint file .* is {title} \(MMDiT\)"):
        load(str(path), device="cpu", dtype="fp32", families=WSSS_FAMILIES)


def test_a_pipeline_without_unet_is_refused_by_name():
    class Config(dict):
        __getattr__ = dict.get

    class Transformer:
        config = Config(_class_name="FluxTransformer2DModel")

    class FluxPipeline:
        transformer = Transformer()

    with pytest.raises(ModelLoadError, match=r"pipeline FluxPipeline is Flux \(MMDiT\)"):
        StableDiffusion.from_pipe(FluxPipeline(), families=WSSS_FAMILIES)


def test_kandinsky_decoder_is_refused_pointing_at_diffseg(tmp_path):
    folder = tmp_path / "kandinsky"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "config.json").write_text(json.dumps(
        {"encoder_hid_dim_type": "image_proj", "addition_embed_type": "image", "in_channels": 4}))
    pytest.importorskip("text2mask.modeling.kandinsky")
    assert family_of_unet({"encoder_hid_dim_type": "image_proj", "addition_embed_type": "image"}).name == "kandinsky22"
    with pytest.raises(ModelLoadError, match=r"Kandinsky 2\.2 decoder: .*`text2mask fewshot train --method diffseg"):
        load(str(folder), device="cpu", dtype="fp32", families=WSSS_FAMILIES)


@pytest.mark.parametrize("change, found", [
    ({"in_channels": 9}, "in_channels=9"),
    ({"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]},
     "the refiner has 4 levels"),
])
def test_sdxl_variants_are_refused_naming_what_was_found(tiny_sdxl_dir, tmp_path, change, found):
    folder = edited_copy(tiny_sdxl_dir, tmp_path / "variant", "unet", **change)
    with pytest.raises(ModelLoadError, match=rf"not an SDXL base model: found .*{found}"):
        load(str(folder), device="cpu", dtype="fp32", families=WSSS_FAMILIES)


def test_refiner_time_ids_are_refused(tiny_sdxl_dir, tmp_path):
    """5 time ids (the refiner's aesthetic score instead of the target size) do not fit."""
    folder = edited_copy(tiny_sdxl_dir, tmp_path / "refiner", "unet", projection_class_embeddings_input_dim=5 * 8 + 16)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet")).save_pretrained(folder / "unet")
    with pytest.raises(ModelLoadError, match=r"added embedding takes 56 values, but 6 time ids x 8 \+ the 16-wide"):
        load(str(folder), device="cpu", dtype="fp32", families=WSSS_FAMILIES)
