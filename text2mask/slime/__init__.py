"""SLiMe (ICLR 2024): segment like one annotated example, with Stable Diffusion attention.

Stage map (``../shared/design/SLIME.md`` sections in brackets; user docs: docs/slime.md):

    examples.py   annotated photos in, checked (mask size, values, every class present);
                  the --train-dir / --val-dir pairing rule
    presets.py    the official dataset settings (pascal-part, celeba)
    augment.py    flip, blur, crop, resize, rotate of a training pair (OpenCV)    [2]
    diffusion.py  prompt rows, VAE posterior sample, forward noising              [1]
    maps.py       cross maps (training: K-way logits; test: 77-way probs), WAS    [1, 2]
    losses.py     weighted CE, K x WAS-MSE, guided SD loss                        [2]
    fit.py        the optimisation of the part rows (Adam, epochs, selection,
                  resumable checkpoint)                                           [2, 4]
    segment.py    tiles, class threshold, affine rescale, merge, labels           [3]
    artifact.py   the parts file (safetensors + JSON), import of official folders [8]
    predictor.py  ``Slime.fit`` / ``Slime.load(path, sd)(image)``
    run.py        batch segmentation through the shared engine (``text2mask.runs``)
    pictures.py   photo | WAS maps | labels
"""
from .fit import FitSettings
from .predictor import Slime, SlimeResult
from .segment import SegmentSettings

__all__ = ["FitSettings", "SegmentSettings", "Slime", "SlimeResult"]
