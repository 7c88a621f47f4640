"""Seeded allocation instances and a brute-force reference for the allocator tests."""

from __future__ import annotations

import itertools

import numpy as np

from allot.allocate import Options

KINDS = ("int", "float", "huge", "duplicates")


def random_options(rng: np.random.Generator, kind: str) -> Options:
    """2-5 layers with 1-5 options each.

    int: small whole costs and damages (many ties); float: real costs, normal damages (some
    negative); huge: whole bit counts up to ~1e9 (layer size x bits + a few scale bits) with real
    damages; duplicates: whole costs, real damages, with repeated and dominated options.
    """
    sizes = rng.integers(1, 6, size=int(rng.integers(2, 6)))
    if kind == "int":
        costs = [rng.integers(0, 12, n) for n in sizes]
        damages = [rng.integers(-4, 9, n).astype(float) for n in sizes]
    elif kind == "float":
        costs = [rng.uniform(0, 10, n) for n in sizes]
        damages = [rng.normal(size=n) for n in sizes]
    elif kind == "huge":
        params = rng.integers(10**5, 10**8, len(sizes))
        costs = [
            rng.integers(1, 9, n) * p + rng.integers(0, 64, n)
            for n, p in zip(sizes, params, strict=True)
        ]
        damages = [rng.normal(size=n) for n in sizes]
    elif kind == "duplicates":
        costs, damages = [], []
        for n in sizes:
            cost = rng.integers(0, 6, n)
            damage = np.round(rng.normal(size=n), 1)
            j = int(rng.integers(n))
            costs.append(np.append(cost, [cost[j], cost[j] + 1]))
            damages.append(np.append(damage, [damage[j], damage[j]]))
    else:
        raise ValueError(kind)
    return Options(costs, damages)


def all_totals(options: Options) -> list[tuple[float, float]]:
    """(cost, damage) of every choice, in itertools.product order."""
    return [options.total(c) for c in itertools.product(*(range(n) for n in options.sizes))]


def budgets(totals: list[tuple[float, float]], which: int, count: int) -> list[float]:
    """Limits around the feasible range of total ``which`` (0: cost, 1: damage): exactly at some
    reachable totals, just above and below them, and beyond both ends."""
    values = sorted({t[which] for t in totals})
    picked = [values[i] for i in np.linspace(0, len(values) - 1, count).round().astype(int)]
    around = [v + d for v in picked for d in (0.0, -1e-9 * max(1.0, abs(v)), 1.0)]
    return [values[0] - 1.0, *around, values[-1] + 1.0]
