"""Pull progress on a terminal (rich), silence elsewhere.

rich is used because it renders several live bars (one per layer) correctly on any terminal width
and degrades to nothing when stderr is not a tty, which hand-written carriage returns do not.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TextIO

from stores.model import Layer
from stores.pull import PullProgress


class RichPullProgress(PullProgress):
    def __init__(self, progress) -> None:  # rich.progress.Progress
        self._progress = progress
        self._tasks: dict[str, int] = {}

    def start(self, image_id: str, layers: list[Layer]) -> None:
        for layer in layers:
            if layer.digest not in self._tasks:
                self._tasks[layer.digest] = self._progress.add_task(layer.digest[7:19], total=layer.size, start=False)

    def layer_start(self, layer: Layer, already: bool) -> None:
        task = self._tasks[layer.digest]
        self._progress.start_task(task)
        if already:
            self._progress.update(task, completed=layer.size, description=f"{layer.digest[7:19]} (present)")

    def advance(self, layer: Layer, nbytes: int) -> None:
        self._progress.advance(self._tasks[layer.digest], nbytes)

    def layer_done(self, layer: Layer) -> None:
        self._progress.update(self._tasks[layer.digest], completed=layer.size)


@contextlib.contextmanager
def progress_for(stream: TextIO, quiet: bool = False) -> Iterator[PullProgress]:
    if quiet or not stream.isatty():
        yield PullProgress()
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    console = Console(file=stream)
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  console=console, transient=False) as progress:
        yield RichPullProgress(progress)
