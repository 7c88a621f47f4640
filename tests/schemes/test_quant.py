"""Quant: the rounding maths, the 1-bit optimum, group checks, storage and field validation."""

from __future__ import annotations

import pytest
import torch

from allot.discover import LayerSpec
from allot.exceptions import ConfigError
from allot.modules.quant import GRIDS, QuantGrid, QuantizedLayer, dequantize
from allot.schemes import Quant, parse_scheme, scheme_from_json
from allot.schemes.grid import quantize_rtn


def _weight(out: int = 6, fan_in: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # rows on different scales and centres, so groups differ
    return torch.randn(out, fan_in, generator=g) * torch.rand(out, 1, generator=g) + 0.3


def _per_group(t: torch.Tensor, n_groups: int) -> torch.Tensor:
    return t.reshape(t.shape[0], n_groups, -1)


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("group", [None, 8])
@pytest.mark.parametrize("bits", range(2, 9))
def test_error_is_at_most_half_a_step(bits: int, group: int | None, grid: str):
    w = _weight() - 0.6  # rows of both signs, and some of one sign only
    codes, fitted = quantize_rtn(w, bits, group, grid)
    scale = fitted.scale
    n_groups = scale.shape[1]
    assert scale.dtype == torch.float16 and fitted.kind == grid
    assert n_groups == (1 if group is None else 32 // group)
    err = _per_group((w - dequantize(codes, fitted)).abs(), n_groups)
    half_step = scale.float()[..., None] / 2
    assert (err <= half_step + 1e-6 * w.abs().max()).all()
    q = _per_group(codes, n_groups)
    if grid == "float-offset":  # min-max: the extremes take the extreme codes
        assert (q.amin(-1) == 0).all()
        assert (q.amax(-1) == 2**bits - 1).all()


@pytest.mark.parametrize("grid", ["zero-point", "symmetric"])
@pytest.mark.parametrize("group", [None, 4])
@pytest.mark.parametrize("bits", range(2, 9))
def test_zero_is_exactly_representable_on_integer_zero_point_grids(bits, group, grid):
    w = _weight()
    w[:, ::3] = 0.0  # zeros in every row and group
    w[0] = w[0].abs()  # a row without negative weights: zero is still on its grid
    w[1] = -w[1].abs()
    w[2, :4] = 0.0  # a group of zeros only
    codes, fitted = quantize_rtn(w, bits, group, grid)
    w_hat = dequantize(codes, fitted)
    assert torch.equal(w_hat[w == 0], torch.zeros(int((w == 0).sum())))
    # the zero point itself, as a code, dequantizes to exactly 0.0 in every group
    zero = fitted.zero_points()
    size = w.shape[1] // zero.shape[1]
    assert torch.equal(dequantize(zero.repeat_interleave(size, 1), fitted), torch.zeros_like(w))


def test_float_offset_grids_do_not_hold_zero_in_general():
    # the reason for integer zero points: a min-max float offset moves exact zeros
    w = _weight()
    w[:, ::3] = 0.0
    codes, fitted = quantize_rtn(w, 4, None, "float-offset")
    assert (dequantize(codes, fitted)[w == 0] != 0).any()


def test_constant_groups_get_zero_scale_and_stay_exact():
    w = _weight(4, 16)
    w[0] = 0.25  # exactly representable in float16
    w[1, :8] = 0.0
    codes, fitted = quantize_rtn(w, 4, 8, "float-offset")
    scale = fitted.scale
    assert scale[0, 0] == 0 and scale[0, 1] == 0 and scale[1, 0] == 0
    w_hat = dequantize(codes, fitted)
    assert torch.isfinite(w_hat).all()
    assert torch.equal(w_hat[0], w[0]) and torch.equal(w_hat[1, :8], w[1, :8])


def test_non_finite_weights_are_refused():
    w = _weight(2, 8)
    w[0, 0] = float("nan")
    with pytest.raises(ConfigError, match="non-finite"):
        quantize_rtn(w, 4, None, "zero-point")
    with pytest.raises(ConfigError, match="float16 range"):
        quantize_rtn(_weight(2, 8) * 1e6, 1, None, "symmetric")


@pytest.mark.parametrize("group", [None, 4])
def test_one_bit_scale_is_mean_abs_and_least_squares_optimal(group: int | None):
    w = _weight(3, 16)
    _, fitted = quantize_rtn(w, 1, group, "zero-point")
    scale = fitted.scale
    assert fitted.offset is None and fitted.zero is None and fitted.kind == "symmetric"
    n_groups = scale.shape[1]
    mean_abs = _per_group(w.abs(), n_groups).mean(-1)
    assert torch.equal(scale, mean_abs.half())
    # brute force: the scale a minimising |w - a sign(w)|^2 over a fine grid is mean |w|
    groups = _per_group(w, n_groups).reshape(-1, w.shape[1] // n_groups).double()
    for wg, a in zip(groups, mean_abs.reshape(-1).double(), strict=True):
        grid = torch.linspace(0, 2 * wg.abs().max().item(), 20001, dtype=torch.float64)
        sign = torch.where(wg >= 0, 1.0, -1.0)
        sq_err = ((wg[None, :] - grid[:, None] * sign[None, :]) ** 2).sum(1)
        assert abs(grid[sq_err.argmin()] - a) <= grid[1]


def test_one_bit_sign_of_zero_is_plus():
    w = torch.tensor([[0.0, -1.0, 2.0, 0.0]])
    codes, fitted = quantize_rtn(w, 1, None, "float-offset")
    assert codes.tolist() == [[1, 0, 1, 1]]
    assert dequantize(codes, fitted).tolist() == [[0.75, -0.75, 0.75, 0.75]]


def test_from_codes_builds_the_same_stored_form_from_another_rounding():
    spec = LayerSpec("linear", 6, 32)
    w = _weight()
    _, fitted = quantize_rtn(w, 3, 8, "float-offset")
    # another rounding rule (floor) against the same grid
    step = fitted.scale.float().repeat_interleave(8, dim=1)
    low = fitted.offset.float().repeat_interleave(8, dim=1)
    codes = ((w - low) / step).floor().clamp(0, 7).long()
    layer = QuantizedLayer.from_codes(spec, codes, fitted, torch.zeros(6))
    assert torch.equal(layer.unpacked_codes(), codes)
    assert torch.equal(layer.reconstruct(), dequantize(codes, fitted))
    assert layer.storage_bits() == Quant(3, 8, grid="float-offset").storage_bits(spec)


def test_zero_points_are_stored_packed_and_reload():
    spec = LayerSpec("linear", 6, 32)
    codes, fitted = quantize_rtn(_weight() - 0.6, 3, 8, "zero-point")
    layer = QuantizedLayer.from_codes(spec, codes, fitted, torch.zeros(6))
    assert layer.zero.dtype == torch.uint8 and layer.zero.numel() == 9  # 24 zero points x 3 bits
    assert torch.equal(layer.quant_grid().zero, fitted.zero)
    fresh = Quant(3, 8, grid="zero-point").empty(spec)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.reconstruct(), layer.reconstruct())


def test_from_codes_checks_its_inputs():
    spec = LayerSpec("linear", 6, 32, bias=False)
    codes, fitted = quantize_rtn(_weight(), 4, None, "float-offset")
    scale, offset = fitted.scale, fitted.offset
    with pytest.raises(ConfigError, match="float16"):
        QuantGrid(4, "float-offset", scale.float(), offset)
    with pytest.raises(ConfigError, match="float-offset grid needs offset"):
        QuantGrid(4, "float-offset", scale)
    with pytest.raises(ConfigError, match="zero-point grid needs zero"):
        QuantGrid(4, "zero-point", scale)
    with pytest.raises(ConfigError, match="zero points must lie in"):
        QuantGrid(4, "zero-point", scale, zero=torch.full(scale.shape, 16))
    with pytest.raises(ConfigError, match="symmetric grid has no offset"):
        QuantGrid(4, "symmetric", scale, offset)
    with pytest.raises(ConfigError, match="shape"):
        QuantizedLayer.from_codes(spec, codes[:, :16], fitted)
    with pytest.raises(ConfigError, match="codes must lie in"):
        QuantizedLayer.from_codes(spec, codes + 1, fitted)


@pytest.mark.parametrize("method", ["check", "storage_bits", "empty"])
def test_group_must_divide_fan_in(method: str):
    spec = LayerSpec("conv2d", 2, 3, (2, 2))  # fan_in 12
    with pytest.raises(ConfigError, match=r"Quant\.group=5 .* fan_in 12 .*: 1, 2, 3, 4, 6, 12$"):
        getattr(Quant(4, 5), method)(spec)
    getattr(Quant(4, 6), method)(spec)


@pytest.mark.parametrize(
    ("scheme", "spec", "bits"),
    [
        # 120 weights: 60 bytes of codes, 6 float16 scales and 6 float16 offsets
        (Quant(4, grid="float-offset"), LayerSpec("linear", 6, 20), 8 * 60 + 16 * 6 + 16 * 6),
        (Quant(1), LayerSpec("linear", 6, 20), 8 * 15 + 16 * 6),
        (Quant(3, 4, grid="float-offset"), LayerSpec("linear", 6, 20), 8 * 45 + 32 * 30),
        # 45 bits round up to 6 bytes
        (Quant(3, grid="float-offset"), LayerSpec("linear", 3, 5), 8 * 6 + 32 * 3),
        (Quant(2, 9, grid="float-offset"), LayerSpec("conv2d", 4, 2, (3, 3)), 8 * 18 + 32 * 8),
        # 6 zero points of 4 bits: 3 bytes
        (Quant(4, grid="zero-point"), LayerSpec("linear", 6, 20), 8 * 60 + 16 * 6 + 8 * 3),
        # 30 zero points of 3 bits: 90 bits, 12 bytes
        (Quant(3, 4, grid="zero-point"), LayerSpec("linear", 6, 20), 8 * 45 + 16 * 30 + 8 * 12),
        (Quant(4, grid="symmetric"), LayerSpec("linear", 6, 20), 8 * 60 + 16 * 6),
    ],
)
def test_storage_formula(scheme: Quant, spec: LayerSpec, bits: int):
    assert scheme.storage_bits(spec) == bits


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bits": 9}, "Quant.bits must be an int in 1..8, got 9"),
        ({"bits": 0}, "Quant.bits"),
        ({"bits": 4.0}, "Quant.bits"),
        ({"bits": True}, "Quant.bits"),
        ({"bits": "4"}, "Quant.bits"),
        ({"bits": 4, "group": 0}, "Quant.group must be an int >= 1, got 0"),
        ({"bits": 4, "group": 2.5}, "Quant.group"),
    ],
)
def test_invalid_fields_are_named(kwargs: dict, message: str):
    with pytest.raises(ConfigError, match=message):
        Quant(**kwargs)


