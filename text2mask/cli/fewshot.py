"""``text2mask fewshot``: few-shot segmentation with DiffewS — ``episodes`` (the benchmark
protocol as a manifest), ``evaluate``, ``segment`` (one's own photos from examples),
``train``, ``import`` (the released weights), ``score`` (run folders, the 4-fold mean) — thin shells over ``text2mask.fewshot``."""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from ..errors import ConfigError
from ..guard import Guard
from ..log import get
from .root import (
    CONFIG_OPTION, DEVICE_OPTION, DTYPE_OPTION, MODEL_PANEL, ORIGINAL_CONFIG_OPTION, REVISION_OPTION, WORKERS_HELP,
    Dtype, check_device, exits, finish_run, parse_shard, quiet_libraries,
)

log = get(__name__)

app = typer.Typer(no_args_is_help=True, help="Few-shot segmentation (DiffewS on SD 2.1, DiffSeg on Kandinsky 2.2): "
                                              "segment things like these examples.")


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


class FewShotMethod(str, Enum):
    diffews = "diffews"
    diffseg = "diffseg"


class EdgeMaps(str, Enum):
    canny = "canny"
    hed = "hed"


# Option groups of `fewshot evaluate --help`.
INPUTS_PANEL, SCORING_PANEL, RUN_PANEL = "Inputs", "Scoring", "Run"


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

    guard = Guard()
    guard.input(data_root, "data root")
    guard.input(lists, "list folder")
    guard.output_file(out, "--out")          # a manifest is never overwritten
    guard.check()
    m = make_manifest(get_benchmark(benchmark.value), data_root, lists, fold, shots, count, seed)
    write_manifest(out, m)
    log.info(f"{out}: {len(m.episodes)} {shots}-shot episodes of {benchmark.value} fold {fold}"
             + ("" if m.protocol["standard"] else " (not the standard protocol)"))
    typer.echo(str(out))


