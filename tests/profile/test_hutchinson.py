"""Hutchinson trace and diagonal estimates against exact values."""

import pytest
import torch
import torch.nn.functional as F
from hessians import pairs
from torch import Tensor, nn

from allot.exceptions import ConfigError
from allot.profile.hutchinson import hutchinson, hutchinson_blocks, probewise
from allot.profile.hvp import Curvature
from allot.profile.lanczos import Krylov, Lanczos


def symmetric(n: int, seed: int) -> Tensor:
    a = torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return a + a.T + 2 * n * torch.eye(n, dtype=torch.float64)


def matrix_matvec(a: Tensor, shape: tuple[int, ...]):
    return lambda z: (a @ z.flatten()).view(shape)


def test_trace_is_within_three_standard_errors_and_the_rule_stops_it() -> None:
    a = symmetric(30, seed=1)
    estimate = hutchinson(
        matrix_matvec(a, (5, 6)), (5, 6), 4, 500, 0.01, torch.Generator().manual_seed(0)
    )
    assert estimate.converged
    assert 4 <= estimate.probes < 500
    assert estimate.trace_stderr <= 0.01 * abs(estimate.trace)
    assert abs(estimate.trace - float(a.trace())) <= 3 * estimate.trace_stderr


def test_diagonal_is_close_with_honest_standard_errors() -> None:
    a = symmetric(20, seed=2)
    estimate = hutchinson(
        matrix_matvec(a, (20,)), (20,), 2000, 2000, 0.0, torch.Generator().manual_seed(0)
    )
    assert estimate.probes == 2000 and not estimate.converged
    # Var(z_j (A z)_j) = sum over k != j of A_jk^2 for Rademacher z.
    off_diagonal = (a.pow(2).sum(1) - a.diagonal().pow(2)).sqrt() / 2000**0.5
    torch.testing.assert_close(estimate.diagonal_stderr, off_diagonal, rtol=0.1, atol=0)
    assert ((estimate.diagonal - a.diagonal()).abs() <= 4.5 * estimate.diagonal_stderr).all()
    assert estimate.diagonal.shape == (20,)


def test_a_diagonal_operator_is_exact_after_the_minimum_probes() -> None:
    d = torch.linspace(-1, 3, 12, dtype=torch.float64).view(3, 4)
    estimate = hutchinson(lambda z: d * z, (3, 4), 3, 100, 1e-9, torch.Generator().manual_seed(0))
    assert estimate.probes == 3 and estimate.converged
    assert estimate.trace == pytest.approx(float(d.sum()), rel=1e-12)
    torch.testing.assert_close(estimate.diagonal, d)
    assert estimate.trace_stderr == pytest.approx(0.0, abs=1e-12)


def test_the_same_seed_gives_the_same_estimate() -> None:
    a = symmetric(10, seed=3)
    runs = [
        hutchinson(matrix_matvec(a, (10,)), (10,), 5, 50, 0.02, torch.Generator().manual_seed(7))
        for _ in range(2)
    ]
    assert runs[0].trace == runs[1].trace and runs[0].probes == runs[1].probes
    assert torch.equal(runs[0].diagonal, runs[1].diagonal)
    other = hutchinson(
        matrix_matvec(a, (10,)), (10,), 5, 50, 0.02, torch.Generator().manual_seed(8)
    )
    assert other.trace != runs[0].trace


def test_trace_of_a_layer_hessian_through_hvps() -> None:
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    batches = [(torch.randn(n, 4, dtype=torch.float64), torch.randint(0, 3, (n,))) for n in (6, 4)]
    curvature = Curvature(model, ["0", "2"], pairs(batches))
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])

    def loss(w: Tensor) -> Tensor:
        return F.cross_entropy(model[2](torch.tanh(F.linear(x, w, model[0].bias))), y)

    hessian = torch.autograd.functional.hessian(loss, model[0].weight.detach()).view(20, 20)
    estimate = hutchinson(
        lambda z: curvature.layer_hvp("0", z), (5, 4), 8, 64, 0.05, torch.Generator().manual_seed(0)
    )
    assert abs(estimate.trace - float(hessian.trace())) <= 3 * estimate.trace_stderr
    assert curvature.passes.fb_equivalents == 2 * estimate.probes


