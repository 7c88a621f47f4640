"""The hostile and faulty inputs of issue 26, re-run: each gives success, or one line on stderr and
exit code 2, with no code run from an artifact and nothing of the user's lost.

Items are numbered as in the issue. Artifacts are forged the way an attacker would: tensors edited,
and the plan's recorded size and SHA-256 of the weights updated to match (the digest catches
damage, not forgery), so it is the load-time checks that must refuse them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file, save_model

from allot import load
from allot.cli import main
from allot.exceptions import ArtifactError
from allot.io import PLAN, WEIGHTS


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["--no-progress", *args])
    out, err = capsys.readouterr()
    return code, out, err


def refused(capsys, *args: str, message: str) -> str:
    """Run the CLI; assert exit code 2, one line on stderr holding `message`; return the line."""
    code, _, err = run(capsys, *args)
    lines = [line for line in err.splitlines() if not line.startswith("allot: warning:")]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert message in lines[0], lines[0]
    return lines[0]


def copy(artifact: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(artifact, target)
    return target


def edit_plan(directory: Path, edit) -> None:
    plan = json.loads((directory / PLAN).read_text())
    edit(plan)
    (directory / PLAN).write_text(json.dumps(plan))


def forge_tensors(directory: Path, edit) -> None:
    """Edit the weights' tensors, and make the plan's digest match the edited file."""
    tensors = load_file(directory / WEIGHTS)
    edit(tensors)
    save_file(tensors, directory / WEIGHTS)
    data = (directory / WEIGHTS).read_bytes()

    def rehash(plan):
        plan["metadata"]["artifact"].update(
            bytes=len(data), sha256=hashlib.sha256(data).hexdigest()
        )

    edit_plan(directory, rehash)


# 1. A plan runs code.


def test_1_an_artifact_never_imports_the_model_file_its_plan_names(
    artifact, tmp_path, capsys
) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.py"
    evil.write_text(f"open({str(marker)!r}, 'w').close()\ndef make():\n    return None\n")
    forged = copy(artifact, tmp_path)
    edit_plan(forged, lambda plan: plan.update(model=f"{evil}:make"))
    refused(capsys, "evaluate", str(forged), message="never runs code it names")
    with pytest.raises(ArtifactError, match="never runs code"):
        load(forged)
    assert not marker.exists()


# 2. --out can destroy the input.


USER_MODEL = (
    "import torch, torch.nn as nn\n"
    "def make():\n"
    "    torch.manual_seed(1)\n"
    "    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))\n"
)


def user_model(folder: Path) -> tuple[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "net.py").write_text(USER_MODEL)
    namespace: dict = {}
    exec(USER_MODEL, namespace)
    weights = folder / "model.safetensors"
    save_file(namespace["make"]().state_dict(), weights)
    return f"{folder / 'net.py'}:make", weights


def test_2_an_out_that_holds_an_input_is_refused_before_any_work(tmp_path, capsys) -> None:
    reference, weights = user_model(tmp_path / "user")
    before = weights.read_bytes()
    cache = Path(os.environ["ALLOT_CACHE"])
    for out in (weights.parent, tmp_path):
        refused(
            capsys,
            *("compress", "--model", reference, "--weights", str(weights), "--data", "digits"),
            *("--method", "uniform-quant", "--bits", "4", "--out", str(out)),
            message="contains the input",
        )
    assert weights.read_bytes() == before
    assert not cache.exists() or not any(cache.rglob("*.safetensors"))  # nothing was profiled
    (tmp_path / "file").write_text("mine")
    refused(
        capsys,
        *("compress", "test-cnn", "--method", "uniform-quant", "--bits", "4"),
        *("--out", str(tmp_path / "file")),
        message="is a file",
    )
    assert (tmp_path / "file").read_text() == "mine"


# 3. The disk cache never hits across processes.


def test_3_the_cache_hits_in_a_second_process(tmp_path) -> None:
    env = {
        **os.environ,
        "ALLOT_CACHE": str(tmp_path / "cache"),
        "PYTHONPATH": os.pathsep.join(sys.path),
    }
    command = [sys.executable, "-m", "allot.cli", "--no-progress", "analyze", "test-cnn"]
    command += ["--calibration", "32", "--probes", "8"]
    first = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    entries = sorted(p.name for p in (tmp_path / "cache").rglob("*.safetensors"))
    assert entries and "0 forward+backward equivalents" not in first.stdout
    second = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    assert "cost: 0 forward+backward equivalents" in second.stdout  # no Hessian product
    assert sorted(p.name for p in (tmp_path / "cache").rglob("*.safetensors")) == entries


def test_3_a_bad_cache_size_bound_is_one_line(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("ALLOT_CACHE_MAX_MB", "lots")
    refused(
        capsys,
        *("analyze", "test-cnn", "--calibration", "16", "--probes", "2"),
        message="ALLOT_CACHE_MAX_MB must be a number",
    )


# 4. An overwritten artifact can be mixed (see also tests/test_files.py and tests/test_kill.py).


def compress_args(out: Path, *more: str) -> list[str]:
    return [
        *("compress", "test-cnn", "--method", "uniform-quant", "--calibration", "64"),
        *("--out", str(out), *more),
    ]


def test_4_and_5_a_full_disk_while_writing_leaves_the_old_artifact_whole(
    tmp_path, capsys, monkeypatch
) -> None:
    out = tmp_path / "art"
    assert run(capsys, *compress_args(out, "--bits", "4"))[0] == 0
    old = {p.name: p.read_bytes() for p in out.iterdir()}
    cache = Path(os.environ["ALLOT_CACHE"])
    entries = sorted(cache.rglob("*.safetensors"))

    import allot.report.markdown as markdown

    def full(path, data):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(markdown, "atomic_write", full)  # the report is the last file written
    line = refused(capsys, *compress_args(out, "--bits", "2"), message="No space left on device")
    assert "left as it was" in line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]
    # 10. the scored work survived the late failure: the rerun profiles nothing again
    monkeypatch.undo()
    monkeypatch.setenv("ALLOT_CACHE", str(cache))
    assert run(capsys, *compress_args(out, "--bits", "2"))[0] == 0
    assert sorted(cache.rglob("*.safetensors")) == entries
    evaluation = json.loads((out / "evaluation.json").read_text())
    plan = json.loads((out / PLAN).read_text())
    assert evaluation["compressed"]["ratio"] == pytest.approx(plan["summary"]["ratio"], rel=1e-3)
    assert plan["budget"] == {"kind": "bits", "value": 2}


# 5. Tracebacks instead of one line and exit 2.


def test_5_a_plan_relabelled_as_another_zoo_model(artifact, tmp_path, capsys) -> None:
    forged = copy(artifact, tmp_path)
    edit_plan(forged, lambda plan: plan.update(model="test-mlp"))
    refused(capsys, "evaluate", str(forged), message="is it a plan for another model?")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"[" * 200_000 + b"]" * 200_000, "nests JSON too deeply"),
        (b"\xff\xfe\x00{", "is not UTF-8"),
        (b"[]", "expected a JSON object"),
    ],
)
def test_5_a_plan_that_is_no_json_object(artifact, tmp_path, capsys, content, message) -> None:
    forged = copy(artifact, tmp_path)
    (forged / PLAN).write_bytes(content)
    for command in ("evaluate", "report"):
        line = refused(capsys, command, str(forged), message=message)
        assert line.count(str(forged / PLAN)) == 1  # named once, not twice


def test_5_an_unusable_cache_directory_warns_once_and_the_run_succeeds(
    tmp_path, capsys, monkeypatch
) -> None:
    (tmp_path / "file").write_text("not a directory")
    monkeypatch.setenv("ALLOT_CACHE", str(tmp_path / "file"))
    code, _, err = run(capsys, *compress_args(tmp_path / "o", "--bits", "4"))
    assert code == 0, err
    warnings = err.splitlines()
    assert len(warnings) == 1 and warnings[0].startswith("allot: warning: the profile cache")
    assert (tmp_path / "file").read_text() == "not a directory"


def test_5_an_unwritable_cache_directory_warns_and_the_run_succeeds(
    tmp_path, capsys, monkeypatch
) -> None:
    """Permission denied (simulated: the tests may run as root, who may write anywhere)."""
    import allot.profile.cache as cache

    def denied(path, data):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(cache, "atomic_write", denied)
    code, _, err = run(capsys, *compress_args(tmp_path / "o", "--bits", "4"))
    assert code == 0, err
    assert err.count("allot: warning:") == 1 and "Permission denied" in err


DICT_MODEL = """
import torch, torch.nn as nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x):
        y = self.body(x)
        return {"logits": y, "energy": y.pow(2).sum(1)}

