"""WSSS commands (the paper's first task): ``generate``, ``evaluate``, ``segment``,
``prompts``, ``visualize``, ``coco-gt`` — thin shells over ``text2mask.wsss``.

Each runs under ``root.exits`` (exit codes in ``text2mask.cli.root``)."""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from ..data.voc import LABEL_SOURCES
from ..modeling.loading import DEFAULT_MODEL
from ..wsss.refine import CRF_IMAGES
from ..wsss.result import MaskConfig

from ..errors import EXIT_CONFIG, EXIT_FAILED_ITEMS as EXIT_FAILED_IMAGES, ConfigError, InputError
from ..guard import Guard, safe_name
from ..log import get, progress
from .root import CONFIG_OPTION, DEVICE_OPTION, DTYPE_OPTION, WSSS_MODEL_HELP, MODEL_PANEL, ORIGINAL_CONFIG_OPTION, REVISION_OPTION, WORKERS_HELP, Dtype, app, check_device, exits, finish_run, parse_shard, quiet_libraries

log = get(__name__)

# --help panels
DATA, MODEL, METHOD, OUTPUT = "Data", MODEL_PANEL, "Method", "Output"


class DatasetKind(str, Enum):
    voc = "voc"
    coco = "coco"
    folder = "folder"


# Choices and defaults come from the modules that define them (one place each).
LabelSource = Enum("LabelSource", {s: s for s in LABEL_SOURCES}, type=str)
CrfImage = Enum("CrfImage", {m: m for m in CRF_IMAGES}, type=str)
DEFAULTS = MaskConfig()


def _err(msg: str) -> None:
    log.error(msg)


def _log(msg: str) -> None:
    log.info(msg)


def load_dataset(dataset: DatasetKind, data_root: Path | None, split: str, labels_from: LabelSource,
                 labels: Path | None, images: Path | None, prompts: str | None,
                 images_dir: Path | None = None, annotations: Path | None = None):
    from ..errors import DatasetError

    if dataset is DatasetKind.voc:
        from ..data.voc import load_voc

        if data_root is None:
            raise DatasetError("--data-root is required for --dataset voc (the VOC2012 folder)")
        return load_voc(data_root, split, labels_from.value, labels, prompts or "voc")
    if dataset is DatasetKind.coco:
        from ..data.coco import load_coco

        if data_root is None and (images_dir is None or annotations is None):
            raise DatasetError("--data-root (or both --images-dir and --annotations) is required for --dataset coco")
        return load_coco(data_root, split, images_dir=images_dir, annotations=annotations,
                         class_set=prompts or "coco")
    from ..data.folder import load_folder

    if images is None or labels is None:
        raise DatasetError("--dataset folder needs --images DIR and --labels FILE")
    if prompts is None:
        raise DatasetError("--dataset folder needs --prompts FILE (or voc / coco) naming the class list")
    return load_folder(images, labels, prompts)


