"""AIMET (aimet-torch 2.x) as a peer on convolutional models: AdaRound, round-to-nearest and
automatic mixed precision (AMP), weights only, on AIMET's own per-channel quantsim grid.

Every peer builds an AIMET `QuantizationSimModel` of a copy of the folded model with AIMET's
shipped per-channel config (`default_config_per_channel.json`: symmetric weights, one scale per
output channel for Conv and Gemm/Linear, biases in float) and removes every input and output
(activation) quantizer, as AIMET's own AdaRound does, so activations stay float32. AIMET's
symmetric grid is not strict: a b-bit weight takes the codes -2^(b-1) .. 2^(b-1)-1 times its
channel's scale, so at 2 bits the codes are -2..1 and positive weights get a single step (AIMET's
min-max rule then sets the scale to max|w| / 2, clipping the positive extreme). The range setting is AIMET's `post_training_tf_enhanced` (an SQNR search over the weight
histogram, the default of `Adaround.apply_adaround`) unless a setting asks for `tf` (min-max).

The returned model is a plain copy of the folded model whose quantized parameters hold exactly the
values the quantsim's weight quantizers produce (scale * (code + offset)), so it runs without AIMET
wrappers. A layer's stored bits are its codes bit-packed at the quantizer's bit-width plus the
encoding AIMET keeps per output channel: a float32 scale and a float32 offset.

aimet-torch pulls in a CUDA build of torchvision whose custom operators cannot load beside a CPU
torch; AIMET only needs torchvision to import, so when its extension cannot load, the two operator
schemas its import needs (`torchvision::nms`, `torchvision::qnms`) are declared, without kernels.
"""

from __future__ import annotations

import copy
import importlib.machinery
import importlib.util
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from allot.data import Inputs, forward
from allot.discover import Layer
from allot.exceptions import ConfigError, DataError
from allot.zoo.data import Dataset
from peers.base import Peer, PeerRun, Setting, packed_bits, tensor_bits

DISTRIBUTION = "aimet-torch"
BITS = (2, 3, 4, 8)
AMP_BITS = (2, 4, 8)
AMP_DROP = 0.01
SCHEMES = {"tf_enhanced": "post_training_tf_enhanced", "tf": "post_training_tf"}
SCHEME_NAMES = {"tf_enhanced": "tf_enhanced (SQNR range search)", "tf": "tf (min-max)"}
DEFAULT_SCHEME = "tf_enhanced"
PER_CHANNEL_CONFIG = "default_config_per_channel.json"

# Keeps the declared torchvision operator schemas registered for the life of the process.
_TORCHVISION_STUB: list[torch.library.Library] = []


def _declare_torchvision_ops() -> None:
    """Declare `torchvision::nms` and `torchvision::qnms` (schemas only) when torchvision is
    installed but its compiled operators cannot load, so that `import torchvision` succeeds.

    Does nothing when torchvision is imported already, is absent, or loads its own operators."""
    if _TORCHVISION_STUB or "torchvision" in sys.modules:
        return
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    if hasattr(torch.ops.torchvision, "nms"):
        return
    finder = importlib.machinery.FileFinder(
        spec.submodule_search_locations[0],
        (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES),
    )
    extension = finder.find_spec("_C")
    if extension is not None and extension.origin is not None:
        try:
            torch.ops.load_library(extension.origin)
            return
        except OSError:
            pass
    library = torch.library.Library("torchvision", "DEF")
    library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _TORCHVISION_STUB.append(library)


@contextmanager
def _quiet_aimet() -> Iterator[None]:
    """Silence AIMET's INFO and WARNING logging (it prints to stdout) and the Python warnings its
    own code raises while a peer runs."""
    from aimet_torch.common.utils import AimetLogger

    loggers = [logging.getLogger(area.value) for area in AimetLogger.LogAreas]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for log, level in zip(loggers, levels, strict=True):
            log.setLevel(level)


def _options(setting: Setting, allowed: Mapping[str, object]) -> dict[str, Any]:
    """The setting's options over the defaults in `allowed`; ConfigError for unknown keys."""
    unknown = sorted(set(setting.options) - set(allowed))
    if unknown:
        raise ConfigError(
            f"unknown AIMET option(s) {unknown} in setting {setting.label!r}; "
            f"known: {sorted(allowed)}"
        )
    options = {**allowed, **setting.options}
    if options["scheme"] not in SCHEMES:
        raise ConfigError(
            f"AIMET scheme must be one of {sorted(SCHEMES)}, got {options['scheme']!r}"
        )
    return options


