import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from allot import apply, load
from allot.cli import main
from allot.exceptions import ArtifactError
from allot.io import PLAN, WEIGHTS
from allot.resources import peak_memory
from allot.source import file_factory, float_model


def _run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["--no-progress", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_compress_prints_float_then_compressed_and_writes_artifact(tmp_path, capsys) -> None:
    out = tmp_path / "art"
    code, stdout, _ = _run(
        capsys,
        "compress",
        "test-cnn",
        "--method",
        "uniform-quant",
        "--bits",
        "4",
        "--out",
        str(out),
        "--calibration",
        "64",
    )
    assert code == 0
    lines = [line for line in stdout.splitlines() if line.startswith("accuracy: ")]
    assert len(lines) == 2
    assert 0 < float(lines[1].split()[1]) <= 1
    (peak,) = [line for line in stdout.splitlines() if line.startswith("peak resident memory: ")]
    assert 100 < float(peak.split()[3].replace(",", "")) <= peak_memory() / 2**20 + 1
    assert {PLAN, WEIGHTS, "report.md", "allocation.png", "evaluation.json"} <= {
        p.name for p in out.iterdir()
    }
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["compressed"]["bytes"] == (out / WEIGHTS).stat().st_size

    code, stdout, _ = _run(capsys, "evaluate", str(out))
    assert code == 0 and stdout.count("accuracy: ") == 1 and "ratio: " in stdout
    code, stdout, _ = _run(capsys, "report", str(out))
    assert code == 0 and "report.md" in stdout


def test_no_geometry_leaves_out_only_the_geometry_and_its_lanczos_sweeps(
    tmp_path, capsys, monkeypatch
) -> None:
    from allot.profile.engine import Profile

    runs = []
    krylov = Profile.krylov
    monkeypatch.setattr(Profile, "krylov", lambda self: runs.append(1) or krylov(self))
    plans = {}
    for flags in ((), ("--no-geometry",)):
        out = tmp_path / f"cet{len(flags)}"
        code, _, _ = _run(
            capsys,
            *("compress", "test-cnn", "--method", "cet", "--bits", "4", "--no-cache"),
            *("--out", str(out), "--calibration", "64", *flags),
        )
        assert code == 0
        plans[flags] = json.loads((out / PLAN).read_text())
        report = (out / "report.md").read_text()
        assert ("## Error geometry" in report) == (not flags)
        assert ("error geometry not computed" in report) == bool(flags)
        assert "## Predicted vs measured loss change" in report
    assert len(runs) == 1  # only the run with geometry ran Lanczos
    with_geometry, without = plans[()], plans[("--no-geometry",)]
    assert "geometry" in with_geometry["metadata"] and "geometry" not in without["metadata"]
    assert without["layers"] == with_geometry["layers"]


def test_cet_under_a_damage_limit_reports_prediction_geometry_and_pareto(tmp_path, capsys) -> None:
    out = tmp_path / "cet"
    code, _, _ = _run(
        capsys,
        *("compress", "test-cnn", "--method", "cet-steer", "--max-damage", "0.001"),
        *("--out", str(out), "--calibration", "64"),
    )
    assert code == 0
    plan = json.loads((out / PLAN).read_text())
    assert plan["budget"] == {"kind": "damage", "value": 0.001}
    assert sum(layer["damage"] for layer in plan["layers"]) <= 0.001
    report = (out / "report.md").read_text()
    for section in ("## Predicted vs measured loss change", "## Error geometry", "pareto.png"):
        assert section in report
    assert (out / "pareto.png").stat().st_size > 0
    # steered codes reload from the artifact alone (re-fitting them would need calibration data)
    model, loaded_plan = load(out)
    assert any(layer.scheme.label().endswith("steered") for layer in loaded_plan.layers)
    with torch.no_grad():
        assert torch.isfinite(model.eval()(torch.randn(2, 1, 8, 8))).all()


QUANT4 = ["compress", "test-cnn", "--method", "uniform-quant", "--bits", "4"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["compress", "no-such-model", "--method", "uniform-quant", "--bits", "4"],
            "unknown zoo model 'no-such-model'",
        ),
        (["compress", "test-cnn", "--method", "uniform-quant", "--ratio", "1000"], "out of reach"),
        (["compress", "test-cnn", "--method", "uniform-quant"], "give a budget"),
        (["compress", "test-cnn", "--method", "uniform-quant", "--ratio", "0.5"], ">= 1"),
        (
            [
                "compress",
                "test-cnn",
                "--method",
                "uniform-quant",
                "--lossless",
                "--macs-ratio",
                "2",
            ],
            "beside a size budget",
        ),
        (["compress", "test-cnn", "--method", "cet", "--macs-ratio", "2"], "--macs-ratio limits"),
        (
            [
                "compress",
                "test-cnn",
                "--method",
                "uniform-quant",
                "--ratio",
                "4",
                "--macs-ratio",
                "2",
            ],
            "cannot limit MACs",
        ),
        (["compress", "test-cnn", "--method", "cet", "--bits", "4", "--screen", "0.5"], ">= 1"),
        (["evaluate", "does-not-exist"], "unknown zoo model"),
        # hostile ranks, pinned from the command line
        ([*QUANT4, "--pin", "5=rank:0"], "LowRank.rank must be an int >= 1"),
        (
            [*QUANT4, "--pin", f"5=rank:{10**30}:whitened"],
            f"LowRank.rank={10**30} exceeds the layer's full rank 10",
        ),
        ([*QUANT4, "--pin", f"5=rank:{'9' * 5000}"], "cannot parse scheme"),
    ],
)
def test_bad_input_gives_one_line_and_exit_2(tmp_path, capsys, args, message) -> None:
    if args[0] == "compress":
        args = [*args, "--out", str(tmp_path / "o")]
    code, _, err = _run(capsys, *args)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


