"""The batch engine every method drives: resume, records, failures, workers, shards.

A method (WSSS pseudo masks, referring segmentation, SLiMe, few-shot) implements the
``Method`` protocol; ``run(method, items, opts)`` does the rest:

- **one configuration per folder**: ``run.lock`` holds the digest of
  ``method.fingerprint()`` (every option that changes an output's bytes); a process of
  another configuration is refused (exit 2) unless ``--overwrite``, and never while one
  of the other configuration is still writing;
- **resume**: an item is complete when its marker (``method.marker``, written last), its
  record ``records/<id>.json`` (configuration digest + ``method.inputs(item)``) and its
  current inputs agree; otherwise it is redone, and the summary says why;
- **producer -> model step -> writer pool**: ``prepare`` (file I/O), items bucketed by
  ``batch_key`` within ``batch_size`` and the memory budget (``call_cost``),
  ``model_step`` per batch (on an error retried item by item, so only the culprit fails),
  ``finish`` in spawned worker processes (a killed worker fails only its items);
- **records**: ``failures.jsonl`` (per shard: ``failures-shard<i>of<n>.jsonl``),
  ``status/<part>.json`` per job, ``run.json`` (the union status), ``metrics.json``
  (from ``method.evaluate``; set aside as stale when outputs change without it);
- **scale-out**: ``--shard I/N`` jobs and ``accelerate launch`` / ``torchrun``
  processes split the items by a hash of their id.

A method, in short::

    class Echo:                                  # copies each photo's first channel
        name, unit = "echo", "image"
        folders = all_folders = ("masks",)
        marker, finish_stage = "masks/{id}.png", "write"

        def fingerprint(self): return {"method": "echo", "version": 1}
        def describe(self): return {}
        def inputs(self, item): return {"photo_sha256": file_digest(item.image, "image file")}
        def prepare(self, item, inputs): return (item.id, read_image(item.image))
        def batch_key(self, prepared): return prepared[1].shape
        def call_cost(self, prepared): return prepared[1].nbytes
        def model_step(self, batch): return [rgb[..., 0] for _, rgb in batch]
        def finish(self, prepared, result): return partial(write_mask, prepared[0], result)
        def tags(self, prepared): return ()
        def evaluate(self, out, items, log): return Evaluation(None)

    def write_mask(key, labels, out):            # module level: it is pickled to a worker
        write_index_png(Path(out) / "masks" / f"{key}.png", labels)

    summary = run(Echo(), dataset.samples, RunOptions(out=Path("run")))

``finish`` must write the marker last; the engine removes a stale marker and writes the
record before calling it.
"""
from .engine import RunOptions, RunSummary, run, select, shard_of
from .method import Evaluation, Method, StageFailed

__all__ = ["Evaluation", "Method", "RunOptions", "RunSummary", "StageFailed", "run", "select", "shard_of"]
