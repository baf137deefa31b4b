"""A quiet terminal and a complete log file: what a newcomer reads versus what a debugger needs.

    from ray_jobs.core import console

    log_path = console.quiet("train", storage_root)   # before Ray or the libraries speak

By default the terminal shows medtune's own lines: the stage headers and results it prints,
its `[medtune] ...` progress lines (also those Ray forwards from workers, without Ray's
`(RayTrainWorker pid=...)` prefix), its loggers' messages and its errors. Everything else,
Ray's INFO lines, raylet messages, library warnings and progress bars, goes only to the log
file, which also gets every line the terminal shows.

`--verbose` or `MEDTUNE_LOG_LEVEL` (any level) leaves the terminal as Ray and the libraries
write it, with medtune's loggers at that level.

Design decisions:
- File descriptor 2 itself points at the log file: Ray's C++ core, the raylet it starts and
  loggers that captured `sys.stderr` at import time all write there, so nothing that is not
  medtune's reaches the terminal through a back door. The terminal keeps a duplicate of it.
- `sys.stdout` and `sys.stderr` become line gates, not a logging filter: Ray hands worker
  output to the driver by writing it to whichever `sys.stdout`/`sys.stderr` is current, and
  `warnings` and tqdm write to `sys.stderr`, so the gates see every line of the process.
- A line a worker prints must reach the driver once: Ray Train's `print`, which writes each
  line to the worker's stdout and logs it to its stderr as well, is turned off
  (`TRAIN_PRINT_PATCH_ENV`), and both gates pass `[medtune]` lines, whichever stream they came by.
"""

from __future__ import annotations

import io
import logging
import os
import re
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

MARK = "[medtune]"
"""Lines carrying it are medtune's progress and results: the gates always pass them."""

VERBOSE_ENV = "MEDTUNE_LOG_LEVEL"
TRAIN_PRINT_PATCH_ENV = "RAY_TRAIN_ENABLE_PRINT_PATCH"
"""Ray Train's switch for its `print` that also logs each line (`quiet` turns it off)."""
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# A line that starts with a timestamp is a log record, whoever printed it.
_LOG_RECORD = re.compile(r"\[?\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2}")
# `(RayTrainWorker pid=1234)`, `(MapBatches(...) pid=12, ip=10.0.0.3)`, `(raylet)`: Ray's prefix
# for a line it forwards from another process.
_RAY_PREFIX = re.compile(r"^\x1b?\[?[0-9;]*m?\((?:[^()]|\([^()]*\))*(?:pid=\d+[^)]*|raylet)\)(?:\x1b\[0m)?\s?")


def verbose_requested(flag: bool = False) -> bool:
    return flag or bool(os.environ.get(VERBOSE_ENV))


def log_dir(storage_root: str | None) -> Path:
    """`<storage root>/logs` for local storage, else `./medtune-logs` (the log is written as
    it happens, so it lives on this machine; the train stage copies it into the run)."""
    if storage_root and "://" not in storage_root:
        return Path(storage_root) / "logs"
    return Path("medtune-logs")


def configure_verbose() -> None:
    """Everything on the terminal, medtune's loggers at MEDTUNE_LOG_LEVEL (default INFO)."""
    logging.basicConfig(level=os.environ.get(VERBOSE_ENV, "INFO").upper(), format=LOG_FORMAT)


def quiet(command: str, storage_root: str | None, *, verbose: bool = False) -> Path | None:
    """Send what is not medtune's to a log file; return its path (None when verbose)."""
    # Ray Data's progress bars redraw one line hundreds of times: noise in logs and job output.
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    # Ray Train replaces `print` in its workers with one that writes the line to stdout (a Ray
    # worker's `sys.stdout` is not `sys.__stdout__`) and also logs it to the root logger, whose
    # console handler writes it to stderr: Ray forwards both, so every `[medtune] step ...` line
    # of the training loop reached the terminal twice, with --verbose too. Ray Train passes the
    # driver's value of this variable on to its controller and workers, on any cluster.
    os.environ.setdefault(TRAIN_PRINT_PATCH_ENV, "0")
    if verbose_requested(verbose):
        configure_verbose()
        return None
    directory = log_dir(storage_root)
    directory.mkdir(parents=True, exist_ok=True)
    path = (directory / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log").resolve()
    log = open(path, "a", buffering=1, encoding="utf-8", errors="replace")  # noqa: SIM115 - lives as long as the process

    sys.stdout.flush()
    sys.stderr.flush()
    terminal_err = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    os.dup2(log.fileno(), 2)
    sys.stdout = LineGate(sys.stdout, log, show_on_stdout)
    sys.stderr = LineGate(terminal_err, log, show_on_stderr, fileno=2)

    to_file = logging.StreamHandler(log)
    to_file.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    root.handlers = [to_file]
    to_terminal = logging.StreamHandler(terminal_err)
    to_terminal.setFormatter(logging.Formatter("[medtune] %(message)s"))
    to_terminal.setLevel(logging.INFO)
    logging.getLogger("ray_jobs").addHandler(to_terminal)

    previous_hook = sys.excepthook

    def show_crash(kind, value, tb) -> None:  # a crash must reach the terminal, not only the log
        text = "".join(traceback.format_exception(kind, value, tb))
        log.write(text)
        terminal_err.write(text + f"{MARK} full log: {path}\n")
        if previous_hook not in (sys.__excepthook__, show_crash):
            previous_hook(kind, value, tb)

    sys.excepthook = show_crash
    os.environ["MEDTUNE_CONSOLE_LOG"] = str(path)  # for the train stage's copy into the run
    # Ray folds equal lines of parallel workers into one and prints "[repeated 2x across
    # cluster] (Ray deduplicates logs ...)" long after: every progress line on its own instead.
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    print(f"{MARK} full log: {path}  (MEDTUNE_LOG_LEVEL=INFO or --verbose shows it all here)", flush=True)
    return path


def show_on_stdout(line: str) -> str | None:
    """Pass what this process prints, except libraries' log records that bypass logging's root
    (DeepSpeed's own stdout handler: "[2026-...] [WARNING] [real_accelerator.py...]"); of
    forwarded worker lines only medtune's."""
    prefix = _RAY_PREFIX.match(line)
    if prefix is None:
        return None if _LOG_RECORD.match(line) else line
    rest = line[prefix.end() :]
    return rest if MARK in rest else None


def show_on_stderr(line: str) -> str | None:
    """Pass medtune's lines (its marks and `medtune: error:`); the rest is for the log."""
    rest = line[m.end() :] if (m := _RAY_PREFIX.match(line)) else line
    return rest if MARK in rest or rest.startswith("medtune:") else None


class LineGate(io.TextIOBase):
    """A text stream that writes every line to `log` and the lines `show` passes to `terminal`.

    Partial lines wait for their end, except carriage-return progress redraws, which only the
    log sees."""

    def __init__(
        self,
        terminal: io.TextIOBase,
        log: io.TextIOBase,
        show: Callable[[str], str | None],
        fileno: int | None = None,
    ):
        self._terminal, self._log, self._show, self._fileno = terminal, log, show, fileno
        self._pending = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._log.write(text)
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            shown = self._show(line.rsplit("\r", 1)[-1])
            if shown is not None:
                self._terminal.write(shown + "\n")
        return len(text)

    def flush(self) -> None:
        self._log.flush()
        self._terminal.flush()

    def isatty(self) -> bool:
        return self._terminal.isatty()

    def fileno(self) -> int:
        return self._fileno if self._fileno is not None else self._terminal.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"
