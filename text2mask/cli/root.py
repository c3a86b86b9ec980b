"""The ``text2mask`` command: global options, then one command group per method.

Global options: ``-v`` (debug messages, and the traceback of a crash), ``-q`` (warnings
and errors only), ``--version``. Messages go to stderr through the ``text2mask`` logger
(``text2mask.log``); results a command prints (a table, a path) go to stdout.

Exit codes, the same for every command (``text2mask.errors``):

    0    finished; every item written
    1    finished, but some items failed (each one named)
    2    configuration error, found before any work: bad option, input file, model,
         output folder (one line ``error: ...`` naming the file, the id and the cause)
    3    crashed: an unexpected error (one line; ``-v`` shows the traceback)
    130  interrupted (Ctrl-C)

Every method's CLI reuses two helpers from this module:

``exits``
    decorator for a command body (put it under ``@app.command()``); it maps
    ``ConfigError`` and its subclasses to exit 2, ``KeyboardInterrupt`` to exit 130
    and any other exception to exit 3, each with one line on stderr. ``typer.Exit``
    and click's usage errors pass through untouched. A body returns normally for
    exit 0 and raises ``typer.Exit(EXIT_FAILED_ITEMS)`` when some items failed::

        @app.command()
        @exits
        def mycommand(device: str = DEVICE_OPTION, dtype: Dtype = DTYPE_OPTION):
            device = check_device(device)   # before any model work
            ...

``check_device`` / ``Dtype``
    ``--device`` is free text (auto, cpu, cuda, cuda:N, mps), checked against this
    machine before any model loads; ``--dtype`` is a choice.

``parse_shard`` / ``quiet_libraries``
    ``--shard I/N`` for job arrays; silencing diffusers/transformers before a model loads.

``finish_run``
    the end of a batch command on the shared runner: the summary, then exit 0, 1 or 3.
"""
from __future__ import annotations

import functools
import os
import re
from enum import Enum
from typing import Optional

import typer

from .. import __version__
from ..errors import EXIT_CONFIG, EXIT_CRASHED, EXIT_FAILED_ITEMS, EXIT_INTERRUPTED, ConfigError, TrainingDiverged
from ..log import get

log = get(__name__)

def _hide_flag_types() -> None:
    """``--help`` shows no value type for an on/off flag: typer labels every flag ``<bool>``,
    which reads as if the flag took a value."""
    from typer.core import TyperOption

    if getattr(TyperOption, "_text2mask_flags", False):
        return
    shown = TyperOption.display_type_rich

    def display_type_rich(self, ctx):
        return None if self.is_flag else shown(self, ctx)

    TyperOption.display_type_rich = display_type_rich
    TyperOption._text2mask_flags = True


_hide_flag_types()

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Segmentation masks from the attention inside diffusion models (Stable Diffusion 1.x, 2.x, "
                       "XL; Kandinsky 2.2 for DiffSeg).")