@pytest.mark.parametrize(
    ("probes_min", "probes_max", "rel_tol"), [(1, 10, 0.1), (5, 4, 0.1), (2, 4, -1)]
)
def test_bad_settings_are_rejected(probes_min: int, probes_max: int, rel_tol: float) -> None:
    with pytest.raises(ConfigError):
        hutchinson(lambda z: z, (3,), probes_min, probes_max, rel_tol)


BLOCKS = {"a": (2, 3), "b": (4,), "c": (2, 2, 2)}


def coupled(seed: int) -> Tensor:
    """A symmetric matrix over the blocks of BLOCKS whose off-diagonal blocks are three times as
    strong as the diagonal ones, shifted to keep every block's trace well away from zero."""
    n = sum(torch.Size(shape).numel() for shape in BLOCKS.values())
    r = torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    within = torch.block_diag(
        *(torch.ones(torch.Size(s).numel(), torch.Size(s).numel()) for s in BLOCKS.values())
    )
    scale = within + 3 * (1 - within.double())
    return (r + r.T) * scale + n * torch.eye(n, dtype=torch.float64)


def block_matvec(a: Tensor, shapes: dict[str, tuple[int, ...]]):
    sizes = [torch.Size(shape).numel() for shape in shapes.values()]

    def matvec(z: dict[str, Tensor]) -> dict[str, Tensor]:
        product = a @ torch.cat([z[name].flatten() for name in shapes])
        parts = product.split(sizes)
        return {name: p.view(shape) for (name, shape), p in zip(shapes.items(), parts, strict=True)}

    return matvec


def block_slices(shapes: dict[str, tuple[int, ...]]) -> dict[str, slice]:
    slices, start = {}, 0
    for name, shape in shapes.items():
        size = torch.Size(shape).numel()
        slices[name] = slice(start, start + size)
        start += size
    return slices


def test_coupled_blocks_have_unbiased_traces_and_diagonals() -> None:
    a = coupled(seed=4)
    slices = block_slices(BLOCKS)
    off_diagonal = a - torch.diag(a.diagonal())
    for rows in slices.values():  # most of every row's off-diagonal weight couples other blocks
        assert off_diagonal[rows].norm() ** 2 > 10 * off_diagonal[rows, rows].norm() ** 2
    estimates = hutchinson_blocks(
        probewise(block_matvec(a, BLOCKS)),
        BLOCKS,
        2000,
        2000,
        0.0,
        torch.Generator().manual_seed(0),
    )
    assert list(estimates) == list(BLOCKS)
    for name, shape in BLOCKS.items():
        block = a[slices[name], slices[name]]
        estimate = estimates[name]
        assert estimate.probes == 2000 and not estimate.converged
        assert estimate.diagonal.shape == shape
        assert abs(estimate.trace - float(block.trace())) <= 3 * estimate.trace_stderr
        diagonal = block.diagonal().view(shape)
        assert ((estimate.diagonal - diagonal).abs() <= 4.5 * estimate.diagonal_stderr).all()
        # The spread of z_j (A z)_j comes from the whole row of A, other blocks included.
        rows = a[slices[name]]
        row_spread = (rows.pow(2).sum(1) - rows[:, slices[name]].diagonal().pow(2)).sqrt()
        torch.testing.assert_close(
            estimate.diagonal_stderr, row_spread.view(shape) / 2000**0.5, rtol=0.1, atol=0
        )


