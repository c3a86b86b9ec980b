"""``text2mask`` command line: a thin shell over the Python API and the runner."""
from __future__ import annotations

import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from .modeling.sd import DEFAULT_MODEL

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Pixel-level pseudo masks from image-level labels with Stable Diffusion attention.")

EXIT_FAILED_IMAGES = 1
EXIT_CONFIG = 2


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
    from .data.base import DatasetError

    if dataset is DatasetKind.voc:
        from .data.voc import load_voc

        if data_root is None:
            raise DatasetError("--data-root is required for --dataset voc (the VOC2012 folder)")
        return load_voc(data_root, split, labels_from.value, labels, prompts or "voc")
    if dataset is DatasetKind.coco:
        from .data.coco import load_coco

        if data_root is None and (images_dir is None or annotations is None):
            raise DatasetError("--data-root (or both --images-dir and --annotations) is required for --dataset coco")
        return load_coco(data_root, split, images_dir=images_dir, annotations=annotations,
                         class_set=prompts or "coco")
    from .data.folder import load_folder

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
    labels: Optional[Path] = typer.Option(None, help="Labels file: JSON {id: [names]}, cls_labels.npy, or CSV (folder)."),
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
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Pseudo masks for a dataset: masks/ (255 = unsure), initial/, crf/, run.json, metrics.json."""
    from .data.base import DatasetError
    from .io import InputError
    from .modeling.sd import ModelLoadError
    from .runner import ConfigMismatch, RunOptions, default_workers, generate as run

    try:
        shard_t = _parse_shard(shard)
        ds = load_dataset(dataset, data_root, split, labels_from, labels, images, prompts, images_dir, annotations)
        if len(ds) == 0:
            raise DatasetError("the dataset has no images")
        _quiet_libraries()
        from .predictor import MaskConfig, Text2Mask

        cfg = MaskConfig(samples=samples, timestep=timestep, seed=seed, box_threshold=box_threshold,
                         background_tau=bg_tau, background_power=bg_power, crf=crf,
                         crf_image=crf_image.value, confidence=confidence)
        opts = RunOptions(out=out, batch_size=batch_size,
                          workers=default_workers() if workers is None else workers,
                          limit=limit, overwrite=overwrite, shard=shard_t, evaluate=evaluate, progress=progress)
        _log(f"loading {model} ...")
        predictor = Text2Mask.from_pretrained(model, ds.class_set, cfg, device=device, dtype=dtype, revision=revision)
        summary = run(predictor, ds, opts, log=_log)
    except (DatasetError, InputError, ModelLoadError, ConfigMismatch, ValueError) as e:
        _err(str(e))
        raise typer.Exit(EXIT_CONFIG)
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
    from .data.base import read_split_file
    from .evaluate import evaluate_dirs, format_table
    from .io import InputError, write_json
    from .prompts import load_class_set

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


@app.command("prompts")
def show_prompts(
    labels: str = typer.Argument(..., help="Class names or indices, comma separated, e.g. 'person,horse'."),
    prompts: str = typer.Option("voc", help="Class set: voc, coco or a JSON file."),
    model: str = typer.Option(DEFAULT_MODEL, help="Model whose tokenizer counts the tokens."),
) -> None:
    """Show the composed prompt(s) and each class's token span, to debug synonyms."""
    from transformers import CLIPTokenizer

    from .data.base import DatasetError
    from .data.voc import class_indices
    from .prompts import load_class_set, plan_prompts

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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
