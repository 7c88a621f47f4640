"""The Profile engine against exact float64 quantities, and its cache."""

import json

import numpy as np
import pytest
import torch
from hessians import blocks, exact, pairs, setup
from torch import nn

from allot.discover import discover
from allot.exceptions import ConfigError
from allot.profile.cache import Cache
from allot.profile.engine import Profile, Settings
from allot.profile.measure import loss_change


def make_profile(kind: str, cache: Cache | None = None, **settings) -> tuple[Profile, nn.Module]:
    model, names, batches = setup(kind)
    layers = [layer for layer in discover(model).layers if layer.name in names]
    profile = Profile(
        model,
        layers,
        pairs(batches),
        settings=Settings(**settings),
        cache=cache,
        progress=False,
    )
    return profile, model


def test_second_order_is_exact_and_skips_zero_changes() -> None:
    profile, model = make_profile("conv2d")
    gradient, hessian = exact(model, profile.names, profile.data.calibration)
    deltas = {
        name: [1e-2 * torch.randn_like(model.get_submodule(name).weight) for _ in range(2)]
        for name in profile.names
    }
    deltas[profile.names[1]].append(torch.zeros_like(model.get_submodule(profile.names[1]).weight))
    terms = profile.second_order(deltas)
    assert profile.curvature.passes.second_backward_sweeps == 4  # the zero change costs nothing
    for name, block in zip(profile.names, blocks(model, profile.names), strict=True):
        for delta, term in zip(deltas[name], terms[name], strict=True):
            d = delta.flatten()
            assert term.linear == pytest.approx(float(gradient[block] @ d), rel=1e-9, abs=1e-15)
            expected = 0.5 * float(d @ hessian[block, block] @ d)
            assert term.quadratic == pytest.approx(expected, rel=1e-6, abs=1e-15)
    assert terms[profile.names[1]][-1].total == 0.0
    # Changes asked for before are remembered one by one: a plan made of scored candidates, in
    # any grouping, costs nothing more, and only the new change is computed.
    first, second = profile.names
    new = 1e-2 * torch.randn_like(model.get_submodule(first).weight)
    again = profile.second_order({second: [deltas[second][1]], first: [deltas[first][0], new]})
    assert profile.curvature.passes.second_backward_sweeps == 4 + 1
    assert again[second][0] == terms[second][1] and again[first][0] == terms[first][0]


def test_second_order_predicts_the_measured_loss_change_of_small_perturbations() -> None:
    profile, model = make_profile("mlp")
    name = profile.names[0]
    delta = 1e-3 * torch.randn_like(model.get_submodule(name).weight)
    predicted = profile.second_order({name: [delta]})[name][0]
    measured = loss_change(model, {name: delta}, profile.data)
    # The error of a second-order expansion is third order: far below the quadratic term here.
    assert measured == pytest.approx(predicted.total, rel=1e-3)
    assert abs(measured - predicted.linear) > 10 * abs(measured - predicted.total)


def test_traces_from_deflated_shared_probes_are_within_three_standard_errors() -> None:
    profile, model = make_profile("conv1d", probes_min=200, probes_max=200, lanczos_iterations=3)
    _, hessian = exact(model, profile.names, profile.data.calibration)
    estimates = profile.hessian_estimates()
    # 3 lock-step Lanczos iterations (one second backward per layer each), then one round of
    # probes sharing a gradient sweep, one full second backward per probe
    passes = profile.curvature.passes
    assert (passes.gradient_sweeps, passes.second_backward_sweeps) == (3 + 1, 3 * 2 + 200)
    profile.eigenpairs()  # from the same Lanczos runs
    assert profile.curvature.passes.fb_equivalents == 3 + 1 + 3 * 2 + 200
    for name, block in zip(profile.names, blocks(model, profile.names), strict=True):
        exact_trace = float(hessian[block, block].trace())
        assert estimates[name].probes == 200
        assert abs(estimates[name].trace - exact_trace) <= 3 * estimates[name].trace_stderr