def _check_bits(bits: object) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ConfigError(f"AIMET weight bits must be an integer from 2 to 16, got {bits!r}")
    return bits


def _quant_scheme(scheme: str) -> Any:
    from aimet_torch.common.defs import QuantScheme

    return getattr(QuantScheme, SCHEMES[scheme])


def _config_file() -> str:
    """Path of AIMET's shipped per-channel quantsim config."""
    import aimet_torch.common.quantsim_config as configs

    return os.path.join(os.path.dirname(configs.__file__), PER_CHANNEL_CONFIG)


def _calibration_inputs(dataset: Dataset) -> list[Inputs]:
    if len(dataset.calibration) == 0:
        raise DataError("AIMET peers need calibration data; the calibration split is empty")
    return [inputs for inputs, _ in dataset.calibration.batches(dataset.batch_size)]


def _dummy_input(dataset: Dataset) -> torch.Tensor:
    inputs = dataset.calibration.inputs
    if isinstance(inputs, dict):
        raise DataError("AIMET peers take models called with one input tensor, not keywords")
    return inputs[:1]


def _quantsim(model: nn.Module, dataset: Dataset, bits: int, scheme: str) -> Any:
    """A weight-only quantsim of a copy of `model`: AIMET's per-channel config at `bits` bits,
    every activation quantizer removed (encodings not computed yet)."""
    from aimet_torch.nn import BaseQuantizationMixin
    from aimet_torch.quantsim import QuantizationSimModel

    sim = QuantizationSimModel(
        copy.deepcopy(model).eval(),
        dummy_input=_dummy_input(dataset),
        quant_scheme=_quant_scheme(scheme),
        default_param_bw=bits,
        config_file=_config_file(),
    )
    for module in sim.model.modules():
        if isinstance(module, BaseQuantizationMixin):
            module.input_quantizers = nn.ModuleList([None] * len(module.input_quantizers))
            module.output_quantizers = nn.ModuleList([None] * len(module.output_quantizers))
    return sim


def _encoding_pass(batch: Inputs) -> Callable[[nn.Module], None]:
    """A `compute_encodings` callback running one calibration batch (weight quantizers see their
    whole weight on any batch; activations are not quantized)."""

    def run(model: nn.Module) -> None:
        forward(model, batch)

    return run


def _harvest(
    sim: Any, model: nn.Module, layers: list[Layer]
) -> tuple[nn.Module, dict[str, int], dict[str, int]]:
    """A copy of the float `model` with every parameter the quantsim quantizes replaced by its
    dequantized value, the stored bits of each allot layer's weight (codes bit-packed + the
    quantizer's scale and offset tensors), and each such layer's weight bit-width.

    AIMET 2.x quantsim swaps modules for quantized subclasses in place (no wrapper level), so its
    module names are the folded model's, which are allot's layer names."""
    names = {layer.name for layer in layers}
    result = copy.deepcopy(model)
    stored: dict[str, int] = {}
    widths: dict[str, int] = {}
    with torch.no_grad():
        for name, qmodule in sim.named_qmodules():
            for param, quantizer in qmodule.param_quantizers.items():
                if quantizer is None:
                    continue
                value = getattr(qmodule, param)
                dequantized = quantizer(value).as_subclass(torch.Tensor)
                getattr(result.get_submodule(name), param).copy_(dequantized)
                if param == "weight" and name in names:
                    encoding = quantizer.get_encodings()
                    widths[name] = quantizer.bitwidth
                    stored[name] = (
                        packed_bits(value.numel(), quantizer.bitwidth)
                        + tensor_bits(encoding.scale)
                        + tensor_bits(encoding.offset)
                    )
    return result, stored, widths


def _grid(scheme: str, widths: Mapping[str, int]) -> str:
    bits = sorted(set(widths.values()))
    two = " (2-bit codes -2..1: positive weights reach one step only)" if 2 in bits else ""
    return f"AIMET {SCHEME_NAMES[scheme]} symmetric per-channel grid{two}"


def _skipped(layers: list[Layer], stored: Mapping[str, int]) -> list[str]:
    missing = [layer.name for layer in layers if layer.name not in stored]
    return [f"AIMET left in float: {', '.join(missing)}"] if missing else []


# --- round to nearest -------------------------------------------------------------------------

RTN_OPTIONS: dict[str, object] = {"bits": None, "scheme": DEFAULT_SCHEME}


