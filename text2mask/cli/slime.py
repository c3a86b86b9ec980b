"""SLiMe commands: ``text2mask slime fit | segment | import | evaluate`` — thin shells
over ``text2mask.slime`` (fit parts on annotated photos, then segment any photo)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Tuple

import typer

from ..errors import InputError
from ..log import get
from .root import CONFIG_OPTION, DEVICE_OPTION, DTYPE_HELP, DTYPE_OPTION, ORIGINAL_CONFIG_OPTION, REVISION_OPTION, WORKERS_HELP, Dtype, check_device, exits, finish_run, quiet_libraries

log = get(__name__)

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="SLiMe: segment photos like one (or a few) annotated examples, at any granularity.")

SLIME_MODEL = "stabilityai/stable-diffusion-2-1-base"   # the official weights


def _load_model(model: str, device: str, dtype: Dtype, revision: Optional[str], config: Optional[str],
                original_config: Optional[Path]):
    from ..modeling.loading import load

    quiet_libraries()
    log.info(f"loading {model} ...")
    return load(model, device=device, dtype=dtype.value, revision=revision, config=config,
                original_config=str(original_config) if original_config else None)


def _segment_settings(base, **given):
    from dataclasses import replace

    return replace(base, **{k: v for k, v in given.items() if v is not None})


@app.command()
@exits
def fit(
    image: List[Path] = typer.Option(..., "--image", help="Annotated photo (repeat for few-shot, each with --mask)."),
    mask: List[Path] = typer.Option(..., "--mask", help="Its index mask (PNG or .npy, photo's size, values 0..K-1)."),
    classes: str = typer.Option(..., help='Class names in index order, background first: "background,body,wheel".'),
    out: Path = typer.Option(..., help="Parts file to write (e.g. car.slime)."),
    model: str = typer.Option(SLIME_MODEL, help="Hugging Face id or local folder (SD 1.x or 2.x; official: SD 2.1-base)."),
    revision: Optional[str] = REVISION_OPTION,
    config: Optional[str] = CONFIG_OPTION,
    original_config: Optional[Path] = ORIGINAL_CONFIG_OPTION,
    val_image: Optional[Path] = typer.Option(None, help="Validation photo: keep the epoch that segments it best."),
    val_mask: Optional[Path] = typer.Option(None, help="Its index mask."),
    epochs: int = typer.Option(200, min=1, help="Passes over the training photos (steps = epochs x photos)."),
    lr: float = typer.Option(0.1, min=0.0, help="Adam learning rate."),
    t_range: Tuple[int, int] = typer.Option((5, 100), help="Timesteps drawn uniformly from this range (inclusive)."),
    was_weight: float = typer.Option(1.0, min=0.0, help="Weight of the WAS-attention MSE loss."),
    sd_weight: float = typer.Option(0.005, min=0.0, help="Weight of the guided SD loss."),
    guidance: float = typer.Option(100.0, help="Guidance scale inside the SD loss."),
    augment: bool = typer.Option(True, "--augment/--no-augment", help="Flip, blur, crop, rotate each step."),
    min_crop: float = typer.Option(0.6, min=0.05, max=1.0, help="Smallest crop side (fraction): 0.6 car/CelebA, 0.8 horse."),
    rotate: float = typer.Option(30.0, min=0.0, max=180.0, help="Rotation range in degrees: 30 PASCAL, 10 CelebA."),
    init_prompt: Optional[str] = typer.Option(None, help='Prompt the rows start from (default "part" x K).'),
    seed: int = typer.Option(0, help="Seed of every draw (augmentation, timesteps, noise)."),
    device: str = DEVICE_OPTION,
    dtype: Dtype = typer.Option(Dtype.fp32, help="Model weights dtype (the official fit is fp32)."),
    mixed_precision: str = typer.Option("no", help="accelerate autocast on GPU: no, fp16 or bf16."),
    tiles: int = typer.Option(1, min=1, help="Validation (and default segment) tiles per side."),
    tile_size: int = typer.Option(512, min=8, help="Tile side on the canvas (at most the canvas)."),
    class_threshold: float = typer.Option(0.2, min=0.0, help="Keep a class in a tile when its peak reaches this."),
    canvas: int = typer.Option(512, min=64, help="Square side the photos are squashed to (official 512; a multiple of 64)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Learn one text embedding per part from annotated photos; write a parts file."""
    from ..slime import FitSettings, SegmentSettings, Slime
    from ..slime.examples import parse_classes, read_example, read_examples

    names = parse_classes(classes)
    examples = read_examples(image, mask, names)
    if (val_image is None) != (val_mask is None):
        raise InputError("give both --val-image and --val-mask, or neither")
    validation = read_example(val_image, val_mask, names) if val_image else None
    inputs = {p.resolve() for p in [*image, *mask, *(x for x in (val_image, val_mask) if x)]}
    if out.resolve() in inputs:
        raise InputError(f"--out {out} is one of the inputs; choose another file")
    if not 0 <= t_range[0] <= t_range[1] <= 999:
        raise InputError(f"--t-range {t_range[0]} {t_range[1]}: need 0 <= low <= high <= 999")
    if canvas % 64:
        raise InputError(f"--canvas {canvas}: must be a multiple of 64 (the UNet's grids)")
    if mixed_precision not in ("no", "fp16", "bf16"):
        raise InputError(f"--mixed-precision {mixed_precision!r}: use no, fp16 or bf16")
    settings = FitSettings(epochs=epochs, lr=lr, t_min=t_range[0], t_max=t_range[1], was_weight=was_weight,
                           sd_weight=sd_weight, guidance=guidance, augment=augment, min_crop=min_crop,
                           rotate=rotate, init_prompt=init_prompt, seed=seed, mixed_precision=mixed_precision,
                           segment=SegmentSettings(tiles=tiles, tile_size=min(tile_size, canvas),
                                                   class_threshold=class_threshold, canvas=canvas))
    sd = _load_model(model, check_device(device), dtype, revision, config, original_config)
    if sd.info.get("random_weights"):
        log.warning("the model has random weights (test model): the fitted parts are MEANINGLESS")
    checkpoint = out.with_name(out.name + ".ckpt")
    slime = Slime.fit(sd, examples, names, settings, validation, checkpoint, progress)
    slime.save(out)
    checkpoint.unlink(missing_ok=True)
    best = (f"; best epoch {slime.parts.best_epoch} (validation mIoU {slime.parts.validation_iou:.1f}%)"
            if slime.parts.best_epoch is not None else "")
    log.info(f"wrote {out} ({len(names)} classes{best})")


