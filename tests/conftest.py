import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random SD v1-layout model in diffusers format, built once per session."""
    # Imported here so test sessions that never use the model skip loading transformers.
    from text2mask.modeling.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-sd") / "model", seed=0)


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    """The real SD v1 CLIP BPE tokenizer saved with the tiny model."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(tiny_model_dir, subfolder="tokenizer")


@pytest.fixture(scope="session")
def sd(tiny_model_dir):
    """The tiny model loaded through text2mask's own loader (CPU, float32)."""
    from text2mask.modeling.sd import load

    return load(str(tiny_model_dir), device="cpu", dtype="fp32")