class TupleNet(Net):
    def forward(self, x):
        y = self.body(x)
        return y, y.pow(2).sum(1)

def make():
    torch.manual_seed(1)
    return Net()

def make_tuple():
    torch.manual_seed(1)
    return TupleNet()
"""

DICT_DATA = """
import torch, torch.nn.functional as F, allot

def logits(outputs):
    return outputs["logits"] if isinstance(outputs, dict) else outputs[0]

def make():
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(192, 1, 8, 8, generator=generator)
    y = torch.randint(0, 10, (192,), generator=generator)
    batches = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 128, 32)]
    held_out = [(x[128:], y[128:])]

    def loss(outputs, batch):
        return F.cross_entropy(logits(outputs), batch[1])

    def evaluate(model):  # metrics without a "loss": the Task protocol does not ask for one
        with torch.no_grad():
            hits = sum(int((logits(model(b[0])).argmax(1) == b[1]).sum()) for b in held_out)
        return {"accuracy": hits / 64}

    return allot.Data(batches, loss, evaluate=evaluate, name="dict-data")
"""


@pytest.mark.parametrize("factory", ["make", "make_tuple"])
def test_5_and_10_a_forward_returning_a_dict_or_tuple_and_metrics_without_loss(
    tmp_path, capsys, factory
) -> None:
    (tmp_path / "net.py").write_text(DICT_MODEL)
    (tmp_path / "data.py").write_text(DICT_DATA)
    namespace: dict = {}
    exec(DICT_MODEL, namespace)
    save_file(namespace[factory]().state_dict(), tmp_path / "w.safetensors")
    model = f"{tmp_path / 'net.py'}:{factory}"
    args = ("--model", model, "--weights", str(tmp_path / "w.safetensors"))
    data = ("--data", f"{tmp_path / 'data.py'}:make")
    code, stdout, err = run(
        capsys,
        *("compress", *args, *data, "--method", "cet", "--ratio", "6"),
        *("--out", str(tmp_path / "o"), "--calibration", "64"),
    )
    assert code == 0, err
    evaluation = json.loads((tmp_path / "o" / "evaluation.json").read_text())
    assert evaluation["compressed"]["macs"] > 0 and "accuracy" in evaluation["compressed"]
    plan = json.loads((tmp_path / "o" / PLAN).read_text())
    assert plan["metadata"]["prediction"]["measured_held_out"] is None  # no "loss" metric
    code, stdout, err = run(capsys, "evaluate", str(tmp_path / "o"), *args, *data, "--latency")
    assert code == 0, err
    assert "macs: " in stdout and "latency_ratio: " in stdout


def test_5_and_10_a_failing_user_evaluation_is_one_line_before_the_long_work(
    tmp_path, capsys
) -> None:
    reference, weights = user_model(tmp_path / "user")
    (tmp_path / "data.py").write_text(
        "import torch, torch.nn.functional as F, allot\n"
        "def make():\n"
        "    batches = [(torch.rand(8, 1, 8, 8), torch.zeros(8).long())]\n"
        "    def evaluate(model):\n"
        "        raise KeyError('loss')\n"
        "    return allot.Data(batches, allot.data.supervised(F.cross_entropy), evaluate=evaluate)\n"
    )
    refused(
        capsys,
        *("compress", "--model", reference, "--weights", str(weights)),
        *("--data", f"{tmp_path / 'data.py'}:make", "--method", "cet", "--ratio", "4"),
        *("--out", str(tmp_path / "o")),
        message="the held-out evaluation failed: KeyError: 'loss'",
    )
    cache = Path(os.environ["ALLOT_CACHE"])
    assert not cache.exists() or not any(cache.rglob("*.safetensors"))  # before any profiling


def test_5_and_7_a_forged_sparse_index_out_of_range(artifact, tmp_path, capsys) -> None:
    forged = copy(artifact, tmp_path)
    plan = json.loads((forged / PLAN).read_text())
    spec = next(layer["spec"] for layer in plan["layers"] if layer["name"] == "5")
    numel = spec["out_features"] * spec["in_features"]
    bits = (numel - 1).bit_length()

    def out_of_range(tensors):
        indices = tensors["5.parts.1.indices"]
        tensors["5.parts.1.indices"] = torch.full_like(indices, 0xFF)  # all ones: 2**bits - 1

    assert 2**bits - 1 >= numel  # the forged position lies past the weight
    forge_tensors(forged, out_of_range)
    line = refused(capsys, "evaluate", str(forged), message="layer 5")
    assert "parts.1.indices must be strictly increasing" in line


@pytest.mark.parametrize(
    "args",
    [
        ["--threads", "-1", "evaluate", "x"],
        ["--threads", "0", "evaluate", "x"],
        ["compress", "test-cnn", "--method", "uniform-quant", "--bits", "4", "--seed", "1e23"],
        ["compress", "test-cnn", "--method", "uniform-quant", "--bits", "4", "--seed", str(2**64)],
        ["compress", "test-cnn", "--method", "uniform-quant", "--bits", "4", "--seed", "-1"],
        ["compress", "test-cnn", "--method", "no-such-method", "--bits", "4"],
        ["compress", "test-cnn", "--method", "uniform-quant", "--ratio", "nan"],
        ["compress", "test-cnn", "--method", "uniform-quant", "--ratio", "inf"],
        ["analyze", "test-cnn", "--probes", "1"],
        ["no-such-command"],
    ],
)
def test_5_bad_arguments_are_one_line(tmp_path, capsys, args) -> None:
    if args[0] == "compress":
        args = [*args, "--out", str(tmp_path / "o")]
    refused(capsys, *args, message="error")
    assert not (tmp_path / "o").exists()


def test_5_analyze_out_that_is_a_file_is_refused_before_the_analysis(tmp_path, capsys) -> None:
    (tmp_path / "file").write_text("mine")
    refused(capsys, "analyze", "test-cnn", "--out", str(tmp_path / "file"), message="is a file")
    assert (tmp_path / "file").read_text() == "mine"
    cache = Path(os.environ["ALLOT_CACHE"])
    assert not cache.exists() or not any(cache.rglob("*.safetensors"))


# 6. Special files.


def test_6_a_plan_or_evaluation_that_is_a_fifo_or_dev_zero(artifact, tmp_path, capsys) -> None:
    forged = copy(artifact, tmp_path)
    (forged / "evaluation.json").unlink(missing_ok=True)
    (forged / "evaluation.json").symlink_to("/dev/zero")
    refused(capsys, "report", str(forged), message="is not a regular file")
    (forged / "evaluation.json").unlink()
    os.mkfifo(forged / "evaluation.json")
    refused(capsys, "report", str(forged), message="is not a regular file")
    (forged / PLAN).unlink()
    os.mkfifo(forged / PLAN)
    refused(capsys, "evaluate", str(forged), message="is not a regular file")
    refused(capsys, "report", str(forged), message="is not a regular file")


def many_layer_plan(artifact: Path, directory: Path, count: int) -> Path:
    plan = json.loads((artifact / PLAN).read_text())
    layer = plan["layers"][0]
    plan["layers"] = [{**layer, "name": f"layer{i}"} for i in range(count)]
    plan["metadata"]["pareto"] = [[1.0, 1.0]] * count
    directory.mkdir()
    (directory / PLAN).write_text(json.dumps(plan))
    return directory


def test_6_a_report_on_a_plan_of_many_layers_stays_bounded(artifact, tmp_path, capsys) -> None:
    """Bounded output: one table row per layer and one bounded figure (its time is measured by
    the slow 150k-layer test's subprocess timeout, not asserted here)."""
    directory = many_layer_plan(artifact, tmp_path / "many", 3_000)
    code, _, err = run(capsys, "report", str(directory))
    assert code == 0, err
    assert (directory / "report.md").stat().st_size < 3_000 * 400  # linear in the layers
    assert (directory / "report.md").read_text().count("| layer2999 |") == 1
    assert (directory / "allocation.png").stat().st_size < 500_000  # one bounded figure


@pytest.mark.slow
def test_6_a_report_on_a_150k_layer_plan_finishes_in_bounded_memory(artifact, tmp_path) -> None:
    """As many layers as fit under the plan size allot reads (64 MiB)."""
    directory = many_layer_plan(artifact, tmp_path / "huge", 150_000)
    command = [sys.executable, "-m", "allot.cli", "--no-progress", "report", str(directory)]
    script = (
        "import resource, subprocess; "
        f"code = subprocess.run({command!r}).returncode; "
        "print(code, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900
    )
    code, peak_kib = result.stdout.splitlines()[-1].split()  # the last line is the script's
    assert code == "0", result.stderr
    assert int(peak_kib) < 2 * 2**20  # under 2 GiB; the timeout above catches a hang


# 7. Quiet acceptance of nonsense.


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("kernel_size", [3.7, 3], "kernel_size must be 2 ints"),
        ("bias", "false", "bias must be true or false"),
        ("padding", "full", "padding must be"),
    ],
)
def test_7_a_nonsense_spec_in_a_plan(artifact, tmp_path, capsys, field, value, message) -> None:
    forged = copy(artifact, tmp_path)
    edit_plan(forged, lambda plan: plan["layers"][0]["spec"].update({field: value}))
    line = refused(capsys, "evaluate", str(forged), message=message)
    assert "plan.layers[0].spec" in line