USER_MODEL = (
    "import torch, torch.nn as nn\n"
    "def make():\n"
    "    torch.manual_seed(1)\n"
    "    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))\n"
)


def _user_model(tmp_path, state=None) -> tuple[str, str]:
    """A model file outside the zoo and a weights file (its own initial weights by default)."""
    model_file = tmp_path / "net.py"
    model_file.write_text(USER_MODEL)
    namespace: dict = {}
    exec(USER_MODEL, namespace)
    weights = tmp_path / "w.safetensors"
    save_file(state if state is not None else namespace["make"]().state_dict(), weights)
    return f"{model_file}:make", str(weights)


def _compress_user_model(capsys, tmp_path, reference: str, weights: str, *budget: str):
    args = ["compress", "--model", reference, "--weights", weights, "--data", "digits"]
    return _run(
        capsys, *args, "--method", "output-error-quant", *budget, "--out", str(tmp_path / "o")
    )


def test_weights_that_do_not_match_the_model(tmp_path, capsys) -> None:
    wrong = {"1.weight": torch.zeros(10, 32), "1.bias": torch.zeros(10)}
    reference, weights = _user_model(tmp_path, wrong)
    code, _, err = _compress_user_model(capsys, tmp_path, reference, weights, "--bits", "4")
    assert code == 2 and "do not match the model" in err and "1.weight" in err


def test_file_model_compresses_and_reloads(tmp_path, capsys) -> None:
    reference, weights = _user_model(tmp_path)
    code, _, err = _compress_user_model(capsys, tmp_path, reference, weights, "--avg-bits", "5")
    assert code == 0, err
    # an artifact never runs the model file it names: the user passes the factory again
    code, _, err = _run(capsys, "evaluate", str(tmp_path / "o"))
    assert code == 2 and "never runs code" in err
    with pytest.raises(ArtifactError, match="never runs code"):
        load(tmp_path / "o")
    args = ("--model", reference, "--weights", weights, "--data", "digits")
    code, stdout, err = _run(capsys, "evaluate", str(tmp_path / "o"), *args)
    assert code == 0, err
    assert "accuracy: " in stdout
    model, plan = load(tmp_path / "o", file_factory(reference))
    assert plan.model == reference
    expected = apply(
        float_model(reference, weights), plan
    )  # the plan re-applied to the float model
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(model(x), expected(x))


