import pytest


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: the tiny models run faster on one thread than on an
    oversubscribed CPU (10x under load). Use with pytestmark = usefixtures("one_thread")."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random SD v1-layout model in diffusers format, built once per session."""
    # Imported here so test sessions that never use the model skip loading transformers.
    from tiny_models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-sd") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_sd2_dir(tmp_path_factory):
    """A tiny random SD v2-layout model (OpenCLIP-style text encoder, per-block head counts,
    linear projections, epsilon prediction) in diffusers format, built once per session."""
    from tiny_models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-sd2") / "model", seed=0, family="sd2")


@pytest.fixture(scope="session")
def sd2(tiny_sd2_dir):
    """The tiny SD2 model loaded through text2mask's own loader (CPU, float32)."""
    from text2mask.modeling.loading import load

    return load(str(tiny_sd2_dir), device="cpu", dtype="fp32")


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    """A tiny random SDXL-base-layout model (tiny_models.make_tiny_sdxl_model) in diffusers
    format, built once per session."""
    from tiny_models import make_tiny_sdxl_model

    return make_tiny_sdxl_model(tmp_path_factory.mktemp("tiny-sdxl") / "model", seed=0)


@pytest.fixture(scope="session")
def sdxl(tiny_sdxl_dir):
    """The tiny SDXL model loaded through text2mask's own loader (CPU, float32)."""
    from text2mask.modeling.families import WSSS_FAMILIES
    from text2mask.modeling.loading import load

    return load(str(tiny_sdxl_dir), device="cpu", dtype="fp32", families=WSSS_FAMILIES)


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    """The real SD v1 CLIP BPE tokenizer saved with the tiny model."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(tiny_model_dir, subfolder="tokenizer")


@pytest.fixture(scope="session")
def sd(tiny_model_dir):
    """The tiny model loaded through text2mask's own loader (CPU, float32)."""
    from text2mask.modeling.loading import load

    return load(str(tiny_model_dir), device="cpu", dtype="fp32")


# --- shared by tests/test_robustness.py and tests/test_resume.py -----------------------

@pytest.fixture(scope="module")
def voc_predictor(tiny_model_dir):
    """One loaded tiny-model predictor (VOC classes, default MaskConfig) per test module."""
    from text2mask.wsss.predictor import MaskConfig, Text2Mask

    return Text2Mask.from_pretrained(str(tiny_model_dir), "voc", MaskConfig(), device="cpu", dtype="fp32")


@pytest.fixture(scope="session")
def make_voc_tree():
    """Factory: make_voc_tree(root, ids, splits=None) builds a VOC2012-layout folder at
    ``root`` (JPEGImages/, SegmentationClass/, ImageSets/Segmentation/<split>.txt) with the
    real photos and ground truth of ``ids`` from samples/voc-mini. ``splits`` maps a split
    name to the id lines of its file (default: {"train": ids})."""
    from pathlib import Path

    samples = Path(__file__).resolve().parent.parent / "samples" / "voc-mini" / "VOC2012"

    def build(root, ids, splits=None):
        root = Path(root)
        for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        for i in ids:
            (root / "JPEGImages" / f"{i}.jpg").write_bytes((samples / "JPEGImages" / f"{i}.jpg").read_bytes())
            (root / "SegmentationClass" / f"{i}.png").write_bytes(
                (samples / "SegmentationClass" / f"{i}.png").read_bytes())
        for name, lines in (splits or {"train": list(ids)}).items():
            (root / "ImageSets/Segmentation" / f"{name}.txt").write_text("".join(f"{x}\n" for x in lines))
        return root

    return build


# --- the quick subset: `scripts/test.sh -m "not slow"` --------------------------------------
# Real-process tests (kills, several processes, fresh interpreters, wheels, torch.compile)
# take most of the suite's time; they are marked slow. CI runs everything.
SLOW_MODULES = {"test_compile", "test_runs_faults", "test_distributed", "test_resume", "test_packaging"}
SLOW_WORDS = ("sigkill", "killed", "fresh_processes", "kill")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: real-process tests left out of the quick subset (-m 'not slow')")


def pytest_collection_modifyitems(items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        if module in SLOW_MODULES or any(w in item.name.lower() for w in SLOW_WORDS):
            item.add_marker(pytest.mark.slow)
