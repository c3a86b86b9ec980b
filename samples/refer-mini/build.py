"""Rebuilds samples/refer-mini from samples/coco-mini (run from the repository root:
``.venv/bin/python samples/refer-mini/build.py``). See README.md for what it makes."""
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from pycocotools.coco import COCO

COCO_MINI = Path("samples/coco-mini")
OUT = Path("samples/refer-mini")
VIEW_SIDE = 256          # long side of a concept view
MARGIN = 0.1             # crop margin around the instance box, share of its size
# image id -> (COCO id, class, {instance id: COCO annotation id})
IMAGES = {
    "coco-39769": (39769, "cat", {"cat-left": 2190839, "cat-right": 2190842}),
    "coco-1000": (1000, "handbag", {"handbag-left": 1176263, "handbag-right": 1182503}),
}
SERIES = {"cat-left": "cats", "cat-right": "cats", "handbag-left": "handbags", "handbag-right": "handbags"}
TRIPLETS = [
    ("t01", "coco-39769", "cat-left", None, "the cat with a green collar sleeping on the left", ["semantic"]),
    ("t02", "coco-39769", "cat-right", None, "the larger cat lying on the right with its head down", ["visual"]),
    ("t03", "coco-39769", "cat-left", "cat-right", "the striped cat sleeping on the left", []),
    ("t04", "coco-39769", "cat-right", "cat-left", "the striped cat lying on the right", []),
    ("t05", "coco-1000", "handbag-left", None, "the grey handbag of the boy in the yellow cap", ["semantic"]),
    ("t06", "coco-1000", "handbag-right", None, "the white handbag at the side of the boy in the red cap", ["visual"]),
]


def crop_box(ann, width, height):
    x, y, w, h = ann["bbox"]
    mx, my = MARGIN * w, MARGIN * h
    return (max(0, int(x - mx)), max(0, int(y - my)), min(width, int(np.ceil(x + w + mx))),
            min(height, int(np.ceil(y + h + my))))


def views(photo: Image.Image, box):
    """Three views of one instance: its box crop, the crop mirrored, and the central 80%
    of the crop (a closer view), each resized to a long side of VIEW_SIDE."""
    crop = photo.crop(box)
    w, h = crop.size
    close = crop.crop((w // 10, h // 10, w - w // 10, h - h // 10))
    for v in (crop, ImageOps.mirror(crop), close):
        s = VIEW_SIDE / max(v.size)
        yield v.resize((max(1, round(v.width * s)), max(1, round(v.height * s))), Image.BICUBIC)


def main():
    coco = COCO(str(COCO_MINI / "annotations" / "instances_mini.json"))
    for sub in ("images", "masks", "concepts"):
        shutil.rmtree(OUT / sub, ignore_errors=True)
    images, concepts = {}, {}
    for image_id, (coco_id, cls, instances) in IMAGES.items():
        info = coco.loadImgs(coco_id)[0]
        src = COCO_MINI / "images" / info["file_name"]
        (OUT / "images").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, OUT / "images" / info["file_name"])
        photo = Image.open(src).convert("RGB")
        masks = {}
        for inst, ann_id in instances.items():
            ann = coco.loadAnns(ann_id)[0]
            mask = coco.annToMask(ann).astype(np.uint8) * 255
            (OUT / "masks" / image_id).mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask).save(OUT / "masks" / image_id / f"{inst}.png")
            masks[inst] = f"masks/{image_id}/{inst}.png"
            (OUT / "concepts" / inst).mkdir(parents=True, exist_ok=True)
            for n, v in enumerate(views(photo, crop_box(ann, info["width"], info["height"])), 1):
                v.save(OUT / "concepts" / inst / f"view{n}.jpg", quality=95)
            concepts[inst] = {"class": cls, "series": SERIES[inst]}
        images[image_id] = {"file": f"images/{info['file_name']}", "scene": image_id, "class": cls,
                            "instances": masks}
    triplets = [{"id": t, "image": im, "target": tg, **({"concept": c} if c else {}), "text": text, "tags": tags}
                for t, im, tg, c, text, tags in TRIPLETS]
    doc = {"class": "cat", "concepts": concepts, "images": images, "triplets": triplets}
    (OUT / "dataset.json").write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
