"""SLiMe commands: ``text2mask slime fit | segment | import | evaluate`` — thin shells
over ``text2mask.slime`` (fit parts on annotated photos, then segment any photo).

Every command declares its inputs and outputs to ``text2mask.guard`` and checks its
options before the model loads (docs/slime.md, *Failures and resuming*)."""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import List, Optional, Tuple

import typer

from ..errors import ConfigError, InputError
from ..guard import Guard
from ..log import get
from .root import (CONFIG_OPTION, DEVICE_HELP, DTYPE_HELP, MODEL_PANEL, ORIGINAL_CONFIG_OPTION, REVISION_OPTION,
                   WORKERS_HELP, Dtype, check_device, exits, finish_run, quiet_libraries)

log = get(__name__)

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="SLiMe: segment photos like one (or a few) annotated examples, at any granularity.")

SLIME_MODEL = "stabilityai/stable-diffusion-2-1-base"   # the official weights
DATA, TRAIN, SEG, OUT = "Data", "Training", "Segmentation", "Output"


class Preset(str, Enum):
    pascal_part = "pascal-part"
    celeba = "celeba"


class Select(str, Enum):
    best = "best"
    last = "last"


def _device_option():
    return typer.Option("auto", help=DEVICE_HELP, rich_help_panel=MODEL_PANEL)


def _load_model(model: str, device: str, dtype: Dtype, revision: Optional[str], config: Optional[str],
                original_config: Optional[Path]):
    from ..modeling.loading import load

    quiet_libraries()
    log.info(f"loading {model} ...")
    return load(model, device=device, dtype=dtype.value, revision=revision, config=config,
                original_config=str(original_config) if original_config else None)


def _declare_model(guard: Guard, model: str, config: Optional[str], original_config: Optional[Path]) -> None:
    guard.model(model)
    guard.model(config, "--config")
    guard.input(original_config, "--original-config file")


def checkpoint_path(out: Path) -> Path:
    return out.with_name(out.name + ".ckpt")


def history_path(out: Path) -> Path:
    return out.with_name(out.name + ".history.json")