def test_blocks_use_independent_probes_in_key_order() -> None:
    a = coupled(seed=5)
    estimates = hutchinson_blocks(
        probewise(block_matvec(a, BLOCKS)), BLOCKS, 40, 40, 0.0, torch.Generator().manual_seed(3)
    )
    generator = torch.Generator().manual_seed(3)
    draws = [
        {
            n: torch.randint(0, 2, s, generator=generator, dtype=torch.float64) * 2 - 1
            for n, s in BLOCKS.items()
        }
        for _ in range(40)
    ]
    products = [block_matvec(a, BLOCKS)(z) for z in draws]
    for name in BLOCKS:
        samples = torch.stack([z[name] * p[name] for z, p in zip(draws, products, strict=True)])
        traces = samples.flatten(1).sum(1)
        assert estimates[name].trace == pytest.approx(float(traces.mean()), rel=1e-12)
        assert estimates[name].trace_stderr == pytest.approx(
            float(traces.std() / 40**0.5), rel=1e-9
        )
        torch.testing.assert_close(
            estimates[name].diagonal, samples.mean(0), rtol=1e-12, atol=1e-12
        )


def test_the_stopping_rule_waits_for_the_slowest_block() -> None:
    shapes = {"exact": (3, 4), "noisy": (20,)}
    d = torch.linspace(1, 3, 12, dtype=torch.float64).view(3, 4)
    a = symmetric(20, seed=6)

    def matvec(z: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"exact": d * z["exact"], "noisy": a @ z["noisy"]}

    slow = hutchinson_blocks(
        probewise(matvec), shapes, 3, 1000, 0.005, torch.Generator().manual_seed(0)
    )
    assert 3 < slow["noisy"].probes < 1000  # the exact block alone would stop at 3
    assert slow["exact"].probes == slow["noisy"].probes
    assert slow["exact"].converged and slow["noisy"].converged
    assert slow["noisy"].trace_stderr <= 0.005 * abs(slow["noisy"].trace)

    cut = hutchinson_blocks(
        probewise(matvec), shapes, 3, 5, 0.005, torch.Generator().manual_seed(0)
    )
    assert cut["exact"].probes == cut["noisy"].probes == 5
    assert cut["exact"].converged and not cut["noisy"].converged
    assert cut["exact"].trace == pytest.approx(float(d.sum()), rel=1e-12)


@pytest.mark.parametrize(("probes_min", "rel_tol"), [(5, 0.02), (50, 0.0)])
def test_one_block_gives_the_single_operator_estimate(probes_min: int, rel_tol: float) -> None:
    a = symmetric(10, seed=3)
    single = hutchinson(
        matrix_matvec(a, (2, 5)), (2, 5), probes_min, 50, rel_tol, torch.Generator().manual_seed(7)
    )
    blocks = hutchinson_blocks(
        probewise(lambda z: {"w": matrix_matvec(a, (2, 5))(z["w"])}),
        {"w": (2, 5)},
        probes_min,
        50,
        rel_tol,
        torch.Generator().manual_seed(7),
    )
    block = blocks["w"]
    assert (block.trace, block.trace_stderr, block.probes, block.converged) == (
        single.trace,
        single.trace_stderr,
        single.probes,
        single.converged,
    )
    assert torch.equal(block.diagonal, single.diagonal)
    assert torch.equal(block.diagonal_stderr, single.diagonal_stderr)


def test_blocks_reject_no_blocks_and_missing_products() -> None:
    with pytest.raises(ConfigError, match="no blocks"):
        hutchinson_blocks(probewise(lambda z: z), {})
    with pytest.raises(ConfigError, match="'b'"):
        hutchinson_blocks(probewise(lambda z: {"a": z["a"]}), {"a": (2,), "b": (3,)})


def krylov_of(a: Tensor, iterations: int, seed: int) -> Krylov:
    run = Lanczos(a.shape[0], iterations, torch.Generator().manual_seed(seed))
    while not run.done:
        run.update(a @ run.query())
    return run.krylov()


def outliers(n: int, seed: int) -> Tensor:
    """A symmetric matrix whose spectrum is a few large outliers over a small bulk, like a
    classifier's Hessian."""
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=generator))
    values = torch.rand(n, dtype=torch.float64, generator=generator) * 0.2
    values[:3] = torch.tensor([40.0, 25.0, 15.0])
    return q @ torch.diag(values) @ q.T


