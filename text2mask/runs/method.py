"""What a method implements to be driven by the batch engine (see the package docstring)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Protocol, Sequence


class StageFailed(Exception):
    """Raised by ``prepare`` (``raise StageFailed("prompt") from e``) to name the stage an
    item failed at in the failure log; the cause's message is the one recorded."""

    def __init__(self, stage: str):
        super().__init__(stage)
        self.stage = stage


class Item(Protocol):
    id: str            # unique within the run; names the outputs and the record


class Method(Protocol):
    name: str                    # e.g. "wsss"; recorded in run.json
    unit: str                    # what an item is, for messages: "image"
    folders: tuple[str, ...]     # output folders this configuration writes
    all_folders: tuple[str, ...]  # every folder the method can write (others are set aside)
    marker: str                  # completion marker, written last, e.g. "masks/{id}.png"
    finish_stage: str            # stage name of writer failures in the failure log

    def fingerprint(self) -> dict:
        """Everything that changes the bytes of an output. One folder, one fingerprint."""

    def describe(self) -> dict:
        """Extra run.json sections (model, dataset, ...); paths absolute."""

    def inputs(self, item: Item) -> dict:
        """The item's own inputs as a small JSON-able record (labels, file digests).
        Compared on resume: a finished item whose inputs differ is redone."""

    def prepare(self, item: Item, inputs: dict) -> Any:
        """File I/O for one item: everything the model step and the writer need."""

    def batch_key(self, prepared: Any) -> Hashable:
        """Items with equal keys may share one model call (e.g. the padded size)."""

    def call_cost(self, prepared: Any) -> int:
        """Bytes the model step needs for this item; a model call is kept within the budget."""

    def model_step(self, batch: Sequence[Any]) -> list[Any]:
        """One result per prepared item, in order (torch, in process)."""

    def finish(self, prepared: Any, result: Any) -> Callable[[Path], object]:
        """A picklable callable that writes the item's outputs into the run folder, the
        marker last (runs in a writer process: numpy/PIL only)."""

    def tags(self, prepared: Any) -> Iterable[str]:
        """Labels counted in the summary for written items (e.g. "no_labels")."""

    def evaluate(self, out: Path, items: Sequence[Item], log: Callable[[str], None]) -> "Evaluation":
        """Metrics of the folder's outputs for ``items`` (those complete on disk)."""


class Evaluation:
    """What ``Method.evaluate`` hands back: metrics (written to metrics.json), the ids
    that could not be scored for lack of ground truth, and per-output errors (e.g. a
    ground truth of another size), each (what, message), recorded as failures."""

    def __init__(self, metrics: dict | None, no_gt: list[str] | None = None,
                 errors: list[tuple[str, str]] | None = None):
        self.metrics = metrics
        self.no_gt = list(no_gt or [])
        self.errors = list(errors or [])
