"""Concepts: formats A (.safetensors, .bin), B, C and textual inversion load to the same
tensors, apply exactly (= diffusers' CustomDiffusionAttnProcessor) and restore bitwise."""
import copy

import pytest
import torch
from safetensors.torch import save_file

from text2mask.errors import InputError
from text2mask.personal.concept import Concept, save_concept

TOKEN = "<new1>"
# diffusers block -> CompVis block, written from the spec's table (independent of the loader)
_TO_COMPVIS = {**{f"down_blocks.{d}.attentions.{a}": f"input_blocks.{i}.1"
                  for (d, a), i in zip([(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)], [1, 2, 4, 5, 7, 8])},
               "mid_block.attentions.0": "middle_block.1",
               **{f"up_blocks.{u}.attentions.{a}": f"output_blocks.{3 * u + a}.1"
                  for u in (1, 2, 3) for a in (0, 1, 2)}}


def random_concept_tensors(unet, seed=0, q_out=False):
    """Random attn2 tensors shaped like ``unet``'s (K/V, optionally Q/out) and a token row."""
    g = torch.Generator().manual_seed(seed)
    params = dict(unet.named_parameters())
    names = [n for n in params if ".attn2." in n and (
        n.endswith(("to_k.weight", "to_v.weight")) or (q_out and n.endswith(("to_q.weight", "to_out.0.weight", "to_out.0.bias"))))]
    attn2 = {n: torch.randn(params[n].shape, generator=g) * 0.2 for n in names}
    dim = unet.config.cross_attention_dim
    return attn2, torch.randn(1, dim, generator=g)


def write_format(folder, fmt, attn2, embed, token=TOKEN):
    """Save the same tensors in one of the formats, as the original tools lay them out."""
    folder.mkdir(parents=True, exist_ok=True)
    if fmt in ("A", "A-bin"):
        suffix = {"to_k.weight": "to_k_custom_diffusion.weight", "to_v.weight": "to_v_custom_diffusion.weight",
                  "to_q.weight": "to_q_custom_diffusion.weight", "to_out.0.weight": "to_out_custom_diffusion.0.weight",
                  "to_out.0.bias": "to_out_custom_diffusion.0.bias"}
        sd = {}
        for n, v in attn2.items():
            module, _, p = n.partition(".attn2.")
            sd[f"{module}.attn2.processor.{suffix[p]}"] = v
        if fmt == "A":
            save_file(sd, str(folder / "pytorch_custom_diffusion_weights.safetensors"))
            save_file({token: embed[0]}, str(folder / f"{token}.safetensors"))
        else:
            for module in {n.partition(".attn2.")[0] for n in attn2}:
                sd[f"{module}.attn1.processor"] = {}
            torch.save(sd, folder / "pytorch_custom_diffusion_weights.bin")
            torch.save({token: embed[0]}, folder / f"{token}.bin")
    elif fmt == "B":
        torch.save({"unet": dict(attn2), "modifier_token": {token: embed[0]}}, folder / "delta.bin")
    elif fmt == "C":
        state = {}
        for n, v in attn2.items():
            block, _, rest = n.partition(".transformer_blocks.")
            state[f"model.diffusion_model.{_TO_COMPVIS[block]}.transformer_blocks.{rest}"] = v
        state["embed"] = embed
        torch.save({"state_dict": state}, folder / "delta_epoch=000001.ckpt")
    elif fmt == "T":
        save_file({token: embed}, str(folder / "learned_embeds.safetensors"))
    return folder


def _unet_state(sd):
    return {k: v.detach().clone() for k, v in sd.unet.state_dict().items()}


