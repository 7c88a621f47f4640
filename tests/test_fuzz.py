"""Fuzzing plan.json, artifacts and command lines (hypothesis).

The only acceptable outcomes: success, or one refusal (an `AllotError` with a one-line message;
on the command line, one line on stderr and exit code 2); bounded memory growth (no test
asserts on wall-clock time: a hang shows as a run that does not end); nothing written outside
the command's output directory. The default suite runs a few hundred generated
cases; `pytest -m slow tests/test_fuzz.py` runs 10,000 (5,000 plans, 4,000 artifacts, 1,000
command lines).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import resource
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from allot import load
from allot.cli import main
from allot.exceptions import AllotError
from allot.io import PLAN, WEIGHTS, read_plan

DTYPES = [
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.bool,
]
WORDS = [
    "quant",
    "rank",
    "sparse",
    "sum",
    "keep",
    "same",
    "valid",
    "linear",
    "conv1d",
    "conv2d",
    "test-cnn",
    "test-mlp",
    "mnist-resnet20",
    "ratio",
    "bits",
    "damage",
    "lossless",
    "nearest",
    "steered",
    "/tmp/evil.py:make",
    "0",
    "",
]
KEYS = [
    "kind",
    "bits",
    "group",
    "rounding",
    "rank",
    "density",
    "parts",
    "repeats",
    "value",
    "name",
    "spec",
    "scheme",
    "damage",
    "padding",
    "bias",
    "artifact",
    "prediction",
    "geometry",
    "pareto",
    "notes",
]
NUMBERS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 2, 3, 4, 8, 32, 33, 64, 2**31, 2**63, 2**64]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, 0.5, 1.0, 1e-300, 1e300, 3.7]),
)
LEAVES = st.one_of(st.none(), st.booleans(), NUMBERS, st.text(max_size=12), st.sampled_from(WORDS))
JSON = st.recursive(
    LEAVES,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=10,
)


def _slots(document: Any, parent: Any = None, key: Any = None) -> list[tuple[Any, Any]]:
    """Every (container, key) place of a JSON document, depth first."""
    places = [] if parent is None else [(parent, key)]
    if isinstance(document, dict):
        for k, v in document.items():
            places += _slots(v, document, k)
    elif isinstance(document, list):
        for i, v in enumerate(document):
            places += _slots(v, document, i)
    return places


def mutate_json(data: st.DataObject, document: Any) -> Any:
    """1-3 edits at places drawn from the document: replace, delete, insert, duplicate."""
    document = copy.deepcopy(document)
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        places = _slots(document)
        if not places:
            break
        parent, key = data.draw(st.sampled_from(places), label="place")
        operation = data.draw(st.sampled_from(["replace", "delete", "insert", "duplicate"]))
        if operation == "replace":
            parent[key] = data.draw(JSON, label="value")
        elif operation == "delete":
            del parent[key]
        elif operation == "insert" and isinstance(parent, dict):
            parent[data.draw(st.sampled_from(KEYS) | st.text(max_size=6))] = data.draw(JSON)
        elif operation == "insert":
            parent.insert(key, data.draw(JSON))
        elif isinstance(parent, list):
            parent.insert(key, copy.deepcopy(parent[key]))
        else:
            parent[key] = [parent[key], copy.deepcopy(parent[key])]
    return document


def mutate_bytes(data: st.DataObject, text: bytes) -> bytes:
    """A few bytes of `text` overwritten, deleted or inserted (a torn or hand-mangled file)."""
    text = bytearray(text)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, max(0, len(text) - 1)))
        operation = data.draw(st.sampled_from(["set", "delete", "insert", "truncate"]))
        value = data.draw(st.integers(0, 255))
        if operation == "set" and text:
            text[at] = value
        elif operation == "delete" and text:
            del text[at]
        elif operation == "insert":
            text.insert(at, value)
        else:
            del text[at:]
    return bytes(text)


def one_line_refusal(exc: BaseException) -> None:
    assert isinstance(exc, AllotError), f"{type(exc).__name__}: {exc}"
    assert "\n" not in str(exc) and 0 < len(str(exc)) < 2000, str(exc)


class Bounds:
    """Memory growth of the whole run (time is bounded by the subprocess timeouts where a case
    runs a command; tests do not assert on wall-clock time)."""

    def __init__(self) -> None:
        self.start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def check(self) -> None:
        grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self.start_rss
        assert grown_kib < 2**20, f"peak memory grew by {grown_kib} KiB"


def _settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=examples < 1000,  # the default suite sees the same cases every run
        suppress_health_check=list(HealthCheck),
    )


# plan.json


def _plan_case(data: st.DataObject, artifact: Path, root: Path, bounds: Bounds) -> None:
    import allot.report.markdown as markdown

    directory = root / "case"
    shutil.rmtree(directory, ignore_errors=True)
    shutil.copytree(artifact, directory)
    original = (artifact / PLAN).read_bytes()
    if data.draw(st.integers(0, 4), label="raw") == 0:
        (directory / PLAN).write_bytes(mutate_bytes(data, original))
    else:
        document = mutate_json(data, json.loads(original))
        (directory / PLAN).write_text(json.dumps(document))
    try:
        plan = read_plan(directory)
        markdown.write_report(plan, {}, directory)
        model, _ = load(directory)
        with torch.no_grad():
            model(torch.rand(2, 1, 8, 8))
    except AllotError as exc:
        one_line_refusal(exc)
    bounds.check()


def _run_plans(artifact: Path, root: Path, examples: int, monkeypatch) -> None:
    import allot.report.markdown as markdown

    monkeypatch.setattr(markdown, "_plots", lambda: None)  # plots: tests/test_hostile.py
    bounds = Bounds()

    @_settings(examples)
    @given(data=st.data())
    def fuzz(data):
        _plan_case(data, artifact, root, bounds)

    fuzz()


def test_fuzzed_plans_load_or_are_refused_in_one_line(artifact, tmp_path, monkeypatch) -> None:
    _run_plans(artifact, tmp_path, 150, monkeypatch)


@pytest.mark.slow
def test_fuzzed_plans_many(artifact, tmp_path, monkeypatch) -> None:
    _run_plans(artifact, tmp_path, 5000, monkeypatch)


# artifacts (the weights file)


def _rehash(directory: Path) -> None:
    data = (directory / WEIGHTS).read_bytes()
    plan = json.loads((directory / PLAN).read_text())
    plan["metadata"]["artifact"].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (directory / PLAN).write_text(json.dumps(plan))


def _forge(data: st.DataObject, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    tensors = dict(tensors)
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        name = data.draw(st.sampled_from(sorted(tensors)), label="tensor")
        operation = data.draw(
            st.sampled_from(["dtype", "resize", "poke", "fill", "delete", "add", "rename"])
        )
        tensor = tensors[name]
        if operation == "dtype":
            tensors[name] = tensor.to(data.draw(st.sampled_from(DTYPES)))
        elif operation == "resize":
            size = data.draw(st.integers(0, 2 * tensor.numel() + 2))
            tensors[name] = tensor.reshape(-1).repeat(2)[:size].clone() if size else tensor[:0]
        elif operation in ("poke", "fill") and tensor.numel():
            value = data.draw(
                st.floats(allow_nan=True, allow_infinity=True)
                if tensor.is_floating_point()
                else st.integers(0, 255)
                if tensor.dtype == torch.uint8
                else st.integers(-(2**31), 2**31 - 1)
            )
            flat = tensor.reshape(-1).clone()
            if operation == "fill":
                flat[:] = value
            else:
                flat[data.draw(st.integers(0, flat.numel() - 1))] = value
            tensors[name] = flat.reshape(tensor.shape)
        elif operation == "delete" and len(tensors) > 1:
            del tensors[name]
        elif operation == "add":
            tensors[data.draw(st.sampled_from([f"{name}.x", "5.parts.2.codes", "extra"]))] = (
                torch.zeros(data.draw(st.integers(0, 4)))
            )
        elif operation == "rename":
            tensors[data.draw(st.text(min_size=1, max_size=8))] = tensors.pop(name)
    return {k: v.contiguous() for k, v in tensors.items()}


def _artifact_case(data: st.DataObject, artifact: Path, root: Path, bounds: Bounds) -> None:
    directory = root / "case"
    shutil.rmtree(directory, ignore_errors=True)
    shutil.copytree(artifact, directory)
    if data.draw(st.integers(0, 4), label="raw") == 0:
        original = (directory / WEIGHTS).read_bytes()
        (directory / WEIGHTS).write_bytes(mutate_bytes(data, original))
    else:
        try:
            save_file(_forge(data, load_file(artifact / WEIGHTS)), directory / WEIGHTS)
        except (SafetensorError, ValueError, RuntimeError):
            return  # safetensors cannot write this forgery; nothing to load
    if data.draw(st.booleans(), label="rehash"):
        _rehash(directory)  # a forger updates the digest; the checks on load must hold
    try:
        model, _ = load(directory)
    except AllotError as exc:
        one_line_refusal(exc)
    else:
        with torch.no_grad():  # what loads runs; forged but valid values may give any outputs
            model(torch.rand(2, 1, 8, 8))
    bounds.check()


def _run_artifacts(artifact: Path, root: Path, examples: int) -> None:
    bounds = Bounds()

    @_settings(examples)
    @given(data=st.data())
    def fuzz(data):
        _artifact_case(data, artifact, root, bounds)

    fuzz()


def test_fuzzed_artifacts_load_or_are_refused_in_one_line(artifact, tmp_path) -> None:
    _run_artifacts(artifact, tmp_path, 120)


@pytest.mark.slow
def test_fuzzed_artifacts_many(artifact, tmp_path) -> None:
    _run_artifacts(artifact, tmp_path, 4000)


# command lines


USER_MODEL = (
    "import torch, torch.nn as nn\n"
    "def make():\n"
    "    torch.manual_seed(1)\n"
    "    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))\n"
)
OUTS = ["new", "art", "mine", "file.txt", "link", "w.safetensors", ".", "sub/new", "/dev/null"]
FAST = ("--calibration", "16")


def _sandbox(template: Path, artifact: Path) -> None:
    """The files a fuzzed command line may name: a user's model, weights and data, an artifact,
    a directory of the user's own, a file and a symlink."""
    template.mkdir()
    (template / "net.py").write_text(USER_MODEL)
    namespace: dict = {}
    exec(USER_MODEL, namespace)
    save_file(namespace["make"]().state_dict(), template / "w.safetensors")
    generator = np.random.default_rng(0)
    np.savez(
        template / "data.npz",
        inputs=generator.random((48, 1, 8, 8), dtype=np.float32),
        targets=generator.integers(0, 10, 48),
    )
    shutil.copytree(artifact, template / "art")
    (template / "mine").mkdir()
    (template / "mine" / "notes.txt").write_text("the user's")
    (template / "file.txt").write_text("the user's")
    (template / "link").symlink_to("mine")


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns)
        for p in root.rglob("*")
    }


