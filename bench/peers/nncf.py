"""NNCF weight compression (`nncf.compress_weights`, PyTorch backend) with NNCF's recommended settings.

Settings: INT8_ASYM per output channel (NNCF's default mode); INT4_SYM and INT4_ASYM in groups of 64
inputs with every ratio-defining layer at 4 bits (ratio 1.0, data-free) or 80% of their weights at
4 bits and the rest at NNCF's INT8_ASYM backup (ratio 0.8), the backup chosen data-free (by weight
quantization error) or data-aware (by max activation variance); and INT4_ASYM groups of 64 with AWQ
and scale estimation (NNCF's default ratio, 1.0). A data-aware ratio-1.0 row without AWQ or scale
estimation is left out: the data only picks the backup layers, so it equals the data-free row.
Whatever the ratio, NNCF keeps the last layer and the embeddings at the INT8_ASYM backup (its
default `all_layers=False`).

NNCF traces the model (`nncf.torch.wrap_model`) and replaces each weight it compresses by its codes
(int4 codes packed two to a uint8, int8 codes one to a byte) with a decompression hook that holds the
float16 scales and the zero points (uint8, or uint4 packed two to a byte); AWQ puts a float32 scale
in front of the layers whose input it rescales. The returned model runs those hooks, so its metrics
are NNCF's numerics, and a layer's stored bits are read from exactly those tensors: its code tensor
and every tensor of the hooks on its weight or its operation. Compressed weights outside allot's
layers (embeddings) change the metrics but not the ratio, which counts allot's layers only.

Data-aware settings hand NNCF the calibration split one sample at a time (NNCF collects activation
statistics per dataset item) with padding positions dropped; data-free settings use the first
calibration sample only to trace the model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from itertools import chain
from typing import Any

from torch import nn

from allot.data import Inputs, token_mask
from allot.discover import Layer
from allot.exceptions import ConfigError
from allot.zoo.data import Dataset, Split
from peers.base import Peer, PeerRun, Setting, tensor_bits

GROUP_SIZE = 64
RATIOS = (1.0, 0.8)
MODES = ("int8_asym", "int8_sym", "int4_asym", "int4_sym")
_OPTIONS = ("mode", "group_size", "ratio", "data_aware", "awq", "scale_estimation")
# Attribute under which `_Traced` holds the model, so NNCF names its weights `model.<layer>.weight`.
_PREFIX = "model"


@dataclass(frozen=True)
class _Options:
    """A setting's NNCF arguments: `group_size` -1 means one group per output channel."""

    mode: str
    group_size: int
    ratio: float
    data_aware: bool
    awq: bool
    scale_estimation: bool

    @property
    def int8(self) -> bool:
        return self.mode.startswith("int8")


def _setting(
    mode: str,
    group_size: int = -1,
    ratio: float = 1.0,
    data_aware: bool = False,
    awq: bool = False,
    scale_estimation: bool = False,
) -> Setting:
    """A setting labelled with its mode, grouping, ratio, data use and data-aware algorithms."""
    parts = [mode, "per-channel" if group_size == -1 else f"g{group_size}"]
    if not mode.startswith("int8"):
        parts += [f"r{ratio}", "data-aware" if data_aware else "data-free"]
    parts += [name for name, on in (("awq", awq), ("se", scale_estimation)) if on]
    options = {
        "mode": mode,
        "group_size": group_size,
        "ratio": ratio,
        "data_aware": data_aware,
        "awq": awq,
        "scale_estimation": scale_estimation,
    }
    return Setting(" ".join(parts), options)


def settings() -> list[Setting]:
    """NNCF's recommended settings (see the module docstring)."""
    rows = [_setting("int8_asym")]
    for mode in ("int4_sym", "int4_asym"):
        rows += [_setting(mode, GROUP_SIZE, ratio) for ratio in RATIOS]
        # Data only steers which layers go to the backup, so ratio 1.0 data-aware is data-free.
        rows.append(_setting(mode, GROUP_SIZE, RATIOS[-1], data_aware=True))
    rows.append(_setting("int4_asym", GROUP_SIZE, 1.0, True, awq=True, scale_estimation=True))
    return rows


