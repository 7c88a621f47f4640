"""Match a stored state dict (a safetensors file's tensors) to a model, before loading it.

A file may store tied tensors (one tensor under several names, such as an embedding shared with an
output layer) once: `safetensors.torch.save_model` does. Every name the model expects is therefore
filled from the file, or from a name it shares its tensor with. What does not fit is named in one
line: missing and unexpected names, shapes, and (for artifacts, which allot wrote itself with exact
dtypes) dtypes; torch's own "Error(s) in loading state_dict" message is never shown.
"""

from __future__ import annotations

from collections import defaultdict

from torch import Tensor, nn

from allot.exceptions import AllotError, shown


def tied_names(model: nn.Module) -> dict[str, list[str]]:
    """For each state-dict name, the names that share its tensor exactly (itself included)."""
    groups: dict[tuple, list[str]] = defaultdict(list)
    state = model.state_dict(keep_vars=True)
    for name, tensor in state.items():
        if tensor.numel() == 0:  # empty tensors share no data, whatever their pointers say
            groups[(name,)].append(name)
            continue
        key = (
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
            tuple(tensor.stride()),
            tensor.dtype,
        )
        groups[key].append(name)
    return {name: names for names in groups.values() for name in names}


def _listed(names: list[str]) -> str:
    shown_names = ", ".join(shown(name) for name in names[:4])
    return shown_names + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def matched_state(
    model: nn.Module,
    stored: dict[str, Tensor],
    where: str,
    error: type[AllotError],
    exact_dtypes: bool,
) -> dict[str, Tensor]:
    """The full state dict to load into `model`: each expected name from `stored` or from a tied
    twin. `error` naming `where` (a plural: "the weights in FILE") when a name is missing or
    unexpected, a shape differs, or (with `exact_dtypes`) a dtype differs; without it a float
    tensor may be cast to the model's float dtype, but never an integer one to a float or back."""
    own = model.state_dict()
    tied = tied_names(model)
    unexpected = sorted(set(stored) - set(own))
    missing = []
    full: dict[str, Tensor] = {}
    for name in own:
        source = next((n for n in tied.get(name, [name]) if n in stored), None)
        if source is None:
            missing.append(name)
        else:
            full[name] = stored[source]
    problems = []
    if missing:
        problems.append(f"missing {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected {_listed(unexpected)}")
    for name, tensor in full.items():
        expected = own[name]
        if tuple(tensor.shape) != tuple(expected.shape):
            problems.append(
                f"{shown(name)} has shape {tuple(tensor.shape)}, the model expects "
                f"{tuple(expected.shape)}"
            )
        elif tensor.dtype != expected.dtype and (
            exact_dtypes or tensor.is_floating_point() != expected.is_floating_point()
        ):
            problems.append(f"{shown(name)} is {tensor.dtype}, the model expects {expected.dtype}")
    if problems:
        raise error(f"{where} do not match the model: {'; '.join(problems[:3])}")
    for names in {tuple(n) for n in tied.values() if len(n) > 1}:
        present = [n for n in names if n in stored]
        if any(not stored[n].equal(stored[present[0]]) for n in present[1:]):
            raise error(
                f"{where} hold different values under {_listed(present)}, which the model ties "
                "to one tensor"
            )
    return full