def test_analyze_writes_a_sensitivity_report_and_caches_its_profile(tmp_path, capsys) -> None:
    out = tmp_path / "analysis"
    args = ["analyze", "test-cnn", "--calibration", "32", "--probes", "8", "--out", str(out)]
    code, stdout, _ = _run(capsys, *args)
    assert code == 0
    assert "forward+backward equivalents" in stdout
    assert {"analysis.md", "analysis.json", "curvature.png", "sensitivity.png"} <= {
        p.name for p in out.iterdir()
    }
    first = json.loads((out / "analysis.json").read_text())
    assert first["error_model"] == "second-order"
    # the peak memory reported is this process's, in MiB on screen and in the report
    mib = f"peak resident memory {first['peak_memory_bytes'] / 2**20:,.0f} MiB"
    assert mib in " ".join(stdout.split())  # rich wraps long lines
    assert mib in (out / "analysis.md").read_text()
    # bytes (torch alone takes more than 100 MiB), the process's peak when analyze ended
    assert 100 * 2**20 < first["peak_memory_bytes"] <= peak_memory()
    layer = first["layers"][0]
    assert layer["top_eigenvalue"] >= layer["bottom_eigenvalue"]
    assert set(layer["candidates"]) >= {"quant4", "keep"}
    assert layer["candidates"]["keep"][1] == 0.0
    code, stdout, _ = _run(capsys, *args)
    assert code == 0
    assert "0 forward+backward equivalents" in stdout  # everything came from the cache
    again = json.loads((out / "analysis.json").read_text())
    assert again["layers"] == first["layers"]


def _tensor_data(tmp_path, name: str, count: int = 96, **tensors) -> str:
    """A .npz data file of digits-shaped inputs and labels (overridden by `tensors`)."""
    generator = torch.Generator().manual_seed(len(name))
    arrays = {
        "inputs": torch.rand(count, 1, 8, 8, generator=generator),
        "targets": torch.randint(0, 10, (count,), generator=generator),
        **tensors,
    }
    path = tmp_path / name
    np.savez(path, **{k: v.numpy() for k, v in arrays.items()})
    return str(path)


@pytest.mark.parametrize("loss", ["cross-entropy", "distill"])
def test_own_model_on_own_tensor_file_with_and_without_labels(tmp_path, capsys, loss) -> None:
    reference, weights = _user_model(tmp_path)
    calibration = _tensor_data(tmp_path, "calibration.npz")
    held_out = _tensor_data(tmp_path, "held_out.npz", count=50)
    args = ["compress", "--model", reference, "--weights", weights, "--data", calibration]
    code, _, err = _run(
        capsys,
        *args,
        *("--loss", loss, "--held-out", held_out, "--method", "output-error-quant"),
        *("--ratio", "6", "--out", str(tmp_path / "o")),
    )
    assert code == 0, err
    evaluation = json.loads((tmp_path / "o" / "evaluation.json").read_text())
    assert evaluation["float"]["loss"] >= 0 and evaluation["compressed"]["ratio"] >= 6
    if loss == "cross-entropy":
        assert "accuracy" in evaluation["float"]
    else:  # distill: the float model is its own reference
        assert evaluation["float"]["loss"] == 0.0
    plan = json.loads((tmp_path / "o" / PLAN).read_text())
    assert plan["metadata"]["dataset"] == "calibration.npz"


def test_without_held_out_data_the_report_says_what_was_not_checked(tmp_path, capsys) -> None:
    reference, weights = _user_model(tmp_path)
    calibration = _tensor_data(tmp_path, "calibration.npz")
    code, _, err = _run(
        capsys,
        *("compress", "--model", reference, "--weights", weights, "--data", calibration),
        *(
            "--loss",
            "cross-entropy",
            "--method",
            "cet",
            "--ratio",
            "6",
            "--out",
            str(tmp_path / "o"),
        ),
    )
    assert code == 0, err
    evaluation = json.loads((tmp_path / "o" / "evaluation.json").read_text())
    assert evaluation["compressed"]["held_out"] == "not given"
    plan = json.loads((tmp_path / "o" / PLAN).read_text())
    assert plan["metadata"]["prediction"]["measured_held_out"] is None
    assert "not given" in (tmp_path / "o" / "report.md").read_text()


