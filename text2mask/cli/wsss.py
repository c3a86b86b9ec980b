"""WSSS commands (the paper's first task): ``generate``, ``evaluate``, ``segment``,
``prompts``, ``visualize``, ``coco-gt`` — thin shells over ``text2mask.wsss``."""
from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from ..modeling.loading import DEFAULT_MODEL

from ..errors import EXIT_CONFIG, EXIT_FAILED_ITEMS as EXIT_FAILED_IMAGES
from .root import app


class DatasetKind(str, Enum):
    voc = "voc"
    coco = "coco"
    folder = "folder"


class LabelSource(str, Enum):
    auto = "auto"
    mask = "mask"
    xml = "xml"
    file = "file"


class CrfImage(str, Enum):
    reference = "reference"
    rgb = "rgb"


def _err(msg: str) -> None:
    typer.secho(f"error: {msg}", err=True, fg=typer.colors.RED)


def _log(msg: str) -> None:
    typer.echo(msg, err=True)


def _quiet_libraries() -> None:
    """Library chatter (loading bars, torchvision notices) would bury our own messages."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import diffusers
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()


def _parse_shard(shard: str | None) -> tuple[int, int] | None:
    if not shard:
        return None
    try:
        i, n = (int(x) for x in shard.split("/"))
    except ValueError:
        raise typer.BadParameter("use I/N, e.g. 0/4") from None
    if not (n >= 1 and 0 <= i < n):
        raise typer.BadParameter(f"shard {shard}: need 0 <= I < N")
    return i, n


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
def generate(
    dataset: DatasetKind = typer.Option(DatasetKind.voc, help="Dataset kind."),
    data_root: Optional[Path] = typer.Option(None, help="VOC2012 folder (voc) or COCO root (coco)."),
    split: str = typer.Option("train", help="voc: train|train_aug|trainval|val (trainaug accepted); coco: train|val."),
    labels_from: LabelSource = typer.Option(LabelSource.auto, help="voc image-level labels: GT masks, XML, or --labels file; auto = masks if present else XML."),
    labels: Optional[Path] = typer.Option(None, help="Labels file: JSON {id: list of class names}, cls_labels.npy, or CSV (folder)."),
    images: Optional[Path] = typer.Option(None, help="Image folder (--dataset folder)."),
    images_dir: Optional[Path] = typer.Option(None, help="coco: override <root>/<split>2014/."),
    annotations: Optional[Path] = typer.Option(None, help="coco: override <root>/annotations/instances_<split>2014.json."),
    prompts: Optional[str] = typer.Option(None, help="Class list and prompts: voc, coco, or a JSON file of that format."),
    model: str = typer.Option(DEFAULT_MODEL, help="Hugging Face id or local diffusers folder of an SD v1 model."),
    revision: Optional[str] = typer.Option(None, help="Model revision (hub ids only)."),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:1, ... (auto: cuda if available)."),
    dtype: str = typer.Option("auto", help="fp32, fp16 or bf16 (auto: fp16 on CUDA, fp32 on CPU)."),
    out: Path = typer.Option(..., help="Output folder."),
    samples: int = typer.Option(1, min=1, help="Noise samples in the ensemble (paper: 10 for VOC)."),
    seed: int = typer.Option(0, help="Global seed; each image's draws come from (seed, image id)."),
    timestep: int = typer.Option(150, min=0, max=999, help="Noise level t of T=1000."),
    box_threshold: Optional[float] = typer.Option(None, help="Class-aware box threshold (default: 0.2 VOC, 0.5 COCO; 0 disables)."),
    bg_tau: Optional[float] = typer.Option(None, help="Background tau (default: 1.0 VOC, 0.7 COCO)."),
    bg_power: Optional[float] = typer.Option(None, help="Background power p (default 2)."),
    crf: bool = typer.Option(True, "--crf/--no-crf", help="Dense CRF refinement."),
    crf_image: CrfImage = typer.Option(CrfImage.reference, help="Colour image of the CRF's bilateral kernel: the reference's wrapped mean-subtracted BGR, or plain RGB."),
    confidence: float = typer.Option(0.95, help="CRF confidence below which the training mask says 255."),
    batch_size: int = typer.Option(1, min=1, help="Images of the same padded size per UNet call."),
    workers: Optional[int] = typer.Option(None, min=0, help="CRF/writer processes (default: cores - 1; 0 = in process)."),
    limit: Optional[int] = typer.Option(None, min=1, help="Only the first N images of the split."),
    overwrite: bool = typer.Option(False, help="Redo every image, even if an earlier run finished it."),
    shard: Optional[str] = typer.Option(None, help="I/N: process only shard I of N (0-based), e.g. for job arrays."),
    evaluate: bool = typer.Option(True, "--evaluate/--no-evaluate", help="Score the masks when ground truth exists."),
    max_pixels: int = typer.Option(4_000_000, min=0, help="Photos with more pixels are worked on area-shrunk (scores, CRF) and their masks written at full size; 0 = never."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Pseudo masks for a dataset: masks/ (255 = unsure), initial/, crf/, run.json, metrics.json."""
    from ..errors import DatasetError
    from ..distributed import Distributed
    from ..errors import InputError
    from ..modeling.loading import ModelLoadError
    from ..wsss.run import ConfigMismatch, RunOptions, check_writable, default_workers, generate as run

    try:
        shard_t = _parse_shard(shard)
        ds = load_dataset(dataset, data_root, split, labels_from, labels, images, prompts, images_dir, annotations)
        if len(ds) == 0:
            raise DatasetError("the dataset has no images")
        if dataset is DatasetKind.coco and evaluate:
            from dataclasses import replace

            from ..data.coco import ensure_gt

            ds = ensure_gt(replace(ds, samples=ds.samples[:limit]) if limit else ds, progress=progress)
        _quiet_libraries()
        from ..wsss.predictor import MaskConfig, Text2Mask

        cfg = MaskConfig(samples=samples, timestep=timestep, seed=seed, box_threshold=box_threshold,
                         background_tau=bg_tau, background_power=bg_power, crf=crf,
                         crf_image=crf_image.value, confidence=confidence)
        opts = RunOptions(out=out, batch_size=batch_size,
                          workers=default_workers() if workers is None else workers,
                          limit=limit, overwrite=overwrite, shard=shard_t, evaluate=evaluate, progress=progress,
                          max_pixels=max_pixels or None)
        check_writable(out)
        dist = Distributed.from_env()  # accelerate launch / torchrun: one process per device
        if dist.world > 1 and device == "auto":
            device = dist.device()
        if dist.main:
            _log(f"loading {model} ...")
        predictor = Text2Mask.from_pretrained(model, ds.class_set, cfg, device=device, dtype=dtype, revision=revision)
        summary = run(predictor, ds, opts, log=_log, dist=dist)
    except (DatasetError, InputError, ModelLoadError, ConfigMismatch, ValueError) as e:
        _err(str(e))
        raise typer.Exit(EXIT_CONFIG)
    if not dist.main:
        raise typer.Exit(EXIT_FAILED_IMAGES if summary.failed else 0)
    _log(f"done: {summary.done} written ({summary.no_labels} without labels, all background), "
         f"{summary.skipped} already complete, {summary.failed} failed; {summary.seconds:.1f} s")
    if summary.failed:
        _err(f"{summary.failed} image(s) failed; see {out / 'failures.jsonl'}")
        for f in summary.failures[:5]:
            _log(f"  {f['id']} [{f['stage']}]: {f['error']}")
        raise typer.Exit(EXIT_FAILED_IMAGES)


