"""Stage 1: image-level labels -> composed prompt and token spans (ALGORITHM.md sections 1, 8).

Expected prompts are written from the spec's rule with the spec's tables copied by hand
below (not read from prompts/*.json), and the spans are checked by decoding the real SD v1
CLIP BPE tokens of the full prompt at the span positions.
"""
import json
from pathlib import Path

import pytest

from text2mask.classes import load_class_set
from text2mask.wsss.prompts import MAX_TOKENS, plan_prompts

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
PREFIX = "a photo including "

# ALGORITHM.md section 1, copied by hand.
VOC_SYNONYMS = [
    "aeroplane", "bicycle", "bird avian", "boat", "bottle", "bus", "car", "cat", "chair seat", "cow",
    "dining table", "dog", "horse", "motorbike", "person with clothes", "potted plant", "sheep",
    "sofa", "train", "tv monitor screen",
]
D = ["tree", "river", "sea", "lake", "water", "railway", "railroad", "track", "stone", "rocks"]
VOC_BACKGROUND = {4: ["river", "sea", "lake", "water", "mountain"], 10: ["grass", "stone", "rocks"],
                  19: ["railway", "railroad", "track"], 20: ["keyboard", "wall"]}
COCO_REPLACEMENTS = {
    "person": "person with clothes", "bird": "bird avian", "backpack": "backpack, bag",
    "umbrella": "umbrella, parasol", "handbag": "handbag, purse", "tie": "necktie",
    "baseball glove": "glove", "spoon": "dessert spoon", "chair": "chair seat", "couch": "sofa",
    "tv": "tv monitor screen", "remote": "remote control", "hair drier": "hairdrier, blowdrier",
    "motorcycle": "motorbike", "airplane": "aeroplane",
}


def spec_prompt(synonyms, backgrounds):
    """The spec's rule: prefix + s(k1) + ", " + ... + s(kn) + ", " + "w1, ..., and wm."."""
    union = []
    for words in backgrounds:
        union += [w for w in words if w not in union]
    bg = ", ".join(union[:-1]) + ", and " + union[-1] + "."
    return PREFIX + "".join(s + ", " for s in synonyms) + bg


def voc_prompt(classes):
    classes = sorted(classes)
    return spec_prompt([VOC_SYNONYMS[k - 1] for k in classes], [VOC_BACKGROUND.get(k, D) for k in classes])


def tokens(tokenizer, text):
    ids = tokenizer(text, truncation=False)["input_ids"]
    return tokenizer.convert_ids_to_tokens(ids)


def words(text):
    """Expected BPE word ends of a text: every word (and comma) ends in '</w>'."""
    return text.replace(",", " ,").split()


def decode_span(toks, span):
    """The words a span covers, from the BPE tokens ('aerop', 'lane</w>' -> 'aeroplane')."""
    return "".join(toks[i] for i in span).replace("</w>", " ").split()


def check_prompt(tokenizer, prompt, class_texts):
    """Spans decode to exactly each class's text; nothing else (commas, background) is in a span."""
    toks = tokens(tokenizer, prompt.text)
    assert toks[0] == "<|startoftext|>" and toks[-1] == "<|endoftext|>"
    assert prompt.num_tokens == len(toks) <= MAX_TOKENS
    assert len(prompt.spans) == len(class_texts)
    assert prompt.spans[0][0] == 4  # <start> a photo including
    for span, text in zip(prompt.spans, class_texts):
        assert list(span) == list(range(span[0], span[-1] + 1))  # contiguous
        assert decode_span(toks, span) == words(text)
        assert toks[span[-1] + 1] in (",</w>", ".</w>")  # the comma after the class is outside
        assert toks[span[0] - 1] in ("including</w>", ",</w>")


# -- every VOC class alone ---------------------------------------------------------------

