"""Checkpoint and restart of the message-passing state (issue: wall-time limits).

A checkpoint holds the whole-interior messages ``a, b`` (and ``b_prev`` for momentum)
of the level being solved, the level index, the iteration count and the stopping-rule
memory, so a resumed run continues exactly where it stopped — on any number of ranks,
since the arrays are whole and scattered again.  Rank 0 writes it atomically.

Triggers: every ``checkpoint.every_seconds`` (rank 0's clock) and on SIGTERM or SIGUSR1
(what Slurm sends before the wall-time kill with ``--signal``).  Requests are folded
into the solver's periodic reduction, so every rank agrees on the iteration.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import h5py
import numpy as np

from mpda_dist import io

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
FORMAT = "mpda_dist checkpoint 3"
# Read too: 3 added the levels' `stopped_by`, which a reader of 2 cannot take (it
# refuses 3 as not a checkpoint, rather than failing on the key)
READABLE = ("mpda_dist checkpoint 2", FORMAT)


@contextlib.contextmanager
def handlers_kept(last: bool = False) -> Iterator[None]:
    """Within: :class:`Requests` may set the handlers of :data:`SIGNALS`; after, they
    are what they were before the run, and SIGUSR1 what it was before ``mpda run``'s
    start-up recorder (:func:`mpda_dist.runtime.catch_early_signals`), which records
    until :meth:`Requests.install` (an ignored SIGTERM would otherwise outlive the run in
    this process, and pass on to every child it starts).

    ``last``: the process ends after the run (``mpda run``), and the signals are ignored
    after it instead: one that came while MPI shut down turned a finished run's exit
    status into the signal's (a Slurm job then failed after writing its analysis,
    review helper)."""
    from mpda_dist import runtime

    saved = {sig: signal.getsignal(sig) for sig in SIGNALS}
    before = runtime.handler_before_catching()  # not the start-up recorder
    if before is not None:
        saved[signal.SIGUSR1] = before
    try:
        yield
    finally:
        for sig, handler in saved.items():
            after = signal.SIG_IGN if last else handler
            signal.signal(sig, after if after is not None else signal.SIG_DFL)


@dataclass
class Requests:
    """What this rank was asked to do at the next check."""

    every_seconds: float = 0.0
    signal_name: str | None = None
    last: float = field(default_factory=time.monotonic)

    def install(self, can_checkpoint: bool = True) -> None:
        """Catch SIGTERM and SIGUSR1 for a checkpoint at the next check.  A run that
        cannot checkpoint (the baselines) leaves SIGTERM to end it and ignores SIGUSR1,
        Slurm's warning before a time limit: it goes on, and may finish in time.  A
        SIGUSR1 that came during start-up (:func:`mpda_dist.runtime.early_signal`)
        counts as one that comes now."""
        from mpda_dist import runtime

        runtime.stop_catching()  # a SIGUSR1 from now on is this run's own
        early = runtime.early_signal()
        if not can_checkpoint:  # SIGTERM as the default, whatever the parent left
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGUSR1, signal.SIG_IGN)
            if early == "SIGTERM":  # (passed on by the batch script) ends it, as it would now
                os.kill(os.getpid(), signal.SIGTERM)
            return
        if early is not None:
            self.signal_name = early

        def handler(signum: int, _frame: Any) -> None:
            self.signal_name = signal.Signals(signum).name

        for sig in SIGNALS:
            signal.signal(sig, handler)

    def uninstall(self) -> None:
        """After the last check: a signal now can no longer stop the solve at a
        checkpoint, and the run is about to finish, so it is ignored (MPI's shutdown
        could otherwise let it end the job with the signal's status after the analysis
        was written)."""
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_IGN)

    def flags(self, is_root: bool) -> tuple[float, float]:
        """``(checkpoint due, interrupted)`` as numbers for the global reduction."""
        due = (
            is_root
            and self.every_seconds > 0
            and time.monotonic() - self.last >= self.every_seconds
        )
        stop = self.signal_name is not None
        return float(due or stop), float(stop)


@dataclass
class State:
    """Where a level stands: enough to continue it exactly."""

    level: int
    iteration: int
    a: np.ndarray  # (12, n, m) whole interior
    b: np.ndarray
    b_prev: np.ndarray | None  # None without momentum
    best: float = math.inf
    delta0: float | None = None
    finished: list[dict] = field(default_factory=list)  # summaries of earlier levels
    # Warm ``(a, b, b_prev)`` of the coarser message-passing levels 1 … level-1, which
    # the coarse-grid corrections continue from, and the hierarchy's depth.
    coarse: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]] = field(default_factory=list)
    levels: int = 0
    frozen: bool = False  # a is at its fixed point (the level iterates b alone)
    # The level's Anderson history (anderson.py): whole-interior stacks of the last
    # check means and scaled residuals, and how many entries are valid (0: none).
    history: tuple[np.ndarray, np.ndarray] | None = None
    history_count: int = 0
    history_last: float = math.inf  # the residual at the last check (restarts the history)
    history_mixed_at: float = math.inf  # the residual at the last check if it mixed
    history_failed: int = 0  # mixes not followed by a lower residual
    config: str = ""  # the run's config as YAML (read back; write takes it apart)


def write(path: str, state: State, config_text: str) -> None:
    coarse = [x for c in state.coarse for x in c]
    size = io.nbytes(state.a, state.b, state.b_prev, *(state.history or ()), *coarse)
    with io.h5_output(path, size) as f:
        f.attrs["format"] = FORMAT
        f.attrs["config"] = config_text
        f.attrs["level"] = state.level
        f.attrs["iteration"] = state.iteration
        f.attrs["best"] = state.best
        f.attrs["delta0"] = np.nan if state.delta0 is None else state.delta0
        f.attrs["finished"] = json.dumps(state.finished)
        f["a"] = state.a
        f["b"] = state.b
        if state.b_prev is not None:
            f["b_prev"] = state.b_prev
        f.attrs["levels"] = state.levels
        f.attrs["frozen"] = int(state.frozen)
        f.attrs["history_last"] = state.history_last
        f.attrs["history_mixed_at"] = state.history_mixed_at
        f.attrs["history_failed"] = state.history_failed
        if state.history is not None:
            f["history/means"], f["history/scaled"] = state.history
            f.attrs["history_count"] = state.history_count
        for k, (ca, cb, cp) in enumerate(state.coarse):
            g = f.create_group(f"coarse/{k}")
            g["a"], g["b"] = ca, cb
            if cp is not None:
                g["b_prev"] = cp


def read(path: str) -> State:
    """A checkpoint written by :func:`write`; errors name the file."""
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") not in READABLE:
                raise io.InputError(f"{path}: not an mpda_dist checkpoint this version reads")
            delta0 = float(f.attrs["delta0"])
            return State(
                level=int(f.attrs["level"]),
                iteration=int(f.attrs["iteration"]),
                a=f["a"][...],
                b=f["b"][...],
                b_prev=f["b_prev"][...] if "b_prev" in f else None,
                best=float(f.attrs["best"]),
                delta0=None if math.isnan(delta0) else delta0,
                finished=json.loads(f.attrs["finished"]),
                coarse=[
                    (g["a"][...], g["b"][...], g["b_prev"][...] if "b_prev" in g else None)
                    for g in (f["coarse"][k] for k in sorted(f.get("coarse", {}), key=int))
                ],
                levels=int(f.attrs.get("levels", 0)),
                frozen=bool(f.attrs.get("frozen", 0)),
                history=(
                    (f["history/means"][...], f["history/scaled"][...]) if "history" in f else None
                ),
                history_count=int(f.attrs.get("history_count", 0)),
                history_last=float(f.attrs.get("history_last", math.inf)),
                history_mixed_at=float(f.attrs.get("history_mixed_at", math.inf)),
                history_failed=int(f.attrs.get("history_failed", 0)),
                config=str(f.attrs.get("config", "")),
            )
    except io.H5_FAILURES as exc:  # a damaged file raises any of them
        if isinstance(exc, io.InputError):
            raise
        raise io.InputError(f"{path}: cannot read checkpoint ({exc})") from exc
