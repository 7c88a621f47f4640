"""Least-squares clustering of real numbers (1-D k-means): the C step of adaptive quantization.

Given values x_1..x_n and k, find centroids c_1 <= ... <= c_k minimising sum_i min_j (x_i - c_j)^2.
In one dimension an optimal clustering cuts the sorted values into k contiguous runs, so the
exact optimum is a dynamic programme over the sorted values (Wang and Song's Ckmeans.1d.dp):

    D(m, j) = min_{i <= j} D(m - 1, i - 1) + SSE(x_i..x_j),

SSE of a run from prefix sums in O(1). The best cut i*(m, j) never decreases with j (the cost is
a Monge array), so each row of the programme is solved by divide and conquer over j with the
search range of i narrowed by the neighbours' cuts: O(n log n) per row, O(k n log n) in all,
here vectorised level by level with numpy. Memory is k n cut indices, so `exact_fits(n, k)`
bounds k n; beyond it, Lloyd's iterations refine a start (the previous C step's codebook, or the
exact solution on evenly spaced order statistics of the values), never increasing the error.
"""

from __future__ import annotations

import numpy as np

EXACT_LIMIT = 2**21
"""Largest k * n solved exactly: about a second on one core at the limit (the cut table takes
4 k n bytes); every layer of the zoo's CNNs is solved exactly at k <= 16."""

LLOYD_ITERATIONS = 100


def exact_fits(n: int, k: int) -> bool:
    """Whether `kmeans_1d` solves n values with k centroids exactly (by dynamic programming)."""
    return n * k <= EXACT_LIMIT


def kmeans_1d(
    values: np.ndarray, k: int, start: np.ndarray | None = None, exact: bool | None = None
) -> np.ndarray:
    """k centroids (float64, increasing) of `values` minimising the squared error to the nearest
    centroid. `exact` (default: `exact_fits`) chooses the dynamic programme; otherwise Lloyd's
    iterations run from `start` (k values) or from the exact solution on evenly spaced order
    statistics. Fewer distinct values than k: each value is a centroid, the last one repeated."""
    x = np.sort(np.asarray(values, dtype=np.float64).reshape(-1))
    if k < 1 or x.size == 0:
        raise ValueError(f"need k >= 1 and at least one value, got k={k}, {x.size} values")
    distinct = np.unique(x)
    if distinct.size <= k:
        return np.concatenate([distinct, np.full(k - distinct.size, distinct[-1])])
    if exact if exact is not None else exact_fits(x.size, k):
        return _exact(x, k)
    if start is None:
        count = min(x.size, max(k, EXACT_LIMIT // k))
        sample = x[np.linspace(0, x.size - 1, count).round().astype(np.int64)]
        start = kmeans_1d(sample, k, exact=True)
    return lloyd_1d(x, np.asarray(start, dtype=np.float64))


def squared_error(values: np.ndarray, centroids: np.ndarray) -> float:
    """sum_i min_j (x_i - c_j)^2, in float64."""
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    c = np.sort(np.asarray(centroids, dtype=np.float64))
    return float(((x - c[nearest(x, c)]) ** 2).sum())


def nearest(values: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest of the increasing `centroids` for each value (ties: the lower)."""
    boundaries = (centroids[:-1] + centroids[1:]) / 2
    return np.searchsorted(boundaries, values, side="left")


def lloyd_1d(sorted_values: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Lloyd's iterations from `centroids` on increasing `sorted_values`: assign each value to its
    nearest centroid, move each centroid to the mean of its values (an empty one stays), until
    nothing moves. Each iteration never increases the squared error."""
    x = sorted_values
    prefix = np.concatenate([[0.0], np.cumsum(x)])
    c = np.sort(centroids)
    for _ in range(LLOYD_ITERATIONS):
        cuts = np.searchsorted(x, (c[:-1] + c[1:]) / 2, side="right")
        edges = np.concatenate([[0], cuts, [x.size]])
        counts = np.diff(edges)
        sums = prefix[edges[1:]] - prefix[edges[:-1]]
        moved = np.where(counts > 0, sums / np.maximum(counts, 1), c)
        if np.array_equal(moved, c):
            break
        c = np.sort(moved)
    return c


def _exact(x: np.ndarray, k: int) -> np.ndarray:
    """The optimal centroids of increasing `x` (more than k distinct values) by the dynamic
    programme in the module docstring."""
    n = x.size
    centred = x - x.mean()  # smaller prefix sums, less cancellation in SSE = S2 - S1^2 / count
    s1 = np.concatenate([[0.0], np.cumsum(centred)])
    s2 = np.concatenate([[0.0], np.cumsum(centred**2)])

    def sse(i: np.ndarray, j: np.ndarray) -> np.ndarray:
        total = s1[j + 1] - s1[i]
        return np.maximum(s2[j + 1] - s2[i] - total**2 / (j - i + 1), 0.0)

    last = np.arange(n)
    cost = sse(np.zeros(n, dtype=np.int64), last)
    cuts = np.zeros((k, n), dtype=np.int32)
    for m in range(1, k):
        cost, cuts[m] = _row(cost, sse, m, n)
    centroids = np.empty(k)
    j = n - 1
    for m in range(k - 1, -1, -1):
        i = int(cuts[m, j]) if m > 0 else 0
        centroids[m] = x[i : j + 1].mean()
        j = i - 1
    return centroids


def _row(previous: np.ndarray, sse, m: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Row m (m + 1 clusters) of the programme: D(j) = min_{m <= i <= j} previous(i - 1) +
    SSE(i..j) for j >= m, and its leftmost best i, by divide and conquer over j, every task of a
    recursion level at once."""
    cost = np.full(n, np.inf)
    best = np.zeros(n, dtype=np.int32)
    # tasks: fill j in [j_lo, j_hi] knowing the best i lies in [i_lo, i_hi]
    j_lo, j_hi = np.array([m]), np.array([n - 1])
    i_lo, i_hi = np.array([m]), np.array([n - 1])
    while j_lo.size:
        mid = (j_lo + j_hi) // 2
        top = np.minimum(mid, i_hi)
        lengths = top - i_lo + 1
        starts = np.cumsum(lengths) - lengths
        task = np.repeat(np.arange(mid.size), lengths)
        i = np.arange(lengths.sum()) - starts[task] + i_lo[task]
        values = previous[i - 1] + sse(i, mid[task])
        least = np.minimum.reduceat(values, starts)
        first = np.where(values <= least[task], i, n)
        chosen = np.minimum.reduceat(first, starts)
        cost[mid], best[mid] = least, chosen
        left, right = mid > j_lo, mid < j_hi
        j_lo, j_hi, i_lo, i_hi = (
            np.concatenate([j_lo[left], mid[right] + 1]),
            np.concatenate([mid[left] - 1, j_hi[right]]),
            np.concatenate([i_lo[left], chosen[right]]),
            np.concatenate([chosen[left], i_hi[right]]),
        )
    return cost, best