@app.command()
@exits
def generate(
    dataset: DatasetKind = typer.Option(DatasetKind.voc, help="Dataset kind.", rich_help_panel=DATA),
    data_root: Optional[Path] = typer.Option(None, help="VOC2012 folder (voc) or COCO root (coco).", rich_help_panel=DATA),
    split: str = typer.Option("train", help="voc: train|train_aug|trainval|val (trainaug accepted); coco: train|val.",
                              rich_help_panel=DATA),
    labels_from: LabelSource = typer.Option(LabelSource.auto, help="voc image-level labels: GT masks, XML, or --labels "
                                            "file; auto = masks if present else XML.", rich_help_panel=DATA),
    labels: Optional[Path] = typer.Option(None, help="Labels file: JSON {id: list of class names}, cls_labels.npy, or "
                                          "CSV (folder).", rich_help_panel=DATA),
    images: Optional[Path] = typer.Option(None, help="Image folder (--dataset folder).", rich_help_panel=DATA),
    images_dir: Optional[Path] = typer.Option(None, help="coco: override <root>/<split>2014/.", rich_help_panel=DATA),
    annotations: Optional[Path] = typer.Option(None, help="coco: override <root>/annotations/instances_<split>2014.json.",
                                               rich_help_panel=DATA),
    prompts: Optional[str] = typer.Option(None, help="Class list and prompts: voc, coco, or a JSON file of that format.",
                                          rich_help_panel=DATA),
    limit: Optional[int] = typer.Option(None, min=1, help="Only the first N images of the split.", rich_help_panel=DATA),
    model: str = typer.Option(DEFAULT_MODEL, help=WSSS_MODEL_HELP, rich_help_panel=MODEL),
    revision: Optional[str] = REVISION_OPTION,
    config: Optional[str] = CONFIG_OPTION,
    original_config: Optional[Path] = ORIGINAL_CONFIG_OPTION,
    device: str = DEVICE_OPTION,
    dtype: Dtype = DTYPE_OPTION,
    compile_vae: bool = typer.Option(False, "--compile", help="Run the VAE encoder through torch.compile: about "
                                     "0.9x its time (two thirds of a photo's) once each padded size is compiled "
                                     "(15-35 s per size the first time; needs a C++ compiler on CPU). Not "
                                     "byte-identical to eager.",
                                     rich_help_panel=MODEL),
    samples: int = typer.Option(DEFAULTS.samples, min=1, help="Noise samples in the ensemble (paper: 10 for VOC).", rich_help_panel=METHOD),
    seed: int = typer.Option(DEFAULTS.seed, help="Global seed; each image's draws come from (seed, image id).", rich_help_panel=METHOD),
    timestep: int = typer.Option(DEFAULTS.timestep, min=0, max=999, help="Noise level t of T=1000.", rich_help_panel=METHOD),
    box_threshold: Optional[float] = typer.Option(None, help="Class-aware box threshold (default: 0.2 VOC, 0.5 COCO; "
                                                  "0 disables).", rich_help_panel=METHOD),
    bg_tau: Optional[float] = typer.Option(None, help="Background tau (default: 1.0 VOC, 0.7 COCO).", rich_help_panel=METHOD),
    bg_power: Optional[float] = typer.Option(None, help="Background power p (default 2).", rich_help_panel=METHOD),
    crf: bool = typer.Option(DEFAULTS.crf, "--crf/--no-crf", help="Dense CRF refinement.", rich_help_panel=METHOD),
    crf_image: CrfImage = typer.Option(CrfImage(DEFAULTS.crf_image), help="Colour image of the CRF's bilateral kernel: the "
                                       "reference's wrapped mean-subtracted BGR, or plain RGB.", rich_help_panel=METHOD),
    confidence: float = typer.Option(DEFAULTS.confidence, help="CRF confidence below which the training mask says 255.",
                                     rich_help_panel=METHOD),
    max_pixels: int = typer.Option(4_000_000, min=0, help="Photos with more pixels are worked on area-shrunk (scores, "
                                   "CRF) and their masks written at full size; 0 = never.", rich_help_panel=METHOD),
    draws: Optional[Path] = typer.Option(None, "--draws", help="Replay the random draws saved by --save-draws: a "
                                         "folder of <id>.safetensors (e.g. another run's draws/).", rich_help_panel=METHOD),
    save_draws: bool = typer.Option(False, "--save-draws", help="Write each image's random draws to "
                                    "<out>/draws/<id>.safetensors, to replay the run with --draws.", rich_help_panel=OUTPUT),
    out: Path = typer.Option(..., help="Output folder.", rich_help_panel=OUTPUT),
    overwrite: bool = typer.Option(False, help="Redo every image, even if an earlier run finished it; takes over a "
                                   "folder of another configuration.", rich_help_panel=OUTPUT),
    evaluate: bool = typer.Option(True, "--evaluate/--no-evaluate", help="Score the masks when ground truth exists.",
                                  rich_help_panel=OUTPUT),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar.", rich_help_panel=OUTPUT),
    batch_size: int = typer.Option(1, min=1, help="Images of the same padded size per UNet call.", rich_help_panel=MODEL),
    memory_budget: str = typer.Option("auto", help="Memory one UNet call may use, e.g. 8GB: images per call are "
                                      "limited to it and a --samples that cannot fit is refused (auto: half of the "
                                      "device's memory; none: no limit).", rich_help_panel=MODEL),
    workers: Optional[int] = typer.Option(None, min=0, help=WORKERS_HELP,
                                          rich_help_panel=OUTPUT),
    shard: Optional[str] = typer.Option(None, help="I/N: process only shard I of N (0-based), e.g. for job arrays.",
                                        rich_help_panel=OUTPUT),
) -> None:
    """Pseudo masks for a dataset: masks/ (255 = unsure), initial/, crf/, records/, run.json, metrics.json."""
    from ..distributed import Distributed
    from ..errors import DatasetError
    from ..runs.budget import parse_budget, resolve_budget
    from ..wsss.run import RunOptions, generate as run

    # 1. Everything that can be checked without the model.
    device = check_device(device)
    shard_t = parse_shard(shard)
    ds = load_dataset(dataset, data_root, split, labels_from, labels, images, prompts, images_dir, annotations)
    if len(ds) == 0:
        raise DatasetError("the dataset has no images")
    if dataset is DatasetKind.coco and evaluate:
        from dataclasses import replace

        from ..data.coco import ensure_gt

        ds = ensure_gt(replace(ds, samples=ds.samples[:limit]) if limit else ds, progress=progress)
    parse_budget(memory_budget)     # a bad size is reported before the model loads
    if compile_vae:
        from ..modeling.kernels import check_compiler
        from ..modeling.loading import resolve_device

        check_compiler(resolve_device(device).type)
    if draws is not None and not draws.is_dir():
        raise ConfigError(f"--draws {draws}: no such folder (pass the draws/ folder of a run made with --save-draws)")
    _guard_dataset(ds, out, model, files=[(labels, "labels file"), (annotations, "annotations file"),
                                          (Path(prompts) if prompts else None, "prompts file"),
                                          (draws, "--draws folder"), (original_config, "original config")])
    dist = Distributed.from_env()  # accelerate launch / torchrun: one process per device
    if dist.world > 1 and device == "auto":
        device = dist.device()
    quiet_libraries()
    from ..wsss.predictor import Text2Mask

    try:
        cfg = MaskConfig(samples=samples, timestep=timestep, seed=seed, box_threshold=box_threshold,
                         background_tau=bg_tau, background_power=bg_power, crf=crf,
                         crf_image=crf_image.value, confidence=confidence).resolved(ds.class_set)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    # 2. The model, then the run.
    if dist.main:
        _log(f"loading {model} ...")
    predictor = Text2Mask.from_pretrained(model, ds.class_set, cfg, device=device, dtype=dtype.value, revision=revision,
                                          config_source=config,
                                          original_config=str(original_config) if original_config else None,
                                          compile=compile_vae)
    opts = RunOptions(out=out, batch_size=batch_size, workers=workers,
                      limit=limit, overwrite=overwrite, shard=shard_t, evaluate=evaluate, progress=progress,
                      memory_budget=resolve_budget(memory_budget, str(predictor.sd.device)),
                      max_pixels=max_pixels or None, save_draws=save_draws, draws=draws)
    summary = run(predictor, ds, opts, log=_log, dist=dist)
    # 3. The summary (main process), and the exit code.
    finish_run(summary, "image", dist.main, _details(summary))


