"""Personalized referring segmentation commands (the paper's second task): ``refer`` (one
photo, or a dataset with ``--data-root``) and ``personalize`` (train a concept) — thin
shells over ``text2mask.personal``."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import typer

from ..errors import ConfigError, InputError
from ..log import get
from ..modeling.loading import DEFAULT_MODEL
from .root import CONFIG_OPTION, DEVICE_OPTION, DTYPE_OPTION, MODEL_HELP, MODEL_PANEL, ORIGINAL_CONFIG_OPTION, REVISION_OPTION, WORKERS_HELP, Dtype, app, check_device, exits, finish_run, parse_shard, quiet_libraries

log = get(__name__)
DATA, MODEL, METHOD, OUTPUT = "Input", MODEL_PANEL, "Method", "Output"


def _referrer(model, revision, device, dtype, seed, timestep, box_threshold, tokens, query, long_side, config,
              original_config):
    from ..personal.refer import Referrer, ReferConfig

    cfg = ReferConfig(timestep=timestep, seed=seed, box_threshold=box_threshold, tokens=tokens, query=query,
                      long_side=long_side)
    quiet_libraries()
    log.info(f"loading {model} ...")
    return Referrer.from_pretrained(model, cfg, device=device, dtype=None if dtype == "auto" else dtype,
                                    revision=revision, config_source=config,
                                    original_config=str(original_config) if original_config else None)


def _concept_folder(spec: Path) -> Path:
    """The folder of a ``--concept`` (``DIR`` or ``DIR#TOKEN`` for one concept of a
    multi-concept folder)."""
    from ..personal.concept import TOKEN_SEPARATOR

    if not spec.exists() and TOKEN_SEPARATOR in spec.name:
        return spec.with_name(spec.name.rpartition(TOKEN_SEPARATOR)[0])
    return spec


def _one_photo(args, photo: Path, class_name: str, concepts: list[Path], texts: list[str], segments: int | None,
               out: Path) -> None:
    """Segments, masks and scores of one photo; every check comes before the model loads."""
    from ..guard import Guard, safe_name
    from ..io import read_image, write_png
    from ..personal.concept import Concept
    from ..personal.refer import Query
    from ..personal.run import SceneOutput, write_scene
    from ..personal.visualize import refer_picture

    guard = Guard()
    guard.input(photo, "photo")
    guard.inputs([_concept_folder(c) for c in concepts], "--concept")
    guard.model(args[0])
    guard.output_folder(out)
    guard.check()
    key = safe_name(photo.stem, "photo name")          # it names masks/<name>-<i>.png
    rgb = read_image(photo)
    loaded = [Concept.load(c) for c in concepts]
    referrer = _referrer(*args)
    for c in loaded:
        c.check(referrer.sd)
    queries = [Query(c, t) for c, t in zip(loaded, texts)]
    r = referrer(rgb, queries, class_name, segments=segments, key=key)
    if r.segments_from == "eigengap":
        log.info(f"{key}: {r.num_segments} segments, chosen from the attention (largest eigengap, K >= "
                 f"{max(2, len(queries))}); give --segments K for the number of items in the photo")
    ids = tuple(f"{key}-{i}" for i in range(1, len(queries) + 1))
    write_scene(SceneOutput(key, class_name, r.segments, ids, tuple(r.prompts), r.correlation, r.bf, r.af), out)
    write_png(out / "pictures" / f"{key}.png", refer_picture(rgb, r.segments, r.af, r.prompts, r.correlation))
    for i, (tid, p) in enumerate(zip(ids, r.prompts)):
        log.info(f"{tid}: {p!r} -> segment {r.af[i]} (bf {r.bf[i]}); masks/{tid}.png")
    typer.echo(str(out))


@app.command("refer")
@exits
def refer(
    photo: Optional[Path] = typer.Argument(None, help="A scene photo (or use --data-root for a dataset)."),
    class_name: Optional[str] = typer.Option(None, "--class", help="The items' class word, e.g. mug.", rich_help_panel=DATA),
    concept: List[Path] = typer.Option([], "--concept", help="A concept folder (DIR#TOKEN: one concept of a multi-concept folder); repeat, one per --text.", rich_help_panel=DATA),
    text: List[str] = typer.Option([], "--text", help="Its description with the plain class word, e.g. \"a white mug filled with cola\".", rich_help_panel=DATA),
    segments: Optional[int] = typer.Option(None, min=1, help="Items in the photo (K); default: chosen from the attention by the largest eigengap, K >= max(2, queries).", rich_help_panel=DATA),
    data_root: Optional[Path] = typer.Option(None, help="Dataset root (dataset.json, images/, masks/).", rich_help_panel=DATA),
    concepts: Optional[Path] = typer.Option(None, help="Folder of trained concepts, one sub-folder per concept id (--data-root).", rich_help_panel=DATA),
    split: str = typer.Option("all", help="all | semantic | visual | variant (--data-root).", rich_help_panel=DATA),
    af_group: str = typer.Option("photo", help="af over: photo (every item of the photo, one triplet each, any split: the paper) | split (the photo's triplets in the split).", rich_help_panel=METHOD),
    limit: Optional[int] = typer.Option(None, min=1, help="Only the first N photos of the split.", rich_help_panel=DATA),
    model: str = typer.Option(DEFAULT_MODEL, help=MODEL_HELP, rich_help_panel=MODEL),
    revision: Optional[str] = REVISION_OPTION,
    config: Optional[str] = CONFIG_OPTION,
    original_config: Optional[Path] = ORIGINAL_CONFIG_OPTION,
    device: str = DEVICE_OPTION,
    dtype: Dtype = DTYPE_OPTION,
    seed: int = typer.Option(0, help="Global seed; each photo's draws come from (seed, photo id).", rich_help_panel=METHOD),
    timestep: int = typer.Option(150, min=0, max=999, help="Noise level t of T=1000.", rich_help_panel=METHOD),
    box_threshold: float = typer.Option(0.2, min=0.0, max=0.999, help="Class-aware box threshold, 0 <= b < 1 (0 disables).", rich_help_panel=METHOD),
    tokens: str = typer.Option("phrase", help="Tokens of an instance map: phrase (\"<new1> mug\") | token | class | text.", rich_help_panel=METHOD),
    query: str = typer.Option("full", help="full | subject (\"a <new1> mug\") | context (the text on the base model).", rich_help_panel=METHOD),
    long_side: Optional[int] = typer.Option(None, min=64, help="Resize photos to this long side (default: the WSSS reference sizes, 704-1024 px).", rich_help_panel=METHOD),
    out: Path = typer.Option(..., help="Output folder.", rich_help_panel=OUTPUT),
    workers: Optional[int] = typer.Option(None, min=0, help=WORKERS_HELP, rich_help_panel=OUTPUT),
    overwrite: bool = typer.Option(False, help="Redo every photo, even if an earlier run finished it.", rich_help_panel=OUTPUT),
    shard: Optional[str] = typer.Option(None, help="I/N: process only shard I of N (0-based).", rich_help_panel=OUTPUT),
    evaluate: bool = typer.Option(True, "--evaluate/--no-evaluate", help="Score the run (scores.jsonl, metrics.json).", rich_help_panel=OUTPUT),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar.", rich_help_panel=OUTPUT),
) -> None:
    """Find MY item in a photo: segments of the photo's items, then the one each concept +
    description points at. One photo: segments/, masks/ (af), masks_bf/, scores/, pictures/.
    A dataset (--data-root): also scores.jsonl, metrics.json, run.json; resumable."""
    from ..personal.query import SPAN_MODES, class_match
    from ..personal.refer import QUERY_MODES
    from ..personal.run import AF_GROUPS

    if tokens not in SPAN_MODES:
        raise ConfigError(f"--tokens {tokens!r}: use one of {', '.join(SPAN_MODES)}")
    if query not in QUERY_MODES:
        raise ConfigError(f"--query {query!r}: use one of {', '.join(QUERY_MODES)}")
    if af_group not in AF_GROUPS:
        raise ConfigError(f"--af-group {af_group!r}: use one of {', '.join(AF_GROUPS)}")
    device = check_device(device)
    if (photo is None) == (data_root is None):
        raise ConfigError("give either a PHOTO (with --class, --concept, --text) or --data-root (with --concepts)")
    args = (model, revision, device, dtype.value, seed, timestep, box_threshold, tokens, query, long_side, config,
            original_config)
    if photo is not None:
        if not class_name:
            raise ConfigError("--class is required with a PHOTO (the class word of the items, e.g. mug)")
        if not concept or len(concept) != len(text):
            raise ConfigError(f"give one --text per --concept (got {len(concept)} concept(s), {len(text)} text(s))")
        if segments is not None and segments < len(concept):
            raise InputError(f"{photo}: --segments {segments} is fewer than the {len(concept)} queries; each "
                             "queried item needs its own segment")
        for t in text:
            if class_match(t, class_name) is None:
                raise InputError(f"--text {t!r} has no whole word {class_name!r} (the class the concept's token goes before)")
        if not photo.is_file():
            raise InputError(f"{photo}: image file not found")
        _one_photo(args, photo, class_name, concept, text, segments, out)
        return
    _dataset(args, data_root, concepts, split, af_group, limit, out, workers, overwrite, shard, evaluate, progress)


def _dataset(args, data_root, concepts, split, af_group, limit, out, workers, overwrite, shard, evaluate,
             progress) -> None:
    from ..data.personal import load_refer_dataset
    from ..distributed import Distributed
    from ..guard import Guard
    from ..personal.run import load_concepts, plan, refer_dataset
    from ..runs import RunOptions

    if concepts is None:
        raise ConfigError("--concepts DIR is required with --data-root (one trained concept folder per concept id)")
    shard_t = parse_shard(shard)
    ds = load_refer_dataset(data_root)
    items = plan(ds, split, af_group)          # an unknown split fails here, before the model loads
    guard = Guard()
    guard.input(data_root, "--data-root")
    guard.input(concepts, "--concepts")
    guard.model(args[0])
    guard.output_folder(out)
    guard.check()
    loaded = load_concepts(concepts, [t.concept for i in items for t in i.queries])
    dist = Distributed.from_env()
    referrer = _referrer(*args[:2], dist.device() if dist.world > 1 and args[2] == "auto" else args[2], *args[3:])
    opts = RunOptions(out=out, workers=workers, limit=limit,
                      overwrite=overwrite, shard=shard_t, evaluate=evaluate, progress=progress)
    summary = refer_dataset(referrer, ds, split, loaded, opts, log=log.info, dist=dist, af_group=af_group)
    finish_run(summary, "photo", dist.main)


@dataclass
class _Job:
    """One concept to train: its photos, class, output and class images."""

    name: str
    photos: list[Path]
    cfg: object
    out: Path
    class_images: Optional[Path]


@app.command("personalize")
@exits
def personalize(
    photos: Optional[List[Path]] = typer.Argument(None, help="Photos of the item (files or folders); or --data-root."),
    class_name: Optional[str] = typer.Option(None, "--class", help="The item's class word, e.g. mug (with --data-root: from dataset.json).", rich_help_panel=DATA),
    out: Path = typer.Option(..., help="Concept folder to write (format A + concept.json); with --data-root the folder of one sub-folder per concept.", rich_help_panel=OUTPUT),
    data_root: Optional[Path] = typer.Option(None, help="Train every concept of a dataset (ROOT/concepts/<concept>/*.jpg) into --out/<concept>.", rich_help_panel=DATA),
    class_images: Optional[Path] = typer.Option(None, help="Folder of class photos for prior preservation (e.g. 200 'mug' images); with --data-root one sub-folder per class word.", rich_help_panel=DATA),
    generate_class_images: int = typer.Option(0, min=0, help="Draw class photos with the base model (prompt: the class "
                                              "word) until the --class-images folder (default <out>-class-images, "
                                              "per class with --data-root) holds N; Custom Diffusion uses 200.", rich_help_panel=DATA),
    token: str = typer.Option("<new1>", help="The new token.", rich_help_panel=METHOD),
    init_token: str = typer.Option("ktn", help="Token whose embedding initializes the new one.", rich_help_panel=METHOD),
    steps: Optional[int] = typer.Option(None, min=1, help="Optimizer steps (default: 500 on one process, 250 on several).", rich_help_panel=METHOD),
    size: int = typer.Option(512, min=64, help="Training resolution (square, a multiple of 8).", rich_help_panel=METHOD),
    batch_size: int = typer.Option(2, min=1, help="Photos per step and process.", rich_help_panel=METHOD),
    base_lr: float = typer.Option(1e-5, help="Scaled by batch x processes x accumulation (x2 with prior).", rich_help_panel=METHOD),
    accumulation: int = typer.Option(1, min=1, help="Gradient accumulation steps.", rich_help_panel=METHOD),
    freeze: str = typer.Option("crossattn_kv", help="crossattn_kv: train K/V; crossattn: also Q and out.", rich_help_panel=METHOD),
    augment: bool = typer.Option(True, "--augment/--no-augment", help="Flip, shrink-and-paste, zoom.", rich_help_panel=METHOD),
    mixed_precision: str = typer.Option("no", help="no | fp16 | bf16 (accelerate autocast).", rich_help_panel=METHOD),
    checkpoint_every: int = typer.Option(250, min=0, help="Save a checkpoint every N steps (0: never).", rich_help_panel=OUTPUT),
    resume: bool = typer.Option(True, "--resume/--restart", help="Continue from the newest checkpoint in <out>-checkpoints (only one of these very inputs and settings); --restart discards them.", rich_help_panel=OUTPUT),
    seed: int = typer.Option(0, help="Seed of augmentations, noise and timesteps.", rich_help_panel=METHOD),
    model: str = typer.Option(DEFAULT_MODEL, help=MODEL_HELP, rich_help_panel=MODEL),
    revision: Optional[str] = REVISION_OPTION,
    config: Optional[str] = CONFIG_OPTION,
    original_config: Optional[Path] = ORIGINAL_CONFIG_OPTION,
    device: str = DEVICE_OPTION,
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar.", rich_help_panel=OUTPUT),
) -> None:
    """Train a Custom Diffusion concept (a new token + cross-attention K/V) on a few photos
    of one item (or every concept of a dataset with --data-root);
    `accelerate launch -m text2mask personalize ...` for several GPUs."""
    from ..distributed import Distributed
    from ..guard import Guard, safe_name
    from ..io import read_image
    from ..modeling.loading import load
    from ..personal.concept import check_replaceable
    from ..personal.train import (TrainConfig, checkpoint_folder, photo_files, resume_point, training_fingerprint)

    def settings(cls: str):
        return TrainConfig(class_name=cls, token=token, init_token=init_token, steps=steps, size=size,
                           batch_size=batch_size, base_lr=base_lr, accumulation=accumulation, freeze=freeze,
                           augment=augment, mixed_precision=mixed_precision, checkpoint_every=checkpoint_every,
                           seed=seed)

    # 1. What to train, every option checked (before anything is read or loaded).
    if (not photos) == (data_root is None):
        raise ConfigError("give either PHOTOS (with --class) or --data-root (every concept of a dataset)")
    guard = Guard()
    generated_root = class_images or Path(f"{out}-class-images")
    if data_root is None:
        if not class_name:
            raise ConfigError("--class is required with PHOTOS (the item's class word, e.g. mug)")
        jobs = [_Job(out.name, list(photos), settings(class_name), out,
                     generated_root if generate_class_images else class_images)]
        guard.inputs(photos, "photo")
    else:
        from ..data.personal import load_refer_dataset

        ds = load_refer_dataset(data_root)
        if class_name is not None:
            raise ConfigError("--class is taken from dataset.json with --data-root; leave it out")
        jobs = []
        for cid in ds.concepts:
            cls = ds.concept_class(cid)
            per_class = generated_root / safe_name(cls, "class word") if (generate_class_images or class_images) \
                else None
            jobs.append(_Job(cid, ds.concept_photos(cid), settings(cls), out / safe_name(cid, "concept id"), per_class))
        guard.input(data_root, "--data-root")
        guard.output_folder(out)
    guard.model(model)
    for job in jobs:
        guard.output_folder(job.out)
        guard.output_folder(checkpoint_folder(job.out), "checkpoints")
    if generate_class_images:
        guard.output_folder(generated_root, "--class-images")
    elif class_images is not None:
        guard.input(class_images, "--class-images")
    guard.check()
    for job in jobs:
        check_replaceable(job.out, "--out")
    device = check_device(device)

    # 2. Inputs read, checkpoints judged: a changed input or a --steps below a checkpoint stop here.
    dist = Distributed.from_env()
    ignore = ("model", "class_photos") if generate_class_images else ("model",)
    for job in jobs:
        files = photo_files(job.photos, "instance")
        for f in files:
            read_image(f)
        class_files = photo_files([job.class_images], "class") if job.class_images and not generate_class_images else []
        fp = training_fingerprint(job.cfg, files, class_files, dist.world)
        resume_point(job.out, fp, job.cfg.total_steps(dist.world), resume, ignore)

    # 3. The model, then each concept.
    quiet_libraries()
    log.info(f"loading {model} ...")
    sd = load(model, device=dist.device() if dist.world > 1 and device == "auto" else device, dtype="fp32",
              revision=revision, config=config, original_config=str(original_config) if original_config else None)
    for job in jobs:
        _train_one(sd, job, generate_class_images, resume, progress, dist)
    typer.echo(str(out))


def _train_one(sd, job: _Job, generate: int, resume: bool, show_progress: bool, dist) -> None:
    from ..personal.class_images import generate_class_images as draw
    from ..personal.concept import CONCEPT_JSON
    from ..personal.train import (check_new_token, fingerprint_digest, initializer_id, photo_files, train_concept,
                                  training_fingerprint)
    from ..runs.manifest import model_identity

    cfg = job.cfg
    check_new_token(sd.tokenizer, cfg.token)
    initializer_id(sd.tokenizer, cfg.init_token)
    if generate:
        if dist.main:     # one process draws, the others wait for the folder
            draw(sd, cfg.class_name, job.class_images, generate, cfg.size, cfg.seed, show_progress=show_progress)
        dist.barrier()
    class_photos = [job.class_images] if job.class_images else []
    if resume and (job.out / CONCEPT_JSON).is_file():
        fp = training_fingerprint(cfg, photo_files(job.photos, "instance"),
                                  photo_files(class_photos, "class") if class_photos else [], dist.world,
                                  model_identity(sd.info))
        try:
            done = json.loads((job.out / CONCEPT_JSON).read_text(encoding="utf-8"))["settings"]["fingerprint_sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            done = None
        if done == fingerprint_digest(fp):
            log.info(f"{job.out}: already trained from these inputs and settings (--restart retrains it)")
            return
    log.info(f"{job.name}: training {cfg.class_name!r} concept {cfg.token} into {job.out}")
    train_concept(sd, job.photos, job.out, cfg, class_photos, resume=resume, show_progress=show_progress)