def _embed(sd, text):
    ids = sd.tokenizer(text, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return sd.text_encoder(ids)[0][0]


@pytest.mark.parametrize("q_out", [False, True])
def test_all_formats_give_the_same_unet_and_restore_bitwise(sd, tmp_path, q_out):
    attn2, embed = random_concept_tensors(sd.unet, seed=1, q_out=q_out)
    before = _unet_state(sd)
    rows_before = sd.text_encoder.get_input_embeddings().weight.detach().clone()
    states = {}
    for fmt in ("A", "A-bin", "B", "C"):
        c = Concept.load(write_format(tmp_path / fmt, fmt, attn2, embed))
        assert c.tokens == (TOKEN,) and set(c.attn2) == set(attn2)
        with c.applied(sd) as ids:
            states[fmt] = _unet_state(sd)
            assert torch.equal(sd.text_encoder.get_input_embeddings().weight[ids[0]], embed[0])
        after = _unet_state(sd)
        assert all(torch.equal(before[k], after[k]) for k in before), fmt
    ref = states["A"]
    for fmt, st in states.items():
        assert all(torch.equal(ref[k], st[k]) for k in ref), fmt
    changed = {k for k in ref if not torch.equal(ref[k], before[k])}
    assert changed == set(attn2)
    rows_after = sd.text_encoder.get_input_embeddings().weight
    assert torch.equal(rows_after[: len(rows_before)], rows_before)


def test_format_a_keys_equal_diffusers_save_attn_procs(sd, tiny_model_dir, tmp_path):
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import CustomDiffusionAttnProcessor
    from safetensors import safe_open

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    procs = {}
    for name in unet.attn_processors:
        cross = name.endswith("attn2.processor")
        layer = unet.get_submodule(name[: -len(".processor")])
        procs[name] = CustomDiffusionAttnProcessor(
            train_kv=cross, train_q_out=False, hidden_size=layer.to_q.out_features,
            cross_attention_dim=unet.config.cross_attention_dim if cross else None)
    unet.set_attn_processor(procs)
    unet.save_attn_procs(tmp_path / "diffusers", safe_serialization=True)
    with safe_open(str(tmp_path / "diffusers" / "pytorch_custom_diffusion_weights.safetensors"), "pt") as f:
        theirs = set(f.keys())
    attn2, embed = random_concept_tensors(sd.unet)
    save_concept(tmp_path / "ours", [TOKEN], embed, attn2, {"class": "mug"})
    with safe_open(str(tmp_path / "ours" / "pytorch_custom_diffusion_weights.safetensors"), "pt") as f:
        ours = set(f.keys())
    assert ours == theirs and len(ours) == 32
    c = Concept.load(tmp_path / "ours")
    assert c.info["class"] == "mug" and all(torch.equal(c.attn2[k], attn2[k]) for k in attn2)


@pytest.mark.parametrize("q_out", [False, True])
def test_merged_weights_equal_diffusers_custom_diffusion_processors(sd, tiny_model_dir, tmp_path, q_out):
    from diffusers.models.attention_processor import AttnProcessor, CustomDiffusionAttnProcessor

    attn2, embed = random_concept_tensors(sd.unet, seed=2, q_out=q_out)
    unet = copy.deepcopy(sd.unet)
    procs = {}
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            module = name[: -len(".processor")]
            layer = unet.get_submodule(module)
            p = CustomDiffusionAttnProcessor(train_kv=True, train_q_out=q_out, hidden_size=layer.to_q.out_features,
                                             cross_attention_dim=unet.config.cross_attention_dim)
            state = {"to_k_custom_diffusion.weight": attn2[f"{module}.to_k.weight"],
                     "to_v_custom_diffusion.weight": attn2[f"{module}.to_v.weight"]}
            if q_out:
                state.update({"to_q_custom_diffusion.weight": attn2[f"{module}.to_q.weight"],
                              "to_out_custom_diffusion.0.weight": attn2[f"{module}.to_out.0.weight"],
                              "to_out_custom_diffusion.0.bias": attn2[f"{module}.to_out.0.bias"]})
            p.load_state_dict(state)
            procs[name] = p
        else:
            procs[name] = AttnProcessor()
    unet.set_attn_processor(procs)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 16, 16, generator=g)
    text = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        theirs = unet(latents, 150, encoder_hidden_states=text).sample
        c = Concept.load(write_format(tmp_path / "A", "A", attn2, embed))
        with c.applied(sd):
            ours = sd.unet(latents, 150, encoder_hidden_states=text).sample
        base = sd.unet(latents, 150, encoder_hidden_states=text).sample
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert not torch.allclose(base, theirs, atol=1e-3)


def test_token_span_and_embedding_change_with_the_concept(sd, tmp_path):
    attn2, e1 = random_concept_tensors(sd.unet, seed=3)
    _, e2 = random_concept_tensors(sd.unet, seed=4)
    c1 = Concept.load(write_format(tmp_path / "one", "A", attn2, e1))
    c2 = Concept.load(write_format(tmp_path / "two", "T", attn2, e2))
    assert c2.attn2 == {} and c2.tokens == (TOKEN,)
    with c1.applied(sd) as ids:
        toks = sd.tokenizer("<new1> mug", add_special_tokens=False).input_ids
        assert len(toks) == 2 and toks[0] == ids[0] and ids[0] >= 49408
        assert toks[1] == sd.tokenizer("mug", add_special_tokens=False).input_ids[0]
        one = _embed(sd, "a <new1> mug")
    with c2.applied(sd) as ids2:
        assert ids2 == ids     # the token was added once
        two = _embed(sd, "a <new1> mug")
    assert not torch.allclose(one, two)
    # tokens before the new one are unchanged (causal text encoder)
    torch.testing.assert_close(one[:2], two[:2])