def _details(summary) -> tuple[str, ...]:
    """What ``generate``'s summary says beyond the counts every run reports."""
    def ids(keys: list[str]) -> str:
        return ", ".join(keys[:10]) + (" ..." if len(keys) > 10 else "")

    lines = [f"{summary.done} written ({summary.no_labels} without labels, all background)"]
    if summary.redone_stale:
        lines.append(f"redone because another configuration (or no record) had written them: {len(summary.redone_stale)}")
    if summary.no_gt:
        lines.append(f"not scored, no ground truth: {len(summary.no_gt)} ({ids(summary.no_gt)})")
    if summary.worker_restarts:
        lines.append(f"the writer processes were restarted {summary.worker_restarts} time(s) after one died")
    if summary.status not in ("complete", "failed"):
        lines.append(f"folder status: {summary.status} (see run.json)")
    return tuple(lines)


@app.command()
@exits
def evaluate(
    pred: Path = typer.Option(..., help="Folder of predicted index PNGs.", rich_help_panel=DATA),
    gt: Path = typer.Option(..., help="Folder of ground-truth index PNGs.", rich_help_panel=DATA),
    split_file: Optional[Path] = typer.Option(None, help="Only these ids (one per line); each must have a prediction.",
                                              rich_help_panel=DATA),
    strict: bool = typer.Option(False, "--strict", help="Fail if a ground-truth image has no prediction "
                                "(default: score the predictions there are and say how many are missing).",
                                rich_help_panel=DATA),
    num_classes: int = typer.Option(21, min=1, max=255, help="Classes including background (21 VOC, 81 COCO).",
                                    rich_help_panel=DATA),
    prompts: Optional[str] = typer.Option(None, help="Class names from a class set (voc, coco or a JSON file); "
                                          "default: voc for 21 classes, coco for 81.", rich_help_panel=DATA),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the metrics to this .json file, and a "
                                            "per-class IoU bar chart next to it (.png).", rich_help_panel=OUTPUT),
) -> None:
    """mIoU, mAcc, aAcc of predicted masks: one confusion matrix over all images, GT 255 ignored."""
    from ..classes import load_class_set
    from ..data.base import read_split_file
    from ..evaluation.semantic import evaluate_dirs, format_table
    from ..io import write_json
    from ..visualize import iou_bar_chart

    if json_out is not None:
        if json_out.is_dir():
            raise ConfigError(f"--json {json_out} is a folder; give a file name such as {json_out / 'metrics.json'}")
        if json_out.suffix.lower() != ".json":
            raise ConfigError(f"--json {json_out}: the metrics file must end in .json "
                              "(its bar chart is written next to it with .png)")
    guard = Guard()
    guard.input(pred, "prediction folder")
    guard.input(gt, "ground-truth folder")
    guard.input(split_file, "split file")
    if json_out is not None:    # a report: rewritten by a rerun, never over an input
        guard.output_file(json_out, "--json", replace=True)
        guard.output_file(json_out.with_suffix(".png"), "--json's bar chart", replace=True)
    guard.check()
    names = None
    if prompts or num_classes in (21, 81):
        cs = load_class_set(prompts or ("voc" if num_classes == 21 else "coco"))
        if cs.num_classes != num_classes:
            raise ConfigError(f"class set {cs.name} has {cs.num_classes} classes, not --num-classes {num_classes}")
        names = cs.names
    notes: list[str] = []
    ids = read_split_file(split_file, notes) if split_file else None
    for n in notes:
        log.info(f"note: {n}")
    res = evaluate_dirs(pred, gt, ids=ids, num_classes=num_classes, class_names=names, progress=True, strict=strict)
    res["split"] = str(split_file) if split_file else "all PNGs in --pred"
    if res["gt_without_prediction"]:
        log.warning(f"{res['gt_without_prediction']} ground-truth image(s) in {gt} have no prediction in {pred} "
                    "and are not scored (--strict makes this an error)")
    typer.echo(format_table(res, f"{pred} vs {gt} ({res['split']})"))
    if json_out:
        write_json(json_out, res)
        iou_bar_chart(res, json_out.with_suffix(".png"))
        log.info(f"metrics in {json_out}, bar chart in {json_out.with_suffix('.png')}")