def test_deflation_by_a_krylov_space_is_unbiased_and_cuts_the_error() -> None:
    shapes = {"a": (6, 5)}
    a = outliers(30, seed=3)
    plain, deflated = (
        hutchinson_blocks(
            probewise(block_matvec(a, shapes)),
            shapes,
            400,
            400,
            0.0,
            torch.Generator().manual_seed(1),
            deflation={"a": krylov_of(a, 6, seed=0)} if deflate else None,
        )["a"]
        for deflate in (False, True)
    )
    for estimate in (plain, deflated):
        assert abs(estimate.trace - float(a.trace())) <= 3 * estimate.trace_stderr
        error = (estimate.diagonal.flatten() - a.diagonal()).abs()
        assert (error <= 4.5 * estimate.diagonal_stderr.flatten()).all()
    assert deflated.trace_stderr < plain.trace_stderr / 10
    assert deflated.diagonal_stderr.mean() < plain.diagonal_stderr.mean() / 3


def test_a_krylov_space_spanning_the_block_makes_it_exact() -> None:
    shapes = {"a": (2, 3), "b": (4,)}
    a = coupled(seed=5)[:10, :10]
    exact_block = a[:6, :6]
    estimates = hutchinson_blocks(
        probewise(block_matvec(a, shapes)),
        shapes,
        50,
        50,
        0.0,
        torch.Generator().manual_seed(0),
        deflation={"a": krylov_of(exact_block, 6, seed=0)},
    )
    assert estimates["a"].trace == pytest.approx(float(exact_block.trace()), rel=1e-10)
    assert estimates["a"].trace_stderr == pytest.approx(0.0, abs=1e-9)
    # the diagonal still sees the coupling to the undeflated block b, which averages out
    error = (estimates["a"].diagonal.flatten() - exact_block.diagonal()).abs()
    assert (error <= 4.5 * estimates["a"].diagonal_stderr.flatten()).all()
    assert estimates["b"].trace_stderr > 0  # undeflated blocks are estimated as before


def test_a_deflation_basis_of_the_wrong_size_is_rejected() -> None:
    with pytest.raises(ConfigError, match="deflation basis"):
        hutchinson_blocks(
            probewise(lambda z: z),
            {"a": (3,)},
            2,
            2,
            0.0,
            deflation={"a": krylov_of(torch.eye(4, dtype=torch.float64), 2, 0)},
        )


@pytest.mark.parametrize(("probes_min", "rel_tol", "round_max"), [(3, 0.005, None), (4, 0.01, 2)])
def test_rounds_of_probes_give_the_one_at_a_time_estimate(
    probes_min: int, rel_tol: float, round_max: int | None
) -> None:
    """Rounds only group the matvecs: the estimate, its errors and the probe count are those of
    probes taken one at a time, and no round is larger than asked."""
    shapes = {"exact": (3, 4), "noisy": (20,)}
    d = torch.linspace(1, 3, 12, dtype=torch.float64).view(3, 4)
    a = symmetric(20, seed=6)
    rounds: list[int] = []

    def matvec(z: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"exact": d * z["exact"], "noisy": a @ z["noisy"]}

    def one_at_a_time(probes: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
        assert len(probes) == 1
        return [matvec(probes[0])]

    def grouped(probes: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
        rounds.append(len(probes))
        return [matvec(z) for z in probes]

    reference, batched = (
        hutchinson_blocks(
            f, shapes, probes_min, 1000, rel_tol, torch.Generator().manual_seed(0), round_max=r
        )
        for f, r in ((one_at_a_time, 1), (grouped, round_max))
    )
    assert rounds[0] == min(probes_min, round_max or probes_min)
    assert 1 < len(rounds) < reference["noisy"].probes  # rounds, fewer than probes
    assert round_max is None or max(rounds) <= round_max
    assert sum(rounds) >= batched["noisy"].probes
    for name in shapes:
        one, many = reference[name], batched[name]
        assert (many.trace, many.trace_stderr, many.probes, many.converged) == (
            one.trace,
            one.trace_stderr,
            one.probes,
            one.converged,
        )
        assert torch.equal(many.diagonal, one.diagonal)