def test_multi_vector_textual_inversion(sd, tmp_path):
    embed = torch.randn(3, sd.unet.config.cross_attention_dim)
    c = Concept.load(write_format(tmp_path / "ti", "T", {}, embed, token="<cat-toy>"))
    assert c.tokens == ("<cat-toy>", "<cat-toy>_1", "<cat-toy>_2")
    assert c.prompt_token == "<cat-toy> <cat-toy>_1 <cat-toy>_2"
    with c.applied(sd) as ids:
        assert sd.tokenizer(f"a {c.prompt_token} mug", add_special_tokens=False).input_ids[1:4] == ids


def test_bad_concept_folders(sd, tmp_path):
    attn2, embed = random_concept_tensors(sd.unet)
    key = sorted(attn2)[0]
    missing = dict(attn2)
    del missing[key]
    with pytest.raises(InputError, match=r"missing .*to_k\.weight"):
        with Concept.load(write_format(tmp_path / "missing", "B", missing, embed)).applied(sd):
            pass
    extra = {**attn2, "down_blocks.3.attentions.0.transformer_blocks.0.attn2.to_k.weight": attn2[key]}
    with pytest.raises(InputError, match=r"down_blocks\.3\.attentions\.0.*not a parameter"):
        with Concept.load(write_format(tmp_path / "extra", "B", extra, embed)).applied(sd):
            pass
    bad = {**attn2, key: attn2[key][:, :-1].contiguous()}
    with pytest.raises(InputError, match=rf"{key.replace('.', '[.]')}' has shape"):
        with Concept.load(write_format(tmp_path / "shape", "A", bad, embed)).applied(sd):
            pass
    odd = {**attn2, key.replace("to_k.weight", "norm.weight"): attn2[key]}
    with pytest.raises(InputError, match="unexpected tensor"):
        Concept.load(write_format(tmp_path / "odd", "B", odd, embed))
    with pytest.raises(InputError, match="no concept weights"):
        Concept.load((tmp_path / "empty").mkdir() or tmp_path / "empty")
    with pytest.raises(InputError, match="dimension"):
        with Concept.load(write_format(tmp_path / "dim", "T", {}, torch.randn(1, 7))).applied(sd):
            pass
    # nothing stayed applied after the failures
    assert not (tmp_path / "ours").exists()


@pytest.mark.parametrize("q_out", [False, True])
def test_capture_with_cd_processors_equals_merged_weights(sd, tmp_path, q_out):
    """AttentionCapture over diffusers' CustomDiffusionAttnProcessor (it projects with the
    processor's own weights) = the same capture with the concept merged into the weights."""
    from diffusers.models.attention_processor import CustomDiffusionAttnProcessor

    from text2mask.modeling.capture import CROSS_BLOCKS, SELF_BLOCK, AttentionCapture

    attn2, embed = random_concept_tensors(sd.unet, seed=5, q_out=q_out)
    unet = copy.deepcopy(sd.unet)
    procs = dict(unet.attn_processors)
    for name in procs:
        if name.endswith("attn2.processor"):
            module = name[: -len(".processor")]
            layer = unet.get_submodule(module)
            p = CustomDiffusionAttnProcessor(train_kv=True, train_q_out=q_out, hidden_size=layer.to_q.out_features,
                                             cross_attention_dim=unet.config.cross_attention_dim)
            suffix = {"to_k.weight": "to_k_custom_diffusion.weight", "to_v.weight": "to_v_custom_diffusion.weight",
                      "to_q.weight": "to_q_custom_diffusion.weight", "to_out.0.weight": "to_out_custom_diffusion.0.weight",
                      "to_out.0.bias": "to_out_custom_diffusion.0.bias"}
            p.load_state_dict({suffix[k.partition(".attn2.")[2]]: v for k, v in attn2.items()
                               if k.startswith(module + ".")})
            procs[name] = p
    unet.set_attn_processor(procs)
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 4, 16, 16, generator=g)
    text = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        with AttentionCapture(unet, CROSS_BLOCKS, (SELF_BLOCK,)) as cap:
            theirs = cap.run(latents, 150, text)
        with Concept.load(write_format(tmp_path / "A", "A", attn2, embed)).applied(sd):
            with AttentionCapture(sd.unet, CROSS_BLOCKS, (SELF_BLOCK,)) as cap:
                ours = cap.run(latents, 150, text)
    for b in CROSS_BLOCKS:
        torch.testing.assert_close(ours.cross[b], theirs.cross[b], atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.self_attn, theirs.self_attn, atol=1e-5, rtol=0)
