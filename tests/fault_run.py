"""``mpda run`` with a fault injected, for tests/test_faults.py (run under mpiexec).

    python fault_run.py MODE RANK CHECKS [mpda run arguments...]

Every rank prints ``ITERATING rank=R pid=P`` once the solver has made CHECKS periodic
convergence checks (the global reduction every ``solver.check_every`` iterations), i.e.
when it is well inside the iterations.  MODE ``raise``: rank RANK then prints
``FAULT rank=R t=<unix time>`` and raises RuntimeError("injected failure on rank R")
instead of joining that reduction, so the other ranks wait in it: without the abort
hook they would hang there for ever.  MODE ``signal``: rank RANK then sends itself
SIGUSR1 (``mpda run``'s checkpoint request) before it joins that reduction, which tells
the other ranks: a signal in the middle of the iterations however fast they run (a
test that signalled from outside after a log line raced a solve that took 0.7 s).  MODE
``sigint``: the same with SIGINT (Ctrl-C), which ends the job without a checkpoint.
MODE ``report``: nothing is injected (the test kills a rank itself).
"""

from __future__ import annotations

import os
import signal
import sys
import time

from mpda_dist import runtime

comm = runtime.start()  # before JAX is imported, as `mpda run` does

from mpda_dist import cli, solver  # noqa: E402

RANK = comm.Get_rank()


def say(line: str) -> None:
    # One write per line: the launcher merges the ranks' output, and print() writes the
    # text and the newline separately.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main() -> None:
    mode, fault_rank, checks, args = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
    assert mode in ("raise", "signal", "sigint", "report"), mode
    if not hasattr(solver, "allreduce_sum"):
        sys.exit("fault_run.py: mpda_dist.solver.allreduce_sum is gone; update the hook")
    original = solver.allreduce_sum  # looked up at call time by solve_level
    calls = 0

    def allreduce_sum(comm, values):
        nonlocal calls
        calls += 1  # the first call of a level is its set-up, then one per check
        if calls == checks + 1:
            say(f"ITERATING rank={RANK} pid={os.getpid()}")
            if mode == "raise" and RANK == fault_rank:
                say(f"FAULT rank={RANK} t={time.time():.3f}")
                raise RuntimeError(f"injected failure on rank {RANK}")
            if mode in ("signal", "sigint") and RANK == fault_rank:
                os.kill(os.getpid(), signal.SIGUSR1 if mode == "signal" else signal.SIGINT)
        return original(comm, values)

    solver.allreduce_sum = allreduce_sum
    cli.main(["run", *args])


if __name__ == "__main__":
    main()
