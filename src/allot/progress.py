"""Progress bars (rich) for every loop that can take more than a second."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

T = TypeVar("T")


def progress_bar(
    items: Sequence[T] | Iterable[T], label: str, enabled: bool = True, total: int | None = None
) -> Iterator[T]:
    """Yield `items`, showing a transient rich progress bar on stderr when `enabled`."""
    if not enabled:
        yield from items
        return
    if total is None and isinstance(items, Sequence):
        total = len(items)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=total)
        for item in items:
            yield item
            bar.advance(task)