@app.command("coco-gt")
@exits
def coco_gt(
    data_root: Path = typer.Option(..., help="COCO root (with <split>2014/ and annotations/).", rich_help_panel=DATA),
    split: str = typer.Option("train", help="train or val.", rich_help_panel=DATA),
    annotations: Optional[Path] = typer.Option(None, help="Override annotations/instances_<split>2014.json.",
                                               rich_help_panel=DATA),
    images_dir: Optional[Path] = typer.Option(None, help="Override <root>/<split>2014/.", rich_help_panel=DATA),
    out: Optional[Path] = typer.Option(None, help="Where to write (default <root>/SegmentationClass/<split>2014).",
                                       rich_help_panel=OUTPUT),
) -> None:
    """Render COCO semantic ground truth (81 classes) from the instance annotations, once."""
    from ..data.coco import build_gt, load_coco

    ds = load_coco(data_root, split, images_dir=images_dir, annotations=annotations)
    guard = Guard()
    guard.inputs(dict.fromkeys(s.image.parent for s in ds.samples), "photo folder")
    guard.input(ds.annotations, "annotations file")
    if (out or ds.gt_cache) is not None:
        guard.output_folder(out if out is not None else ds.gt_cache)
    guard.check()
    where = build_gt(ds, out, progress=True)
    typer.echo(f"ground truth of {len(ds)} images in {where}")


