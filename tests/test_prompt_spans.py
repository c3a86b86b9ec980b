"""The composer's second line of defence (issue 15): a class span that holds the
unknown / end-of-text token is refused, whatever tokenizer the loader let through."""
import json

import pytest
from transformers import CLIPTokenizer

from text2mask.wsss.prompts import compose

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


@pytest.fixture(scope="module")
def letters_tokenizer(tmp_path_factory):
    """A hand-made character-level CLIP tokenizer without the letter q: every other word
    spells out in real tokens, a word of q's becomes end-of-text tokens."""
    d = tmp_path_factory.mktemp("tok")
    vocab = {BOS: 0, EOS: 1}
    for c in "abcdefghijklmnoprstuvwxyz,.":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), bos_token=BOS, eos_token=EOS,
                         unk_token=EOS, pad_token=EOS)


def test_known_words_compose(letters_tokenizer):
    p = compose(letters_tokenizer, ["horse"], [13], ["tree"])
    ids = letters_tokenizer(p.text)["input_ids"]
    assert [ids[i] for i in p.spans[0]] == letters_tokenizer("horse", add_special_tokens=False)["input_ids"]
    assert len(p.spans[0]) == 5  # h o r s e</w>, one token per character


def test_a_class_word_that_maps_to_end_of_text_is_refused(letters_tokenizer):
    # Without the check, "qq" gives a 2-token span of <|endoftext|> and a mask anyway.
    assert letters_tokenizer("qq", add_special_tokens=False)["input_ids"] == [1, 1]
    with pytest.raises(ValueError, match=r"'qq' tokenizes to special token\(s\) \['<\|endoftext\|>'\]"):
        compose(letters_tokenizer, ["horse", "qq"], [13, 15], ["tree"])


def test_a_tokenizer_whose_vocabulary_did_not_load_is_refused(tmp_path):
    # transformers 5 silently ignores vocab_file=/merges_file= keywords and returns a
    # 2-token tokenizer that maps every word to its unknown token: the silent failure of issue 15.
    (tmp_path / "vocab.json").write_text(json.dumps({BOS: 0, EOS: 1, "horse</w>": 2}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    broken = CLIPTokenizer(vocab_file=str(tmp_path / "vocab.json"), merges_file=str(tmp_path / "merges.txt"))
    assert len(broken) == 2
    with pytest.raises(ValueError, match="'horse' tokenizes to special token"):
        compose(broken, ["horse"], [13], [])


def test_a_class_longer_than_77_tokens_is_refused_before_any_image(tokenizer):
    from text2mask.classes import ClassSet, ClassSpec, load_class_set
    from text2mask.errors import ConfigError
    from text2mask.wsss.prompts import check_class_set_fits

    check_class_set_fits(tokenizer, load_class_set("coco"))  # all 80 fit alone
    long_name = " ".join(["horse"] * 80)  # start + 3 prefix + 80 + '.' + end = 86 tokens
    cs = ClassSet("long", (ClassSpec("dog", "dog", ()), ClassSpec(long_name, long_name, ())), 0.2, 1.0, 2.0)
    with pytest.raises(ConfigError, match=r"class set 'long': class 2 'horse horse horse.*\.\.\.: does not fit in 77 tokens \(86 in its"):
        check_class_set_fits(tokenizer, cs)
