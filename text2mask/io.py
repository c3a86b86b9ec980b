"""File I/O at the edges of the pipeline: images in, index PNGs and JSON out.

Every write goes to a temporary file in the destination folder and is renamed into
place, so a killed run never leaves a half-written output behind.
"""
from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

import numpy as np
from PIL import Image

from . import guard
from .errors import InputError

# The photo formats every method reads (by file suffix, lower case).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def image_files(folder: str | os.PathLike) -> list[Path]:
    """The image files directly in ``folder`` (by suffix, any case), in name order."""
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def read_image(path: str | os.PathLike) -> np.ndarray:
    """RGB uint8 array (H, W, 3) of the photo's stored pixels.

    The EXIF orientation tag is not applied, for every method: the ground truth of VOC,
    COCO and the few-shot and part benchmarks is aligned with the stored pixels, and the
    official code of each method reads photos the same way (README, *Inputs*). A photo
    with transparency is composited on white, as an image viewer shows it; masks are
    never composited (``read_binary_mask``)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: image file not found")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: image file is empty (0 bytes)")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                # 16/32-bit grey: scale to 8 bits instead of clipping at 255.
                a = np.asarray(im, dtype=np.float64)
                peak = 65535.0 if im.mode.startswith("I;16") else max(float(a.max()), 1.0)
                im = Image.fromarray(np.clip(a / peak * 255.0 + 0.5, 0, 255).astype(np.uint8))
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                im = Image.alpha_composite(bg, rgba)
            rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except InputError:
        raise
    except Exception as e:  # PIL raises several types for corrupt/unknown files
        raise InputError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from e
    return np.ascontiguousarray(rgb)


def image_input(image, key: str | None = None) -> tuple[str, np.ndarray]:
    """(id, RGB uint8 array) of what a Python API call was given: a path (id = its file
    stem, unless ``key``), a PIL image or an (H, W, 3) array (id = ``key`` or "image")."""
    if isinstance(image, (str, os.PathLike)):
        return key or Path(image).stem, read_image(image)
    if isinstance(image, Image.Image):
        return key or "image", np.asarray(image.convert("RGB"))
    return key or "image", np.ascontiguousarray(image, dtype=np.uint8)


def read_json(path: str | os.PathLike, what: str, error: type[Exception] = InputError,
              not_found: str | None = None):
    """The parsed JSON document of ``path`` (a UTF-8 BOM is accepted), or one ``error``
    naming the file, what it should be and the cause: not found (``not_found``, if given,
    says what to pass instead), unreadable, or not JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise error(not_found or f"{path}: {what} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: cannot read {what}: not valid JSON ({e})") from None
    except OSError as e:
        raise error(f"{path}: cannot read {what} ({e.strerror or e})") from None


# Modes whose pixel values are indices (palette indices, grey levels, 16/32-bit values).
_INDEX_MODES = ("P", "L", "I", "I;16", "I;16B", "I;16L", "1")


def _open_mask(path: Path) -> tuple[str, np.ndarray, np.ndarray | None]:
    """(mode, values, alpha or None) of a mask image, as stored (no EXIF, no compositing)."""
    if not path.is_file():
        raise InputError(f"{path}: mask file not found")
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode in ("RGBA", "LA", "PA"):
                alpha = np.asarray(im.getchannel("A"))
                values = np.asarray(im.convert("RGB" if mode != "LA" else "L"))
                return mode, values, alpha
            if mode in _INDEX_MODES:
                return mode, np.asarray(im), None
            return mode, np.asarray(im.convert("RGB")), None
    except InputError:
        raise
    except Exception as e:  # PIL raises several types for a bad file
        raise InputError(f"{path}: cannot read mask ({type(e).__name__}: {e})") from e


def read_index_png(path: str | os.PathLike) -> np.ndarray:
    """Class-index array (H, W) uint8 of an index mask; the one index reader of every method.

    The rule (README, *Inputs*): a palette PNG gives its palette indices, a grey (L, 16-bit,
    1-bit) PNG its values; an RGB(A) picture is accepted only when it is grey (R = G = B)
    and fully opaque, and then its grey levels are the indices. Any other picture is
    refused: colours are not classes, and never read through luminance."""
    path = Path(path)
    mode, a, alpha = _open_mask(path)
    if mode not in _INDEX_MODES:
        grey = a if a.ndim == 2 else a[..., 0]
        if (a.ndim == 3 and not (np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 0], a[..., 2]))) \
                or (alpha is not None and alpha.min(initial=255) < 255):
            raise InputError(f"{path}: not a single-channel index mask (mode {mode} with colours or "
                             "transparency); save the class indices as a grey or palette PNG")
        a = grey
    if a.dtype == bool:
        a = a.astype(np.uint8)
    if a.dtype != np.uint8 and (a.min(initial=0) < 0 or a.max(initial=0) > 255):
        # 16/32-bit masks: a value past 255 must not wrap into another class
        raise InputError(f"{path}: mask values outside 0..255 (max {int(a.max())})")
    return a.astype(np.uint8, copy=False)


def read_binary_mask(path: str | os.PathLike, cls: int | None = None) -> np.ndarray:
    """(H, W) bool object mask; the one binary reader of every method.

    The rule (README, *Inputs*), on the stored pixels: with ``cls``, the pixels of index
    ``cls`` of an index mask (``read_index_png``). Else a mask with varying transparency
    marks its opaque pixels (alpha > 127), whatever their colour; a single-channel mask
    marks its non-zero pixels; an RGB picture marks pixels whose brightest channel is past
    mid-grey (a white or coloured object on black). Never composited on white."""
    path = Path(path)
    if cls is not None:
        return read_index_png(path) == cls
    mode, a, alpha = _open_mask(path)
    if alpha is not None and alpha.min(initial=255) != alpha.max(initial=255):
        return alpha > 127
    if a.ndim == 2:
        return a != 0
    return a.max(axis=2) > 127


def _create_temp(path: Path) -> tuple[int, str]:
    """A new temp file beside ``path``, named ``.<name>.<random>.tmp``. Created with mode
    0666 so the kernel applies the process's umask (mkstemp's fixed 0600 would make a
    shared run folder unreadable to the group)."""
    for _ in range(100):
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"{path.parent}: cannot create a temporary file for {path.name}")


def _atomic(path: Path, write) -> None:
    harm = guard.protected(path)
    if harm:  # rule 1 of text2mask.guard, kept at the last moment too
        raise InputError(f"refusing to write {path}: {harm}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_index_png(path: str | os.PathLike, labels: np.ndarray) -> None:
    """Single-channel 8-bit PNG whose pixel values are the class indices (mode 'L').

    Mode 'L' rather than a palette: OpenCV reads palette PNGs as colours, 'L' as indices.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"index mask must be 2-D, got shape {labels.shape}")
    if labels.dtype != np.uint8:
        if labels.min(initial=0) < 0 or labels.max(initial=0) > 255:
            raise ValueError("index mask values must lie in 0..255")
        labels = labels.astype(np.uint8)
    img = Image.fromarray(np.ascontiguousarray(labels))  # uint8 2-D -> mode "L"
    _atomic(Path(path), lambda f: img.save(f, format="PNG"))


def write_png(path: str | os.PathLike, image: Image.Image) -> None:
    _atomic(Path(path), lambda f: image.save(f, format="PNG"))


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    _atomic(Path(path), lambda f: f.write(data))


def write_text(path: str | os.PathLike, text: str) -> None:
    _atomic(Path(path), lambda f: f.write(text.encode("utf-8")))


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")