@app.command()
@exits
def evaluate(
    episodes_file: Path = typer.Option(..., "--episodes", help="Manifest from `text2mask fewshot episodes`.",
                                       rich_help_panel=INPUTS_PANEL),
    data_root: Optional[Path] = typer.Option(None, help="Override the data root recorded in the manifest.",
                                             rich_help_panel=INPUTS_PANEL),
    model: Path = typer.Option(..., help="A few-shot checkpoint (text2mask layout; see `fewshot import`; offline: "
                               "`python scripts/make_tiny_model.py --family fewshot OUT`).",
                               rich_help_panel=MODEL_PANEL),
    base_model: Optional[str] = typer.Option(None, help="Override the checkpoint's base SD 2.x model (path or id).",
                                             rich_help_panel=MODEL_PANEL),
    text_condition: Optional[TextCondition] = typer.Option(None, help="Override the checkpoint's empty-prompt form.",
                                                           rich_help_panel=MODEL_PANEL),
    device: str = DEVICE_OPTION,
    dtype: Dtype = DTYPE_OPTION,
    score_at: ScoreAt = typer.Option(ScoreAt.model, help="Headline scores at the model resolution (default: "
                                     "DiffewS' 512², the paper's protocol) or at the query's original size; both "
                                     "are printed and kept in metrics.json.", rich_help_panel=SCORING_PANEL),
    out: Path = typer.Option(..., help="Run folder: masks/, areas/, records/, run.json, metrics.json.",
                             rich_help_panel=RUN_PANEL),
    visualize: int = typer.Option(0, min=0, help="Pictures of the first N episodes in visual/.",
                                  rich_help_panel=RUN_PANEL),
    batch_size: int = typer.Option(1, min=1, help="Episodes per model call.", rich_help_panel=RUN_PANEL),
    workers: Optional[int] = typer.Option(None, min=0, help=WORKERS_HELP, rich_help_panel=RUN_PANEL),
    limit: Optional[int] = typer.Option(None, min=1, help="Only the first N episodes.", rich_help_panel=RUN_PANEL),
    shard: Optional[str] = typer.Option(None, help="I/N: only shard I of N (0-based).", rich_help_panel=RUN_PANEL),
    overwrite: bool = typer.Option(False, help="Redo every episode of a folder of another configuration.",
                                   rich_help_panel=RUN_PANEL),
    progress: bool = typer.Option(True, help="Progress bar.", rich_help_panel=RUN_PANEL),
) -> None:
    """Score a checkpoint on an episode manifest (resumable; shards; accelerate processes)."""
    from ..distributed import Distributed
    from ..fewshot.checkpoint import load_diffews, read_info
    from ..fewshot.episodes import data_root as resolve_root, read_manifest
    from ..runs import RunOptions

    # 1. Everything checked before the model loads.
    device = check_device(device)
    shard_t = parse_shard(shard)
    manifest = read_manifest(episodes_file)
    root = resolve_root(manifest.benchmark, data_root or manifest.protocol["data_root"])
    info = read_info(model)
    diffseg = info["method"] == "diffseg"        # the checkpoint's method picks the predictor
    if diffseg and text_condition:
        raise ConfigError(f"--text-condition applies to DiffewS checkpoints; {model} is a DiffSeg one")
    guard = Guard()
    guard.input(episodes_file, "episode manifest")
    guard.input(root, "data root")
    guard.model(model, "--model")
    guard.model(base_model or info["base_model"], "base model")
    if diffseg:
        from ..fewshot.diffseg.commands import guard_checkpoint

        guard_checkpoint(guard, info, base_model)
    guard.output_folder(out)
    guard.check()
    dist = Distributed.from_env()
    if dist.world > 1 and device == "auto":
        device = dist.device()
    quiet_libraries()
    # 2. The model, then the run.
    if diffseg:
        from ..fewshot.diffseg.checkpoint import load_diffseg
        from ..fewshot.diffseg.evaluate import evaluate as run_evaluation

        m = load_diffseg(model, device=device, dtype=dtype.value, base_model=base_model)
    else:
        from ..fewshot.evaluate import evaluate as run_evaluation

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
    score_at: ScoreAt = typer.Option(ScoreAt.model, help="Headline resolution: model (default, the paper's "
                                     "512²) or original."),
) -> None:
    """Score finished evaluation folders (e.g. after shards); with folds 0..3, the 4-fold mean; with one fold
    on several seeded manifests, mean ± std over the seeds."""
    from ..evaluation.fewshot import four_fold_mean
    from ..fewshot.evaluate import score_run

    guard = Guard()
    for r in runs:
        guard.input(r / "run.json", "run record")
        guard.input(r / "areas", "episode areas")
        guard.output_file(r / "metrics.json", "metrics.json", replace=True)   # rewritten by design
    guard.check()

    results = [score_run(r, score_at.value, log=log.info) for r in runs]
    folds = {m["fold"]: m for m in results}
    if sorted(folds) == [0, 1, 2, 3] and len(results) == 4:
        mean = four_fold_mean(folds)
        log.info(f"4-fold mean ({score_at.value} resolution): mIoU {mean['mIoU']:.1f}%, FB-IoU {mean['FB-IoU']:.1f}%")
    from ..fewshot.diffseg.seeds import seed_table

    seed_table(runs, results, log.info)      # runs of one fold on several seeded manifests: mean ± std


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
    from ..fewshot.checkpoint import load_diffews, read_info
    from ..fewshot.segment import output_names, parse_pair, read_supports, segment as run_segment
    from ..io import read_image

    device = check_device(device)
    pairs = [parse_pair(s) for s in support]
    supports = read_supports(pairs, class_index)
    for q in query:
        read_image(q)                       # a bad query fails before the model loads
    stems = output_names(query)
    info = read_info(model)
    guard = Guard()
    guard.inputs([image for image, _ in pairs], "support photo")
    guard.inputs([mask for _, mask in pairs], "support mask")
    guard.inputs(query, "query photo")
    guard.model(model, "--model")
    guard.model(base_model or info["base_model"], "base model")
    if info["method"] == "diffseg":
        from ..fewshot.diffseg.commands import guard_checkpoint

        guard_checkpoint(guard, info, base_model)
    guard.output_folder(out)
    for stem in stems:                      # a rerun rewrites its own masks, never an input
        guard.output_file(out / f"{stem}.png", "--out", replace=True)
        if visualize:
            guard.output_file(out / "visual" / f"{stem}.png", "--out", replace=True)
    guard.check()
    quiet_libraries()
    if info["method"] == "diffseg":
        from ..fewshot.diffseg.checkpoint import load_diffseg

        m = load_diffseg(model, device=device, dtype=dtype.value, base_model=base_model)
    else:
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
    model: str = typer.Option(..., "--model", "--init", help="Start from a base SD 2.x model (hub id, folder or "
                              "single file; diffews), a Kandinsky 2.2 decoder (hub id or folder; diffseg) or a "
                              "few-shot checkpoint (--init is the old name).",
                              rich_help_panel=MODEL_PANEL),
    revision: Optional[str] = REVISION_OPTION,
    config: Optional[str] = CONFIG_OPTION,
    original_config: Optional[str] = ORIGINAL_CONFIG_OPTION,
    out: Path = typer.Option(..., help="Training folder: checkpoint-N/ states, train.json, the final checkpoint."),
    method: FewShotMethod = typer.Option(FewShotMethod.diffews, help="diffews (SD 2.1, docs/fewshot.md) or "
                                         "diffseg (Kandinsky 2.2 with SCM and PAM, docs/diffseg.md)."),
    steps: Optional[int] = typer.Option(None, min=1, help="diffews: optimisation steps (10000)."),
    epochs: Optional[int] = typer.Option(None, min=1, help="diffseg: epochs over the training pairs (200)."),
    batch_size: Optional[int] = typer.Option(None, min=1, help="Episodes per device per (micro-)batch "
                                             "(diffews 1, diffseg 2)."),
    grad_accum: int = typer.Option(4, min=1, help="diffews: micro-batches per step."),
    lr: Optional[float] = typer.Option(None, help="diffews: AdamW learning rate (1e-5, linear decay, no warm-up); "
                                       "diffseg: SGD learning rate (0.01, x0.9 every 20 epochs)."),
    max_shots: int = typer.Option(1, min=1, help="diffews: each step draws k in 1..N supports (DiffewS-n)."),
    checkpoint_every: Optional[int] = typer.Option(None, min=1, help="accelerate save_state every N steps "
                                                   "(diffews, 2000) or epochs (diffseg, 10)."),
    prior: Optional[str] = typer.Option(None, help="diffseg: the Kandinsky 2.2 prior (its CLIP image tower), "
                                        "folder or hub id; default the --model folder's prior/ or "
                                        "kandinsky-community/kandinsky-2-2-prior.", rich_help_panel=MODEL_PANEL),
    timestep: Optional[int] = typer.Option(None, min=0, max=999, help="diffseg: the query's noise step t (100)."),
    edges: EdgeMaps = typer.Option(EdgeMaps.canny, help="diffseg: query edge maps for SCM: canny, or hed "
                                   "with --hed."),
    hed: Optional[Path] = typer.Option(None, help="diffseg: ControlNetHED.pth weights for --edges hed."),
    resolution: int = typer.Option(512, min=8, help="Square input size."),
    text_condition: TextCondition = typer.Option(TextCondition.padded, help="Empty prompt padded to 77 tokens "
                                                 "(the reference's training input) or not."),
    mixed_precision: Precision = typer.Option(Precision.no, help="no, fp16 or bf16 (with accelerate)."),
    seed: int = typer.Option(42, help="Seed of every draw (episodes, shots, posterior noise)."),
    resume: bool = typer.Option(False, help="Continue from the latest checkpoint-N/ in --out (refused when an "
                                "input or setting changed; see docs/fewshot.md)."),
    device: str = typer.Option("auto", help="auto or cpu (accelerate picks the GPU of each process)."),
    progress: bool = typer.Option(True, help="Progress bar with the loss."),
) -> None:
    """Train DiffewS or DiffSeg on a fold (🤗 accelerate: `accelerate launch -m text2mask fewshot train ...`)."""
    from ..fewshot.episodes import benchmark as get_benchmark, check_fold, data_root as resolve_root
    from ..fewshot.model import FewShotConfig
    from ..fewshot.train import TrainConfig, train as run_training, training_data

    device = check_device(device)
    check_fold(fold)
    if method is FewShotMethod.diffseg:
        from ..fewshot.diffseg.commands import refuse_diffews_options, train_command

        refuse_diffews_options(steps=steps, max_shots=max_shots > 1, config=config, original_config=original_config)
        bench = get_benchmark(benchmark.value)
        root = resolve_root(bench, data_root)
        quiet_libraries()
        train_command(bench=bench, root=root, list_folder=lists.expanduser() if lists else root / "splits", fold=fold,
                      model=model, revision=revision, prior=prior, out=out, epochs=epochs, batch_size=batch_size,
                      lr=lr, checkpoint_every=checkpoint_every, resolution=resolution, timestep=timestep,
                      edges=edges.value, hed=hed, mixed_precision=mixed_precision.value, seed=seed, resume=resume,
                      device=None if device == "auto" else device, progress=progress, log=log.info)
        return
    given = {"--epochs": epochs, "--prior": prior, "--timestep": timestep is not None, "--hed": hed,
             "--edges": edges is not EdgeMaps.canny}
    if any(given.values()):
        raise ConfigError(f"{', '.join(k for k, v in given.items() if v)} apply to --method diffseg only")
    steps = steps or 10_000
    train_config = TrainConfig(steps=steps, batch_size=batch_size or 1, grad_accum=grad_accum,
                               lr=1e-5 if lr is None else lr, max_shots=max_shots,
                               checkpoint_every=checkpoint_every or 2000, seed=seed,
                               mixed_precision=mixed_precision.value,
                               fewshot=FewShotConfig(resolution=resolution, text_condition=text_condition.value))
    bench = get_benchmark(benchmark.value)
    root = resolve_root(bench, data_root)
    list_folder = lists.expanduser() if lists else root / "splits"
    guard = Guard()
    guard.model(model, "--model")
    if (Path(model).expanduser() / "fewshot.json").is_file():       # fine-tuning a few-shot checkpoint
        from ..fewshot.checkpoint import read_info

        guard.model(read_info(model)["base_model"], "base model")
    guard.input(root, "data root")
    guard.input(list_folder, "list folder")
    guard.output_folder(out)
    guard.check()
    data = training_data(bench, root, list_folder, fold)
    quiet_libraries()
    losses = run_training(model, data, out, train_config, resume=resume, device=None if device == "auto" else device,
                          progress=progress, revision=revision, model_config=config, original_config=original_config)
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
    guard = Guard()
    guard.input(released, "released model")
    guard.model(base_model, "--base-model")
    guard.output_folder(out)
    guard.check()
    if any(out.iterdir()):
        raise ConfigError(f"--out {out} is not empty; import writes a new checkpoint folder and never overwrites one")
    run_import(released, out, base_model=base_model, benchmark=benchmark.value if benchmark else None,
               fold=fold, max_shots=max_shots)
    log.info(f"{out}: imported (text condition: unpadded, as the published evaluation)")
    typer.echo(str(out))