def test_voc_single_class_prompts_by_hand(tokenizer):
    voc = load_class_set("voc")
    hand = {
        4: "a photo including boat, river, sea, lake, water, and mountain.",
        10: "a photo including cow, grass, stone, and rocks.",
        15: "a photo including person with clothes, tree, river, sea, lake, water, railway, railroad, "
            "track, stone, and rocks.",
        19: "a photo including train, railway, railroad, and track.",
        20: "a photo including tv monitor screen, keyboard, and wall.",
    }
    for k, text in hand.items():
        plan = plan_prompts(tokenizer, voc, [k])
        assert plan.actions == ()
        assert [p.text for p in plan.prompts] == [text]
    toks = tokens(tokenizer, hand[15])
    assert [toks[i] for i in plan_prompts(tokenizer, voc, [15]).prompts[0].spans[0]] == [
        "person</w>", "with</w>", "clothes</w>"]
    toks = tokens(tokenizer, hand[20])
    assert [toks[i] for i in plan_prompts(tokenizer, voc, [20]).prompts[0].spans[0]] == [
        "tv</w>", "monitor</w>", "screen</w>"]
    assert plan_prompts(tokenizer, voc, [20]).prompts[0].spans == ((4, 5, 6),)


@pytest.mark.parametrize("k", range(1, 21))
def test_every_voc_class_alone(tokenizer, k):
    voc = load_class_set("voc")
    assert voc.num_classes == 21
    plan = plan_prompts(tokenizer, voc, [k])
    assert plan.actions == ()
    assert plan.classes == (k,)
    (prompt,) = plan.prompts
    assert prompt.text == voc_prompt([k])
    assert prompt.classes == (k,)
    check_prompt(tokenizer, prompt, [VOC_SYNONYMS[k - 1]])


# -- several VOC classes -----------------------------------------------------------------

@pytest.mark.parametrize("labels, text, span_tokens", [
    ([15, 13],
     "a photo including horse, person with clothes, tree, river, sea, lake, water, railway, "
     "railroad, track, stone, and rocks.",
     [["horse</w>"], ["person</w>", "with</w>", "clothes</w>"]]),
    ([20, 9, 18],
     "a photo including chair seat, sofa, tv monitor screen, tree, river, sea, lake, water, railway, "
     "railroad, track, stone, rocks, keyboard, and wall.",
     [["chair</w>", "seat</w>"], ["sofa</w>"], ["tv</w>", "monitor</w>", "screen</w>"]]),
    ([12, 8],
     "a photo including cat, dog, tree, river, sea, lake, water, railway, railroad, track, stone, "
     "and rocks.",
     [["cat</w>"], ["dog</w>"]]),
    ([10, 4],
     "a photo including boat, cow, river, sea, lake, water, mountain, grass, stone, and rocks.",
     [["boat</w>"], ["cow</w>"]]),
])
def test_voc_multi_class(tokenizer, labels, text, span_tokens):
    plan = plan_prompts(tokenizer, load_class_set("voc"), labels)
    assert plan.actions == ()
    (prompt,) = plan.prompts
    assert prompt.text == text == voc_prompt(labels)
    assert prompt.classes == tuple(sorted(labels))
    toks = tokens(tokenizer, text)
    assert [[toks[i] for i in span] for span in prompt.spans] == span_tokens
    comma_positions = {i for i, t in enumerate(toks) if t == ",</w>"}
    assert not comma_positions & {i for span in prompt.spans for i in span}
    check_prompt(tokenizer, prompt, [VOC_SYNONYMS[k - 1] for k in sorted(labels)])


def test_person_horse_span_positions(tokenizer):
    (prompt,) = plan_prompts(tokenizer, load_class_set("voc"), [15, 13]).prompts
    # <start>=0 a=1 photo=2 including=3 horse=4 ,=5 person=6 with=7 clothes=8 ,=9
    assert prompt.spans == ((4,), (6, 7, 8))


def test_duplicate_labels_and_unknown_index(tokenizer):
    voc = load_class_set("voc")
    assert plan_prompts(tokenizer, voc, [8, 8, 12]).prompts[0].text == voc_prompt([8, 12])
    with pytest.raises(ValueError):
        plan_prompts(tokenizer, voc, [21])
    with pytest.raises(ValueError):
        plan_prompts(tokenizer, voc, [])


# -- COCO --------------------------------------------------------------------------------

def coco_categories():
    doc = json.loads((SAMPLES / "coco-mini/annotations/instances_mini.json").read_text())
    return [c["name"] for c in sorted(doc["categories"], key=lambda c: c["id"])]


