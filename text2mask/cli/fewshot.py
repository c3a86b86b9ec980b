"""``text2mask fewshot``: few-shot segmentation with DiffewS — ``episodes`` (the benchmark
protocol as a manifest), ``evaluate``, ``segment`` (one's own photos from examples),
``train``, ``import`` (the released weights), ``score`` (run folders, the 4-fold mean) — thin shells over ``text2mask.fewshot``."""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from ..errors import ConfigError
from ..log import get
from .root import DEVICE_OPTION, DTYPE_OPTION, WORKERS_HELP, Dtype, check_device, exits, finish_run, parse_shard, quiet_libraries

log = get(__name__)

app = typer.Typer(no_args_is_help=True, help="Few-shot segmentation (DiffewS): segment things like these examples.")


class BenchmarkName(str, Enum):
    pascal5i = "pascal5i"
    coco20i = "coco20i"


class ScoreAt(str, Enum):
    original = "original"
    model = "model"


class TextCondition(str, Enum):
    padded = "padded"
    unpadded = "unpadded"


class Precision(str, Enum):
    no = "no"
    fp16 = "fp16"
    bf16 = "bf16"


def _refuse_existing(out: Path, what: str) -> None:
    if out.exists():
        raise ConfigError(f"{out} exists; {what} never overwrites a file: choose another --out")


@app.command()
@exits
def episodes(
    benchmark: BenchmarkName = typer.Option(..., help="pascal5i or coco20i (HSNet's interleaved COCO split)."),
    fold: int = typer.Option(..., help="Fold 0..3."),
    shots: int = typer.Option(1, min=1, help="Supports per episode (K)."),
    data_root: Path = typer.Option(..., help="The VOC2012 / COCO2014 folder (or its parent)."),
    lists: Optional[Path] = typer.Option(None, help="Folder of HSNet's {val,trn}/fold{i}.txt|pkl lists "
                                                     "(default: DATA_ROOT/splits). Not shipped: bring your own."),
    count: int = typer.Option(1000, min=1, help="Episodes (1000 is the standard protocol)."),
    seed: int = typer.Option(0, help="NumPy seed (0 is the standard protocol)."),
    out: Path = typer.Option(..., help="The manifest to write (JSONL); never overwritten."),
) -> None:
    """Write the fold's test episodes (HSNet protocol) once, as a manifest to evaluate from."""
    from ..fewshot.episodes import benchmark as get_benchmark, make_manifest, write_manifest

    _refuse_existing(out, "episodes")
    m = make_manifest(get_benchmark(benchmark.value), data_root, lists, fold, shots, count, seed)
    write_manifest(out, m)
    log.info(f"{out}: {len(m.episodes)} {shots}-shot episodes of {benchmark.value} fold {fold}"
             + ("" if m.protocol["standard"] else " (not the standard protocol)"))


@app.command()
@exits
def evaluate(
    episodes_file: Path = typer.Option(..., "--episodes", help="Manifest from `text2mask fewshot episodes`."),
    model: Path = typer.Option(..., help="A few-shot checkpoint (text2mask layout; see `fewshot import`)."),
    out: Path = typer.Option(..., help="Run folder: masks/, areas/, records/, run.json, metrics.json."),
    data_root: Optional[Path] = typer.Option(None, help="Override the data root recorded in the manifest."),
    base_model: Optional[str] = typer.Option(None, help="Override the checkpoint's base SD 2.x model (path or id)."),
    text_condition: Optional[TextCondition] = typer.Option(None, help="Override the checkpoint's empty-prompt form."),
    score_at: ScoreAt = typer.Option(ScoreAt.original, help="Headline scores at the query's original size "
                                     "(default) or at the model resolution (DiffewS' 512²); both are kept."),
    visualize: int = typer.Option(0, min=0, help="Pictures of the first N episodes in visual/."),
    device: str = DEVICE_OPTION,
    dtype: Dtype = DTYPE_OPTION,
    batch_size: int = typer.Option(1, min=1, help="Episodes per model call."),
    workers: Optional[int] = typer.Option(None, min=0, help=WORKERS_HELP),
    limit: Optional[int] = typer.Option(None, min=1, help="Only the first N episodes."),
    shard: Optional[str] = typer.Option(None, help="I/N: only shard I of N (0-based)."),
    overwrite: bool = typer.Option(False, help="Redo every episode of a folder of another configuration."),
    progress: bool = typer.Option(True, help="Progress bar."),
) -> None:
    """Score a checkpoint on an episode manifest (resumable; shards; accelerate processes)."""
    from ..distributed import Distributed
    from ..fewshot.checkpoint import load_diffews
    from ..fewshot.episodes import data_root as resolve_root, read_manifest
    from ..fewshot.evaluate import evaluate as run_evaluation
    from ..runs import RunOptions
    from ..runs.folder import check_writable

    # 1. Everything checked before the model loads.
    device = check_device(device)
    shard_t = parse_shard(shard)
    manifest = read_manifest(episodes_file)
    root = resolve_root(manifest.benchmark, data_root or manifest.protocol["data_root"])
    check_writable(out)
    dist = Distributed.from_env()
    if dist.world > 1 and device == "auto":
        device = dist.device()
    quiet_libraries()
    # 2. The model, then the run.
    m = load_diffews(model, device=device, dtype=dtype.value, base_model=base_model,
                     text_condition=text_condition.value if text_condition else None)
    opts = RunOptions(out=out, batch_size=batch_size, workers=workers,
                      limit=limit, overwrite=overwrite, shard=shard_t, progress=progress)
    summary = run_evaluation(m, manifest, root, opts, score_at=score_at.value, visualize=visualize,
                             log=log.info, dist=dist)
    finish_run(summary, "episode", dist.main)