@app.command()
def evaluate(
    pred: Path = typer.Option(..., help="Folder of predicted index PNGs."),
    gt: Path = typer.Option(..., help="Folder of ground-truth index PNGs."),
    split_file: Optional[Path] = typer.Option(None, help="Only these ids (one per line)."),
    num_classes: int = typer.Option(21, help="Classes including background (21 VOC, 81 COCO)."),
    prompts: Optional[str] = typer.Option(None, help="Class names from a class set (voc, coco or a JSON file); default: voc for 21 classes, coco for 81."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the metrics as JSON."),
) -> None:
    """mIoU of predicted masks: one confusion matrix over all images, GT 255 ignored."""
    from ..data.base import read_split_file
    from ..evaluation.semantic import evaluate_dirs, format_table
    from ..io import write_json
    from ..errors import InputError
    from ..classes import load_class_set

    try:
        names = None
        if prompts or num_classes in (21, 81):
            cs = load_class_set(prompts or ("voc" if num_classes == 21 else "coco"))
            if cs.num_classes != num_classes:
                raise ValueError(f"class set {cs.name} has {cs.num_classes} classes, not --num-classes {num_classes}")
            names = cs.names
        notes: list[str] = []
        ids = read_split_file(split_file, notes) if split_file else None
        for n in notes:
            _log(f"note: {n}")
        res = evaluate_dirs(pred, gt, ids=ids, num_classes=num_classes, class_names=names)
    except (InputError, ValueError) as e:
        _err(str(e))
        raise typer.Exit(EXIT_CONFIG)
    res["split"] = str(split_file) if split_file else "all PNGs in --pred"
    typer.echo(format_table(res, f"{pred} vs {gt} ({res['split']})"))
    if json_out:
        write_json(json_out, res)
        from ..visualize import iou_bar_chart

        iou_bar_chart(res, json_out.with_suffix(".png"))


@app.command("coco-gt")
def coco_gt(
    data_root: Path = typer.Option(..., help="COCO root (with <split>2014/ and annotations/)."),
    split: str = typer.Option("train", help="train or val."),
    annotations: Optional[Path] = typer.Option(None, help="Override annotations/instances_<split>2014.json."),
    images_dir: Optional[Path] = typer.Option(None, help="Override <root>/<split>2014/."),
    out: Optional[Path] = typer.Option(None, help="Where to write (default <root>/SegmentationClass/<split>2014)."),
) -> None:
    """Render COCO semantic ground truth (81 classes) from the instance annotations, once."""
    from ..errors import DatasetError
    from ..data.coco import build_gt, load_coco

    try:
        ds = load_coco(data_root, split, images_dir=images_dir, annotations=annotations)
        where = build_gt(ds, out, progress=True)
    except DatasetError as e:
        _err(str(e))
        raise typer.Exit(EXIT_CONFIG)
    typer.echo(f"ground truth of {len(ds)} images in {where}")


@app.command("prompts")
def show_prompts(
    labels: str = typer.Argument(..., help="Class names or indices, comma separated, e.g. 'person,horse'."),
    prompts: str = typer.Option("voc", help="Class set: voc, coco or a JSON file."),
    model: str = typer.Option(DEFAULT_MODEL, help="Model whose tokenizer counts the tokens."),
) -> None:
    """Show the composed prompt(s) and each class's token span, to debug synonyms."""
    from transformers import CLIPTokenizer

    from ..errors import DatasetError
    from ..data.voc import class_indices
    from ..classes import load_class_set
    from ..wsss.prompts import plan_prompts

    try:
        cs = load_class_set(prompts)
        classes = class_indices(labels, cs, where="--labels")
        local = Path(model).is_dir()
        _quiet_libraries()
        tok = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer", local_files_only=local)
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
    VOC's default background words and VOC's box threshold and background (tau, p)."""
    from ..classes import ClassSet, ClassSpec, load_class_set

    phrases = [p.strip() for p in labels.split(",") if p.strip()]
    if not phrases:
        raise ValueError("--labels needs at least one phrase, e.g. --labels 'dog,frisbee'")
    if len({p.lower() for p in phrases}) != len(phrases):
        raise ValueError(f"--labels repeats a phrase: {', '.join(phrases)}")
    background = load_class_set("voc").default_background
    return ClassSet(name="open-vocabulary", classes=tuple(ClassSpec(p, p, background) for p in phrases),
                    box_threshold=0.2, background_tau=1.0, background_power=2.0)


@app.command()
def segment(
    images: list[Path] = typer.Argument(..., help="Photos to segment."),
    labels: str = typer.Option(..., help="Comma-separated free phrases, one class each, e.g. 'dog,frisbee'. "
                                         "Each phrase gets VOC's default background words; box threshold 0.2, "
                                         "background tau 1.0, power p 2."),
    out: Path = typer.Option(Path("segment-out"), help="Output folder."),
    model: str = typer.Option(DEFAULT_MODEL, help="Hugging Face id or local diffusers folder of an SD v1 model."),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:1, ... (auto: cuda if available)."),
    dtype: str = typer.Option("auto", help="fp32, fp16 or bf16 (auto: fp16 on CUDA, fp32 on CPU)."),
    samples: int = typer.Option(1, min=1, help="Noise samples in the ensemble."),
    seed: int = typer.Option(0, help="Global seed; each image's draws come from (seed, file stem)."),
    crf: bool = typer.Option(True, "--crf/--no-crf", help="Dense CRF refinement."),
) -> None:
    """Open-vocabulary masks for photos: <out>/<stem>.png (index k = k-th phrase, 0 = background,
    255 = unsure after the CRF; without the CRF the initial labels) and <out>/<stem>_overlay.png."""
    from ..io import read_image, write_index_png, write_png
    from ..errors import InputError
    from ..modeling.loading import ModelLoadError
    from ..visualize import overlay_with_legend

    try:
        cs = _phrase_class_set(labels)
        stems = [p.stem for p in images]
        if len(set(stems)) != len(stems):
            raise ValueError("two images share a file name stem; their outputs would overwrite each other")
        _quiet_libraries()
        from ..wsss.predictor import MaskConfig, Text2Mask

        _log(f"loading {model} ...")
        predictor = Text2Mask.from_pretrained(model, cs, MaskConfig(samples=samples, seed=seed, crf=crf),
                                              device=device, dtype=dtype)
        classes = list(range(1, len(cs.classes) + 1))
        predictor.plan(classes)  # a phrase that tokenizes to nothing fails here, not once per image
    except (ModelLoadError, ValueError) as e:
        _err(str(e))
        raise typer.Exit(EXIT_CONFIG)
    failed = []
    for path in images:
        try:
            rgb = read_image(path)
            res = predictor(rgb, classes, key=path.stem)
        except Exception as e:  # noqa: BLE001 - one photo must not stop the others
            _err(str(e) if isinstance(e, InputError) else f"{path}: {type(e).__name__}: {e}")
            failed.append(path)
            continue
        mask = res.mask if res.crf is not None else res.labels
        write_index_png(out / f"{path.stem}.png", mask)
        write_png(out / f"{path.stem}_overlay.png", overlay_with_legend(rgb, mask, cs.names))
        _log(f"{path} -> {out / path.stem}.png, {out / path.stem}_overlay.png")
    if failed:
        _err(f"{len(failed)} of {len(images)} image(s) failed: {', '.join(map(str, failed))}")
        raise typer.Exit(EXIT_FAILED_IMAGES)


@app.command()
def visualize(
    run: Path = typer.Option(..., help="Output folder of `text2mask generate`."),
    n: int = typer.Option(16, min=1, help="Show the first N ids (sorted) that have masks."),
    images: Optional[Path] = typer.Option(None, help="Photo folder (default: the run's recorded image folder)."),
    out: Optional[Path] = typer.Option(None, help="Output folder (default: <run>/vis)."),
) -> None:
    """Per-image strips photo | initial | CRF | ground truth | unsure pixels, plus index.html.
    The last column is CRF confidence below the run's threshold (masks/ 255), not the score gap."""
    from ..errors import InputError
    from ..visualize import visualize_run

    try:
        index = visualize_run(run, n=n, out=out, images=images)
    except (InputError, ValueError) as e:
        _err(str(e))
        raise typer.Exit(EXIT_CONFIG)
    typer.echo(index)
