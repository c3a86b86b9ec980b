"""Class images for prior preservation (``personalize --generate-class-images N``).

Custom Diffusion regularises a concept with ~200 images of its class that the base model
draws itself from the bare class word ("mug"). As diffusers' Custom Diffusion script does,
they are sampled with the model's own scheduler and ``StableDiffusionPipeline``'s defaults
(50 steps, guidance 7.5), kept in a folder, and only the missing ones are made on the next
run, so an interrupted generation resumes and a folder made once serves every concept of
that class. Ours: the images are drawn at the training resolution (the trainer resizes to
it anyway), and image i's noise comes from (seed, class word, i), so a folder regenerated
from scratch holds the same pictures.
"""
from __future__ import annotations

import hashlib
import io
from pathlib import Path

import torch

from ..io import image_files, write_bytes
from ..log import get, progress
from ..modeling.latents import image_seed

log = get(__name__)

SAMPLING_STEPS = 50          # StableDiffusionPipeline's default, which the diffusers script uses
GUIDANCE_SCALE = 7.5         # idem
JPEG_QUALITY = 95


def class_photos(folder: Path) -> list[Path]:
    """The class photos already in ``folder``, in name order."""
    return image_files(folder) if folder.is_dir() else []


def generate_class_images(sd, class_name: str, folder: Path, count: int, size: int, seed: int = 0,
                          show_progress: bool = True) -> list[Path]:
    """At least ``count`` photos of ``class_name`` in ``folder``: the missing ones sampled
    from the base model ``sd`` (before any concept is added to it); returns every photo."""
    from diffusers import StableDiffusionPipeline

    have = class_photos(folder)
    missing = count - len(have)
    if missing <= 0:
        log.info(f"{folder}: {len(have)} class photos already there (asked for {count})")
        return have
    if sd.scheduler is None:
        raise ValueError("this model was loaded without its scheduler; class images need the model's own sampler")
    folder.mkdir(parents=True, exist_ok=True)
    pipe = StableDiffusionPipeline(vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer, unet=sd.unet,
                                   scheduler=sd.scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    log.info(f"drawing {missing} photo(s) of {class_name!r} with the base model into {folder} "
             f"({SAMPLING_STEPS} steps, guidance {GUIDANCE_SCALE}, {size}x{size})")
    bar = progress(total=missing, enabled=show_progress, desc="class images", unit="img")
    for i in range(len(have), count):
        generator = torch.Generator(sd.device).manual_seed(image_seed(seed, f"class-image:{class_name}:{i}"))
        with torch.inference_mode():
            image = pipe(class_name, height=size, width=size, num_inference_steps=SAMPLING_STEPS,
                         guidance_scale=GUIDANCE_SCALE, generator=generator).images[0]
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=JPEG_QUALITY)
        data = buf.getvalue()
        # Numbered first (the order they were drawn in), then a digest: never a name clash
        # with a photo the user put there.
        write_bytes(folder / f"{i:04d}-{hashlib.sha1(data).hexdigest()[:12]}.jpg", data)
        bar.update(1)
    bar.close()
    return class_photos(folder)