def test_coco_class_set_matches_categories_and_spec():
    coco = load_class_set("coco")
    names = coco_categories()
    assert len(names) == 80 and len(coco.classes) == 80 and coco.num_classes == 81
    assert [c.name for c in coco.classes] == names
    # "tv" (COCO id 72) is 62nd counting from 0 among the 80 categories sorted by id, so
    # its class index (1..80, 0 = background) is 63.
    assert names.index("tv") == 62
    assert coco.index_of("tv") == 63 and coco.names[63] == "tv"
    assert coco.spec(63).prompt == "tv monitor screen"
    assert coco.spec(coco.index_of("couch")).prompt == "sofa"
    assert coco.spec(coco.index_of("snowboard")).prompt == "snowboard"
    assert not any("sknow" in c.prompt for c in coco.classes)
    assert [c.prompt for c in coco.classes] == [COCO_REPLACEMENTS.get(n, n) for n in names]
    assert all(list(c.background) == D for c in coco.classes)
    assert (coco.box_threshold, coco.background_tau, coco.background_power) == (0.5, 0.7, 2.0)
    voc = load_class_set("voc")
    assert (voc.box_threshold, voc.background_tau, voc.background_power) == (0.2, 1.0, 2.0)


def test_coco_prompt_with_comma_synonyms(tokenizer):
    coco = load_class_set("coco")
    labels = [coco.index_of(n) for n in ("backpack", "hair drier", "snowboard")]
    plan = plan_prompts(tokenizer, coco, labels)
    assert plan.actions == ()
    (prompt,) = plan.prompts
    assert prompt.text == spec_prompt(["backpack, bag", "snowboard", "hairdrier, blowdrier"], [D] * 3)
    toks = tokens(tokenizer, prompt.text)
    assert [[toks[i] for i in s] for s in prompt.spans] == [
        ["backpack</w>", ",</w>", "bag</w>"], ["snowboard</w>"],
        ["hair", "drier</w>", ",</w>", "blow", "drier</w>"]]


# -- overflow (section 8) ----------------------------------------------------------------

def check_plan_covers(tokenizer, plan, classes, texts):
    assert sorted(plan.classes) == sorted(classes) and len(plan.classes) == len(set(plan.classes))
    for prompt in plan.prompts:
        assert list(prompt.classes) == sorted(prompt.classes)
        n = len(tokenizer(prompt.text, truncation=False)["input_ids"])
        assert n == prompt.num_tokens <= 77
        check_prompt(tokenizer, prompt, [texts[k] for k in prompt.classes])


def test_all_twenty_voc_classes_drop_background(tokenizer):
    voc = load_class_set("voc")
    # The full prompt with background words is too long ...
    assert len(tokenizer(voc_prompt(range(1, 21)), truncation=False)["input_ids"]) > 77
    plan = plan_prompts(tokenizer, voc, range(1, 21))
    assert plan.actions == ("dropped background words",)
    (prompt,) = plan.prompts
    assert prompt.text == PREFIX + ", ".join(VOC_SYNONYMS) + "."
    check_plan_covers(tokenizer, plan, range(1, 21), dict(enumerate(VOC_SYNONYMS, start=1)))


def test_coco_plain_names_when_synonyms_do_not_fit(tokenizer):
    coco = load_class_set("coco")
    names = dict(enumerate(coco_categories(), start=1))
    plan = plan_prompts(tokenizer, coco, range(1, 29))
    assert plan.actions == ("dropped background words", "used plain class names instead of synonyms")
    (prompt,) = plan.prompts
    assert prompt.text == PREFIX + ", ".join(names[k] for k in range(1, 29)) + "."
    check_plan_covers(tokenizer, plan, range(1, 29), names)


def test_all_coco_classes_split(tokenizer):
    coco = load_class_set("coco")
    names = dict(enumerate(coco_categories(), start=1))
    plan = plan_prompts(tokenizer, coco, range(80, 0, -1))
    assert plan.actions[:2] == ("dropped background words", "used plain class names instead of synonyms")
    assert len(plan.actions) == 3 and plan.actions[2].startswith("split the classes over")
    assert str(len(plan.prompts)) in plan.actions[2]
    assert len(plan.prompts) >= 3  # 80 plain names are ~190 tokens
    check_plan_covers(tokenizer, plan, range(1, 81), names)


def test_prompt_of_exactly_77_tokens_needs_no_action(tokenizer):
    coco = load_class_set("coco")
    # Every COCO class with a replaced synonym: 77 tokens with the background words.
    labels = [coco.index_of(n) for n in COCO_REPLACEMENTS]
    names = coco_categories()
    text = spec_prompt([COCO_REPLACEMENTS[names[k - 1]] for k in sorted(labels)], [D] * len(labels))
    assert len(tokenizer(text, truncation=False)["input_ids"]) == 77
    plan = plan_prompts(tokenizer, coco, labels)
    assert plan.actions == ()
    assert [p.text for p in plan.prompts] == [text]
    check_plan_covers(tokenizer, plan, labels, {k: COCO_REPLACEMENTS[names[k - 1]] for k in labels})