def test_lanczos_in_lock_step_finds_every_blocks_extreme_eigenvalues() -> None:
    profile, model = make_profile("mlp", lanczos_iterations=30, eigenpairs=2)
    _, hessian = exact(model, profile.names, profile.data.calibration)
    eigen = profile.eigenpairs()
    for name, block in zip(profile.names, blocks(model, profile.names), strict=True):
        eig = np.linalg.eigh(hessian[block, block].numpy())[0]
        expected = np.r_[eig[-2:][::-1], eig[:2][::-1]]
        np.testing.assert_allclose(eigen[name].values.numpy(), expected, atol=1e-6 * abs(eig).max())
        assert float(eigen[name].residuals.max()) <= 1e-6 * abs(eig).max()


def test_a_second_profile_loads_everything_from_the_cache(tmp_path) -> None:
    first, model = make_profile("conv2d", cache=Cache(tmp_path), probes_max=8)
    deltas = {first.names[0]: [torch.randn_like(model.get_submodule(first.names[0]).weight)]}
    results = [
        first.inputs(first.names[0]).input_cov,
        first.gradient(first.names[1]),
        first.hessian_estimates()[first.names[1]].trace,
        first.eigenpairs()[first.names[0]].values,
        first.second_order(deltas)[first.names[0]][0],
    ]
    second = Profile(
        model,
        first.layers,
        first.data,
        settings=first.settings,
        cache=Cache(tmp_path),
        progress=False,
    )
    again = [
        second.inputs(first.names[0]).input_cov,
        second.gradient(first.names[1]),
        second.hessian_estimates()[first.names[1]].trace,
        second.eigenpairs()[first.names[0]].values,
        second.second_order(deltas)[first.names[0]][0],
    ]
    assert second.curvature.passes.fb_equivalents == 0
    for a, b in zip(results, again, strict=True):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def test_the_cache_key_changes_with_the_weights_data_and_settings(tmp_path) -> None:
    profile, model = make_profile("mlp", cache=Cache(tmp_path))
    profile.gradient(profile.names[0])
    with torch.no_grad():
        model.get_submodule(profile.names[0]).weight[0, 0] += 1e-3
    changed = Profile(model, profile.layers, profile.data, cache=Cache(tmp_path))
    changed.gradient(profile.names[0])
    assert changed.curvature.passes.gradient_sweeps == 1  # recomputed, not loaded
    fewer = Profile(
        model, profile.layers, pairs(list(profile.data.calibration)[:2]), cache=Cache(tmp_path)
    )
    fewer.gradient(profile.names[0])
    assert fewer.curvature.passes.gradient_sweeps == 1
    assert len(list(tmp_path.rglob("*.safetensors"))) == 3


def test_an_unreadable_cache_entry_is_recomputed_with_a_warning(tmp_path) -> None:
    profile, _ = make_profile("mlp", cache=Cache(tmp_path))
    expected = profile.gradient(profile.names[0])
    (entry,) = tmp_path.rglob("*.safetensors")
    entry.write_bytes(b"torn")
    again = Profile(profile.model, profile.layers, profile.data, cache=Cache(tmp_path))
    with pytest.warns(UserWarning, match="unreadable"):
        torch.testing.assert_close(again.gradient(profile.names[0]), expected)


def test_unknown_layers_and_bad_settings_are_refused() -> None:
    profile, _ = make_profile("mlp")
    with pytest.raises(ConfigError, match="not profiled"):
        profile.layer("nope")
    with pytest.raises(ConfigError, match="not profiled"):
        profile.second_order({"nope": [torch.zeros(1)]})
    with pytest.raises(ConfigError, match="probes_min"):
        Settings(probes_min=1)
    with pytest.raises(ConfigError, match="eigenpairs"):
        Settings(eigenpairs=5, lanczos_iterations=4)