BUDGETS = {
    "--bits": ["2", "4", "8"],
    "--ratio": ["4", "8", "20"],
    "--avg-bits": ["3", "5.5"],
    "--bytes": ["3000", "100000"],
    "--max-damage": ["0.01", "0"],
}
JUNK = st.text(max_size=8) | st.sampled_from(["-1", "0", "nan", "inf", "1e23", "", "--x"])
EXTRAS = {
    "compress": {
        "--seed": ["0", "1", "7"],
        "--calibration": ["16", "32", "1"],
        "--keep": ["0", "5", "*", "nothing"],
        "--pin": ["0=quant:8", "5=quant:2+sparse:0.1", "*=keep", "0=rank:2"],
        "--refine": ["feedback", "finetune"],
        "--refine-epochs": ["0", "1"],
        "--no-cache": None,
    },
    "analyze": {
        "--seed": ["0", "3"],
        "--calibration": ["16", "8"],
        "--error-model": ["second-order", "output", "weight", "trace"],
        "--method": ["uniform-quant", "cet"],
        "--no-cache": None,
    },
    "evaluate": {"--latency": None, "--data": ["digits", "data.npz"]},
    "report": {},
    "zoo": {},
}


def _argv(data: st.DataObject) -> list[str]:
    """A command line, valid in most of its parts (so that runs reach deep into the work), each
    part replaced by junk one time in ten."""

    def pick(options: list[str], label: str) -> str:
        if data.draw(st.integers(0, 9), label=f"{label} junk?") == 0:
            return data.draw(JUNK, label=f"{label} junk")
        return data.draw(st.sampled_from(options), label=label)

    commands = ["compress"] * 4 + ["evaluate", "evaluate", "analyze", "report", "report", "zoo"]
    command = data.draw(st.sampled_from(commands), label="command")
    args: list[str] = []
    if data.draw(st.integers(0, 9), label="threads?") == 0:
        args += ["--threads", pick(["1", "2"], "threads")]
    model = pick(["test-cnn", "test-cnn", "test-mlp", "file", "no-such"], "model")
    if command == "compress":
        if model == "file":
            args += ["compress", "--model", "net.py:make", "--weights", "w.safetensors"]
            args += ["--data", pick(["digits", "data.npz", "data.npz", "nothing.npz"], "data")]
            if data.draw(st.booleans(), label="loss?"):
                args += ["--loss", pick(["cross-entropy", "mse", "distill"], "loss")]
        else:
            args += ["compress", model]
        args += ["--method", pick(["uniform-quant", "weight-error-quant", "cet"], "method")]
        budget = pick(sorted(BUDGETS), "budget")
        args += [budget, pick(BUDGETS.get(budget, ["4"]), "value")]
        args += ["--out", pick(OUTS, "out"), *FAST]
    elif command == "evaluate":
        args += ["evaluate", pick(["art", "art", "test-cnn", "mine", "file.txt"], "target")]
    elif command == "analyze":
        args += ["analyze", model if model != "file" else "test-cnn", *FAST]
        args += ["--probes", pick(["2", "4"], "probes"), "--lanczos", pick(["1", "2"], "lz")]
        if data.draw(st.booleans(), label="out?"):
            args += ["--out", pick(OUTS, "out")]
    elif command == "report":
        args += ["report", pick(["art", "art", "mine", "file.txt", "."], "target")]
    else:
        args += ["zoo", pick(["list"], "zoo")]
    extras = EXTRAS[command]
    for _ in range(data.draw(st.integers(0, 2), label="extras") if extras else 0):
        option = pick(sorted(extras), "option")
        values = extras.get(option)
        args += [option] if values is None else [option, pick(values, option)]
    return args


