"""Per-episode model cost of the two few-shot methods at FULL architecture, random weights,
counted on PyTorch's meta device (no memory, no weights, no time): floating-point
operations of every matrix product, convolution and attention (torch's FlopCounterMode;
elementwise work is not counted) and parameter counts.

    DiffewS  SD 2.1 (UNet 865 M, VAE 84 M): VAE encodes of query, k supports and k support
             masks; the support pass (k UNet rows) and the query pass (attn1 over
             [query; k supports]); one VAE decode
    DiffSeg  Kandinsky 2.2 decoder (UNet 1.25 B), MoVQ, CLIP ViT-bigG/14 image tower, SCM
             and PAM: MoVQ encodes of the query and k masked supports, k CLIP passes at
             224², one UNet pass stopped after the last attention layer with SCM on the
             up path, the map fusion, PAM, one MoVQ decode; and one training step on
             cached features (the UNet forward + the backward through the up path, SCM
             and PAM)

All at 512² (latent 64²). Used by ``scripts/benchmark.py --only fewshot`` (or run alone:
``python scripts/fewshot_cost.py``).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESOLUTION = 512
TERA = 1e12

# Hub configs (diffusers layout) of the models, as their config.json files give them.
SD21_UNET = dict(sample_size=96, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), attention_head_dim=(5, 10, 20, 20),
                 cross_attention_dim=1024, use_linear_projection=True,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
              block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, sample_size=768, scaling_factor=0.18215)
KANDINSKY_UNET = dict(
    sample_size=64, in_channels=4, out_channels=8, layers_per_block=3, block_out_channels=(384, 768, 1152, 1536),
    attention_head_dim=64, cross_attention_dim=768, encoder_hid_dim=1280, encoder_hid_dim_type="image_proj",
    addition_embed_type="image", addition_embed_type_num_heads=64, resnet_time_scale_shift="scale_shift",
    down_block_types=("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * 3,
    up_block_types=("SimpleCrossAttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",),
    mid_block_type="UNetMidBlock2DSimpleCrossAttn", class_embed_type=None, norm_num_groups=32)
MOVQ = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 256, 512),
            down_block_types=("DownEncoderBlock2D",) * 3 + ("AttnDownEncoderBlock2D",),
            up_block_types=("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * 3, norm_num_groups=32,
            norm_type="spatial", num_vq_embeddings=16384, vq_embed_dim=4)
CLIP_BIGG = dict(hidden_size=1664, intermediate_size=8192, num_hidden_layers=48, num_attention_heads=16,
                 patch_size=14, image_size=224, projection_dim=1280, hidden_act="gelu")


def _params(m) -> int:
    return sum(p.numel() for p in m.parameters())


def _flops(fn) -> float:
    """TFLOP of ``fn()`` (forward and, inside it, any backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops() / TERA


def diffews_costs(shots: tuple[int, ...]) -> dict:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from text2mask.fewshot.diffews import DiffewsUNet, support_conv_in

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD21_UNET).eval().requires_grad_(False)
        vae = AutoencoderKL(**SD_VAE).eval().requires_grad_(False)
        net = DiffewsUNet(unet, support_conv_in(unet.conv_in))
        img = torch.empty(1, 3, RESOLUTION, RESOLUTION)
        z = torch.empty(1, 4, RESOLUTION // 8, RESOLUTION // 8)
        text = torch.empty(1, 77, 1024)
    out = {"params": {"unet": _params(unet), "vae": _params(vae)}}
    with torch.no_grad():
        out["vae_encode"] = _flops(lambda: vae.encode(img))
        out["vae_decode"] = _flops(lambda: vae.decode(z))
        for k in shots:
            support = torch.empty(k, 8, *z.shape[-2:], device="meta")
            unet_tf = _flops(lambda: net(z, support, k, text))
            out[f"{k}-shot"] = {"unet_passes": unet_tf, "vae": (2 * k + 1) * out["vae_encode"] + out["vae_decode"],
                                "total": unet_tf + (2 * k + 1) * out["vae_encode"] + out["vae_decode"]}
    return out


def diffseg_costs(shots: tuple[int, ...], batch: int = 8) -> dict:
    import torch
    from diffusers import UNet2DConditionModel, VQModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from text2mask.fewshot.diffseg.model import DiffSegConfig, DiffSegHeads, Features
    from text2mask.fewshot.diffseg.stages import diffseg_loss

    h = RESOLUTION // 8
    with torch.device("meta"):
        unet = UNet2DConditionModel(**KANDINSKY_UNET).eval().requires_grad_(False)
        movq = VQModel(**MOVQ).eval().requires_grad_(False)
        clip = CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_BIGG)).eval().requires_grad_(False)
        heads = DiffSegHeads(unet, 4, DiffSegConfig(resolution=RESOLUTION))

        def feats(b):
            return Features(*(torch.empty(*shape, device="meta") for shape in (
                (b, 4, h, h), (b, 4, h, h), (b, 1280), (b, 1, RESOLUTION, RESOLUTION), (b, 4, h, h))))

        img = torch.empty(1, 3, RESOLUTION, RESOLUTION)
        px = torch.empty(1, 3, 224, 224)
        z = torch.empty(1, 4, h, h)
    out = {"params": {"unet": _params(unet), "movq": _params(movq), "clip_image_tower": _params(clip),
                      "scm": _params(heads.scm), "pam": _params(heads.pam)}}
    with torch.no_grad():
        out["movq_encode"] = _flops(lambda: movq.encode(img))
        out["movq_decode"] = _flops(lambda: movq.decode(z, force_not_quantize=True))
        out["clip"] = _flops(lambda: clip(px))
        out["heads_forward"] = _flops(lambda: heads(unet, feats(1), 0.867, 100, None))
    for k in shots:
        out[f"{k}-shot"] = {"encoders": (k + 1) * out["movq_encode"] + k * out["clip"],
                            "unet_scm_pam": out["heads_forward"], "movq_decode": out["movq_decode"],
                            "total": (k + 1) * out["movq_encode"] + k * out["clip"] + out["heads_forward"]
                            + out["movq_decode"]}
    heads.train().requires_grad_(True)

    def step():
        f = feats(batch)
        g, w, gt = (torch.empty(batch, c, h, h, device="meta") for c in (1, 1, 4))
        m_a, l_pre = heads(unet, f, 0.867, 100, None)
        diffseg_loss(m_a, l_pre, g, w, gt).backward()

    out["train_step_per_episode"] = _flops(step) / batch
    out["train_batch"] = batch
    return out


def episode_costs(shots: tuple[int, ...] = (1, 5), log=print) -> dict:
    sys.path.insert(0, str(ROOT))
    res = {"resolution": RESOLUTION, "diffews": diffews_costs(shots), "diffseg": diffseg_costs(shots)}
    for name in ("diffews", "diffseg"):
        r = res[name]
        log(f"{name}: params " + ", ".join(f"{k} {v / 1e6:.1f} M" for k, v in r["params"].items()))
        for k in shots:
            log(f"{name} {k}-shot episode at {RESOLUTION}²: " + ", ".join(f"{a} {b:.2f}" for a, b in r[f"{k}-shot"].items())
                + " TFLOP")
    log(f"diffseg training step per episode (cached features, batch {res['diffseg']['train_batch']}): "
        f"{res['diffseg']['train_step_per_episode']:.2f} TFLOP")
    return res


if __name__ == "__main__":
    print(json.dumps(episode_costs(), indent=2))