@app.command()
@exits
def score(
    runs: List[Path] = typer.Argument(..., help="Evaluation folders (e.g. the four folds of one model)."),
    score_at: ScoreAt = typer.Option(ScoreAt.original, help="Headline resolution: original or model."),
) -> None:
    """Score finished evaluation folders (e.g. after shards); with folds 0..3, the 4-fold mean."""
    from ..evaluation.fewshot import four_fold_mean
    from ..fewshot.evaluate import score_run

    results = [score_run(r, score_at.value, log=log.info) for r in runs]
    folds = {m["fold"]: m for m in results}
    if sorted(folds) == [0, 1, 2, 3] and len(results) == 4:
        mean = four_fold_mean(folds)
        log.info(f"4-fold mean ({score_at.value} resolution): mIoU {mean['mIoU']:.1f}%, FB-IoU {mean['FB-IoU']:.1f}%")


@app.command()
@exits
def segment(
    support: List[str] = typer.Option(..., help="IMAGE:MASK of one example (repeat for K shots). The mask: "
                                      "white object on black, or an index PNG (non-zero = object, see --class)."),
    query: List[Path] = typer.Option(..., help="A photo to segment (repeat for several)."),
    model: Path = typer.Option(..., help="A few-shot checkpoint (text2mask layout)."),
    out: Path = typer.Option(..., help="Folder for <query stem>.png (0 background, 1 object) at the query's size."),
    class_index: Optional[int] = typer.Option(None, "--class", min=1, max=254,
                                              help="In index-PNG support masks, the object is this value."),
    visualize: bool = typer.Option(False, help="Also write visual/<stem>.png: supports | query | prediction."),
    base_model: Optional[str] = typer.Option(None, help="Override the checkpoint's base SD 2.x model."),
    device: str = DEVICE_OPTION,
    dtype: Dtype = DTYPE_OPTION,
    batch_size: int = typer.Option(1, min=1, help="Queries per model call."),
) -> None:
    """Segment your own photos like the examples (few-shot, DiffewS)."""
    from ..fewshot.checkpoint import load_diffews
    from ..fewshot.segment import parse_pair, read_supports, segment as run_segment
    from ..io import read_image
    from ..runs.folder import check_writable

    device = check_device(device)
    supports = read_supports([parse_pair(s) for s in support], class_index)
    for q in query:
        read_image(q)                       # a bad query fails before the model loads
    check_writable(out)
    quiet_libraries()
    m = load_diffews(model, device=device, dtype=dtype.value, base_model=base_model)
    if m.sd.info.get("random_weights"):
        log.warning("the model has random weights (test model): these masks are MEANINGLESS")
    run_segment(m, supports, query, out, visualize, batch_size, log=log.info)


