"""Stage 4 — segments of the object area by normalized cuts (Shi & Malik).

    W = ½ (Self + Selfᵀ) restricted to the cells of the object area F
    D = diag(W·1)
    (D − W) v = λ D v   solved as   (I − D^-½ W D^-½) u = λ u,   v = D^-½ u
    cell embedding = (v₂, …, v_K);  k-means (k-means++, restarts, seeded) → K segments

Segments are labelled 1..K in the raster order of their centroids (0 = outside F).
K = 1 makes F one segment; when F has fewer than K cells the whole grid is clustered.

K when nobody says it (``eigengap_segments``, ours; von Luxburg's rule for normalized
spectral clustering): with λ₁ ≤ λ₂ ≤ … the eigenvalues of I − D^-½ W D^-½ on F,
K = the k in [k_min, k_max] with the largest gap λ_{k+1} − λ_k (ties: the smaller k).
Pure numpy (float64); nothing here knows about the model.
"""
from __future__ import annotations

import numpy as np

KMEANS_RESTARTS = 10
KMEANS_ITERATIONS = 300
MAX_AUTO_SEGMENTS = 8      # eigengap search bound (Mug19 scenes hold 3-5 items)


def _eigh(affinity: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ascending eigenvalues λ, eigenvectors u of I − D^-½ W D^-½, D^-½)."""
    w = np.asarray(affinity, dtype=np.float64)
    d = w.sum(axis=1)
    if (d <= 0).any():
        raise ValueError("normalized cut needs every cell to have a positive degree")
    d_inv_sqrt = 1.0 / np.sqrt(d)
    laplacian = np.eye(len(w)) - d_inv_sqrt[:, None] * w * d_inv_sqrt[None, :]
    lam, u = np.linalg.eigh(laplacian)
    return lam, u, d_inv_sqrt


def spectral_embedding(affinity: np.ndarray, k: int) -> np.ndarray:
    """(n, k − 1) embedding v₂…v_K of the generalized problem (D − W) v = λ D v for a
    symmetric non-negative affinity W (n, n) with positive degrees."""
    _, u, d_inv_sqrt = _eigh(affinity)
    return (d_inv_sqrt[:, None] * u)[:, 1:k]


def eigengap(affinity: np.ndarray, k_min: int, k_max: int = MAX_AUTO_SEGMENTS) -> int:
    """K in [k_min, k_max] (k_max capped at n − 1) with the largest λ_{K+1} − λ_K of the
    normalized Laplacian of W; k_min when the range is empty."""
    lam, _, _ = _eigh(affinity)
    k_max = min(k_max, len(lam) - 1)
    if k_max <= k_min:
        return k_min
    ks = np.arange(k_min, k_max + 1)
    gaps = lam[ks] - lam[ks - 1]            # λ_{k+1} − λ_k with 1-based λ
    return int(ks[int(np.argmax(gaps))])    # argmax: the first (smallest k) among ties


def _area_cells(area: np.ndarray, k: int) -> np.ndarray:
    cells = np.flatnonzero(np.asarray(area, dtype=bool).ravel())
    return cells if len(cells) >= k else np.arange(area.size)   # F too small: the whole grid


def eigengap_segments(self_attn: np.ndarray, area: np.ndarray, k_min: int, k_max: int = MAX_AUTO_SEGMENTS) -> int:
    """K for ``segment`` chosen from the attention: ``eigengap`` of ½(Self + Selfᵀ) on F."""
    cells = _area_cells(area, k_min)
    s = np.asarray(self_attn, dtype=np.float64)[np.ix_(cells, cells)]
    return eigengap(0.5 * (s + s.T), k_min, k_max)


def _kmeans_pp_init(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    centers = [x[rng.integers(len(x))]]
    for _ in range(1, k):
        d2 = ((x[:, None, :] - np.asarray(centers)[None]) ** 2).sum(-1).min(axis=1)
        total = d2.sum()
        # All points on existing centres: any point is as good as another.
        p = d2 / total if total > 0 else np.full(len(x), 1.0 / len(x))
        centers.append(x[rng.choice(len(x), p=p)])
    return np.asarray(centers)


def _lloyd(x: np.ndarray, centers: np.ndarray, iterations: int) -> tuple[np.ndarray, float]:
    labels = np.zeros(len(x), dtype=np.int64)
    for it in range(iterations):
        d2 = ((x[:, None, :] - centers[None]) ** 2).sum(-1)
        new = d2.argmin(axis=1)
        if it > 0 and np.array_equal(new, labels):
            break
        labels = new
        for j in range(len(centers)):
            members = x[labels == j]
            if len(members):
                centers[j] = members.mean(axis=0)
            else:  # an emptied cluster takes the point farthest from its centre
                far = int(d2[np.arange(len(x)), labels].argmax())
                centers[j] = x[far]
                labels[far] = j
    d2 = ((x[:, None, :] - centers[None]) ** 2).sum(-1)
    labels = d2.argmin(axis=1)
    return labels, float(d2[np.arange(len(x)), labels].sum())


def kmeans(x: np.ndarray, k: int, seed: int, restarts: int = KMEANS_RESTARTS,
           iterations: int = KMEANS_ITERATIONS) -> np.ndarray:
    """Labels 0..k−1 of the lowest-inertia run among ``restarts`` k-means++ starts."""
    x = np.asarray(x, dtype=np.float64)
    rng = np.random.default_rng(seed)
    best, best_inertia = None, np.inf
    for _ in range(restarts):
        labels, inertia = _lloyd(x, _kmeans_pp_init(x, k, rng), iterations)
        if inertia < best_inertia:
            best, best_inertia = labels, inertia
    return best


def raster_order(labels: np.ndarray, cells: np.ndarray, width: int, k: int) -> np.ndarray:
    """Relabel clusters 1..k by the raster order (row, then column) of the grid cell
    that holds each cluster's centroid; ties by the exact centroid (y, x)."""
    ys, xs = cells // width, cells % width
    keys = []
    for j in range(k):
        cy, cx = ys[labels == j].mean(), xs[labels == j].mean()
        keys.append((int(np.floor(cy + 0.5)), int(np.floor(cx + 0.5)), cy, cx, j))
    order = [key[-1] for key in sorted(keys)]
    lut = np.empty(k, dtype=np.int64)
    lut[order] = np.arange(1, k + 1)
    return lut[labels]


def segment(self_attn: np.ndarray, area: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Segments (h, w) int64 of the object area: 0 outside F, 1..K inside.

    self_attn: (N, N) row-stochastic Self (rows = queries) of an (h, w) grid, N = h·w;
    area: (h, w) bool object area F."""
    area = np.asarray(area, dtype=bool)
    h, w = area.shape
    if k < 1:
        raise ValueError(f"need at least one segment, got K = {k}")
    cells = _area_cells(area, k)
    out = np.zeros(h * w, dtype=np.int64)
    if k == 1:
        out[cells] = 1
        return out.reshape(h, w)
    s = np.asarray(self_attn, dtype=np.float64)[np.ix_(cells, cells)]
    embedding = spectral_embedding(0.5 * (s + s.T), k)
    labels = kmeans(embedding, k, seed)
    out[cells] = raster_order(labels, cells, w, k)
    return out.reshape(h, w)
