"""The stderr console: one progress bar for every long loop (caching, training, sampling, feature
extraction), and `say` for every line a person reads.

Engine functions take `progress: bool`; bars (and `print_table`'s tables) go to stderr so `--json`
output on stdout stays clean.
Nothing printed here is read as Rich markup: paths, class names and messages may hold [brackets].
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

stderr_console = Console(stderr=True)
Part = str | tuple[str, str]
# What a terminal would act on rather than show: C0 and C1 control characters (escape sequences that clear the
# screen or retitle the window, bells, carriage returns, line breaks) and the bidirectional overrides that reorder
# what is shown. Names, paths, captions and metadata come from files anyone can write.
CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """`text` with every control character written as its escape (`\\x1b`, `\\n`, `\\u202e`): shown, never obeyed."""
    return CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def _printable_part(part: Part) -> Part:
    return printable(part) if isinstance(part, str) else (printable(part[0]), part[1])


def _printable_cell(cell):
    if isinstance(cell, str):
        return printable(cell)
    if isinstance(cell, Text) and CONTROL.search(cell.plain):
        return Text(printable(cell.plain), style=cell.style)
    return cell


def say(*parts: Part) -> None:
    """One line on stderr from plain strings and (text, style) pairs, e.g. `say(("Wrote", "green"), f" {path}")`.

    Text is shown as written, never parsed as markup (`[red]` in a file name stays `[red]`), with control
    characters escaped (`printable`): every line a person reads goes through here or `print_table`.
    """
    stderr_console.print(Text.assemble(*map(_printable_part, parts)), highlight=False)


def print_table(table: Table) -> None:
    """A rich Table on stderr. Its cells and title are shown as written, control characters escaped (`printable`):
    `[red]` in a path stays `[red]`, an escape sequence in a name is shown, not obeyed."""
    table.title = _printable_cell(table.title)
    if isinstance(table.title, str):
        table.title = Text(table.title, style="table.title")
    table.caption = _printable_cell(table.caption)
    for column in table.columns:
        column.header = _printable_cell(column.header)
        column._cells[:] = [_printable_cell(cell) for cell in column._cells]
    stderr_console.print(table, markup=False, highlight=False)


def make_progress(*extra_columns, enabled: bool = True) -> Progress:
    """A rich Progress on stderr: description, bar, n/total, %, elapsed, ETA, then `extra_columns`."""
    return Progress(
        TextColumn("{task.description}", style="bold", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        *extra_columns,
        console=stderr_console,
        disable=not enabled,
        transient=False,
    )


@contextlib.contextmanager
def track(total: int, description: str, enabled: bool = True) -> Iterator[callable]:
    """`with track(n, "Encoding") as advance: ... advance(k)` for simple counted loops."""
    enabled = enabled and sys.stderr is not None
    with make_progress(enabled=enabled) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n=1: progress.advance(task, n)


@contextlib.contextmanager
def library_bars_off() -> Iterator[None]:
    """transformers' and diffusers' own "Loading weights" bars off while loading: noise beside ours."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    states = [(lib, lib.is_progress_bar_enabled()) for lib in (transformers_logging, diffusers_logging)]
    for lib, _ in states:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, enabled in states:
            if enabled:
                lib.enable_progress_bar()
