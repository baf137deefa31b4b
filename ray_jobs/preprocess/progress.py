"""Progress of the preprocessing plan while Ray Data runs it: the step, rows done of Ray Data's
estimated total, the pace and an ETA, one `[medtune] preprocess:` line every few seconds.

    with reporting_progress():        # datasets created inside report while they execute
        tokenized = build_plan(...)
    tokenized.materialize()           # -> "[medtune] preprocess: clean + PHI 12,288/~20,000 rows ..."

The figures are Ray Data's own operator metrics (rows each operator's tasks produced, and the
operator's estimate of its total), read by an `ExecutionCallback` on the driver's scheduling
loop. Ray Data's bars would redraw one line hundreds of times, noise in a log file or in
`ray job submit` output, and its non-TTY mode logs a block of lines per operator without a pace
or ETA; one line per interval reads the same in a terminal and in a job's log.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from typing import Any

from ray.data._internal.execution.execution_callback import ExecutionCallback

INTERVAL_ENV = "MEDTUNE_PROGRESS_INTERVAL_S"
DEFAULT_INTERVAL_S = 10.0

# Our plan's functions and Ray Data's own operators, as they appear in operator names, and what
# a user calls each step. Ray fuses consecutive maps into one operator
# ("MapBatches(convert_batch)->MapBatches(tokenize_batch)"): it is named by all its steps.
STEPS = {
    "ReadBinary": "read",
    "SplitBlocks": "read",
    "Union": "read",
    "explode": "read",
    "cut_pieces": "read",
    "Repartition": "read",
    "convert_batch": "clean + PHI",
    "ConvertBatch": "clean + PHI",
    "with_signature": "near-dedupe signatures",
    "Sort": "group",
    "band_rows": "near-dedupe",
    "band_matches": "near-dedupe",
    "tokenize_batch": "tokenise",
    "Write": "write",
}


def step_name(operator_name: str) -> str:
    """What a user calls the step(s) of a (possibly fused) Ray Data operator."""
    names = []
    for part in operator_name.split("->"):
        known = [step for key, step in STEPS.items() if key in part]
        # An unknown function keeps its own name: "MapBatches(normalise)" -> "normalise".
        inner = part[part.find("(") + 1 : -1] if part.endswith(")") else ""
        name = known[0] if known else (inner if inner and not inner.isdigit() else part.split("(")[0])
        if name not in names:
            names.append(name)
    return ", ".join(names)


def duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    minutes, secs = divmod(seconds, 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class PreprocessProgress(ExecutionCallback):
    """Prints the progress of one Ray Data execution (Ray makes one instance per execution).

    The reported step is the first operator that has not finished: the rows downstream of it
    cannot finish earlier, so its ETA is the soonest the step can end."""

    def __init__(self) -> None:
        self.interval_s = float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL_S))
        self.last_line_at = time.monotonic()
        self.last_line = ""
        self.started_at: dict[int, float] = {}  # operator -> when its first input arrived
        self.first_rows: dict[int, tuple[float, int]] = {}  # operator -> (when, rows) of its first output

    def on_execution_step(self, executor: Any) -> None:
        now = time.monotonic()
        operators = [op for op in (executor._topology or {}) if op.input_dependencies]  # not the input buffers
        for op in operators:
            if id(op) not in self.started_at and op.metrics.num_inputs_received:
                self.started_at[id(op)] = now
            if id(op) not in self.first_rows and op.metrics.rows_task_outputs_generated:
                self.first_rows[id(op)] = (now, op.metrics.rows_task_outputs_generated)
        if now - self.last_line_at < self.interval_s:
            return
        self.last_line_at = now
        line = self.describe(operators, now)
        if line and line != self.last_line:  # a line the terminal already shows says nothing new
            self.last_line = line
            print(f"[medtune] preprocess: {line}", flush=True)

    def describe(self, operators: list[Any], now: float) -> str | None:
        running = next((op for op in operators if not op.has_completed()), None)
        if running is None or id(running) not in self.started_at:
            return None
        done = running.metrics.rows_task_outputs_generated
        total = running.num_output_rows_total()
        # The pace since the first rows came out: the first tasks also paid for loading the
        # tokenizer and the PHI engine, which later tasks of a warm worker do not.
        since, rows_then = self.first_rows.get(id(running), (now, 0))
        if now - since >= 1.0 and done > rows_then:
            pace = (done - rows_then) / (now - since)
        else:
            elapsed = now - self.started_at[id(running)]
            pace = done / elapsed if elapsed > 0 else 0.0
        step = step_name(running.name)
        if done == 0:
            # The time waited keeps each line new: a slow first batch (a cold worker loading
            # the tokenizer and the PHI engine) otherwise printed the same line every interval.
            running_tasks = running.metrics.num_tasks_running
            waited = duration(now - self.started_at[id(running)])
            text = (
                f"{step} starting ({waited})"
                if not running_tasks
                else f"{step}: {running_tasks} task(s) running for {waited}, none done yet"
            )
        elif total:
            text = f"{step} {done:,}/~{max(total, done):,} rows ({min(done / total, 1.0):.0%}), {pace:,.0f} rows/s"
        else:
            text = f"{step} {done:,} rows, {pace:,.0f} rows/s"
        if total and pace > 0 and done < total:
            text += f", ETA {duration((total - done) / pace)}"
        later = [step_name(op.name) for op in operators[operators.index(running) + 1 :]]
        later = [s for i, s in enumerate(later) if s not in later[:i] and s != step]
        if later:
            text += f"; then {', '.join(later)}"
        return text


@contextlib.contextmanager
def reporting_progress() -> Iterator[None]:
    """Datasets created inside the block print progress whenever they execute (a dataset keeps
    a copy of the Ray Data context it was created with); datasets created after it do not, so
    training's reads of the result stay quiet."""
    from ray.data import DataContext

    context = DataContext.get_current()
    before = list(context.custom_execution_callback_classes)
    if PreprocessProgress not in before:
        context.custom_execution_callback_classes = [*before, PreprocessProgress]
    try:
        yield
    finally:
        context.custom_execution_callback_classes = before