def test_7_a_nan_damage_in_a_plan(artifact, tmp_path, capsys) -> None:
    forged = copy(artifact, tmp_path)
    text = (forged / PLAN).read_text()
    plan = json.loads(text)
    plan["layers"][0]["damage"] = float("nan")
    (forged / PLAN).write_text(json.dumps(plan))  # json writes the NaN literal Python reads
    for command in ("evaluate", "report"):
        refused(capsys, command, str(forged), message="damage: expected a finite number")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.update({"0.codes": t["0.codes"].float()}), "0.codes is torch.float32"),
        (
            lambda t: t.update({"0.codes": t["0.codes"].long() * 10**12}),
            "0.codes is torch.int64",
        ),
        (
            lambda t: t["0.scale"].view(-1).__setitem__(0, float("nan")),
            "scale holds NaN or infinite",
        ),
        (lambda t: t["0.bias"].__setitem__(0, float("inf")), "bias holds NaN or infinite"),
        (lambda t: t.update({"0.scale": t["0.scale"][:, :0]}), "0.scale has shape"),
        (lambda t: t.pop("0.offset"), "missing 0.offset"),
        (lambda t: t.update({"extra": torch.zeros(1)}), "unexpected extra"),
    ],
)
def test_7_forged_tensors_in_an_artifact(artifact, tmp_path, capsys, edit, message) -> None:
    forged = copy(artifact, tmp_path)
    forge_tensors(forged, edit)
    refused(capsys, "evaluate", str(forged), message=message)
    with pytest.raises(ArtifactError, match=message.split()[0]):
        load(forged)


