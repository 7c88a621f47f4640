"""LC: the loop refines any plan toward its compressed form, reports the compressed model, and a
resumed run equals an uninterrupted one."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from allot import Budget, Policy, Refinement, compress, load, save
from allot.exceptions import ArtifactError, ConfigError
from allot.methods import Method
from allot.modules.base import dense_weight, layer_storage_bits
from allot.profile.measure import mean_loss
from allot.refine import lc as lc_module
from allot.refine.lc import LCSettings
from allot.refine.lc_state import STATE
from allot.schemes import Keep, LowRank
from allot.zoo import create_model

# weight error model: no curvature to compute for a plan that pins every layer
PINNED = Method("pinned", "the policy's scheme in every layer", lambda layer: [Keep()], "weight")
QUICK = {"steps": 3, "epochs": 2, "mu0": 0.1, "growth": 3.0, "lr": 0.02, "optimizer": "sgd"}


def _lc(data, scheme: str, model: str = "test-mlp", **settings):
    return compress(
        create_model(model),
        data,
        PINNED,
        Budget("ratio", 1.0),
        policy=Policy.parse(pins=[f"*={scheme}"]),
        refinement=Refinement("lc", {**QUICK, **settings}),
        progress=False,
    )


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_lc_improves_on_direct_compression_and_reports_the_compressed_model(digits) -> None:
    direct = compress(
        create_model("test-mlp"),
        digits,
        PINNED,
        Budget("ratio", 1.0),
        policy=Policy.parse(pins=["*=quant:1+sparse:0.05"]),
        progress=False,
    )
    result = _lc(digits, "quant:1+sparse:0.05", steps=4)
    history = result.plan.metadata["lc"]["history"]
    assert [h["step"] for h in history] == [0, 1, 2, 3, 4]
    assert history[0]["metrics"] == pytest.approx(digits.evaluate(direct.model))
    assert history[-1]["metrics"] == pytest.approx(digits.evaluate(result.model))
    assert history[-1]["gap"] < 0.1 * history[0]["gap"]  # the weights reach their compressed form
    assert mean_loss(result.model, digits) < mean_loss(direct.model, digits)
    # the refined model stores exactly what the plan says
    assert result.plan.weight_bits == direct.plan.weight_bits
    for layer in result.plan.layers:
        module = result.model.get_submodule(layer.name)
        assert layer_storage_bits(module) == layer.cost_bits


def test_the_quadratic_penalty_keeps_no_multipliers(digits, tmp_path) -> None:
    _lc(digits, "ternary", multipliers=False, checkpoint=str(tmp_path))
    tensors = load_file(next(tmp_path.glob("lc-state-*.safetensors")))
    multipliers = [v for k, v in tensors.items() if k.startswith("lambda/")]
    assert multipliers and all(not v.any() for v in multipliers)
    _lc(digits, "ternary", checkpoint=str(tmp_path))
    tensors = load_file(next(tmp_path.glob("lc-state-*.safetensors")))
    assert any(v.any() for k, v in tensors.items() if k.startswith("lambda/"))


def test_kept_layers_are_free_and_take_the_trained_weight(digits) -> None:
    result = compress(
        create_model("test-mlp"),
        digits,
        PINNED,
        Budget("ratio", 1.0),
        policy=Policy.parse(keep=["3"], pins=["1=codebook:4"]),
        refinement=Refinement("lc", QUICK),
        progress=False,
    )
    kept = result.model.get_submodule("3")
    assert isinstance(kept, torch.nn.Linear)
    assert not torch.equal(kept.weight, create_model("test-mlp").get_submodule("3").weight)
    assert result.plan.layer("3").scheme == Keep()


def test_resume_after_an_interrupted_step_equals_an_uninterrupted_run(
    digits, tmp_path, monkeypatch
) -> None:
    whole = _lc(digits, "quant:1+sparse:0.05", checkpoint=str(tmp_path / "whole"))
    calls = {"n": 0}
    real_train = lc_module.train

    def killed_in_the_second_l_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # as a kill: nothing after the last checkpoint survives
        return real_train(*args, **kwargs)

    monkeypatch.setattr(lc_module, "train", killed_in_the_second_l_step)
    with pytest.raises(KeyboardInterrupt):
        _lc(digits, "quant:1+sparse:0.05", checkpoint=str(tmp_path / "part"))
    assert json.loads((tmp_path / "part" / STATE).read_text())["step"] == 1
    monkeypatch.setattr(lc_module, "train", real_train)
    torch.manual_seed(123)  # the resumed process's own random state does not matter
    resumed = _lc(digits, "quant:1+sparse:0.05", checkpoint=str(tmp_path / "part"), resume=True)
    first, second = _state(whole.model), _state(resumed.model)
    assert list(first) == list(second)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert resumed.plan.metadata["lc"]["history"] == whole.plan.metadata["lc"]["history"]


def test_a_checkpoint_of_other_settings_or_damaged_is_refused(digits, tmp_path) -> None:
    _lc(digits, "ternary", checkpoint=str(tmp_path))
    with pytest.raises(ConfigError, match="another settings"):
        _lc(digits, "ternary", checkpoint=str(tmp_path), resume=True, mu0=0.5)
    with pytest.raises(ConfigError, match="another plan"):
        _lc(digits, "quant:1", checkpoint=str(tmp_path), resume=True)
    tensors = next(tmp_path.glob("lc-state-*.safetensors"))
    tensors.write_bytes(tensors.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(ArtifactError, match="damaged"):
        _lc(digits, "ternary", checkpoint=str(tmp_path), resume=True)
    # more steps than the checkpoint reached: it continues
    more = _lc(digits, "ternary", checkpoint=str(tmp_path / "more"), steps=1)
    assert len(more.plan.metadata["lc"]["history"]) == 2
    more = _lc(digits, "ternary", checkpoint=str(tmp_path / "more"), steps=2, resume=True)
    assert [h["step"] for h in more.plan.metadata["lc"]["history"]] == [0, 1, 2]


def test_rank_selection_changes_the_plan_and_its_storage(digits) -> None:
    plain = _lc(digits, "rank:4")
    cheap = _lc(digits, "rank:4", rank_alpha=1.0)
    ranks = {layer.name: layer.scheme for layer in cheap.plan.layers}
    assert ranks == {"1": LowRank(1), "3": LowRank(1)}
    assert cheap.plan.weight_bits < plain.plan.weight_bits
    assert [h["bits"] for h in cheap.plan.metadata["lc"]["history"]][-1] == cheap.plan.weight_bits
    for layer in cheap.plan.layers:
        assert cheap.model.get_submodule(layer.name).rank == 1


def test_lc_refines_any_plan_and_the_artifact_reloads(digits, tmp_path) -> None:
    # CET's allocation on a model with BatchNorm (folded), then LC; the artifact reloads
    result = compress(
        create_model("test-cnn"),
        digits,
        "lc",
        Budget("ratio", 6),
        refinement=Refinement("lc", {**QUICK, "steps": 1}),
        model_name="test-cnn",
        progress=False,
    )
    assert result.plan.metadata["refine"]["name"] == "lc"
    assert result.plan.ratio >= 6
    save(result.model, result.plan, tmp_path / "art")
    again, plan = load(tmp_path / "art")
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(again(x), result.model(x))
    assert plan.metadata["lc"]["history"][-1]["step"] == 1


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"steps": -1}, "steps"),
        ({"growth": 0.5}, "growth"),
        ({"mu0": 0}, "mu0"),
        ({"lr": float("nan")}, "lr"),
        ({"optimizer": "lamb"}, "optimizer"),
        ({"rank_alpha": -1.0}, "rank_alpha"),
    ],
)
def test_invalid_settings_are_named(values, message) -> None:
    with pytest.raises(ConfigError, match=message):
        LCSettings(**values)


def test_the_free_model_is_a_copy(digits) -> None:
    reference = create_model("test-mlp")
    before = copy.deepcopy(reference.state_dict())
    compress(
        reference,
        digits,
        PINNED,
        Budget("ratio", 1.0),
        policy=Policy.parse(pins=["*=quant:2"]),
        refinement=Refinement("lc", QUICK),
        progress=False,
    )
    assert all(torch.equal(before[k], v) for k, v in reference.state_dict().items())
    assert dense_weight(reference.get_submodule("1")).requires_grad


def test_relative_rates_and_scaled_penalty_make_lc_blind_to_a_layers_scale(digits) -> None:
    # BatchNorm folding multiplies layers by constants; with `relative` rates and the `scaled`
    # penalty LC refines a layer multiplied by c (the next divided by c) to the same function
    settings = {**QUICK, "relative": True, "scaled": True, "lr": 0.05, "mu0": 0.1}
    factor = 20.0
    model = create_model("test-mlp")
    other = copy.deepcopy(model)
    with torch.no_grad():
        other[1].weight.mul_(factor)
        other[1].bias.mul_(factor)
        other[3].weight.div_(factor)
    results = [
        compress(
            network,
            digits,
            PINNED,
            Budget("ratio", 1.0),
            policy=Policy.parse(pins=["*=quant:1+sparse:0.05"]),
            refinement=Refinement("lc", settings),
            progress=False,
        )
        for network in (model, other)
    ]
    first, second = (r.plan.metadata["lc"]["history"] for r in results)
    # each layer's own gap is scale-free (the summed one weighs layers by their scale)
    worst = [h["worst_gap"] for h in first]
    assert worst == pytest.approx([h["worst_gap"] for h in second], rel=1e-2)
    assert worst[-1] < 0.1 * worst[0]
    x = torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(results[1].model(x), results[0].model(x), rtol=1e-2, atol=1e-3)
    # the absolute penalty and rates see the scale
    settings = {**QUICK, "lr": 0.05, "mu0": 0.1}
    plain = [
        compress(
            network,
            digits,
            PINNED,
            Budget("ratio", 1.0),
            policy=Policy.parse(pins=["*=quant:1+sparse:0.05"]),
            refinement=Refinement("lc", settings),
            progress=False,
        ).plan.metadata["lc"]["history"][-1]["worst_gap"]
        for network in (model, other)
    ]
    assert plain[0] != pytest.approx(plain[1], rel=0.1)


def test_a_feedback_start_is_error_feedbacks_model_and_a_fixed_point_of_the_c_step(
    digits,
) -> None:
    scheme = "quant:1:steered+sparse:0.05"
    post = compress(
        create_model("test-mlp"),
        digits,
        PINNED,
        Budget("ratio", 1.0),
        policy=Policy.parse(pins=[f"*={scheme}"]),
        refinement=Refinement("feedback"),
        progress=False,
    )
    direct = _lc(digits, scheme, steps=0, start="direct")
    start = _lc(digits, scheme, steps=0, start="feedback")
    first = start.plan.metadata["lc"]["history"][0]
    assert first["metrics"] == pytest.approx(digits.evaluate(post.model))
    assert first["metrics"] != pytest.approx(direct.plan.metadata["lc"]["history"][0]["metrics"])
    assert first["gap"] == 0.0  # the free weights start at Delta(Theta): feasible
    # Theta_0 is the projection of the post-training solution: the C step returns it unchanged
    for layer in post.plan.layers:
        fitted = post.model.get_submodule(layer.name)
        weight = dense_weight(fitted).detach()
        again = layer.scheme.project(weight, fitted.bias, layer.spec, fitted)
        torch.testing.assert_close(dense_weight(again), weight)
    # and LC from there keeps the constraint while lowering the loss
    refined = _lc(digits, scheme, steps=3, start="feedback", lr=0.005)
    history = refined.plan.metadata["lc"]["history"]
    assert history[-1]["worst_gap"] < 0.05
    assert mean_loss(refined.model, digits) < mean_loss(post.model, digits)


def test_a_feasible_start_starts_every_layer_at_its_projection(digits) -> None:
    scheme = "quant:2"  # round-to-nearest: error feedback cannot re-fit it
    direct = _lc(digits, scheme, steps=0, start="direct")
    feedback = _lc(digits, scheme, steps=0, start="feedback")
    feasible = _lc(digits, scheme, steps=0, start="feasible")
    starts = [r.plan.metadata["lc"]["history"][0] for r in (direct, feedback, feasible)]
    # the same compressed model, Delta(Theta_0) the projection of the float weights...
    assert starts[2]["metrics"] == pytest.approx(starts[0]["metrics"])
    # ...but only the feasible start's free weights are at it
    assert starts[0]["gap"] > 0 and starts[1]["gap"] == starts[0]["gap"]
    assert starts[2]["gap"] == 0.0
    # and training from there lowers the compressed model's loss
    trained = _lc(digits, scheme, steps=2, start="feasible", lr=0.005)
    assert mean_loss(trained.model, digits) < mean_loss(feasible.model, digits)