@app.command()
@exits
def segment(
    images: List[Path] = typer.Argument(..., help="Photos and/or folders of photos."),
    parts: Path = typer.Option(..., help="Parts file from `slime fit` or `slime import`."),
    out: Path = typer.Option(..., help="Output folder: masks/, overlays/, pictures/, run.json."),
    model: Optional[str] = typer.Option(None, help="Model (default: the one the parts were fitted on)."),
    revision: Optional[str] = REVISION_OPTION,
    config: Optional[str] = CONFIG_OPTION,
    original_config: Optional[Path] = ORIGINAL_CONFIG_OPTION,
    timestep: Optional[int] = typer.Option(None, "--t", min=0, max=999, help="Noise level (default 100)."),
    tiles: Optional[int] = typer.Option(None, min=1, help="Tiles per side (default: as fitted, 1)."),
    tile_size: Optional[int] = typer.Option(None, min=8, help="Tile side on the 512 canvas (CelebA: 400 with 2 tiles)."),
    class_threshold: Optional[float] = typer.Option(None, min=0.0, help="Keep a class in a tile when its peak cross probability reaches this (default 0.2)."),
    keep_aspect: bool = typer.Option(False, "--keep-aspect", help="Pad the photo to a square instead of squashing it (not the official behaviour)."),
    seed: Optional[int] = typer.Option(None, help="Seed; each photo's draws come from (seed, photo id). Default: the fit's."),
    overlays: bool = typer.Option(True, "--overlays/--no-overlays", help="Also write overlays/<id>.png."),
    pictures: bool = typer.Option(False, "--pictures", help="Also write pictures/<id>.png: photo | WAS map per class | labels."),
    gt: Optional[Path] = typer.Option(None, help="Ground-truth folder (<id>.npy or .png): score the masks."),
    batch_size: int = typer.Option(1, min=1, help="Photos per UNet call."),
    workers: Optional[int] = typer.Option(None, min=0, help=WORKERS_HELP),
    overwrite: bool = typer.Option(False, help="Redo every photo, even if an earlier run finished it."),
    limit: Optional[int] = typer.Option(None, min=1, help="Only the first N photos."),
    device: str = DEVICE_OPTION,
    dtype: Dtype = DTYPE_OPTION,
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Segment photos with fitted parts: index PNGs at each photo's size (resumable)."""
    from ..runs import RunOptions
    from ..slime import Slime
    from ..slime.artifact import load_parts
    from ..slime.run import FOLDERS, photos, segment_photos

    items = photos(images)
    p = load_parts(parts)
    written = {(out / folder).resolve() for folder in FOLDERS}
    clash = [i.image for i in items if i.image.resolve().parent in written]
    if clash:
        raise InputError(f"{clash[0]}: an input photo inside an output folder of --out {out}; it could be overwritten")
    settings = _segment_settings(p.segment_settings(), timestep=timestep, tiles=tiles, tile_size=tile_size,
                                 class_threshold=class_threshold, keep_aspect=keep_aspect or None)
    if settings.tile_size > settings.canvas:
        raise InputError(f"--tile-size {settings.tile_size} is larger than the {settings.canvas}-pixel canvas")
    sd = _load_model(model or p.model["id"], check_device(device), dtype, revision, config, original_config)
    slime = Slime(sd, p, settings, seed)
    opts = RunOptions(out=out, batch_size=batch_size, workers=workers,
                      limit=limit, overwrite=overwrite, progress=progress)
    summary = segment_photos(slime, parts, items, opts, overlays, pictures, gt, log=log.info)
    finish_run(summary, "photo")


@app.command("import")
@exits
def import_(
    folder: Path = typer.Argument(..., help="Official SLiMe checkpoint folder with embedding_0.pth, embedding_1.pth, ..."),
    out: Path = typer.Option(..., help="Parts file to write."),
    classes: Optional[str] = typer.Option(None, help="Class names, background first (default: background,part1,...)."),
    model: str = typer.Option(SLIME_MODEL, help="The model the embeddings were trained on (official: SD 2.1-base)."),
    revision: Optional[str] = REVISION_OPTION,
    config: Optional[str] = CONFIG_OPTION,
    original_config: Optional[Path] = ORIGINAL_CONFIG_OPTION,
    init_prompt: Optional[str] = typer.Option(None, help='The training --text_prompt, if one was given (default "part" x K).'),
    device: str = DEVICE_OPTION,
    dtype: Dtype = typer.Option(Dtype.fp32, help=DTYPE_HELP),
) -> None:
    """Convert an official SLiMe embedding folder into a parts file."""
    from ..slime.artifact import save_parts
    from ..slime.official import import_official

    sd = _load_model(model, check_device(device), dtype, revision, config, original_config)
    p = import_official(folder, sd, classes, init_prompt)
    save_parts(p, out)
    log.info(f"wrote {out} ({len(p.classes)} classes: {', '.join(p.classes)})")


@app.command()
@exits
def evaluate(
    pred: Path = typer.Option(..., help="Folder of predicted index PNGs (e.g. OUT/masks)."),
    gt: Path = typer.Option(..., help="Ground-truth folder: <id>.npy or <id>.png index masks."),
    classes: str = typer.Option(..., help='car, horse, celeba, or names in index order "background,a,b".'),
    official_size: bool = typer.Option(False, "--official-size", help="Squash both to 512x512 first, as the official code scores."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the metrics as JSON."),
) -> None:
    """Score part masks: the official per-image protocol and the confusion-matrix mIoU."""
    from ..evaluation.parts import PART_CLASSES, evaluate_dirs, format_table
    from ..io import write_json
    from ..slime.examples import parse_classes

    names = list(PART_CLASSES[classes]) if classes in PART_CLASSES else parse_classes(classes)
    result = evaluate_dirs(pred, gt, names, official_size)
    typer.echo(format_table(result, f"{pred} vs {gt}"))
    if json_out:
        write_json(json_out, result)