# -- user class-set files ----------------------------------------------------------------

def test_user_class_set_file(tmp_path, tokenizer):
    path = tmp_path / "fruit.json"
    path.write_text(json.dumps({
        "default_background": ["table", "wall"],
        "classes": [{"name": "apple"},
                    {"name": "pear", "prompt": "green pear", "background": ["bowl", "table"]}],
    }))
    cs = load_class_set(path)
    assert cs.name == "fruit" and cs.num_classes == 3
    assert (cs.box_threshold, cs.background_tau, cs.background_power) == (0.2, 1.0, 2.0)
    assert cs.spec(1).prompt == "apple" and list(cs.spec(1).background) == ["table", "wall"]
    assert cs.spec(2).prompt == "green pear" and list(cs.spec(2).background) == ["bowl", "table"]
    plan = plan_prompts(tokenizer, cs, [2, 1])
    assert [p.text for p in plan.prompts] == ["a photo including apple, green pear, table, wall, and bowl."]
    assert plan.prompts[0].spans == ((4,), (6, 7))
    # Custom method parameters are read too.
    path.write_text(json.dumps({"box_threshold": 0.35, "background_tau": 0.8, "background_power": 3,
                                "classes": [{"name": "kiwi"}]}))
    cs = load_class_set(str(path))
    assert (cs.box_threshold, cs.background_tau, cs.background_power) == (0.35, 0.8, 3.0)
    assert plan_prompts(tokenizer, cs, [1]).prompts[0].text == "a photo including kiwi."


@pytest.mark.parametrize("content", [
    "{not json",
    json.dumps({"name": "x"}),                                  # no classes
    json.dumps({"classes": [{"prompt": "no name"}]}),           # class without a name
    json.dumps({"classes": []}),                                # empty
    json.dumps({"classes": [{"name": "a"}, {"name": "A"}]}),    # duplicate
    json.dumps({"classes": [{"name": "a"}], "box_threshold": "high"}),
])
def test_malformed_class_set_file(tmp_path, content):
    path = tmp_path / "broken.json"
    path.write_text(content)
    with pytest.raises(ValueError, match="broken.json"):
        load_class_set(path)


@pytest.mark.parametrize("doc", [
    {"classes": [{"name": "apple", "background": "grass"}]},
    {"default_background": "grass", "classes": [{"name": "apple"}]},
])
def test_background_given_as_a_string_is_not_split_into_letters(tmp_path, tokenizer, doc):
    """A bare string where a word list is expected must not become the words 'g', 'r', 'a', ...:
    either the file is rejected as malformed, naming it, or the string is one word."""
    path = tmp_path / "stringbg.json"
    path.write_text(json.dumps(doc))
    try:
        cs = load_class_set(path)
    except ValueError as e:
        assert "stringbg.json" in str(e)
        return
    assert list(cs.spec(1).background) == ["grass"]


@pytest.mark.parametrize("synonym", ["hot-dog", "mr. potato", "dog's", "c++", "cat!", "e.t."])
def test_user_synonym_with_punctuation(tmp_path, tokenizer, synonym):
    """CLIP's pre-tokenizer glues runs of punctuation together ('+,' is one token), so a
    synonym ending in punctuation merges with the comma after it. The span must still cover
    exactly the synonym's characters -- or the class set must be rejected with a ValueError;
    never a span that silently misses part of the class or an internal RuntimeError."""
    path = tmp_path / "punct.json"
    path.write_text(json.dumps({"default_background": ["tree"],
                                "classes": [{"name": "x", "prompt": synonym}, {"name": "cat"}]}))
    try:
        plan = plan_prompts(tokenizer, load_class_set(path), [1, 2])
    except ValueError:
        return
    (prompt,) = plan.prompts
    toks = tokens(tokenizer, prompt.text)
    covered = ["".join(toks[i] for i in span).replace("</w>", "") for span in prompt.spans]
    assert covered == [synonym.replace(" ", ""), "cat"]


def test_missing_class_set_file(tmp_path):
    with pytest.raises(ValueError, match="nothere.json"):
        load_class_set(tmp_path / "nothere.json")