@pytest.mark.parametrize(
    "text",
    [
        "quant",
        "quant:x",
        "quant:4:64",
        "quant:4:g64:1",
        "quant:9",
        "quant:4:integer",
        "quant:4:zero-point:g64",
        "quant:4:steered:zero-point",
    ],
)
def test_bad_string_forms_raise(text: str):
    with pytest.raises(ConfigError):
        parse_scheme(text)


def test_string_forms_name_the_grid():
    assert parse_scheme("quant:4:g64:zero-point") == Quant(4, 64, grid="zero-point")
    assert parse_scheme("quant:3:symmetric:steered") == Quant(3, None, "steered", "symmetric")
    assert parse_scheme("quant:4:float-offset") == Quant(4, grid="float-offset")
    with pytest.raises(ConfigError, match=r"Quant\.grid must be one of"):
        Quant(4, grid="integer")


def test_one_bit_grids_are_the_scaled_sign_whatever_the_grid():
    assert Quant(1, grid="zero-point") == Quant(1, grid="float-offset") == Quant(1)
    assert Quant(1).grid == "symmetric" and Quant(1).label() == "quant1"


def test_plans_written_before_grids_keep_their_float_offset_meaning():
    old = {"kind": "quant", "bits": 4, "group": 64, "rounding": "steered"}
    assert scheme_from_json(old) == Quant(4, 64, "steered", "float-offset")
    new = Quant(4, 64, grid="zero-point")
    assert scheme_from_json(new.to_json()) == new


