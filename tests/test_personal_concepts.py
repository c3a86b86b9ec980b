"""Concept files validated on load (issue 21, rule 4) and multi-concept folders (issue 22,
item 5): a diffusers ``--modifier_token "<new1>+<new2>"`` folder, a delta.bin with two
modifier tokens and a CompVis delta with two embedding rows load as separate concepts
that share the jointly trained K/V."""
import json

import pytest
import torch
from safetensors.torch import save_file

from test_refer_concept import random_concept_tensors, write_format
from text2mask.errors import InputError
from text2mask.personal.concept import Concept, save_concept


def _two_token_folder(folder, attn2, rows, fmt):
    """The layout diffusers' train_custom_diffusion.py writes for two modifier tokens
    (one weights file, one <token> file each), or Custom Diffusion's delta.bin / CompVis
    delta with both tokens, written by hand."""
    if fmt == "A":
        write_format(folder, "A", attn2, rows[:1], token="<new1>")
        save_file({"<new2>": rows[1]}, str(folder / "<new2>.safetensors"))
    elif fmt == "A-bin-safetensors":
        # diffusers' save_new_embed has written safetensors bytes under a .bin name
        write_format(folder, "A", attn2, rows[:1], token="<new1>")
        (folder / "<new1>.safetensors").rename(folder / "<new1>.bin")
        save_file({"<new2>": rows[1]}, str(folder / "<new2>.bin"))
    elif fmt == "B":
        folder.mkdir(parents=True)
        torch.save({"unet": dict(attn2), "modifier_token": {"<new1>": rows[0], "<new2>": rows[1]}}, folder / "delta.bin")
    else:
        write_format(folder, "C", attn2, rows)
    return folder


@pytest.mark.parametrize("fmt", ["A", "A-bin-safetensors", "B", "C"])
def test_multi_concept_folder_loads_as_separate_concepts(sd, tmp_path, fmt):
    attn2, e1 = random_concept_tensors(sd.unet, seed=7)
    rows = torch.cat([e1, e1.flip(1)])
    folder = _two_token_folder(tmp_path / "pair", attn2, rows, fmt)
    both = Concept.load_all(folder)
    assert [c.tokens for c in both] == [("<new1>",), ("<new2>",)]
    assert [c.name for c in both] == ["pair#<new1>", "pair#<new2>"]
    for c, row in zip(both, rows):
        assert torch.equal(c.embeddings, row[None]) and c.attn2.keys() == attn2.keys()
        assert all(torch.equal(c.attn2[k], attn2[k]) for k in attn2)
    with pytest.raises(InputError, match=r"holds 2 concepts trained together \(<new1>, <new2>\)"):
        Concept.load(folder)
    second = Concept.load(folder, token="<new2>")
    assert Concept.load(f"{folder}#<new2>").digest == second.digest != both[0].digest
    with pytest.raises(InputError, match="no concept with token '<new3>'"):
        Concept.load(folder, token="<new3>")
    with second.applied(sd) as ids:      # applying one writes its own row and the shared K/V
        assert torch.equal(sd.text_encoder.get_input_embeddings().weight[ids[0]], rows[1])
        assert torch.equal(sd.unet.get_parameter(sorted(attn2)[0]), attn2[sorted(attn2)[0]])


def test_refer_one_photo_with_a_concept_of_a_multi_concept_folder(sd, tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from test_refer_run import CATS
    from text2mask.cli import app

    attn2, e1 = random_concept_tensors(sd.unet, seed=8)
    folder = _two_token_folder(tmp_path / "pair", attn2, torch.cat([e1, -e1]), "A")
    res = CliRunner().invoke(app, ["refer", str(CATS), "--class", "cat", "--segments", "2",
                                   "--concept", f"{folder}#<new1>", "--text", "the cat on the left",
                                   "--concept", f"{folder}#<new2>", "--text", "the cat on the right",
                                   "--out", str(tmp_path / "seg"), "--model", str(tiny_model_dir), "--device", "cpu",
                                   "--long-side", "128"])
    assert res.exit_code == 0, res.output
    scores = json.loads((tmp_path / "seg" / "scores" / f"{CATS.stem}.json").read_text())
    assert [t["prompt"] for t in scores["triplets"]] == ["the <new1> cat on the left", "the <new2> cat on the right"]


@pytest.mark.parametrize("damage,field", [
    ("nan-weight", "to_k_custom_diffusion.weight"),
    ("inf-row", "<new1>"),
    ("int-weight", "to_k_custom_diffusion.weight"),
    ("3d-weight", "to_k_custom_diffusion.weight"),
])
def test_concept_tensors_are_checked_on_load(sd, tmp_path, damage, field):
    attn2, embed = random_concept_tensors(sd.unet, seed=9)
    key = sorted(attn2)[0]
    if damage == "nan-weight":
        attn2[key] = attn2[key].clone()
        attn2[key][0, 0] = float("nan")
    elif damage == "inf-row":
        embed = embed.clone()
        embed[0, 1] = float("inf")
    elif damage == "int-weight":
        attn2[key] = attn2[key].to(torch.int32)
    else:
        attn2[key] = attn2[key][None]
    folder = write_format(tmp_path / damage, "A", attn2, embed)
    with pytest.raises(InputError) as e:
        Concept.load(folder)
    assert str(folder) in str(e.value) and field in str(e.value)


def test_concept_json_schema_is_checked(sd, tmp_path):
    attn2, embed = random_concept_tensors(sd.unet, seed=10)
    folder = write_format(tmp_path / "c", "C", attn2, embed)
    (folder / "concept.json").write_text(json.dumps({"tokens": "<new1>"}))
    with pytest.raises(InputError, match=r"concept\.json: field 'tokens' must be a non-empty list"):
        Concept.load(folder)
    (folder / "concept.json").write_text("[1, 2]")
    with pytest.raises(InputError, match="expected a JSON object"):
        Concept.load(folder)
    (folder / "concept.json").write_text(json.dumps({"class": 3}))
    with pytest.raises(InputError, match="field 'class'"):
        Concept.load(folder)


def test_save_concept_never_replaces_a_folder_that_is_not_a_concept(sd, tmp_path):
    attn2, embed = random_concept_tensors(sd.unet, seed=11)
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_bytes(b"my photo")
    with pytest.raises(InputError, match="not a concept"):
        save_concept(photos, ["<new1>"], embed, attn2, {"class": "cat"})
    assert (photos / "a.jpg").read_bytes() == b"my photo"
    save_concept(tmp_path / "c", ["<new1>"], embed, attn2, {"class": "cat"})
    save_concept(tmp_path / "c", ["<new1>"], -embed, attn2, {"class": "cat"})      # an earlier concept: replaced
    assert torch.equal(Concept.load(tmp_path / "c").embeddings, -embed)
    with pytest.raises(Exception, match="concept token"):
        save_concept(tmp_path / "d", ["../../x"], embed, attn2, {"class": "cat"})