@app.command()
@exits
def train(
    benchmark: BenchmarkName = typer.Option(..., help="pascal5i or coco20i."),
    fold: int = typer.Option(..., help="Fold 0..3: trains on the other folds' classes."),
    data_root: Path = typer.Option(..., help="The VOC2012 / COCO2014 folder (or its parent)."),
    lists: Optional[Path] = typer.Option(None, help="HSNet list folder (default: DATA_ROOT/splits)."),
    init: str = typer.Option(..., help="Start from a base SD 2.x model (folder or id) or a few-shot checkpoint."),
    out: Path = typer.Option(..., help="Training folder: checkpoint-N/ states, train.json, the final checkpoint."),
    steps: int = typer.Option(10_000, min=1, help="Optimisation steps."),
    batch_size: int = typer.Option(1, min=1, help="Episodes per device per micro-batch."),
    grad_accum: int = typer.Option(4, min=1, help="Micro-batches per step."),
    lr: float = typer.Option(1e-5, help="AdamW learning rate (linear decay, no warm-up)."),
    max_shots: int = typer.Option(1, min=1, help="Each step draws k in 1..N supports (DiffewS-n)."),
    checkpoint_every: int = typer.Option(2000, min=1, help="accelerate save_state every N steps."),
    resolution: int = typer.Option(512, min=8, help="Square input size."),
    text_condition: TextCondition = typer.Option(TextCondition.padded, help="Empty prompt padded to 77 tokens "
                                                 "(the reference's training input) or not."),
    mixed_precision: Precision = typer.Option(Precision.no, help="no, fp16 or bf16 (with accelerate)."),
    seed: int = typer.Option(42, help="Seed of every draw (episodes, shots, posterior noise)."),
    resume: bool = typer.Option(False, help="Continue from the latest checkpoint-N/ in --out."),
    device: str = typer.Option("auto", help="auto or cpu (accelerate picks the GPU of each process)."),
    progress: bool = typer.Option(True, help="Progress bar with the loss."),
) -> None:
    """Train DiffewS on a fold (🤗 accelerate: `accelerate launch -m text2mask fewshot train ...`)."""
    from ..fewshot.episodes import benchmark as get_benchmark, check_fold, data_root as resolve_root
    from ..fewshot.model import FewShotConfig
    from ..fewshot.train import TrainConfig, train as run_training, training_data

    device = check_device(device)
    check_fold(fold)
    bench = get_benchmark(benchmark.value)
    root = resolve_root(bench, data_root)
    data = training_data(bench, root, lists.expanduser() if lists else root / "splits", fold)
    config = TrainConfig(steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=lr, max_shots=max_shots,
                         checkpoint_every=checkpoint_every, seed=seed, mixed_precision=mixed_precision.value,
                         fewshot=FewShotConfig(resolution=resolution, text_condition=text_condition.value))
    quiet_libraries()
    losses = run_training(init, data, out, config, resume=resume, device=None if device == "auto" else device,
                          progress=progress)
    if losses:
        log.info(f"last loss {losses[-1]:.5f} after step {steps}")


@app.command("import")
@exits
def import_released(
    released: Path = typer.Option(..., help="A released DiffewS model folder (e.g. weight/coco_fold0)."),
    base_model: str = typer.Option(..., help="Its SD 2.1 base (e.g. the stable-diffusion-2-1-ref8inchannels-"
                                   "tag4inchannels folder): VAE, text encoder, tokenizer."),
    out: Path = typer.Option(..., help="New checkpoint folder (text2mask layout)."),
    benchmark: Optional[BenchmarkName] = typer.Option(BenchmarkName.coco20i, help="What it was trained on."),
    fold: Optional[int] = typer.Option(None, help="Its fold (coco_fold0 -> 0); none for the in-context model."),
    max_shots: Optional[int] = typer.Option(None, help="Max shots it was trained with, if known."),
) -> None:
    """Convert released DiffewS weights to a text2mask checkpoint (the UNet split from conv_in_ref)."""
    from ..fewshot.checkpoint import import_released as run_import
    from ..fewshot.episodes import check_fold

    if fold is not None:
        check_fold(fold)
    _refuse_existing(out, "import")
    run_import(released, out, base_model=base_model, benchmark=benchmark.value if benchmark else None,
               fold=fold, max_shots=max_shots)
    log.info(f"{out}: imported (text condition: unpadded, as the published evaluation)")
