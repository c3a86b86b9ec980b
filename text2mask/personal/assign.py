"""Stages 5–6 — correlation of instance maps with segments, and the assignment.

    c[i, s] = mean of A_i over the cells of segment s
    bf: item i alone,  s_i = argmax_s c[i, s]            (ties: lowest s)
    af: all items of a photo jointly, max Σ_i c[i, s_i] with distinct s_i (Hungarian);
        queries beyond the number of segments keep their bf choice. ``assign_groups``:
        each scored query over its own group (the dataset run's --af-group).

Segments are numbered 1..K on the grid; arrays here index them 0..K−1.
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment


def correlation(instance_maps: np.ndarray, segments: np.ndarray, k: int) -> np.ndarray:
    """c (Q, K): mean of each map (Q, h, w) over each segment s = 1..K of ``segments``
    (h, w); an empty segment scores −inf so that it is never chosen."""
    maps = np.asarray(instance_maps, dtype=np.float64)
    c = np.full((maps.shape[0], k), -np.inf)
    for s in range(k):
        cells = segments == s + 1
        if cells.any():
            c[:, s] = maps[:, cells].mean(axis=1)
    return c


def best_first(c: np.ndarray) -> np.ndarray:
    """bf: argmax per row (np.argmax returns the lowest index among ties)."""
    return np.asarray(c).argmax(axis=1)


def assign_all(c: np.ndarray) -> np.ndarray:
    """af: Hungarian assignment maximising the summed correlation; rows left without a
    segment (more queries than segments) fall back to bf."""
    c = np.asarray(c, dtype=np.float64)
    out = best_first(c)
    ok = np.isfinite(c)
    if ok.any():
        # scipy refuses infinities: an empty segment costs more than any other choice could gain.
        lo, hi = c[ok].min(), c[ok].max()
        c = np.where(ok, c, lo - (hi - lo + 1.0) * len(c))
    else:
        c = np.zeros_like(c)
    rows, cols = linear_sum_assignment(c, maximize=True)
    out[rows] = cols
    return out


def assign_groups(c: np.ndarray, rows, groups) -> np.ndarray:
    """af of query ``rows[i]``: the Hungarian assignment over the rows of ``groups[i]``
    (query indices into ``c``, holding ``rows[i]``). A group of one is bf by construction."""
    c = np.asarray(c, dtype=np.float64)
    return np.array([assign_all(c[list(g)])[list(g).index(r)] for r, g in zip(rows, groups)], dtype=np.int64)