def _options(setting: Setting) -> _Options:
    """The setting's options, checked; ConfigError naming what is wrong."""
    label, given = setting.label, setting.options
    unknown = sorted(set(given) - set(_OPTIONS))
    missing = [key for key in _OPTIONS if key not in given]
    if unknown or missing:
        raise ConfigError(
            f"nncf setting {label!r}: options must be exactly {', '.join(_OPTIONS)} "
            f"(unknown: {unknown}, missing: {missing})"
        )
    options = _Options(**{key: given[key] for key in _OPTIONS})  # type: ignore[arg-type]
    if options.mode not in MODES:
        raise ConfigError(f"nncf setting {label!r}: mode {options.mode!r} is not one of {MODES}")
    if not isinstance(options.group_size, int) or not (
        options.group_size == -1 or options.group_size >= 1
    ):
        raise ConfigError(
            f"nncf setting {label!r}: group_size must be a positive int or -1 (per channel), "
            f"got {options.group_size!r}"
        )
    flags = (options.data_aware, options.awq, options.scale_estimation)
    if not all(isinstance(flag, bool) for flag in flags):
        raise ConfigError(f"nncf setting {label!r}: data_aware, awq, scale_estimation are bools")
    if not isinstance(options.ratio, float | int) or not 0.0 < options.ratio <= 1.0:
        raise ConfigError(f"nncf setting {label!r}: ratio must be in (0, 1], got {options.ratio}")
    if (options.awq or options.scale_estimation) and not options.data_aware:
        raise ConfigError(f"nncf setting {label!r}: AWQ and scale estimation need data_aware")
    if options.int8 and (options.group_size != -1 or options.ratio != 1.0 or options.data_aware):
        raise ConfigError(
            f"nncf setting {label!r}: NNCF's int8 modes are per channel (group_size -1), at "
            f"ratio 1.0 and data-free"
        )
    return options


class _Traced(nn.Module):
    """Holds the model NNCF traces. NNCF adds its hook storage as a child of the module it wraps,
    which an `nn.Sequential` would run as a layer; a holder keeps it out of the model's forward."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)


def _samples(split: Split) -> list[Inputs]:
    """The split's inputs one sample at a time, without the positions its attention mask pads."""
    samples = []
    for inputs, _ in split.batches(1):
        mask = token_mask(inputs)
        if mask is not None and isinstance(inputs, dict):
            inputs = {key: value[:, mask[0]] for key, value in inputs.items()}
        samples.append(inputs)
    return samples


def _compress(model: nn.Module, samples: list[Inputs], options: _Options) -> tuple[nn.Module, Any]:
    """NNCF's compressed copy of `model` (a `_Traced`, running NNCF's hooks) and the NNCF graph it
    was traced to (operations and the weights they read, by NNCF's names)."""
    import nncf
    from nncf.torch import wrap_model

    wrapped = wrap_model(
        _Traced(copy.deepcopy(model)), example_input=samples[0], trace_parameters=True
    )
    graph = wrapped.get_graph()
    kwargs: dict[str, Any] = {"mode": nncf.CompressWeightsMode(options.mode)}
    if not options.int8:
        kwargs.update(ratio=options.ratio, group_size=options.group_size)
    if options.data_aware:
        kwargs.update(dataset=nncf.Dataset(samples), subset_size=len(samples))
    if options.awq:
        kwargs["awq"] = True
    if options.scale_estimation:
        kwargs["scale_estimation"] = True
    return nncf.compress_weights(wrapped, **kwargs), graph


def _hooks(
    traced: nn.Module, graph: Any, layers: list[Layer]
) -> tuple[dict[str, list[tuple[str, nn.Module]]], list[str]]:
    """NNCF's hooks by allot layer: those on the layer's weight (decompression) and those on the
    operation that reads it (AWQ's input scale), as (hook type, module) pairs; and the names of the
    other weights NNCF put a hook on."""
    from nncf.torch.function_hook.hook_storage import decode_hook_name
    from nncf.torch.function_hook.wrapper import get_hook_storage

    owner = {f"{_PREFIX}.{layer.name}.weight": layer.name for layer in layers}
    for node in graph.get_all_nodes():
        for edge in graph.get_input_edges(node):
            if edge.from_node.node_name in owner:
                owner[node.node_name] = owner[edge.from_node.node_name]
    hooks: dict[str, list[tuple[str, nn.Module]]] = {layer.name: [] for layer in layers}
    others = []
    for name, hook in get_hook_storage(traced).named_hooks():
        hook_type, op_name, _ = decode_hook_name(name)
        if op_name in owner:
            hooks[owner[op_name]].append((hook_type, hook))
        else:
            others.append(op_name.removeprefix(f"{_PREFIX}."))
    return hooks, others


