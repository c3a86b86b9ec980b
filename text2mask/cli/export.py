"""``text2mask export``: a WSSS run folder as COCO RLE JSON, an mmsegmentation dataset
config, or plain index PNGs (``text2mask.export``; docs/exports.md). Runs under
``root.exits``: 0 every complete image exported; 1 some images of the run were not
exported (the run's failures and unfinished images included, each named); 2 a bad option,
run folder, photo folder or --out, before anything is written."""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from ..errors import EXIT_FAILED_ITEMS, ConfigError
from ..export import FORMATS, IGNORE, REGIONS
from ..log import get
from .root import app, exits

log = get(__name__)

DATA, FORMAT, OUTPUT = "Input", "Format", "Output"
Format = Enum("Format", {f.replace("-", "_"): f for f in FORMATS}, type=str)
Regions = Enum("Regions", {r: r for r in REGIONS}, type=str)
Ignore = Enum("Ignore", {i: i for i in IGNORE}, type=str)


@app.command("export")
@exits
def export_command(
    run: Path = typer.Option(..., help="Output folder of `text2mask generate`.", rich_help_panel=DATA),
    format: Format = typer.Option(..., "--format", help="coco-rle: COCO JSON with RLE masks; mmseg: an "
                                  "mmsegmentation 1.x dataset config and split file; png: plain index PNGs.",
                                  rich_help_panel=FORMAT),
    regions: Optional[Regions] = typer.Option(None, help="coco-rle: one annotation per class per image (class, "
                                              "the default) or per 8-connected component.", rich_help_panel=FORMAT),
    ignore: Optional[Ignore] = typer.Option(None, help="coco-rle: the unsure (255) pixels in no annotation (omit, "
                                            "the default) or as one iscrowd=1 annotation of category 255 "
                                            "'unsure' per image (crowd).", rich_help_panel=FORMAT),
    palette: bool = typer.Option(False, "--palette", help="png: also palette/<id>.png, the same indices in the VOC "
                                 "colours.", rich_help_panel=FORMAT),
    images: Optional[Path] = typer.Option(None, help="Photo folder (default: the run's recorded one); coco-rle "
                                          "and mmseg.", rich_help_panel=DATA),
    check_photos: bool = typer.Option(True, "--check-photos/--no-check-photos", help="Skip an image whose photo's "
                                      "sha256 differs from the run's record (reads every photo once).",
                                      rich_help_panel=DATA),
    out: Optional[Path] = typer.Option(None, help="New or empty output folder (default: <run>-<format> beside "
                                       "the run).", rich_help_panel=OUTPUT),
    show_progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar.",
                                       rich_help_panel=OUTPUT),
) -> None:
    """Export a WSSS run's training masks for other trainers (detectron2, mmdetection,
    mmsegmentation, DeepLab). Exit codes: 0 every complete image exported; 1 some of the
    run's images were not (failed, unfinished, unreadable), each named in export.json;
    2 bad options or inputs, before anything is written."""
    from ..export import export

    fmt = format.value
    if fmt != "coco-rle" and (regions is not None or ignore is not None):
        raise ConfigError(f"--regions and --ignore apply to --format coco-rle, not {fmt}")
    if fmt != "png" and palette:
        raise ConfigError(f"--palette applies to --format png, not {fmt}")
    if fmt == "png" and images is not None:
        raise ConfigError("--images applies to --format coco-rle and mmseg (png exports the masks only)")
    summary = export(run, fmt, out, regions_by=regions.value if regions else REGIONS[0],
                     ignore=ignore.value if ignore else IGNORE[0], palette=palette, images=images,
                     check_photos=check_photos, show_progress=show_progress)
    for path in summary.files:
        typer.echo(path)
    log.info(f"exported {len(summary.exported)} image(s) as {fmt} to {summary.out}")
    if summary.incomplete:
        n = len(summary.skipped) + summary.unnamed_missing
        named = list(summary.skipped.items())
        log.error(f"{n} image(s) of the run not exported; see {summary.out / 'export.json'}")
        for key, why in named[:5]:
            log.info(f"  {key}: {why}")
        if summary.unnamed_missing:
            log.info(f"  and {summary.unnamed_missing} more without a mask that run.json counts but does not name")
        raise typer.Exit(EXIT_FAILED_ITEMS)