@app.command()
@exits
def fit(
    image: Optional[List[Path]] = typer.Option(None, "--image", help="Annotated photo (repeat for few-shot, each with --mask).", rich_help_panel=DATA),
    mask: Optional[List[Path]] = typer.Option(None, "--mask", help="Its index mask (PNG or .npy, photo's size, values 0..K-1).", rich_help_panel=DATA),
    train_dir: Optional[Path] = typer.Option(None, help="Folder of training pairs: <stem>.npy beside its photo, or <stem>.png beside <stem>.jpg (docs/slime.md).", rich_help_panel=DATA),
    val_image: Optional[Path] = typer.Option(None, help="Validation photo: keep the epoch that segments it best.", rich_help_panel=DATA),
    val_mask: Optional[Path] = typer.Option(None, help="Its index mask.", rich_help_panel=DATA),
    val_dir: Optional[Path] = typer.Option(None, help="Folder of validation pairs (same pairing rule as --train-dir).", rich_help_panel=DATA),
    classes: str = typer.Option(..., help='Class names in index order, background first: "background,body,wheel".', rich_help_panel=DATA),
    out: Path = typer.Option(..., help="Parts file to write (e.g. car.slime); <out>.history.json and, while running, <out>.ckpt beside it.", rich_help_panel=OUT),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing parts file (else it is refused).", rich_help_panel=OUT),
    restart: bool = typer.Option(False, "--restart", help="Discard a kept <out>.ckpt and fit from the start.", rich_help_panel=OUT),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar.", rich_help_panel=OUT),
    preset: Optional[Preset] = typer.Option(None, help="Official dataset settings: rotation, tiles, tile size, min crop (explicit options win).", rich_help_panel=TRAIN),
    select: Select = typer.Option(Select.best, help="best: keep the epoch of the best validation mIoU (official; without validation pairs the training pairs are validated, unaugmented); last: the last epoch, no validation.", rich_help_panel=TRAIN),
    epochs: int = typer.Option(200, help="Passes over the training photos (steps = epochs x photos).", rich_help_panel=TRAIN),
    lr: float = typer.Option(0.1, help="Adam learning rate (> 0).", rich_help_panel=TRAIN),
    t_range: Tuple[int, int] = typer.Option((5, 100), help="Timesteps drawn uniformly from this range (inclusive).", rich_help_panel=TRAIN),
    was_weight: float = typer.Option(1.0, help="Weight of the WAS-attention MSE loss.", rich_help_panel=TRAIN),
    sd_weight: float = typer.Option(0.005, help="Weight of the guided SD loss.", rich_help_panel=TRAIN),
    guidance: float = typer.Option(100.0, help="Guidance scale inside the SD loss.", rich_help_panel=TRAIN),
    augment: bool = typer.Option(True, "--augment/--no-augment", help="Flip, blur, crop, rotate each step.", rich_help_panel=TRAIN),
    min_crop: Optional[float] = typer.Option(None, help="Smallest crop side (fraction, default 0.6): 0.6 car/CelebA, 0.8 horse.", rich_help_panel=TRAIN),
    rotate: Optional[float] = typer.Option(None, help="Rotation range in degrees (default 30): 30 PASCAL, 10 CelebA.", rich_help_panel=TRAIN),
    init_prompt: Optional[str] = typer.Option(None, help='Prompt the rows start from (default "part" x K).', rich_help_panel=TRAIN),
    seed: int = typer.Option(0, help="Seed of every draw (augmentation, timesteps, noise).", rich_help_panel=TRAIN),
    bgr: bool = typer.Option(False, "--bgr", help="Feed photos as B, G, R, as the official HEAD does (cv2.imread); which order the paper's numbers used is unknown.", rich_help_panel=TRAIN),
    tiles: Optional[int] = typer.Option(None, help="Validation (and default segment) tiles per side (default 1).", rich_help_panel=SEG),
    tile_size: Optional[int] = typer.Option(None, help="Tile side on the canvas (default: the canvas).", rich_help_panel=SEG),
    class_threshold: float = typer.Option(0.2, help="Keep a class in a tile when its peak reaches this.", rich_help_panel=SEG),
    canvas: int = typer.Option(512, help="Square side the photos are squashed to (official 512; a multiple of 64).", rich_help_panel=SEG),
    model: str = typer.Option(SLIME_MODEL, help="Hugging Face id or local folder (SD 1.x or 2.x; official: SD 2.1-base).", rich_help_panel=MODEL_PANEL),
    revision: Optional[str] = REVISION_OPTION,
    config: Optional[str] = CONFIG_OPTION,
    original_config: Optional[Path] = ORIGINAL_CONFIG_OPTION,
    device: str = _device_option(),
    dtype: Dtype = typer.Option(Dtype.fp32, help="Model weights dtype (the official fit is fp32).", rich_help_panel=MODEL_PANEL),
    mixed_precision: str = typer.Option("no", help="accelerate autocast on GPU: no, fp16 or bf16.", rich_help_panel=MODEL_PANEL),
) -> None:
    """Learn one text embedding per part from annotated photos; write a parts file."""
    from ..io import write_json
    from ..slime import FitSettings, SegmentSettings, Slime
    from ..slime.examples import pair_folder, parse_classes, read_example, read_examples
    from ..slime.presets import resolve

    names = parse_classes(classes)
    # 1. options (ranges), before any file is read
    chosen = resolve({"min_crop": min_crop, "rotate": rotate, "tiles": tiles, "tile_size": tile_size},
                     preset.value if preset else None, canvas=canvas)
    settings = FitSettings(
        epochs=epochs, lr=lr, t_min=t_range[0], t_max=t_range[1], was_weight=was_weight, sd_weight=sd_weight,
        guidance=guidance, augment=augment, min_crop=chosen.get("min_crop", 0.6), rotate=chosen.get("rotate", 30.0),
        init_prompt=init_prompt, seed=seed, mixed_precision=mixed_precision, select=select.value,
        segment=SegmentSettings(tiles=chosen.get("tiles", 1), tile_size=chosen.get("tile_size", canvas),
                                class_threshold=class_threshold, canvas=canvas, bgr=bgr)).check()
    if (val_image is None) != (val_mask is None):
        raise InputError("give both --val-image and --val-mask, or neither")
    if select is Select.last and (val_image or val_dir):
        raise ConfigError("--select last keeps the last epoch: it takes no --val-image or --val-dir")
    # 2. inputs and outputs
    images, masks = list(image or []), list(mask or [])
    if len(images) != len(masks):
        raise InputError(f"{len(images)} --image but {len(masks)} --mask: give one mask per image, in order")
    train_pairs = list(zip(images, masks)) + (pair_folder(train_dir, "--train-dir") if train_dir else [])
    val_pairs = ([(val_image, val_mask)] if val_image else []) + (pair_folder(val_dir, "--val-dir") if val_dir else [])
    guard = Guard()
    guard.inputs([p for pair in train_pairs for p in pair], "training photo or mask")
    guard.inputs([p for pair in val_pairs for p in pair], "validation photo or mask")
    guard.input(train_dir, "--train-dir folder")
    guard.input(val_dir, "--val-dir folder")
    _declare_model(guard, model, config, original_config)
    guard.output_file(out, "--out", replace=True)   # an existing one: refused below unless --overwrite
    guard.output_file(checkpoint_path(out), "--out's checkpoint", replace=True)
    guard.output_file(history_path(out), "--out's history", replace=True)
    guard.check()
    if out.is_file() and not overwrite:
        raise ConfigError(f"--out {out} exists; a fit never overwrites a parts file: pass --overwrite "
                          "to replace it, or choose another file")
    examples = read_examples([p for p, _ in train_pairs], [m for _, m in train_pairs], names)
    validation = [read_example(p, m, names) for p, m in val_pairs] or None
    # 3. the work
    sd = _load_model(model, check_device(device), dtype, revision, config, original_config)
    if sd.info.get("random_weights"):
        log.warning("the model has random weights (test model): the fitted parts are MEANINGLESS")
    slime = Slime.fit(sd, examples, names, settings, validation, checkpoint_path(out), progress, restart=restart)
    write_json(history_path(out), slime.history)
    slime.save(out)
    checkpoint_path(out).unlink(missing_ok=True)
    p = slime.parts
    kept = (f"best epoch {p.best_epoch + 1} of {epochs} (validation mIoU {p.validation_iou:.1f}% on "
            f"{slime.history['validation']})" if p.best_epoch is not None else f"last epoch {epochs}")
    log.info(f"wrote {out} ({len(names)} classes; {kept}); losses and validation per epoch in {history_path(out)}")
    typer.echo(str(out))   # the result, on stdout