def exits(command):
    """Run a command body under the exit-code contract of this module's docstring."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        from .. import guard

        guard.release()     # the inputs an earlier command (same process) protected
        try:
            return command(*args, **kwargs)
        except ConfigError as e:
            log.error(str(e))
            raise typer.Exit(EXIT_CONFIG) from None
        except TrainingDiverged as e:
            log.error(str(e))
            raise typer.Exit(EXIT_FAILED_ITEMS) from None
        except KeyboardInterrupt:
            log.error("interrupted")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except (typer.Exit, typer.Abort, typer.TyperException, SystemExit):
            raise  # typer.Exit, and usage errors (BadParameter) that typer reports itself (exit 2)
        except Exception as e:  # noqa: BLE001 - the one place an unexpected error becomes a message
            log.debug("traceback of the crash:", exc_info=True)
            text = str(e).splitlines()[0] if str(e) else ""
            log.error(f"{type(e).__name__}: {text} (crashed; rerun with -v for the traceback)"
                      if text else f"{type(e).__name__} (crashed; rerun with -v for the traceback)")
            raise typer.Exit(EXIT_CRASHED) from None
        finally:
            guard.release()

    return run


class Dtype(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


_CUDA = re.compile(r"cuda(?::(\d+))?")


def check_device(device: str) -> str:
    """``device`` if this machine has it (auto, cpu, cuda, cuda:N, mps); a ConfigError
    naming what it has otherwise. Cheap: nothing is loaded onto the device."""
    import torch

    d = device.strip().lower()
    if d in ("auto", "cpu"):
        return d
    m = _CUDA.fullmatch(d)
    if m:
        if not torch.cuda.is_available():
            built = "built with CUDA, but no GPU is visible" if torch.backends.cuda.is_built() else "a CPU-only build"
            raise ConfigError(f"--device {device}: no CUDA GPU on this machine (torch {torch.__version__}: "
                              f"{built}); use --device cpu")
        n = torch.cuda.device_count()
        if m.group(1) is not None and int(m.group(1)) >= n:
            raise ConfigError(f"--device {device}: this machine has {n} CUDA device(s): "
                              + ", ".join(f"cuda:{i}" for i in range(n)))
        return d
    if d == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"--device {device}: Apple's MPS backend is not available here; use --device cpu")
        return d
    raise ConfigError(f"--device {device!r} is not a device; use auto, cpu, cuda, cuda:N or mps")


DEVICE_HELP = "auto (cuda if available, else cpu), cpu, cuda, cuda:N or mps."
MODEL_HELP = "Hugging Face id, local diffusers folder, or single .ckpt/.safetensors file (SD 1.x or 2.x)."
WSSS_MODEL_HELP = ("Hugging Face id, local diffusers folder, or single .ckpt/.safetensors file (SD 1.x, 2.x "
                   "or SDXL base; SDXL works at 1024 px on the long side, docs/sdxl.md).")
CONFIG_HELP = ("With a single-file --model: a diffusers folder or hub id with the component configs and "
               "tokenizer (needed offline).")
ORIGINAL_CONFIG_HELP = "With a single-file --model of a non-standard architecture: its original (ldm) YAML."
DTYPE_HELP = ("auto: fp32 on every device, as the official evaluations (fp16/bf16: faster, slightly different "
              "masks; bf16 is fast on CPUs with AVX512-BF16 or AMX).")
WORKERS_HELP = ("Writer processes (CRF, PNGs). Default: sized from the measured model and writing rates, "
                "1 to cores - 1. N: exactly N. 0: in this process.")

# The model options every loading command shares, in one "Model" panel of --help.
MODEL_PANEL = "Model"
REVISION_OPTION = typer.Option(None, help="Model revision (hub ids only).", rich_help_panel=MODEL_PANEL)
CONFIG_OPTION = typer.Option(None, help=CONFIG_HELP, rich_help_panel=MODEL_PANEL)
ORIGINAL_CONFIG_OPTION = typer.Option(None, help=ORIGINAL_CONFIG_HELP, rich_help_panel=MODEL_PANEL)
DEVICE_OPTION = typer.Option("auto", help=DEVICE_HELP, rich_help_panel=MODEL_PANEL)
DTYPE_OPTION = typer.Option(Dtype.auto, help=DTYPE_HELP, rich_help_panel=MODEL_PANEL)


def quiet_libraries() -> None:
    """Library chatter (loading bars, advisory notices) would bury our own messages."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import diffusers
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()


def parse_shard(shard: str | None) -> tuple[int, int] | None:
    """``--shard I/N`` (0-based I) as (I, N); None when not given."""
    if not shard:
        return None
    try:
        i, n = (int(x) for x in shard.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {shard!r}: use I/N, e.g. 0/4") from None
    if not (n >= 1 and 0 <= i < n):
        raise ConfigError(f"--shard {shard}: need 0 <= I < N")
    return i, n


def finish_run(summary, unit: str, main: bool = True, details: tuple[str, ...] = ()) -> None:
    """The end of every batch command (generate, refer, slime segment, fewshot evaluate):
    the summary (main process only), then the exit code: 3 when a record (run.json,
    metrics.json) could not be written, 1 when some items failed, else return (0)."""
    if not main:
        if summary.failed:
            raise typer.Exit(EXIT_FAILED_ITEMS)
        return
    done = details[0] if details else f"{summary.done} {unit}(s) written"
    log.info(f"done: {done}, {summary.skipped} already complete, {summary.failed} failed; {summary.seconds:.1f} s")
    if summary.redone_changed:
        keys = summary.redone_changed
        log.info(f"redone because the input changed: {len(keys)} ({', '.join(keys[:10])}{' ...' if len(keys) > 10 else ''})")
    for line in details[1:]:
        log.info(line)
    for e in summary.errors:
        log.error(f"{e}; the outputs are written and the folder can be resumed")
    if summary.failed:
        log.error(f"{summary.failed} {unit}(s) failed; see {summary.failures_file}")
        for f in summary.failures[:5]:
            log.info(f"  {f['id']} [{f['stage']}]: {f['error']}")
    if summary.errors:
        raise typer.Exit(EXIT_CRASHED)
    if summary.failed:
        raise typer.Exit(EXIT_FAILED_ITEMS)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"text2mask {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: int = typer.Option(0, "--verbose", "-v", count=True,
                                help="Debug messages, and the traceback of a crash."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors; no progress bars."),
    version: Optional[bool] = typer.Option(None, "--version", callback=_version, is_eager=True,
                                           help="Print the version and exit."),
) -> None:
    from ..log import setup

    setup(-1 if quiet else verbose)
