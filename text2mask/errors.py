"""Error types every method shares, and the exit codes the CLI maps them to.

    0    finished; every item written
    1    finished, but some items failed (each one recorded in the run's failure log),
         or a training diverged (non-finite loss or parameter; nothing NaN is written)
    2    configuration error: bad option, input file, model or output folder, found
         before any work (or the run folder belongs to another configuration)
    3    crashed: an unexpected error stopped the run (the folder can be resumed)
    130  interrupted (Ctrl-C / SIGINT; the folder can be resumed)
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED_ITEMS = 1
EXIT_CONFIG = 2
EXIT_CRASHED = 3
EXIT_INTERRUPTED = 130


class ConfigError(ValueError):
    """A configuration problem found before any work: the CLI prints it and exits 2."""


class InputError(ConfigError):
    """A problem with one input file; the message names the file and the cause."""


class DatasetError(ConfigError):
    """A dataset configuration problem found before any image is processed."""


class ModelLoadError(ConfigError):
    """The model could not be loaded, or is not a layout a method supports."""


class ConfigMismatch(ConfigError):
    """The output folder holds results of another configuration."""


class TrainingDiverged(RuntimeError):
    """A training step gave a non-finite loss or parameter: the CLI prints it and exits 1,
    and nothing trained is written (the last good checkpoint stays)."""
