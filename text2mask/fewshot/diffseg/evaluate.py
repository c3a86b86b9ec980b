"""``text2mask fewshot evaluate`` for a DiffSeg checkpoint: the few-shot evaluation method
of ``fewshot.evaluate`` (episodes, areas, masks, pictures, metrics, resume, shards)
driving DiffSeg's predictor; only the memory estimate of a model call differs."""
from __future__ import annotations

from pathlib import Path

from ..episodes import Manifest
from ..evaluate import DEFAULT_SCORE_AT, FewShotEvaluation, run_episodes
from .model import DiffSeg


class DiffSegEvaluation(FewShotEvaluation):
    def call_cost(self, p) -> int:
        # MoVQ at full resolution dominates, as the SD VAE does for DiffewS: k + 1 encodes
        # and one decode, each ~8 live fp32 tensors of 128 channels at R², plus the SCM
        # edge encoder's 32-channel maps at R².
        r = self.model.config.resolution
        return ((p.inputs.shots + 2) * 8 * 128 + 2 * 32) * r * r * 4


def evaluate(model: DiffSeg, manifest: Manifest, root: Path, opts, *, score_at: str = DEFAULT_SCORE_AT,
             visualize: int = 0, log=print, dist=None):
    """Score ``model`` on the manifest's episodes into ``opts.out`` (``text2mask.runs.run``)."""
    return run_episodes(lambda say: DiffSegEvaluation(model, manifest, root, score_at, visualize, say),
                        model.base.info.get("random_weights"), manifest, opts, log=log, dist=dist)