@app.command("prompts")
@exits
def show_prompts(
    labels: str = typer.Argument(..., help="Class names or indices, comma separated, e.g. 'person,horse'."),
    prompts: str = typer.Option("voc", help="Class set: voc, coco or a JSON file."),
    model: str = typer.Option(DEFAULT_MODEL, help="Model whose tokenizer counts the tokens."),
) -> None:
    """Show the composed prompt(s) and each class's token span, to debug synonyms."""
    from ..errors import DatasetError
    from ..data.voc import class_indices
    from ..classes import load_class_set
    from ..modeling.loading import load_tokenizer
    from ..wsss.prompts import plan_prompts

    try:
        cs = load_class_set(prompts)
        classes = class_indices(labels, cs, where="--labels")
        quiet_libraries()
        # Checked against the text encoder's vocabulary: a missing tokenizer must not
        # silently count every word as end-of-text (issue 15). ModelLoadError is a ValueError.
        tok = load_tokenizer(model)
        plan = plan_prompts(tok, cs, classes)
    except (DatasetError, ValueError, OSError) as e:
        _err(str(e))
        raise typer.Exit(EXIT_CONFIG)
    for action in plan.actions:
        typer.echo(f"overflow: {action}")
    for p in plan.prompts:
        ids = tok(p.text)["input_ids"]
        typer.echo(f"prompt ({p.num_tokens} of 77 tokens): {p.text}")
        for k, span in zip(p.classes, p.spans):
            toks = tok.convert_ids_to_tokens([ids[i] for i in span])
            typer.echo(f"  {k:3d} {cs.spec(k).name:<20} tokens {span[0]}..{span[-1]}: {' '.join(toks)}")


def _phrase_class_set(labels: str):
    """An in-memory class set whose k-th class is the k-th comma-separated phrase, with
    VOC's default background words (minus any word that is itself one of the phrases:
    a target must not be prompted as background too) and VOC's box threshold and
    background (tau, p)."""
    from ..classes import ClassSet, ClassSpec, load_class_set

    phrases = [p.strip() for p in labels.split(",") if p.strip()]
    if not phrases:
        raise ConfigError("--labels needs at least one phrase, e.g. --labels 'dog,frisbee'")
    if len({p.lower() for p in phrases}) != len(phrases):
        raise ConfigError(f"--labels repeats a phrase: {', '.join(phrases)}")
    voc = load_class_set("voc")
    targets = {p.lower() for p in phrases}
    background = tuple(w for w in voc.default_background if w.lower() not in targets)
    try:
        specs = tuple(ClassSpec(p, p, background) for p in phrases)
        return ClassSet(name="open-vocabulary", classes=specs, box_threshold=voc.box_threshold,
                        background_tau=voc.background_tau, background_power=voc.background_power,
                        source="--labels")
    except ValueError as e:  # check_class_text: a phrase must begin and end with a letter or digit
        raise ConfigError(f"--labels: {e}") from None


def _guard_dataset(ds, out: Path, model: str, files) -> None:
    """The guard of ``generate``: the photo and ground-truth folders, the given files and a
    local model are inputs; --out may not be, hold or lie inside any of them."""
    guard = Guard()
    guard.inputs(dict.fromkeys(s.image.parent for s in ds.samples), "photo folder")
    guard.inputs(ds.gt_dirs, "ground-truth folder")
    for path, what in files:
        guard.input(path, what)
    guard.model(model)
    guard.output_folder(out)
    guard.check()


