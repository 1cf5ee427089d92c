"""A throwaway single-node Slurm (slurmctld + slurmd + munged) for tests.

Everything lives in one private directory (the munge socket in its own mode-711
directory under /tmp, as munged insists): the munge key, pid and seed files,
``slurm.conf``, state and spool directories and the logs.  Ports are free ones picked by
binding port 0, so the cluster never touches a system Slurm or munge and two clusters can
run side by side.  The daemons run in the foreground as children of the test process;
they are stopped by their recorded PIDs, after every job has been cancelled (a
``slurmstepd`` can be orphaned otherwise), and as a last resort any process still
carrying this cluster's ``SLURM_CONF`` in its environment is killed by PID.

Needs root (``SlurmUser=root``), ``slurmctld``, ``slurmd``, ``munged`` and the client
commands; :func:`unavailable_reason` says what is missing.  No systemd, no cgroups
(``proctrack/linuxproc``, ``task/none``), no accounting (``sbatch -W`` returns the job's
exit code; ``MinJobAge=5`` makes it poll every 2 s instead of backing off to 32 s, at
the price of forgetting finished jobs after 5-15 s).  Facts behind the choices:
``../shared/SLURM_NOTES.md`` in the project's workspace.

    with SlurmCluster(tmp_path / "slurm") as cluster:
        proc = cluster.run(["sbatch", "-W", "--wrap", "hostname"])
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from datetime import datetime
from pathlib import Path

from _procs import kill_marked

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "squeue", "scancel", "scontrol", "sinfo")
NODE = "localhost"


def _which(name: str) -> str | None:
    # Daemons live in /usr/sbin, which a non-login PATH may lack.
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin")


def unavailable_reason() -> str | None:
    """Why a throwaway Slurm cannot be started here, or None when it can."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "a private Slurm needs root (SlurmUser=root); run the tests as root"
    missing = [n for n in (*DAEMONS, *CLIENTS) if _which(n) is None]
    if missing:
        return (
            f"Slurm/munge not installed (missing: {', '.join(missing)}); "
            "apt-get install slurmctld slurmd slurm-client munge (.ci/run does this as root)"
        )
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


class SlurmCluster:
    """One node (``localhost``), one partition (``test``), ``cpus`` CPUs declared.

    ``cpus`` defaults to at least 2 whatever the machine has (``config_overrides``
    makes slurmd accept the declared count), so 2-task jobs run on a 1-core runner.
    """

    def __init__(self, root: Path, cpus: int | None = None) -> None:
        self.root = Path(root).resolve()
        self.cpus = cpus or max(2, len(os.sched_getaffinity(0)))
        self.conf = self.root / "slurm.conf"
        # munged wants every directory above its socket searchable by all, which a
        # pytest tmp_path (0700) is not: the socket gets its own directory in /tmp.
        self.socket_dir: Path | None = None
        self.munge_socket = self.root / "munge" / "munge.socket"  # set in _write_config
        self.procs: dict[str, subprocess.Popen] = {}
        self._logs: list = []
        self.leftovers: list[int] = []  # job processes stop() had to kill
        self.started_at = 0.0  # time.time() when slurmctld was started

    # ------------------------------------------------------------------ environment
    @property
    def env(self) -> dict[str, str]:
        """The environment for client commands and jobs: this cluster's SLURM_CONF, and
        none of the caller's own Slurm job or MPI launcher variables."""
        drop = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "PMI_", "PMIX_", "HYDRA_", "MPIR_")
        env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = env.get("PATH", "/usr/bin:/bin") + ":/usr/sbin:/sbin"
        return env

    def run(
        self,
        cmd: list[str],
        timeout: float = 30,
        env: dict[str, str] | None = None,
        **kwargs,
    ) -> subprocess.CompletedProcess:
        """A client command (sbatch, squeue, ...) against this cluster with a hard
        timeout; ``env`` adds variables (sbatch passes them on into the job)."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(cmd, env=self.env | (env or {}), timeout=timeout, **kwargs)

    # ---------------------------------------------------------------------- set-up
    def _write_config(self) -> None:
        r = self.root
        for d in ("munge", "state", "spool", "log", "jobs"):
            (r / d).mkdir(parents=True, exist_ok=True)
        self.socket_dir = Path(tempfile.mkdtemp(prefix="mpda-munge-"))
        self.socket_dir.chmod(0o711)  # munged refuses a socket directory others can write
        self.munge_socket = self.socket_dir / "munge.socket"
        key = r / "munge" / "munge.key"
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(1024))
        ctld_port, slurmd_port = free_port(), free_port()
        while slurmd_port == ctld_port:
            slurmd_port = free_port()
        self.conf.write_text(
            f"""\
