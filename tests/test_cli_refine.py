"""The CLI's LC paths: `compress --method lc --scheme`, `refine ARTIFACT --lc`, `--resume`."""

from __future__ import annotations

import json

import pytest

from allot.cli import main
from allot.io import PLAN
from allot.schemes import parse_scheme, scheme_from_json

FAST = ("--refine-setting", "epochs=1", "--refine-setting", "optimizer=sgd")


def _run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["--no-progress", *args])
    out, err = capsys.readouterr()
    return code, out, err


def _plan(directory) -> dict:
    return json.loads((directory / PLAN).read_text())


def test_compress_with_one_scheme_then_refine_and_resume(tmp_path, capsys) -> None:
    art, again = tmp_path / "art", tmp_path / "again"
    code, stdout, err = _run(
        capsys,
        *("compress", "test-mlp", "--method", "lc", "--scheme", "quant:1+sparse:0.05"),
        *("--keep", "3", "--out", str(art), "--calibration", "64"),
        *FAST,
        *("--refine-setting", "steps=1"),
    )
    assert code == 0, err
    plan = _plan(art)
    schemes = {layer["name"]: scheme_from_json(layer["scheme"]) for layer in plan["layers"]}
    assert schemes == {"1": parse_scheme("quant:1+sparse:0.05"), "3": parse_scheme("keep")}
    assert plan["metadata"]["refine"]["name"] == "lc"
    assert plan["metadata"]["refine"]["settings"]["checkpoint"] == str(art / "checkpoint")
    assert (art / "checkpoint" / "lc-state.json").exists()
    assert stdout.count("accuracy: ") == 2

    refine = ("refine", str(art), "--lc", "--out", str(again), "--calibration", "64", *FAST)
    code, _, err = _run(capsys, *refine, "--refine-setting", "steps=1")
    assert code == 0, err
    code, _, err = _run(capsys, *refine, "--refine-setting", "steps=2", "--resume")
    assert code == 0, err
    history = _plan(again)["metadata"]["lc"]["history"]
    assert [h["step"] for h in history] == [0, 1, 2]
    assert _plan(again)["summary"]["ratio"] == plan["summary"]["ratio"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--refine-setting", "bogus=1"], "has no setting 'bogus'"),
        (["--refine-setting", "steps"], "expected KEY=VALUE"),
        (["--refine-setting", "mu0=-1"], "mu0"),
        (["--scheme", "nonsense:3"], "unknown scheme 'nonsense'"),
        (["--scheme", "rank:99"], "exceeds the layer's full rank"),
        (["--refine", "finetune", "--resume"], "keeps no checkpoint to resume"),
    ],
)
def test_bad_lc_input_gives_one_line_and_exit_2(tmp_path, capsys, args, message) -> None:
    base = ["compress", "test-mlp", "--method", "lc", "--out", str(tmp_path / "o")]
    if "--scheme" not in args:
        base += ["--scheme", "quant:2"]
    code, _, err = _run(capsys, *base, *args)
    assert code == 2, err
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_refine_needs_an_artifact_a_refinement_and_another_out(tmp_path, capsys) -> None:
    art = tmp_path / "art"
    code, _, err = _run(
        capsys,
        *("compress", "test-mlp", "--method", "uniform-quant", "--bits", "4"),
        *("--out", str(art), "--calibration", "64"),
    )
    assert code == 0, err
    for args, message in (
        (("refine", str(art), "--lc", "--out", str(art)), "another directory"),
        (("refine", str(art), "--out", str(tmp_path / "x")), "name the refinement"),
        (("refine", str(tmp_path / "none"), "--lc", "--out", str(tmp_path / "x")), "artifact"),
    ):
        code, _, err = _run(capsys, *args)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1
