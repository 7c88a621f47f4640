"""Hugging Face models from a directory on disk: `--model hf:PATH`, with text calibration lines.

`PATH` is a transformers model directory (`config.json`, weights, tokenizer files); nothing is
downloaded (`HF_HUB_OFFLINE`, `local_files_only`) and no code from the directory runs
(`trust_remote_code` stays off: only the installed transformers classes are built). The model is
loaded with eager attention, the only attention with a double backward (Hessian-vector products
need it), and wrapped as `HFEncoder`: token ids and attention mask in, the attention-masked mean of
the last hidden states out (N, hidden), the sentence embedding of encoder models.

Data: a text file of calibration lines (`--data FILE.txt`), tokenized in batches (padded to the
longest line, truncated to `MAX_TOKENS`), under the data contract with the `distill` loss (squared
distance to the float model's outputs: no labels needed). A held-out text file adds `fidelity`,
the mean cosine of the outputs to the float model's, as the held-out metric.

An artifact of a Hugging Face model carries the model's `config.json` and tokenizer in its `hf/`
folder (`save_architecture`), so it reloads into the same transformers class without the original
directory: `allot.load(DIR, allot.hf.architecture(DIR / "hf"))`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from allot.data import Data, Distill, model_device, to_device
from allot.exceptions import DataError, ModelError

PREFIX = "hf:"
FOLDER = "hf"
"""The folder of an artifact that holds the model's config and tokenizer."""
MAX_TOKENS = 128
BATCH_SIZE = 32


def is_hf_reference(reference: str) -> bool:
    """True for `hf:PATH` model references."""
    return reference.startswith(PREFIX)


def _transformers() -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers
    except ImportError as exc:
        raise ModelError("hf: models need transformers: pip install transformers") from exc
    transformers.utils.logging.disable_progress_bar()
    return transformers


def _directory(reference: str) -> Path:
    path = Path(reference.removeprefix(PREFIX)).expanduser()
    if not (path / "config.json").is_file():
        raise ModelError(f"{path} is not a transformers model directory (no config.json)")
    return path


class HFEncoder(nn.Module):
    """A transformers model whose output is the attention-masked mean of its last hidden states.

    `forward(input_ids, attention_mask)` takes (N, T) integer tensors and returns (N, hidden)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def load_model(reference: str) -> HFEncoder:
    """The trained model of `hf:PATH`, with eager attention, in eval mode."""
    path = _directory(reference)
    transformers = _transformers()
    try:
        model = transformers.AutoModel.from_pretrained(
            path, attn_implementation="eager", local_files_only=True, trust_remote_code=False
        )
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"transformers cannot load {path}: {first}") from exc
    return HFEncoder(model).eval()


def architecture(directory: str | Path) -> Callable[[], HFEncoder]:
    """A factory of the model's architecture (random weights) from the `config.json` in
    `directory` (an artifact's `hf/` folder, or the model directory itself)."""
    path = Path(directory)
    if not (path / "config.json").is_file():
        raise ModelError(f"{path} holds no config.json of a transformers model")
    transformers = _transformers()

    def build() -> HFEncoder:
        config = transformers.AutoConfig.from_pretrained(
            path, local_files_only=True, trust_remote_code=False
        )
        return HFEncoder(transformers.AutoModel.from_config(config, attn_implementation="eager"))

    return build


def tokenizer(directory: str | Path) -> Any:
    """The tokenizer saved in a model directory (or an artifact's `hf/` folder)."""
    transformers = _transformers()
    try:
        return transformers.AutoTokenizer.from_pretrained(
            Path(directory), local_files_only=True, trust_remote_code=False
        )
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"no usable tokenizer in {directory}: {first}") from exc


def save_architecture(reference: str, artifact: str | Path) -> Path:
    """Copy the model's config and tokenizer into the artifact's `hf/` folder."""
    source = _directory(reference)
    folder = Path(artifact) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    _transformers().AutoConfig.from_pretrained(source, local_files_only=True).save_pretrained(
        folder
    )
    tokenizer(source).save_pretrained(folder)
    return folder


def read_lines(path: str | Path, limit: int | None = None) -> list[str]:
    """The non-empty lines of a text file (at most `limit`)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"text file {path} does not exist")
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not a readable UTF-8 text file: {exc}") from exc
    lines = [line for line in lines if line]
    if not lines:
        raise DataError(f"{path} holds no text lines")
    return lines if limit is None else lines[:limit]


def batches(lines: list[str], tokenize: Any, batch_size: int = BATCH_SIZE) -> list[dict]:
    """Tokenized batches of lines: dicts of `input_ids` and `attention_mask` (N, T) int64."""
    out = []
    for start in range(0, len(lines), batch_size):
        encoded = tokenize(
            lines[start : start + batch_size],
            padding="longest",
            truncation=True,
            max_length=MAX_TOKENS,
            return_tensors="pt",
        )
        out.append({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]})
    return out


def text_data(
    path: str | Path,
    model: nn.Module,
    tokenize: Any,
    calibration: int | None,
    held_out: str | Path | None = None,
) -> Data:
    """Calibration lines of a text file (the first `calibration`) under the data contract with
    the distill loss, and `fidelity` (mean cosine to the float model's outputs) on `held_out`
    lines when given."""
    loss = Distill(model)
    data = Data(batches(read_lines(path, calibration), tokenize), loss, name=Path(path).name)
    if held_out is None:
        return data
    evaluation = batches(read_lines(held_out), tokenize)

    def evaluate(candidate: nn.Module) -> dict[str, float]:
        cosine, distance, count = 0.0, 0.0, 0
        device = model_device(candidate)
        with torch.no_grad():
            for batch in evaluation:
                batch = to_device(batch, device)
                outputs, target = candidate(**batch), loss.reference(**batch)
                n = len(outputs)
                cosine += float(F.cosine_similarity(outputs, target, dim=-1).sum())
                distance += n * float(loss(outputs, batch))
                count += n
        return {"fidelity": cosine / count, "loss": distance / count}

    return Data(data.calibration, loss, evaluate=evaluate, name=data.name)