# throwaway single-node cluster written by tests/slurm_cluster.py
ClusterName=mpdatest
SlurmctldHost={NODE}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
CredType=cred/munge
StateSaveLocation={r / "state"}
SlurmdSpoolDir={r / "spool"}
SlurmctldPidFile={r / "slurmctld.pid"}
SlurmdPidFile={r / "slurmd.pid"}
SlurmctldLogFile={r / "log" / "slurmctld.log"}
SlurmdLogFile={r / "log" / "slurmd.log"}
# debug2 logs every time-limit check (next_time_limit_check reads them)
SlurmctldDebug=debug2
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SlurmdParameters=config_overrides
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
InactiveLimit=0
KillWait=5
MinJobAge=5
NodeName={NODE} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN
PartitionName=test Nodes={NODE} Default=YES MaxTime=INFINITE State=UP
"""
        )

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "wb")  # noqa: SIM115 (closed in stop)
        self._logs.append(log)
        self.procs[name] = subprocess.Popen(
            [_which(name) or name, *args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,  # a Ctrl-C at the terminal reaches the tests, not these
        )

    def _check_daemons(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with code {proc.returncode} while starting:\n" + self.logs()
                )

    def _wait_for(self, what: str, ok, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not ok():
            self._check_daemons()
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} not ready after {timeout:.0f} s:\n" + self.logs())
            time.sleep(0.2)

    def start(self, timeout: float = 30.0) -> SlurmCluster:
        """Write the configuration, start munged, slurmctld and slurmd, wait until the
        node is idle.  Raises RuntimeError (with the daemons' logs) on failure, after
        stopping whatever was started."""
        try:
            self._write_config()
            m = self.root / "munge"
            self._spawn(
                "munged",
                [
                    "--foreground",
                    f"--socket={self.munge_socket}",
                    f"--key-file={m / 'munge.key'}",
                    f"--pid-file={m / 'munged.pid'}",
                    f"--log-file={self.root / 'log' / 'munged.log'}",
                    f"--seed-file={m / 'munged.seed'}",
                ],
            )
            self._wait_for("munged", self.munge_socket.exists, timeout)
            self.started_at = time.time()
            self._spawn("slurmctld", ["-D", "-c", "-f", str(self.conf)])
            self._spawn("slurmd", ["-D", "-N", NODE, "-f", str(self.conf)])
            self._wait_for("the Slurm node", self._node_idle, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _node_idle(self) -> bool:
        try:
            proc = self.run(["sinfo", "-h", "-n", NODE, "-o", "%T"], timeout=10)
        except subprocess.TimeoutExpired:
            return False
        return proc.returncode == 0 and proc.stdout.strip() == "idle"

    # -------------------------------------------------------------------- jobs
    def next_time_limit_check(self) -> float:
        """When (``time.time()``) slurmctld will next check time limits, which is also
        when it sends ``--signal`` warnings: every 30 s from its start, logged at
        debug2 ("Testing job time limits")."""
        last = self.started_at
        log = self.root / "log" / "slurmctld.log"
        for line in log.read_text(errors="replace").splitlines() if log.exists() else []:
            if "Testing job time limits" in line and line.startswith("["):
                try:  # [2026-11-26T17:37:52.445] in local time
                    last = datetime.fromisoformat(line[1 : line.index("]")]).timestamp()
                except ValueError:
                    continue
        now, nxt = time.time(), last + 30.0
        while nxt < now:
            nxt += 30.0
        return nxt

    def job_ids(self) -> list[str]:
        proc = self.run(["squeue", "-h", "-o", "%i"], timeout=15)
        return proc.stdout.split() if proc.returncode == 0 else []

    def job_info(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict; {} once slurmctld has forgotten the job
        (5-15 s after its end: MinJobAge=5)."""
        proc = self.run(["scontrol", "show", "job", "-o", str(job_id)], timeout=15)
        info = {}
        for word in proc.stdout.split():
            key, sep, value = word.partition("=")
            if sep:
                info[key] = value
        return info

    def cancel_all(self, timeout: float = 20.0) -> None:
        """Cancel every job and wait (bounded) until the queue is empty."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                ids = self.job_ids()
            except subprocess.TimeoutExpired:
                ids = []
            if not ids:
                return
            self.run(["scancel", *ids], timeout=15)
            time.sleep(0.5)

    # ------------------------------------------------------------------ tear-down
    def stop(self) -> None:
        """Cancel the jobs, stop slurmd, slurmctld and munged by PID, then kill any
        process left from this cluster's jobs (found by its SLURM_CONF)."""
        try:
            if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
                self.cancel_all()
        except (OSError, subprocess.SubprocessError):
            pass
        for name in ("slurmd", "slurmctld", "munged"):
            if name in self.procs:
                _stop(self.procs[name])
        self.leftovers = kill_marked("SLURM_CONF", str(self.conf))
        for log in self._logs:
            log.close()
        self._logs.clear()
        if self.socket_dir is not None:
            shutil.rmtree(self.socket_dir, ignore_errors=True)
            self.socket_dir = None

    def logs(self, tail: int = 40) -> str:
        """The last lines of every daemon log, for failure messages."""
        out = []
        for path in sorted((self.root / "log").glob("*")):
            lines = path.read_text(errors="replace").splitlines()[-tail:]
            out.append(f"--- {path.name}\n" + "\n".join(lines))
        return "\n".join(out)

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