# 8. Portability of artifacts.


def test_8_a_custom_models_artifact_works_from_another_folder(
    tmp_path, capsys, monkeypatch
) -> None:
    reference, weights = user_model(tmp_path / "user")
    monkeypatch.chdir(tmp_path / "user")
    code, _, err = run(
        capsys,
        *("compress", "--model", "net.py:make", "--weights", "model.safetensors"),
        *("--data", "digits", "--method", "uniform-quant", "--bits", "4", "--out", "../art"),
    )
    assert code == 0, err
    plan = json.loads((tmp_path / "art" / PLAN).read_text())
    assert plan["model"] == reference  # the absolute path, for the record
    monkeypatch.chdir(tmp_path.parent)
    code, stdout, err = run(
        capsys,
        *("evaluate", str(tmp_path / "art"), "--model", reference),
        *("--weights", str(weights), "--data", "digits"),
    )
    assert code == 0, err
    assert "accuracy: " in stdout


def test_8_every_artifact_file_gets_ordinary_permissions(tmp_path, capsys) -> None:
    umask = os.umask(0o022)
    try:
        assert run(capsys, *compress_args(tmp_path / "art", "--bits", "4"))[0] == 0
    finally:
        os.umask(umask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "art").iterdir()}
    assert modes[WEIGHTS] == 0o644 and set(modes.values()) == {0o644}
    assert stat.S_IMODE((tmp_path / "art").stat().st_mode) == 0o755


