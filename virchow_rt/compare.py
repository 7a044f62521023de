"""Compare embeddings from two paths (a tested backend against the fp32 reference).

:func:`compare` returns a :class:`Comparison`: truthy when it passed, printable as the line a
user needs (the idea of Polygraphy's comparison results).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from virchow_rt.errors import InputError


@dataclass(frozen=True)
class Comparison:
    """Agreement of ``tested`` with ``reference`` over N embeddings."""

    n: int
    min_cosine: float
    mean_cosine: float
    p01_cosine: float
    max_abs: float
    rel_l2: float
    knn10_overlap: float
    tolerance: float
    all_finite: bool
    knn10_tolerance: float | None = None  # a 10-NN overlap gate too (int8); None: cosine alone

    @property
    def passed(self) -> bool:
        knn_ok = self.knn10_tolerance is None or self.knn10_overlap >= self.knn10_tolerance
        return self.all_finite and self.min_cosine >= self.tolerance and knn_ok

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}

    def __str__(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        finite = "" if self.all_finite else ", NON-FINITE values"
        return (
            f"{verdict}: min cosine {self.min_cosine:.6f} (tolerance {self.tolerance}), "
            f"mean {self.mean_cosine:.6f}, "
            f"max abs {self.max_abs:.3g}, rel L2 {self.rel_l2:.3g}, 10-NN overlap {self.knn10_overlap:.3f}"
            + (f" (tolerance {self.knn10_tolerance})" if self.knn10_tolerance is not None else "")
            + f" over {self.n} tiles{finite}"
        )


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching rows of two (N, E) arrays, computed in float64."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    denom = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    return np.einsum("ne,ne->n", a64, b64) / np.maximum(denom, 1e-30)


def knn_overlap(a: np.ndarray, b: np.ndarray, k: int = 10) -> float:
    """Mean overlap of each row's k nearest neighbours (cosine) under ``a`` and ``b``; 1.0: identical."""
    n = a.shape[0]
    k = min(k, n - 1)
    if k < 1:
        return 1.0

    def neighbours(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64)
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)
        sim = x @ x.T  # (N, N)
        np.fill_diagonal(sim, -np.inf)
        return np.argpartition(-sim, k - 1, axis=1)[:, :k]  # (N, k), unordered

    na, nb = neighbours(a), neighbours(b)
    return float(np.mean([len(np.intersect1d(ra, rb)) / k for ra, rb in zip(na, nb, strict=True)]))


def compare(
    tested: np.ndarray, reference: np.ndarray, tolerance: float, knn10_tolerance: float | None = None
) -> Comparison:
    """Compare two (N, E) embedding arrays; ``tolerance`` is the minimum cosine that passes, and
    ``knn10_tolerance`` (if given) the minimum 10-NN overlap."""
    if tested.shape != reference.shape or tested.ndim != 2:
        raise InputError(
            f"cannot compare embeddings of shapes {tested.shape} and {reference.shape}; expected equal (N, E)"
        )
    finite = bool(np.isfinite(tested).all())
    t = np.nan_to_num(tested.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    r = reference.astype(np.float64)
    cos = cosine_rows(t, r)
    return Comparison(
        n=int(t.shape[0]),
        min_cosine=float(cos.min()),
        mean_cosine=float(cos.mean()),
        p01_cosine=float(np.percentile(cos, 1)),
        max_abs=float(np.abs(t - r).max()),
        rel_l2=float(np.linalg.norm(t - r) / max(np.linalg.norm(r), 1e-30)),
        knn10_overlap=knn_overlap(t, r),
        tolerance=float(tolerance),
        all_finite=finite,
        knn10_tolerance=None if knn10_tolerance is None else float(knn10_tolerance),
    )