def rtn_settings() -> list[Setting]:
    """Round-to-nearest at 2, 3, 4 and 8 bits per weight."""
    return [Setting(f"W{bits} per-channel", {"bits": bits}) for bits in BITS]


def run_rtn(model: nn.Module, dataset: Dataset, layers: list[Layer], setting: Setting) -> PeerRun:
    """Weights rounded to nearest on AIMET's quantsim grid at `bits` bits (options: `bits`,
    `scheme` "tf_enhanced" or "tf"); activations float."""
    options = _options(setting, RTN_OPTIONS)
    bits = _check_bits(options["bits"])
    _declare_torchvision_ops()
    with _quiet_aimet():
        sim = _quantsim(model, dataset, bits, options["scheme"])
        sim.compute_encodings(_encoding_pass(_calibration_inputs(dataset)[0]))
        result, stored, widths = _harvest(sim, model, layers)
    return PeerRun(
        result,
        stored,
        _grid(options["scheme"], widths) + ", round-to-nearest",
        _skipped(layers, stored),
    )


# --- AdaRound ---------------------------------------------------------------------------------

ADAROUND_OPTIONS: dict[str, object] = {"bits": None, "scheme": DEFAULT_SCHEME, "iterations": None}


def adaround_settings() -> list[Setting]:
    """AdaRound at 2, 3, 4 and 8 bits per weight with AIMET's default hyper-parameters."""
    return [Setting(f"W{bits} per-channel, AdaRound defaults", {"bits": bits}) for bits in BITS]


def run_adaround(
    model: nn.Module, dataset: Dataset, layers: list[Layer], setting: Setting
) -> PeerRun:
    """AIMET's documented AdaRound flow, weights only: `Adaround.apply_adaround` on a copy, then a
    quantsim of the AdaRounded model that loads AdaRound's weight encodings frozen and computes the
    rest (layer kinds AdaRound does not support are rounded to nearest there).

    Options: `bits`, `scheme`, `iterations` (per layer; None keeps AIMET's default of 15000 below
    8 bits and 10000 at 8 bits). The other hyper-parameters are AIMET's defaults: regularization
    0.01, beta annealed 20 -> 2, warm start 20%, every calibration batch (AIMET advises 500-1000
    images), AIMET's own minibatches of 32.
    """
    options = _options(setting, ADAROUND_OPTIONS)
    bits = _check_bits(options["bits"])
    iterations = options["iterations"]
    if iterations is not None and (
        isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1
    ):
        raise ConfigError(f"AdaRound iterations must be a positive integer, got {iterations!r}")
    _declare_torchvision_ops()
    from aimet_torch.adaround import Adaround, AdaroundParameters
    from aimet_torch.adaround.adaround_weight import AdaroundSupportedModules

    batches = _calibration_inputs(dataset)
    params = AdaroundParameters(
        data_loader=batches,
        num_batches=len(batches),
        default_num_iterations=iterations,
        forward_fn=forward,
    )
    with _quiet_aimet(), tempfile.TemporaryDirectory() as directory, torch.random.fork_rng():
        torch.manual_seed(0)
        rounded = Adaround.apply_adaround(
            copy.deepcopy(model).eval(),
            _dummy_input(dataset),
            params,
            path=directory,
            filename_prefix="adaround",
            default_param_bw=bits,
            default_quant_scheme=_quant_scheme(options["scheme"]),
            default_config_file=_config_file(),
        )
        sim = _quantsim(rounded, dataset, bits, options["scheme"])
        sim.load_encodings(
            os.path.join(directory, "adaround.encodings"),
            strict=True,
            partial=True,
            requires_grad=False,
            allow_overwrite=False,
        )
        sim.compute_encodings(_encoding_pass(batches[0]))
        result, stored, widths = _harvest(sim, model, layers)
    unsupported = [
        name
        for name in stored
        if not isinstance(model.get_submodule(name), AdaroundSupportedModules)
    ]
    notes = _skipped(layers, stored)
    if unsupported:
        notes.append(
            "AIMET AdaRound supports Conv2d, ConvTranspose2d and Linear only; rounded to nearest "
            f"on the same grid: {', '.join(unsupported)}"
        )
    default = 15000 if bits < 8 else 10000
    count = (
        f"{iterations} iterations per layer (lowered from AIMET's default {default})"
        if iterations
        else f"{default} iterations per layer (AIMET's default)"
    )
    notes.append(
        f"AdaRound {count}, {len(dataset.calibration)} calibration samples, regularization 0.01, "
        "beta 20->2, warm start 0.2"
    )
    return PeerRun(result, stored, _grid(options["scheme"], widths) + ", AdaRound", notes)


