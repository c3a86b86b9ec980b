"""Issue 15: a tokenizer that did not load must stop the run before any work.

transformers 5 does not fail on missing vocabulary files: it returns a 2-token tokenizer
that maps every word to end-of-text. The folders below have the layout of the released
SD repos (vocab.json + merges.txt, no tokenizer.json), broken in the three ways found."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from text2mask.cli import app
from text2mask.errors import EXIT_CONFIG, ModelLoadError
from text2mask.modeling.loading import check_tokenizer, load, load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
IDS = ["2007_000039"]


def hub_layout_copy(src: Path, dst: Path) -> Path:
    """The tiny model with a tokenizer/ as the hub repos have it (no tokenizer.json)."""
    shutil.copytree(src, dst)
    (dst / "tokenizer" / "tokenizer.json").unlink()
    return dst


def break_tokenizer(folder: Path, how: str) -> None:
    tok = folder / "tokenizer"
    if how == "missing":
        shutil.rmtree(tok)
    elif how == "empty_vocab":
        (tok / "vocab.json").write_text("{}")
    elif how == "truncated_merges":
        lines = (tok / "merges.txt").read_text(encoding="utf-8").splitlines(keepends=True)
        (tok / "merges.txt").write_text("".join(lines[:1000]), encoding="utf-8")


@pytest.fixture(scope="module")
def intact(tiny_model_dir, tmp_path_factory):
    return hub_layout_copy(tiny_model_dir, tmp_path_factory.mktemp("intact") / "model")


def test_hub_layout_tokenizer_is_accepted(intact):
    tok = load_tokenizer(str(intact))
    assert len(tok) == 49408 and tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


@pytest.mark.parametrize("how, message", [
    ("missing", r"it has 2 tokens, the text encoder expects 49408.*tokenizer \(missing\)"),
    ("empty_vocab", r"vocab\.json|Token `.*` out of vocabulary"),
    ("truncated_merges", r"its BPE has 999 merges for 49408 tokens \(CLIP needs 48894"),
])
def test_broken_tokenizer_is_refused_by_the_loader(intact, tmp_path, how, message):
    folder = tmp_path / how
    shutil.copytree(intact, folder)
    break_tokenizer(folder, how)
    for loader in (lambda: load(str(folder), device="cpu", dtype="fp32"), lambda: load_tokenizer(str(folder))):
        with pytest.raises(ModelLoadError, match=message) as err:
            loader()
        assert str(folder) in str(err.value)


@pytest.mark.parametrize("how", ["missing", "empty_vocab", "truncated_merges"])
def test_generate_exits_2_and_writes_no_mask(intact, tmp_path, make_voc_tree, how):
    folder = tmp_path / "model"
    shutil.copytree(intact, folder)
    break_tokenizer(folder, how)
    voc = make_voc_tree(tmp_path / "VOC2012", IDS)
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["generate", "--dataset", "voc", "--data-root", str(voc), "--model", str(folder),
                                 "--out", str(out), "--device", "cpu", "--workers", "0", "--no-progress"])
    assert r.exit_code == EXIT_CONFIG, r.output
    assert "tokenizer" in r.output and str(folder) in r.output.replace("\n", "")
    assert "Traceback" not in r.output
    assert not list(out.rglob("*.png")) if out.exists() else True


def test_prompts_command_uses_the_guarded_loader(intact, tmp_path):
    r = CliRunner().invoke(app, ["prompts", "sheep,sports ball", "--prompts", "coco", "--model", str(intact)])
    assert r.exit_code == 0, r.output
    assert "prompt (31 of 77 tokens)" in r.output and "overflow" not in r.output
    folder = tmp_path / "notok"
    shutil.copytree(intact, folder)
    break_tokenizer(folder, "missing")
    r = CliRunner().invoke(app, ["prompts", "sheep,sports ball", "--prompts", "coco", "--model", str(folder)])
    assert r.exit_code == EXIT_CONFIG and "did not load correctly" in r.output


def test_prompts_with_an_unreachable_hub_exits_2(tmp_path):
    """The default model id, nothing cached, the hub at a closed port: a message, exit 2."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf-home"), "HF_ENDPOINT": "http://127.0.0.1:9",
           "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    r = subprocess.run([sys.executable, "-m", "text2mask", "prompts", "sheep,sports ball", "--prompts", "coco"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == EXIT_CONFIG, r.stdout + r.stderr[-2000:]
    assert "cannot load the tokenizer of 'CompVis/stable-diffusion-v1-4'" in r.stderr
    assert "out of reach" in r.stderr and "overflow" not in r.stdout and "Traceback" not in r.stderr


def test_text_encoder_vocabulary_must_match(intact, tmp_path):
    folder = tmp_path / "vocab"
    shutil.copytree(intact, folder)
    cfg = json.loads((folder / "text_encoder/config.json").read_text())
    cfg["vocab_size"] = 49409
    (folder / "text_encoder/config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="it has 49408 tokens, the text encoder expects 49409"):
        load_tokenizer(str(folder))


def hand_made_tokenizer(tmp_path):
    """CLIP's byte-level vocabulary without the letter 'h' and without merges: 'h' becomes
    the unknown token, which for CLIP is end-of-text."""
    from transformers import CLIPTokenizer

    from tiny_models import _bytes_to_unicode

    byte_tokens = [t for t in _bytes_to_unicode().values() if t != "h"]
    vocab = byte_tokens + [t + "</w>" for t in byte_tokens] + ["<|startoftext|>", "<|endoftext|>"]
    (tmp_path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    eos = "<|endoftext|>"
    return CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), bos_token="<|startoftext|>",
                         eos_token=eos, unk_token=eos, pad_token=eos, model_max_length=77)


def test_span_with_end_of_text_token_is_refused_by_the_composer(tmp_path):
    """Second line of defence, whatever the loader let through (wsss/prompts.compose)."""
    from text2mask.wsss.prompts import compose

    tok = hand_made_tokenizer(tmp_path)
    ids = tok("horse", add_special_tokens=False).input_ids
    assert ids[0] == tok.eos_token_id  # 'h' -> end of text
    assert [len(s) for s in compose(tok, ["cow"], [10], ()).spans] == [3]  # c, o, w</w>: accepted
    with pytest.raises(ValueError, match=r"'horse'.*<\|endoftext\|>"):
        compose(tok, ["horse"], [13], ())
    with pytest.raises(ModelLoadError, match="did not load correctly: its BPE has 0 merges"):
        check_tokenizer(tok, len(tok), "hand-made")
