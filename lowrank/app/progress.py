"""One line per stage of a long command, on a terminal or in a log.

tqdm bars (``train.progress``) show only on a terminal; these lines show everywhere, so a
run in CI or under ``nohup`` says what it is doing and how long each part took:

    [demo    12.4 s] pretrain          11.9 s  val acc 0.972
    [demo    15.0 s] lora r=8           2.6 s  test acc 0.997
"""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager


class StageLog:
    """``with log.stage("pretrain") as note: ...; note["result"] = "val acc 0.97"`` prints one line
    when the block ends: the command, the time since the log started, the stage and its seconds."""

    def __init__(self, command: str, stream=None, enabled: bool = True):
        self.command, self.stream, self.enabled = command, stream, enabled
        self.started = time.perf_counter()
        self.lines: list[str] = []

    @contextmanager
    def stage(self, name: str):
        note = {"result": ""}
        t = time.perf_counter()
        yield note
        now = time.perf_counter()
        line = f"[{self.command} {now - self.started:7.1f} s] {name:<16} {now - t:6.1f} s  {note['result']}".rstrip()
        self.lines.append(line)
        if self.enabled:
            print(line, file=self.stream or sys.stderr, flush=True)


@contextmanager
def no_stage(name: str):
    """The stand-in for ``StageLog.stage`` where nobody asked for lines."""
    yield {"result": ""}