@app.command()
@exits
def segment(
    images: list[Path] = typer.Argument(..., help="Photos to segment."),
    labels: str = typer.Option(..., help="Comma-separated free phrases, one class each, e.g. 'dog,frisbee'. "
                                         "Each phrase gets VOC's default background words (except the phrases "
                                         "themselves); box threshold 0.2, background tau 1.0, power p 2.",
                               rich_help_panel=DATA),
    out: Path = typer.Option(Path("segment-out"), help="Output folder.", rich_help_panel=OUTPUT),
    model: str = typer.Option(DEFAULT_MODEL, help=WSSS_MODEL_HELP, rich_help_panel=MODEL),
    revision: Optional[str] = REVISION_OPTION,
    config: Optional[str] = CONFIG_OPTION,
    original_config: Optional[Path] = ORIGINAL_CONFIG_OPTION,
    device: str = DEVICE_OPTION,
    dtype: Dtype = DTYPE_OPTION,
    samples: int = typer.Option(DEFAULTS.samples, min=1, help="Noise samples in the ensemble.", rich_help_panel=METHOD),
    seed: int = typer.Option(DEFAULTS.seed, help="Global seed; each image's draws come from (seed, file stem).",
                             rich_help_panel=METHOD),
    crf: bool = typer.Option(DEFAULTS.crf, "--crf/--no-crf", help="Dense CRF refinement.", rich_help_panel=METHOD),
) -> None:
    """Open-vocabulary masks for photos, one class per phrase.

    Writes <out>/<stem>.png (index k = k-th phrase, 0 = background, 255 = unsure after the
    CRF; without the CRF the initial labels) and <out>/<stem>_overlay.png."""
    from ..io import read_image, write_index_png, write_png
    from ..visualize import overlay_with_legend

    # 1. Everything that can be checked without the model.
    device = check_device(device)
    cs = _phrase_class_set(labels)
    stems = [p.stem for p in images]
    if len(set(stems)) != len(stems):
        raise ConfigError("two images share a file name stem; their outputs would overwrite each other")
    guard = Guard()
    guard.inputs(images, "photo")
    guard.input(original_config, "original config")
    guard.model(model)
    guard.output_folder(out)
    for p in images:
        for target in (out / f"{safe_name(p.stem, 'photo name')}.png", out / f"{p.stem}_overlay.png"):
            guard.output_file(target, "output", replace=True)
    guard.check()
    # 2. The model, and the prompt of every phrase (a phrase too long for 77 tokens fails here).
    quiet_libraries()
    from ..wsss.predictor import Text2Mask

    log.info(f"loading {model} ...")
    predictor = Text2Mask.from_pretrained(model, cs, MaskConfig(samples=samples, seed=seed, crf=crf),
                                          device=device, dtype=dtype.value, revision=revision, config_source=config,
                                          original_config=str(original_config) if original_config else None)
    if predictor.sd.info.get("random_weights"):
        log.warning("the model has random weights (test model): these masks are MEANINGLESS")
    classes = list(range(1, len(cs.classes) + 1))
    try:
        predictor.plan(classes)
    except ValueError as e:
        raise ConfigError(f"--labels: {e}") from None
    # 3. One photo at a time; one failure does not stop the others.
    failed = []
    for path in progress(images, desc="segment", unit="img"):
        try:
            rgb = read_image(path)
            res = predictor(rgb, classes, key=path.stem)
        except Exception as e:  # noqa: BLE001 - one photo must not stop the others
            log.error(str(e) if isinstance(e, InputError) else f"{path}: {type(e).__name__}: {e}")
            failed.append(path)
            continue
        mask = res.mask if res.crf is not None else res.labels
        write_index_png(out / f"{path.stem}.png", mask)
        write_png(out / f"{path.stem}_overlay.png", overlay_with_legend(rgb, mask, cs.names))
        log.info(f"{path} -> {out / path.stem}.png, {out / path.stem}_overlay.png")
    if failed:
        log.error(f"{len(failed)} of {len(images)} image(s) failed: {', '.join(map(str, failed))}")
        raise typer.Exit(EXIT_FAILED_IMAGES)


@app.command()
@exits
def visualize(
    run: Path = typer.Option(..., help="Output folder of `text2mask generate` or `text2mask refer --data-root`.",
                             rich_help_panel=DATA),
    n: int = typer.Option(16, min=1, help="Show the first N ids (sorted) that have masks.", rich_help_panel=DATA),
    images: Optional[Path] = typer.Option(None, help="Photo folder (default: the run's recorded image folder).",
                                          rich_help_panel=DATA),
    gt: Optional[Path] = typer.Option(None, help="Ground-truth folder (default: the run's recorded one).",
                                      rich_help_panel=DATA),
    out: Optional[Path] = typer.Option(None, help="Output folder (default: <run>/vis).", rich_help_panel=OUTPUT),
) -> None:
    """Pictures of a generate or refer run.

    WSSS: per-image strips photo | initial | CRF | ground truth | unsure pixels, plus
    index.html (the last column is CRF confidence below the run's threshold, masks/ 255,
    not the score gap; an image whose photo is missing is skipped, exit code 1, and the
    page lists it). Refer: photo | segments | chosen mask per query | correlations.
    SLiMe and few-shot runs draw their pictures while they run (--pictures / --visualize)."""
    from ..visualize import run_method
    from ..wsss.visualize import visualize_run

    method = run_method(run)
    if method == "refer":
        from ..personal.visualize import visualize_refer_run

        for path in visualize_refer_run(run, n=n, out=out):
            typer.echo(path)
        return
    if method in ("slime", "fewshot"):
        raise ConfigError(f"{run}: a {method} run draws its pictures while it runs; rerun it with "
                          + ("--pictures" if method == "slime" else "--visualize"))
    pages = visualize_run(run, n=n, out=out, images=images, gt=gt)
    typer.echo(pages.index)
    if pages.skipped:
        log.error(f"{len(pages.skipped)} of {len(pages.skipped) + len(pages.shown)} image(s) skipped: "
                  + ", ".join(pages.skipped))
        raise typer.Exit(EXIT_FAILED_IMAGES)