TIED_MODEL = (
    "import torch, torch.nn as nn\n"
    "def make():\n"
    "    torch.manual_seed(1)\n"
    "    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64),\n"
    "                        nn.ReLU(), nn.Linear(64, 10))\n"
    "    net[3].weight = net[1].weight\n"
    "    return net\n"
)


def test_8_tied_weights_saved_with_save_model_are_accepted(tmp_path, capsys) -> None:
    (tmp_path / "tied.py").write_text(TIED_MODEL)
    namespace: dict = {}
    exec(TIED_MODEL, namespace)
    save_model(namespace["make"](), str(tmp_path / "tied.safetensors"))
    assert "3.weight" not in load_file(tmp_path / "tied.safetensors")  # stored once
    code, _, err = run(
        capsys,
        *("compress", "--model", f"{tmp_path / 'tied.py'}:make"),
        *("--weights", str(tmp_path / "tied.safetensors"), "--data", "digits"),
        *("--method", "uniform-quant", "--bits", "4", "--out", str(tmp_path / "o")),
    )
    assert code == 0, err
    plan = json.loads((tmp_path / "o" / PLAN).read_text())
    assert "tied" in plan["skipped"]["3"]


# 9. Unclear messages.


def test_9_a_padding_mismatch_names_padding(artifact, tmp_path, capsys) -> None:
    forged = copy(artifact, tmp_path)
    edit_plan(forged, lambda plan: plan["layers"][0]["spec"].update(padding="same"))
    line = refused(capsys, "evaluate", str(forged), message="padding 'same' vs (1, 1)")
    assert "is it a plan for another model?" in line