@pytest.mark.parametrize(
    ("tensors", "loss", "message"),
    [
        (
            {"inputs": torch.rand(96, 3, 8, 8)},
            "cross-entropy",
            "cannot run on the calibration data",
        ),
        ({"targets": torch.randint(0, 10, (90,))}, "cross-entropy", "'targets' has 90 samples"),
        ({"inputs": torch.full((96, 1, 8, 8), float("nan"))}, "cross-entropy", "NaN or inf"),
        ({"targets": torch.rand(96, 10)}, "mse", None),
        ({"inputs": torch.rand(0, 1, 8, 8), "targets": torch.zeros(0)}, "mse", "holds no samples"),
        ({}, None, "name their loss with --loss"),
    ],
)
def test_bad_data_gives_one_line_and_exit_code_2(tmp_path, capsys, tensors, loss, message) -> None:
    reference, weights = _user_model(tmp_path)
    data = _tensor_data(tmp_path, "bad.npz", **tensors)
    code, _, err = _run(
        capsys,
        *("compress", "--model", reference, "--weights", weights, "--data", data),
        *(("--loss", loss) if loss else ()),
        *("--method", "uniform-quant", "--bits", "4", "--out", str(tmp_path / "o")),
    )
    if message is None:  # mse against 10-dim targets is a valid regression setup
        assert code == 0, err
        return
    assert code == 2 and err.startswith("allot: error: ") and err.count("\n") == 1, err
    assert message in err


def test_a_loss_that_returns_a_vector_is_refused_before_any_work(tmp_path, capsys) -> None:
    reference, weights = _user_model(tmp_path)
    factory = tmp_path / "data.py"
    factory.write_text(
        "import torch, allot\n"
        "def make():\n"
        "    batches = [(torch.rand(8, 1, 8, 8), torch.zeros(8).long())]\n"
        "    return allot.Data(batches, lambda outputs, batch: outputs.sum(1))\n"
    )
    code, _, err = _run(
        capsys,
        *("compress", "--model", reference, "--weights", weights, "--data", f"{factory}:make"),
        *("--method", "uniform-quant", "--bits", "4", "--out", str(tmp_path / "o")),
    )
    assert code == 2 and "must return a scalar tensor" in err and err.count("\n") == 1


def test_lowrank_compact_runs_under_its_own_lossless_budget(tmp_path, capsys) -> None:
    out = tmp_path / "compact"
    code, _, err = _run(
        capsys,
        *("compress", "test-mlp", "--method", "lowrank-compact", "--out", str(out)),
        *("--calibration", "64"),
    )
    assert code == 0, err
    plan = json.loads((out / PLAN).read_text())
    assert plan["budget"] == {"kind": "lossless", "value": None}
    lossless = plan["metadata"]["lossless"]
    assert lossless["search"] == "compact"
    assert lossless["calibration_loss"] <= lossless["float_calibration_loss"]
    report = (out / "report.md").read_text()
    assert "predicted dL" in report and "measured dL" in report


def test_demo_runs_compress_with_every_compress_option(monkeypatch, tmp_path) -> None:
    """The demo hands compress a namespace its own parser made: an option added to compress
    cannot be missing from it (the README's first command broke that way once)."""
    from allot import cli

    seen = {}
    monkeypatch.setattr(cli, "cmd_compress", lambda args: seen.update(vars(args)))
    cli.main(["--threads", "1", "demo", "--out", str(tmp_path / "d")])
    compress = cli.parser().parse_args(["compress", "x", "--method", "cet", "--out", "o"])
    assert set(vars(compress)) - {"func"} <= set(seen)
    assert seen["method"] == "uniform-quant" and seen["bits"] == 4 and seen["threads"] == 1
    assert seen["out"] == str(tmp_path / "d") and seen["model"] == "mnist-resnet20"