@app.command()
@exits
def segment(
    images: List[Path] = typer.Argument(..., help="Photos and/or folders of photos."),
    parts: Path = typer.Option(..., help="Parts file from `slime fit` or `slime import`.", rich_help_panel=DATA),
    gt: Optional[Path] = typer.Option(None, help="Ground-truth folder (<id>.npy or .png): score the masks.", rich_help_panel=DATA),
    limit: Optional[int] = typer.Option(None, min=1, help="Only the first N photos.", rich_help_panel=DATA),
    out: Path = typer.Option(..., help="Output folder: masks/, overlays/, pictures/, run.json.", rich_help_panel=OUT),
    overlays: bool = typer.Option(True, "--overlays/--no-overlays", help="Also write overlays/<id>.png.", rich_help_panel=OUT),
    pictures: bool = typer.Option(False, "--pictures", help="Also write pictures/<id>.png: photo | WAS map per class | labels.", rich_help_panel=OUT),
    overwrite: bool = typer.Option(False, help="Redo every photo, even if an earlier run finished it.", rich_help_panel=OUT),
    workers: Optional[int] = typer.Option(None, min=0, help=WORKERS_HELP, rich_help_panel=OUT),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar.", rich_help_panel=OUT),
    preset: Optional[Preset] = typer.Option(None, help="Official tiling of a dataset (celeba: 2 x 2 tiles of 400; pascal-part: 1 of 512); explicit options win.", rich_help_panel=SEG),
    timestep: Optional[int] = typer.Option(None, "--t", help="Noise level (default 100).", rich_help_panel=SEG),
    tiles: Optional[int] = typer.Option(None, help="Tiles per side (default: as fitted, 1).", rich_help_panel=SEG),
    tile_size: Optional[int] = typer.Option(None, help="Tile side on the canvas (CelebA: 400 with 2 tiles).", rich_help_panel=SEG),
    class_threshold: Optional[float] = typer.Option(None, help="Keep a class in a tile when its peak cross probability reaches this (default 0.2).", rich_help_panel=SEG),
    keep_aspect: bool = typer.Option(False, "--keep-aspect", help="Pad the photo to a square instead of squashing it (not the official behaviour).", rich_help_panel=SEG),
    bgr: Optional[bool] = typer.Option(None, "--bgr/--rgb", help="Channel order fed to the model (default: as fitted).", rich_help_panel=SEG),
    seed: Optional[int] = typer.Option(None, help="Seed; each photo's draws come from (seed, photo id). Default: the fit's.", rich_help_panel=SEG),
    batch_size: int = typer.Option(1, min=1, help="Photos per UNet call.", rich_help_panel=SEG),
    model: Optional[str] = typer.Option(None, help="Model (default: the one the parts were fitted on).", rich_help_panel=MODEL_PANEL),
    revision: Optional[str] = REVISION_OPTION,
    config: Optional[str] = CONFIG_OPTION,
    original_config: Optional[Path] = ORIGINAL_CONFIG_OPTION,
    device: str = _device_option(),
    dtype: Dtype = typer.Option(Dtype.auto, help=DTYPE_HELP, rich_help_panel=MODEL_PANEL),
) -> None:
    """Segment photos with fitted parts: index PNGs at each photo's size (resumable)."""
    from dataclasses import replace

    from ..runs import RunOptions
    from ..slime import Slime
    from ..slime.artifact import load_parts
    from ..slime.presets import SEGMENT_KEYS, resolve
    from ..slime.run import photos, segment_photos

    items = photos(images)
    p_in = Path(parts)
    p = load_parts(p_in)
    guard = Guard()
    guard.inputs(images, "photo")
    guard.input(p_in, "parts file")
    guard.input(gt, "ground-truth folder")
    _declare_model(guard, model or p.model["id"], config, original_config)
    guard.output_folder(out)
    guard.check()
    fitted = p.segment_settings()
    given = resolve({"tiles": tiles, "tile_size": tile_size}, preset.value if preset else None, SEGMENT_KEYS,
                    canvas=fitted.canvas)
    given.update({k: v for k, v in {"timestep": timestep, "class_threshold": class_threshold,
                                    "keep_aspect": keep_aspect or None, "bgr": bgr}.items() if v is not None})
    settings = replace(fitted, **given).check()
    sd = _load_model(model or p.model["id"], check_device(device), dtype, revision, config, original_config)
    slime = Slime(sd, p, settings, seed)
    opts = RunOptions(out=out, batch_size=batch_size, workers=workers,
                      limit=limit, overwrite=overwrite, progress=progress)
    summary = segment_photos(slime, p_in, items, opts, overlays, pictures, gt, log=log.info)
    finish_run(summary, "photo")


