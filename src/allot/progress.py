"""Progress bars (rich) for every loop that can take more than a second; under `torchrun` only
rank 0 shows them."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from allot import distributed

T = TypeVar("T")


@contextmanager
def progress_counter(
    label: str, enabled: bool = True, total: int | None = None
) -> Iterator[Callable[..., None]]:
    """A transient rich progress bar on stderr (when `enabled`); yields `advance(note=None)`, one
    call per step, for work that is not shaped as a loop over known items; a `note` is shown
    after the label from then on (a metric, say)."""
    if not enabled or not distributed.is_main():
        yield lambda note=None: None
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=total)

        def advance(note: str | None = None) -> None:
            bar.update(task, advance=1, description=label if note is None else f"{label} {note}")

        yield advance


def progress_bar(
    items: Sequence[T] | Iterable[T], label: str, enabled: bool = True, total: int | None = None
) -> Iterator[T]:
    """Yield `items`, showing a transient rich progress bar on stderr when `enabled`."""
    if total is None and isinstance(items, Sequence):
        total = len(items)
    with progress_counter(label, enabled, total) as advance:
        for item in items:
            yield item
            advance()
