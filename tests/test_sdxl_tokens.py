"""Token spans over SDXL's two tokenizers (issue 24), on the real CLIP BPE built offline by
tests/tiny_models.py: the spans counted with ``tokenizer`` index the same tokens in
``tokenizer_2``; the two differ only in padding (end of text 49407 vs "!" = id 0)."""
import copy

import pytest
import torch

from text2mask.classes import load_class_set
from text2mask.modeling import sdxl as X
from text2mask.modeling.families import prompt_ids
from text2mask.wsss.prompts import plan_prompts

EOS, BANG = 49407, 0


@pytest.fixture(scope="module")
def tokenizers(sdxl):
    return sdxl.tokenizer, sdxl.tokenizer_2


def test_the_two_tokenizers_pad_differently(tokenizers):
    tok, tok2 = tokenizers
    assert (tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", EOS)
    assert (tok2.pad_token, tok2.pad_token_id) == ("!", BANG)
    assert tok.get_vocab() == tok2.get_vocab() and len(tok) == 49408


@pytest.mark.parametrize("classes", [(13, 15), (9, 11, 18, 20), tuple(range(1, 21))])
def test_spans_index_the_same_tokens_in_both(tokenizers, classes):
    """VOC prompts (synonyms, background words; all 20 classes overflow into several
    prompts): one set of spans for both encoders' halves of the conditioning."""
    tok, tok2 = tokenizers
    voc = load_class_set("voc")
    plan = plan_prompts(tok, voc, classes)
    assert plan.classes == tuple(sorted(classes))
    for p in plan.prompts:
        a, b = prompt_ids(tok, p.text)[0], prompt_ids(tok2, p.text)[0]
        n = p.num_tokens
        assert torch.equal(a[:n], b[:n]) and a[n - 1] == EOS
        assert (a[n:] == EOS).all() and (b[n:] == BANG).all()   # padding: the only difference
        for k, span in zip(p.classes, p.spans):
            words = tok2.convert_ids_to_tokens(b[list(span)].tolist())
            text = "".join(words).replace("</w>", " ").strip()
            assert text in (voc.spec(k).prompt, voc.spec(k).name) and words == tok.tokenize(text)


def test_a_prompt_split_differently_is_refused(sdxl):
    """A tokenizer_2 that splits a word otherwise (here "horse" as an added token, id 8562
    instead of "horse</w>" 4558) would make the spans mean other tokens in one half."""
    tok2 = copy.deepcopy(sdxl.tokenizer_2)
    tok2.add_tokens(["horse"])
    with pytest.raises(ValueError, match="two tokenizers split .* differently"):
        X.encode_prompt((sdxl.tokenizer, tok2), (sdxl.text_encoder, sdxl.text_encoder_2),
                        "a photo including horse.", "cpu")
    with pytest.raises(ValueError, match="does not fit in 77 tokens"):
        prompt_ids(sdxl.tokenizer, "cat " * 80)


def test_load_checks_tokenizer_2_against_its_encoder(tiny_sdxl_dir, tmp_path):
    import shutil

    from text2mask.errors import ModelLoadError
    from text2mask.modeling.families import WSSS_FAMILIES
    from text2mask.modeling.loading import load
    from tiny_models import build_clip_tokenizer

    folder = tmp_path / "xl"
    shutil.copytree(tiny_sdxl_dir, folder)
    shutil.rmtree(folder / "tokenizer_2")
    tok2 = build_clip_tokenizer(folder / "tokenizer_2", "!")
    tok2.add_tokens(["<new1>"])     # 49409 tokens: the text encoder's vocabulary check names it
    tok2.save_pretrained(folder / "tokenizer_2")
    with pytest.raises(ModelLoadError, match=r"tokenizer_2.*49409 tokens, the text encoder expects 49408"):
        load(str(folder), device="cpu", dtype="fp32", families=WSSS_FAMILIES)


def test_tokenizers_with_other_merges_are_refused(sdxl, tmp_path):
    """Same size, other BPE (two merges swapped): spans would not mean the same tokens."""
    from transformers import CLIPTokenizer

    from text2mask.errors import ModelLoadError
    from tiny_models import build_clip_tokenizer

    build_clip_tokenizer(tmp_path / "t2", "!")
    lines = (tmp_path / "t2" / "merges.txt").read_text(encoding="utf-8").split("\n")
    lines[1], lines[2] = lines[2], lines[1]
    (tmp_path / "t2" / "merges.txt").write_text("\n".join(lines), encoding="utf-8")
    other = CLIPTokenizer(str(tmp_path / "t2" / "vocab.json"), str(tmp_path / "t2" / "merges.txt"),
                          bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>",
                          pad_token="!", model_max_length=77)
    assert len(other) == len(sdxl.tokenizer)
    X.check_parts(sdxl.unet, sdxl.text_encoder, sdxl.text_encoder_2, sdxl.tokenizer, sdxl.tokenizer_2, "ok")
    with pytest.raises(ModelLoadError, match="different BPE vocabularies or merges"):
        X.check_parts(sdxl.unet, sdxl.text_encoder, sdxl.text_encoder_2, sdxl.tokenizer, other, "tiny")