@app.command("import")
@exits
def import_(
    folder: Path = typer.Argument(..., help="Official SLiMe checkpoint folder with embedding_0.pth, embedding_1.pth, ..."),
    out: Path = typer.Option(..., help="Parts file to write."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing parts file (else it is refused)."),
    classes: Optional[str] = typer.Option(None, help="Class names, background first (default: background,part1,...)."),
    init_prompt: Optional[str] = typer.Option(None, help='The training --text_prompt, if one was given (default "part" x K).'),
    bgr: bool = typer.Option(False, "--bgr", help="Segment with B, G, R channels by default (embeddings trained with the official HEAD, which reads photos with cv2.imread)."),
    model: str = typer.Option(SLIME_MODEL, help="The model the embeddings were trained on (official: SD 2.1-base).", rich_help_panel=MODEL_PANEL),
    revision: Optional[str] = REVISION_OPTION,
    config: Optional[str] = CONFIG_OPTION,
    original_config: Optional[Path] = ORIGINAL_CONFIG_OPTION,
    device: str = _device_option(),
    dtype: Dtype = typer.Option(Dtype.fp32, help=DTYPE_HELP, rich_help_panel=MODEL_PANEL),
) -> None:
    """Convert an official SLiMe embedding folder into a parts file."""
    from ..slime.artifact import save_parts
    from ..slime.examples import parse_classes
    from ..slime.official import embedding_files, import_official

    if classes is not None:
        parse_classes(classes)
    embedding_files(folder)     # listed and checked before the model loads
    guard = Guard()
    guard.input(folder, "official checkpoint folder")
    _declare_model(guard, model, config, original_config)
    guard.output_file(out, "--out", replace=overwrite)
    guard.check()
    sd = _load_model(model, check_device(device), dtype, revision, config, original_config)
    p = import_official(folder, sd, classes, init_prompt, bgr)
    save_parts(p, out)
    log.info(f"wrote {out} ({len(p.classes)} classes: {', '.join(p.classes)})")
    typer.echo(str(out))


def _run_classes(pred: Path) -> tuple[Path, list[str]] | None:
    """(run.json, class names) of the ``slime segment`` run whose masks/ is ``pred``."""
    from ..io import read_json

    record = pred.parent / "run.json"
    if pred.name != "masks" or not record.is_file():
        return None
    doc = read_json(record, "run record")
    names = (doc.get("parts_file") or {}).get("classes") if isinstance(doc, dict) and doc.get("method") == "slime" else None
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        return None
    return record, names


@app.command()
@exits
def evaluate(
    pred: Path = typer.Option(..., help="Folder of predicted index PNGs (e.g. OUT/masks)."),
    gt: Path = typer.Option(..., help="Ground-truth folder: <id>.npy or <id>.png index masks."),
    classes: Optional[str] = typer.Option(None, help='car, horse, celeba, or names in index order "background,a,b" '
                                          "(default: those of the slime segment run that wrote --pred)."),
    official_size: bool = typer.Option(False, "--official-size", help="Squash both to 512x512 first, as the official code scores."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the metrics as JSON (rewritten by a rerun; never over an input)."),
) -> None:
    """Score part masks: the official per-image protocol and the confusion-matrix mIoU."""
    from ..evaluation.parts import PART_CLASSES, evaluate_dirs, format_table
    from ..io import write_json
    from ..slime.examples import parse_classes

    guard = Guard()
    guard.input(pred, "prediction folder")
    guard.input(gt, "ground-truth folder")
    if json_out is not None:
        guard.output_file(json_out, "--json", replace=True)
    guard.check()
    run = _run_classes(pred)
    if classes is None:
        if run is None:
            raise ConfigError(f"--classes is needed: {pred} is not the masks/ folder of a slime segment run "
                              "(its run.json names the classes)")
        names = run[1]
    else:
        names = list(PART_CLASSES[classes]) if classes in PART_CLASSES else parse_classes(classes)
        if run is not None and names != run[1]:
            fitted = ",".join(run[1])
            if len(names) != len(run[1]):
                raise ConfigError(f"--classes {classes} names {len(names)} classes ({','.join(names)}), but the masks "
                                  f"in {pred} were made with parts of {len(run[1])} classes ({fitted}, {run[0]}); "
                                  "omit --classes to use those")
            log.warning(f"--classes {','.join(names)} renames the classes of the parts the masks were made with "
                        f"({fitted}, {run[0]})")
    result = evaluate_dirs(pred, gt, names, official_size)
    typer.echo(format_table(result, f"{pred} vs {gt}"))
    if json_out:
        write_json(json_out, result)