def _grid(options: _Options) -> str:
    """How the setting picks its grid and rounds, and what it stores."""
    bits = 8 if options.int8 else 4
    group = (
        "output channel" if options.group_size == -1 else f"group of {options.group_size} inputs"
    )
    if options.mode.endswith("_sym"):
        rule = f"signed scale = largest-magnitude weight / {2 ** (bits - 1)}"
        stored = f"int{bits} codes, fp16 scale per {group}"
    else:
        rule = "min-max range widened to hold 0, integer zero point"
        stored = f"uint{bits} codes, fp16 scale + uint{bits} zero point per {group}"
    parts = [f"NNCF {options.mode}: {rule}, round to nearest; {stored}"]
    if not options.int8:
        metric = "max activation variance" if options.data_aware else "weight quantization error"
        backup = "the last layer"
        if options.ratio < 1.0:
            backup += f" and the {1 - options.ratio:.0%} of weights most sensitive by {metric}"
        parts.append(f"int8_asym per channel (NNCF's backup) for {backup}")
    if options.awq:
        parts.append("AWQ input scaling (fp32 scale per input where it cannot be folded)")
    if options.scale_estimation:
        parts.append("scale estimation (scales refit to the layer's output on calibration data)")
    return "; ".join(parts)


def run(model: nn.Module, dataset: Dataset, layers: list[Layer], setting: Setting) -> PeerRun:
    """Compress a copy of `model` with `nncf.compress_weights` under `setting`.

    `stored_bits[layer]` is the bits of the layer's code tensor (already bit-packed by NNCF) plus
    every tensor of NNCF's hooks on it (scales, zero points, AWQ scales), at their dtypes; layers
    NNCF leaves in float are absent. The model is a holder of the compressed copy that runs NNCF's
    decompression in its forward.
    """
    options = _options(setting)
    samples = _samples(dataset.calibration)
    if not samples:
        raise ConfigError("nncf needs at least one calibration sample to trace the model")
    traced, graph = _compress(model, samples, options)
    hooks, others = _hooks(traced, graph, layers)
    stored_bits: dict[str, int] = {}
    code_bits: dict[str, int] = {}
    for layer in layers:
        codes = traced.get_submodule(f"{_PREFIX}.{layer.name}").weight
        if codes.is_floating_point():
            continue
        tensors = chain.from_iterable(
            chain(hook.buffers(), hook.parameters()) for _, hook in hooks[layer.name]
        )
        stored_bits[layer.name] = tensor_bits(codes) + sum(tensor_bits(t) for t in tensors)
        code_bits[layer.name] = tensor_bits(codes) // layer.spec.numel
    notes = []
    floats = [layer.name for layer in layers if layer.name not in stored_bits]
    if floats:
        notes.append(f"NNCF left {len(floats)} layers in float: {', '.join(floats)}")
    if not options.int8:
        backup = [name for name, bits in code_bits.items() if bits == 8]
        notes.append(
            f"NNCF kept {len(backup)} of {len(layers)} layers at int8: {', '.join(backup)}"
        )
    scaled = [name for name, pairs in hooks.items() if any(t == "pre_hooks" for t, _ in pairs)]
    if scaled:
        notes.append(
            f"AWQ scales the inputs of {len(scaled)} layers (scales counted in their bits)"
        )
    weights = sorted(name for name in others if name.endswith(".weight"))
    if weights:
        notes.append(
            f"NNCF also compressed {len(weights)} weights outside allot's layers (in the metrics, "
            f"not in the ratio): {', '.join(weights)}"
        )
    return PeerRun(traced, stored_bits, _grid(options), notes)


PEERS = (
    Peer(
        name="nncf",
        distribution="nncf",
        targets="linear",
        settings=settings,
        run=run,
        modules=("nncf", "nncf.torch"),
    ),
)
