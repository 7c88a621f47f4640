"""Additive layer: the weight is the sum of several compressed parts (quantized + sparse, say).

Each part is a compressed layer of the same geometry without a bias (its state dict entries sit
under `parts.<i>.`); the sum layer holds the bias. The forward pass runs whichever is cheaper in
multiply-accumulates: one dense operation with the summed weight (`fan_in` MACs per output
element), or every part's own operation on the input with the outputs added (the parts' MACs
summed: cheaper when every part runs small, e.g. two low-rank factor pairs).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from allot.discover import LayerSpec
from allot.exceptions import ConfigError
from allot.modules.base import CompressedLayer


class SumLayer(CompressedLayer):
    """A layer whose weight is the sum of its `parts`' weights (each a `CompressedLayer`)."""

    def __init__(
        self, spec: LayerSpec, parts: Sequence[CompressedLayer], bias: Tensor | None = None
    ) -> None:
        super().__init__(spec, bias)
        inner = spec.with_channels(bias=False)
        for part in parts:
            if not isinstance(part, CompressedLayer) or part.spec != inner or part.bias is not None:
                raise ConfigError(
                    "every part of a sum must be a compressed layer of the same geometry without "
                    "a bias"
                )
        if len(parts) < 2:
            raise ConfigError(f"a sum needs at least two parts, got {len(parts)}")
        self.parts = nn.ModuleList(parts)
        # MACs per output position of each way to run; a part's `macs` reads only the output's
        # size, so a one-position output on the meta device measures it without computing.
        position = torch.empty(spec.out_features, device="meta")
        self._parts_macs = sum(part.macs(position) for part in parts)
        self.runs_parts = self._parts_macs < spec.out_features * spec.fan_in

    def check_state(self) -> None:
        """Every part's own checks (and the bias's finiteness)."""
        super().check_state()
        for i, part in enumerate(self.parts):
            try:
                part.check_state()
            except ConfigError as exc:
                raise ConfigError(f"parts.{i}.{exc}") from exc

    def weight_parameter_count(self) -> int:
        return sum(part.weight_parameter_count() for part in self.parts)

    def reconstruct(self) -> Tensor:
        return torch.stack([part.reconstruct() for part in self.parts]).sum(0)

    @property
    def rebuilds_weight(self) -> bool:
        return not self.runs_parts

    def forward(self, x: Tensor) -> Tensor:
        if not self.runs_parts:
            return super().forward(x)
        out = sum(part(x) for part in self.parts)
        if self.bias is not None:
            shape = (-1,) + (1,) * (out.dim() - 2) if self.spec.kind != "linear" else (-1,)
            out = out + self.bias.view(shape)
        return out

    def macs(self, output: Tensor) -> int:
        """The cheaper way's MACs: the parts' own, or one dense operation."""
        if not self.runs_parts:
            return super().macs(output)
        return output.numel() // self.spec.out_features * self._parts_macs

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, parts={len(self.parts)}"
