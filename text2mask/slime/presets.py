"""Dataset presets of the official runs (``README.md`` commands and ``src/dataset.py`` of
aliasgharkhani/SLiMe), for ``slime fit`` and ``slime segment`` alike.

    pascal-part  rotation +-30, 1 tile of 512 (--num_patchs_per_side 1 --patch_size 512),
                 min crop 0.6 (the car runs; the horse runs pass 0.8: add --min-crop 0.8)
    celeba       rotation +-10 (dataset_name celeba), 2 x 2 tiles of 400 (the argument
                 defaults the CelebA commands keep), min crop 0.6

Fit reads every key, segment only the tiling. An option given on the command line wins
over the preset; without a preset, fit uses the pascal-part values and segment the tiling
stored in the parts file. A preset's tile size is for the official 512 canvas and scales
with a smaller ``--canvas`` (400 -> 50 on a 64 canvas), so the tiling covers the same
share of the photo.
"""
from __future__ import annotations

from ..errors import ConfigError

OFFICIAL_CANVAS = 512

PRESETS: dict[str, dict] = {
    "pascal-part": {"rotate": 30.0, "tiles": 1, "tile_size": 512, "min_crop": 0.6},
    "celeba": {"rotate": 10.0, "tiles": 2, "tile_size": 400, "min_crop": 0.6},
}
SEGMENT_KEYS = ("tiles", "tile_size")


def preset(name: str | None) -> dict:
    """The settings of preset ``name`` ({} for None); ConfigError for an unknown name."""
    if name is None:
        return {}
    if name not in PRESETS:
        raise ConfigError(f"--preset {name!r}: unknown; use one of {', '.join(PRESETS)}")
    return dict(PRESETS[name])


def resolve(given: dict, name: str | None, keys=None, canvas: int = OFFICIAL_CANVAS) -> dict:
    """``given`` options (None = not given) filled from the preset, restricted to ``keys``;
    the preset's tile size scaled to ``canvas``."""
    base = preset(name)
    if "tile_size" in base:
        base["tile_size"] = max(1, round(base["tile_size"] * canvas / OFFICIAL_CANVAS))
    out = {}
    for key, value in given.items():
        if value is not None:
            out[key] = value
        elif key in base and (keys is None or key in keys):
            out[key] = base[key]
    return out
