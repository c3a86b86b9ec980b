"""The DiffSeg side of ``text2mask fewshot train|evaluate|segment`` (the typer commands in
``cli/fewshot.py`` dispatch here on ``--method diffseg`` or on a checkpoint's
fewshot.json): option checks and guards before any model loads, then the calls."""
from __future__ import annotations

from pathlib import Path

from ...errors import ConfigError
from ...guard import Guard

# Defaults of `fewshot train --method diffseg` where DiffewS' differ (the paper's recipe).
EPOCHS = 200
BATCH_SIZE = 2            # per process; the paper: 4 GPUs x 2 = 8 episodes
LR = 0.01
CHECKPOINT_EVERY = 10     # epochs


def refuse_diffews_options(**given) -> None:
    """DiffewS-only options given with --method diffseg (their names as the CLI spells them)."""
    bad = [f"--{k.replace('_', '-')}" for k, v in given.items() if v]
    if bad:
        raise ConfigError(f"{', '.join(bad)} appl{'y' if len(bad) > 1 else 'ies'} to --method diffews only; "
                          "DiffSeg trains by --epochs, 1-shot, on Kandinsky 2.2 (docs/diffseg.md)")


def train_command(*, bench, root: Path, list_folder: Path, fold: int, model: str, revision: str | None,
                  prior: str | None, out: Path, epochs: int | None, batch_size: int | None, lr: float | None,
                  checkpoint_every: int | None, resolution: int, timestep: int | None, edges: str,
                  hed: Path | None, mixed_precision: str, seed: int, resume: bool, device: str | None,
                  progress: bool, log) -> list[float]:
    from ..train import training_data
    from .edges import EdgeDetector
    from .model import TIMESTEP, DiffSegConfig
    from .train import DiffSegTrainConfig, train

    config = DiffSegTrainConfig(
        epochs=epochs or EPOCHS, batch_size=batch_size or BATCH_SIZE, lr=LR if lr is None else lr,
        checkpoint_every=checkpoint_every or CHECKPOINT_EVERY, seed=seed, mixed_precision=mixed_precision,
        diffseg=DiffSegConfig(resolution=resolution, timestep=TIMESTEP if timestep is None else timestep))
    if (edges == "hed") != (hed is not None):
        raise ConfigError("--edges hed needs --hed FILE (ControlNetHED.pth), and --hed only goes with --edges hed")
    guard = Guard()
    guard.model(model, "--model")
    guard.model(prior, "--prior")
    guard.input(hed, "--hed weights")
    guard.input(root, "data root")
    guard.input(list_folder, "list folder")
    guard.output_folder(out)
    guard.check()
    data = training_data(bench, root, list_folder, fold)
    detector = EdgeDetector(edges, hed)
    losses = train(model, data, out, config, prior=prior, edges=detector, resume=resume, device=device,
                   progress=progress, revision=revision)
    if losses:
        log(f"last loss {losses[-1]:.5f} after epoch {config.epochs}")
    return losses


def guard_checkpoint(guard: Guard, info: dict, base_model: str | None) -> None:
    """A DiffSeg checkpoint's other inputs: its prior and its HED weights file."""
    if base_model is None:
        guard.model(info.get("prior"), "prior model")
    guard.input(info["edges"].get("file"), "HED weights")