def test_label():
    assert Quant(4).label() == "quant4"
    assert Quant(4, 64).label() == "quant4g64"
    others = {g for g in GRIDS if g != Quant(4).grid}
    labels = {Quant(4, 64, grid=g).label() for g in others}
    assert len(labels) == 2 and all(label.startswith("quant4g64-") for label in labels)


def test_an_artifact_saved_before_grids_reloads_with_its_float_offsets(digits, tmp_path):
    import json

    from allot import Budget, compress, load, save
    from allot.methods import Method
    from allot.schemes import Keep
    from allot.zoo import create_model

    method = Method(
        "old", "float offsets", lambda layer: [Quant(4, grid="float-offset"), Keep()],
        error_model="weight", allocator="uniform",
    )  # fmt: skip
    result = compress(
        create_model("test-cnn"), digits, method, Budget("ratio", 4), model_name="test-cnn",
        progress=False,
    )  # fmt: skip
    directory = save(result.model, result.plan, tmp_path / "art")
    plan = json.loads((directory / "plan.json").read_text())
    for layer in plan["layers"]:  # as an allot without grids wrote it
        del layer["scheme"]["grid"]
    (directory / "plan.json").write_text(json.dumps(plan))
    model, loaded = load(directory)
    assert all(layer.scheme.grid == "float-offset" for layer in loaded.layers)
    x = digits.example_inputs(8)
    with torch.no_grad():
        assert torch.equal(model(x), result.model(x))