# --- automatic mixed precision ----------------------------------------------------------------

AMP_OPTIONS: dict[str, object] = {
    "candidates": AMP_BITS,
    "drop": AMP_DROP,
    "scheme": DEFAULT_SCHEME,
}


def amp_settings() -> list[Setting]:
    """AMP over {2, 4, 8}-bit weights, at most 1 accuracy point lost on the calibration split."""
    return [Setting("{2,4,8} drop<=1pt (calibration)")]


def run_amp(model: nn.Module, dataset: Dataset, layers: list[Layer], setting: Setting) -> PeerRun:
    """AIMET's greedy AMP (`choose_mixed_precision`, binary search in phase 2) choosing each
    layer's weight bit-width among `candidates` so that the headline metric on the calibration
    split (both evaluation callbacks) drops by at most `drop` (a fraction: 0.01 = 1 point) from
    the float model's. Activations stay float: the activation half of AMP's candidates is nominal
    (16-bit int) because every activation quantizer is removed before AMP runs.

    Options: `candidates` (weight bit-widths), `drop`, `scheme`.
    """
    options = _options(setting, AMP_OPTIONS)
    candidates = options["candidates"]
    if not isinstance(candidates, (tuple, list)) or len(candidates) < 2:
        raise ConfigError(f"AMP needs at least two candidate bit-widths, got {candidates!r}")
    widths = sorted({_check_bits(bits) for bits in candidates})
    drop = options["drop"]
    if isinstance(drop, bool) or not isinstance(drop, (int, float)) or not 0 <= drop < 1:
        raise ConfigError(f"AMP accuracy drop must be a fraction in [0, 1), got {drop!r}")
    _declare_torchvision_ops()
    from aimet_torch.common.defs import CallbackFunc, QuantizationDataType
    from aimet_torch.mixed_precision import choose_mixed_precision

    batches = _calibration_inputs(dataset)
    integer = QuantizationDataType.int
    amp_candidates = [((16, integer), (bits, integer)) for bits in widths]

    def evaluate(net: nn.Module, _: object) -> float:
        return dataset.task.evaluate(net, dataset, "calibration")[dataset.task.headline]

    def encode(net: nn.Module, batch: Inputs) -> None:
        forward(net, batch)

    with _quiet_aimet(), tempfile.TemporaryDirectory() as directory:
        sim = _quantsim(model, dataset, widths[-1], options["scheme"])
        sim.compute_encodings(encode, batches[0])
        choose_mixed_precision(
            sim,
            _dummy_input(dataset),
            amp_candidates,
            eval_callback_for_phase1=CallbackFunc(evaluate),
            eval_callback_for_phase2=CallbackFunc(evaluate),
            allowed_accuracy_drop=float(drop),
            results_dir=directory,
            clean_start=True,
            forward_pass_callback=CallbackFunc(encode, batches[0]),
        )
        result, stored, chosen = _harvest(sim, model, layers)
    counts = {bits: sum(1 for w in chosen.values() if w == bits) for bits in widths}
    chosen_counts = ", ".join(
        f"{n} layer{'' if n == 1 else 's'} at {bits} bits" for bits, n in counts.items()
    )
    notes = [
        *_skipped(layers, stored),
        f"AMP chose {chosen_counts}; accuracy drop allowed {drop:g} on the calibration split; "
        "activations float",
    ]
    return PeerRun(
        result,
        stored,
        _grid(options["scheme"], chosen) + ", round-to-nearest, AMP per-layer bit-widths",
        notes,
    )


@dataclass(frozen=True)
class AimetPeer(Peer):
    """A peer whose availability check first makes torchvision importable (see the module notes),
    since importing aimet_torch imports torchvision."""

    def unavailable(self) -> str | None:
        """One line saying why this peer cannot run here, or None when it can."""
        if importlib.util.find_spec("aimet_torch") is not None:
            _declare_torchvision_ops()
        return super().unavailable()


MODULES = ("aimet_torch",)

PEERS: tuple[Peer, ...] = (
    AimetPeer(
        "aimet-adaround", DISTRIBUTION, "conv", adaround_settings, run_adaround, MODULES, "aimet"
    ),
    AimetPeer("aimet-rtn", DISTRIBUTION, "conv", rtn_settings, run_rtn, MODULES, "aimet"),
    AimetPeer("aimet-amp", DISTRIBUTION, "conv", amp_settings, run_amp, MODULES, "aimet"),
)