def test_9_a_hand_edited_scheme_names_what_does_not_fit(artifact, tmp_path, capsys) -> None:
    forged = copy(artifact, tmp_path)
    edit_plan(forged, lambda plan: plan["layers"][0]["scheme"].update(bits=3))
    line = refused(capsys, "evaluate", str(forged), message="0.codes has shape")
    assert "was plan.json edited?" in line and "Error(s) in loading" not in line


def test_9_a_model_of_linear_subclasses_says_why(tmp_path, capsys) -> None:
    (tmp_path / "sub.py").write_text(
        "import torch.nn as nn\n"
        "class MyLinear(nn.Linear):\n"
        "    pass\n"
        "def make():\n"
        "    return nn.Sequential(nn.Flatten(), MyLinear(64, 10))\n"
    )
    namespace: dict = {}
    exec((tmp_path / "sub.py").read_text(), namespace)
    save_file(namespace["make"]().state_dict(), tmp_path / "w.safetensors")
    line = refused(
        capsys,
        *("compress", "--model", f"{tmp_path / 'sub.py'}:make"),
        *("--weights", str(tmp_path / "w.safetensors"), "--data", "digits"),
        *("--method", "uniform-quant", "--bits", "4", "--out", str(tmp_path / "o")),
        message="no compressible layers",
    )
    assert "MyLinear subclasses nn.Linear" in line and "plain nn.Linear" in line


def test_9_huge_weights_with_low_rank_name_the_layer(tmp_path, capsys) -> None:
    reference, weights = user_model(tmp_path / "user")
    state = load_file(weights)
    state["1.weight"] = state["1.weight"] * 1e30
    save_file(state, weights)
    line = refused(
        capsys,
        *("compress", "--model", reference, "--weights", str(weights), "--data", "digits"),
        *("--method", "uniform-rank", "--ratio", "2", "--out", str(tmp_path / "o")),
        message="NaN or infinite predicted damage",
    )
    assert "layer 3" in line and "nan, nan" not in line


# Interrupts: SIGINT during compress (more in tests/test_kill.py).


def test_5_sigint_during_compress_is_one_line_and_exit_130(tmp_path) -> None:
    """Exit code 130, not 2: an interrupt is no refused input, and 130 is what shells, make and
    CI report for a command stopped by SIGINT. Whenever it lands, even in the seconds of
    importing torch, it is one line."""
    import signal
    import time

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    args = compress_args(tmp_path / "o", "--bits", "4")
    for delay in (0.3, 1.0, 2.0, 4.0):  # while starting (importing torch), and in the work
        process = subprocess.Popen(
            [sys.executable, "-m", "allot_main", "--no-progress", *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(delay)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=300)
        if process.returncode == 0:
            continue  # finished before the signal (a fast machine): nothing to check
        assert process.returncode == 130, err
        assert len(err.strip().splitlines()) == 1 and err.startswith("allot: interrupted"), err
        assert not (tmp_path / "o").exists()
        assert list(tmp_path.iterdir()) == []  # no staging directory left either