def _forge_entry(entry, edit) -> None:
    """Rewrite a cache entry's tensors with `edit`, with a checksum that matches them (what a
    forger, or another program, would write)."""
    from safetensors.torch import load_file, save_file

    from allot.profile.cache import _checksum

    tensors = edit(load_file(entry))
    save_file(tensors, entry, metadata={"sha256": _checksum(tensors)})


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda t: {k: v[..., :1].contiguous() for k, v in t.items()},
            "does not hold what allot stores",
        ),
        (lambda t: {f"x{k}": v for k, v in t.items()}, "does not hold what allot stores"),
        (lambda t: {k: torch.full_like(v, float("nan")) for k, v in t.items()}, "NaN or inf"),
    ],
)
def test_an_entry_with_a_valid_checksum_but_wrong_content_is_recomputed(
    tmp_path, edit, message
) -> None:
    profile, _ = make_profile("mlp", cache=Cache(tmp_path))
    expected = profile.gradient(profile.names[0])
    (entry,) = tmp_path.rglob("*.safetensors")
    _forge_entry(entry, edit)
    again = Profile(profile.model, profile.layers, profile.data, cache=Cache(tmp_path))
    with pytest.warns(UserWarning, match=message):
        torch.testing.assert_close(again.gradient(profile.names[0]), expected)
    assert again.curvature.passes.gradient_sweeps == 1


def test_non_finite_results_are_never_stored(tmp_path) -> None:
    cache = Cache(tmp_path)
    cache.put("a" * 64, {"x": torch.tensor([1.0, float("inf")])})
    cache.put("b" * 64, {"x": torch.tensor([1.0, 2.0])})
    assert [p.name[:1] for p in tmp_path.rglob("*.safetensors")] == ["b"]


def test_the_cache_is_bounded_and_evicts_the_least_recently_used(tmp_path) -> None:
    import os

    entry = {"x": torch.zeros(1000)}  # about 4 kB on disk
    cache = Cache(tmp_path, max_bytes=10_000)
    for i, key in enumerate(("a", "b")):
        cache.put(key * 64, entry)
        path = next(tmp_path.rglob(f"{key * 64}.safetensors"))
        os.utime(path, (1000 + i, 1000 + i))
    assert cache.get("a" * 64) is not None  # now the most recently used
    cache.put("c" * 64, entry)
    assert sorted(p.name[:1] for p in tmp_path.rglob("*.safetensors")) == ["a", "c"]


def test_a_read_only_cache_still_serves_its_entries(tmp_path, monkeypatch) -> None:
    import os

    Cache(tmp_path).put("a" * 64, {"x": torch.ones(3)})

    def read_only(*args, **kwargs):
        raise PermissionError(30, "Read-only file system")

    monkeypatch.setattr(os, "utime", read_only)
    assert torch.equal(Cache(tmp_path).get("a" * 64)["x"], torch.ones(3))


def test_a_bad_size_bound_is_a_config_error(monkeypatch) -> None:
    for value in ("lots", "-1", "nan"):
        monkeypatch.setenv("ALLOT_CACHE_MAX_MB", value)
        with pytest.raises(ConfigError, match="ALLOT_CACHE_MAX_MB"):
            Cache(None)
    monkeypatch.setenv("ALLOT_CACHE_MAX_MB", "1.5")
    assert Cache(None).max_bytes == int(1.5 * 2**20)


def test_an_altered_entry_fails_its_checksum_and_is_recomputed(tmp_path) -> None:
    """Tensors changed under an unchanged header: the stored SHA-256 no longer matches."""
    from safetensors.torch import load_file, save_file

    profile, _ = make_profile("mlp", cache=Cache(tmp_path))
    expected = profile.gradient(profile.names[0])
    (entry,) = tmp_path.rglob("*.safetensors")
    header = json.loads(
        entry.read_bytes()[8 : 8 + int.from_bytes(entry.read_bytes()[:8], "little")]
    )
    tensors = {k: v + 1 for k, v in load_file(entry).items()}
    save_file(tensors, entry, metadata=header["__metadata__"])
    again = Profile(profile.model, profile.layers, profile.data, cache=Cache(tmp_path))
    with pytest.warns(UserWarning, match="fails its checksum"):
        torch.testing.assert_close(again.gradient(profile.names[0]), expected)