def _command_case(data, template: Path, root: Path, bounds: Bounds, capsys) -> None:
    sandbox = root / "sandbox"
    os.chdir(root)  # not inside the sandbox while it is removed
    shutil.rmtree(sandbox, ignore_errors=True)
    shutil.copytree(template, sandbox, symlinks=True)
    argv = _argv(data)
    os.chdir(sandbox)
    before = _tree(sandbox)
    code = main(["--no-progress", *argv])
    bounds.check()
    _, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if not line.startswith("allot: warning:")]
    if code != 0:
        assert code == 2, (argv, err)
        assert len(errors) == 1 and errors[0].startswith("allot"), (argv, err)
    # nothing written outside the command's output: --out, or the artifact `report` rewrites
    outputs = set()
    if "--out" in argv:
        outputs.add(argv[argv.index("--out") + 1])
    if "report" in argv:
        outputs.add(argv[argv.index("report") + 1])
    after = _tree(sandbox)
    touched = (set(before) ^ set(after)) | {
        p for p in set(before) & set(after) if before[p] != after[p]
    }
    outside = sorted(p for p in touched if not _within(p, outputs))
    assert outside == [], (argv, outside, err)
    assert not [p for p in after if ".allot-new-" in p or ".allot-old-" in p], (argv, after)


def _within(path: str, outputs: set[str]) -> bool:
    """Whether `path` is an output, inside one, or a folder made to hold one."""
    for output in (o.strip("/") for o in outputs):
        if path == output or path.startswith(output + "/") or output.startswith(path + "/"):
            return True
    return False


def _run_commands(template_root: Path, artifact: Path, examples: int, capsys) -> None:
    template = template_root / "template"
    _sandbox(template, artifact)
    bounds = Bounds()
    cwd = os.getcwd()

    @_settings(examples)
    @given(data=st.data())
    def fuzz(data):
        _command_case(data, template, template_root, bounds, capsys)

    try:
        fuzz()
    finally:
        os.chdir(cwd)


def test_fuzzed_command_lines_succeed_or_refuse_in_one_line(artifact, tmp_path, capsys) -> None:
    _run_commands(tmp_path, artifact, 30, capsys)


@pytest.mark.slow
def test_fuzzed_command_lines_many(artifact, tmp_path, capsys) -> None:
    _run_commands(tmp_path, artifact, 1000, capsys)
