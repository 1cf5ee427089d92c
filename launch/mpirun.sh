#!/usr/bin/env bash
# launch/mpirun.sh: run `mpda run` on several MPI ranks with per-rank settings that suit it.
#
# Usage:
#   launch/mpirun.sh -n RANKS [-t THREADS_PER_RANK] [--gpus-per-node N|auto]
#                    [--bind core|none] [--jemalloc] [--dry-run] -- [CONFIG] [mpda run args...]
#
# Examples:
#   launch/mpirun.sh -n 2 -- configs/small.yaml -o small.h5
#   launch/mpirun.sh -n 8 -t 2 --bind core --jemalloc -- configs/demo.yaml --set grid.nx=1024
#   launch/mpirun.sh -n 4 --gpus-per-node 4 -- configs/demo.yaml -o out.h5
#
# What it does:
# - Launcher: $MPDA_MPIEXEC if set (a command with arguments, split on blanks unless it
#   is the path of an executable, e.g. "srun --mpi=pmi2"), else the mpiexec of the
#   project's virtual environment ($MPDA_VENV, else ./.venv, else the .venv next to this
#   script's directory), else
#   mpiexec on PATH.  The `mpda` command comes from the same venv, else PATH.  The venv's
#   mpiexec (the PyPI `mpich` wheel) is the one mpi4py there was built against.
# - -t T: OMP_NUM_THREADS, OPENBLAS_NUM_THREADS and MKL_NUM_THREADS = T for every rank,
#   and with T = 1 XLA_FLAGS gains --xla_cpu_multi_thread_eigen=false; only what the user
#   has not set already.  XLA's CPU thread pool sizes itself from the cores a rank may run
#   on, so --bind core (T cores per rank) is what really limits it.  Without -t, mpda sets
#   these per rank from the cores and ranks of the node (again never overriding yours).
# - --bind core: pin each rank to T cores (MPICH/hydra `-bind-to core:T`, Open MPI
#   `--bind-to core --map-by slot:PE=T`, srun `--cpus-per-task=T --cpu-bind=cores`).
#   Worth it when ranks x threads >= cores: each rank starts ~17 XLA threads.  --bind
#   none asks the launcher not to bind; without --bind the launcher's default applies.
# - --gpus-per-node N (or auto): each rank sees one GPU, chosen by node-local rank, via
#   launch/bind_gpu.sh, which also splits a shared GPU's memory between its ranks.  Give
#   GPU ranks several cores (-t 8 --bind core, or --bind none): they compile their
#   programs on them, and Open MPI binds each of 2 ranks to one core by default (a cold
#   start several times longer; mpda warns).
# - --jemalloc: LD_PRELOAD libjemalloc into every rank if it can be found ($JEMALLOC_LIB,
#   ldconfig, usual paths); at large blocks glibc malloc page faults can double the time
#   per iteration.  Not found: a warning, and the run goes on without it.
# - $MPDA_MPIEXEC_ARGS: extra launcher arguments, split on spaces (e.g. "-f hosts").
# - Prints the command it runs (on stderr), then replaces itself with it, so the exit code
#   is the launcher's: mpda's 0 ok, 2 input/config error, 3 diverged, 4 not converged,
#   5 interrupted after writing a checkpoint, 1 for an unexpected error (the failing
#   rank aborts the whole job).  This script's own
#   usage errors exit 2.
set -euo pipefail

prog=launch/mpirun.sh
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

usage() {
    cat <<EOF
usage: $prog -n RANKS [-t THREADS_PER_RANK] [--gpus-per-node N|auto]
                          [--bind core|none] [--jemalloc] [--dry-run] -- [CONFIG] [mpda run args...]

Run 'mpda run' on RANKS MPI ranks with the project's mpiexec.

options:
  -n, --ranks RANKS        number of MPI ranks (required)
  -t, --threads T          threads per rank: sets OMP/OpenBLAS/MKL thread counts (and,
                           for T=1, turns off XLA's multi-threaded Eigen) unless already
                           set in the environment; with --bind core, T cores per rank
  --gpus-per-node N|auto   bind each rank to one GPU by its node-local rank
                           (launch/bind_gpu.sh)
  --bind core|none         core: pin every rank to T cores (-bind-to core);
                           none: no binding; default: the launcher's default
  --jemalloc               LD_PRELOAD libjemalloc into the ranks if found
                           (Debian/Ubuntu: apt-get install libjemalloc2)
  --dry-run                print the command and exit without running it
  -h, --help               show this help and exit

Everything after '--' goes to 'mpda run' (see 'mpda run --help'); no CONFIG runs the
bundled demo.

environment:
  MPDA_VENV          virtual environment to take mpiexec and mpda from (default ./.venv,
                     then the .venv beside launch/)
  MPDA_MPIEXEC       launcher to use instead, with its arguments split on blanks
                     (e.g. mpirun of a system MPI, or "srun --mpi=pmi2"); the path of
                     an executable stays one word
  MPDA_MPIEXEC_ARGS  extra launcher arguments, split on spaces (e.g. "-f hostfile")
  JEMALLOC_LIB       path of libjemalloc.so to preload with --jemalloc

exit status: that of the launcher, i.e. mpda's: 0 ok, 2 input or config error,
3 diverged, 4 not converged, 5 interrupted by a signal after writing a checkpoint,
1 unexpected error; 2 for a usage error of this script.

examples:
  $prog -n 2 -- configs/small.yaml -o small.h5
  $prog -n 8 -t 2 --bind core --jemalloc -- configs/demo.yaml --set grid.nx=1024
  $prog -n 4 --gpus-per-node 4 -- configs/demo.yaml -o out.h5
EOF
}

die() {
    printf '%s: error: %s\n' "$prog" "$*" >&2
    printf "Try '%s --help'.\n" "$prog" >&2
    exit 2
}

note() {
    printf '%s: %s\n' "$prog" "$*" >&2
}

is_count() {
    [[ "$1" =~ ^[1-9][0-9]*$ ]]
}

# ---------------------------------------------------------------------------- arguments
ranks=""
threads=""
gpus=""
bind=""
jemalloc=0
dry_run=0
need_value() {
    [[ $# -ge 2 && -n "$2" ]] || die "option $1 needs a value"
}
while [[ $# -gt 0 ]]; do
    case "$1" in
    -h | --help)
        usage
        exit 0
        ;;
    -n | -np | --ranks)
        need_value "$@"
        ranks=$2
        shift 2
        ;;
    -t | --threads)
        need_value "$@"
        threads=$2
        shift 2
        ;;
    --gpus-per-node)
        need_value "$@"
        gpus=$2
        shift 2
        ;;
    --bind)
        need_value "$@"
        bind=$2
        shift 2
        ;;
    --jemalloc)
        jemalloc=1
        shift
        ;;
    --dry-run)
        dry_run=1
        shift
        ;;
    --)
        shift
        break
        ;;
    -*)
        die "unknown option '$1' (mpda run options go after '--')"
        ;;
    *)
        break # the config: everything from here on is for mpda run
        ;;
    esac
done
mpda_args=("$@")

[[ -n "$ranks" ]] || die "-n RANKS is required"
is_count "$ranks" || die "-n RANKS must be a positive integer, got '$ranks'"
[[ -z "$threads" ]] || is_count "$threads" || die "-t must be a positive integer, got '$threads'"
[[ -z "$gpus" || "$gpus" == auto ]] || is_count "$gpus" ||
    die "--gpus-per-node must be a positive integer or 'auto', got '$gpus'"
case "$bind" in
"" | core | none) ;;
*) die "--bind must be 'core' or 'none', got '$bind'" ;;
esac

# ------------------------------------------------------------------- launcher and mpda
venv=""
if [[ -n "${MPDA_VENV:-}" ]]; then
    [[ -d "$MPDA_VENV" ]] || die "MPDA_VENV=$MPDA_VENV is not a directory"
    venv=$(cd "$MPDA_VENV" && pwd)
elif [[ -d .venv ]]; then
    venv=$(pwd)/.venv
elif [[ -d "$here/../.venv" ]]; then
    venv=$(cd "$here/../.venv" && pwd)
fi

# The launcher is a list of words: MPDA_MPIEXEC may carry arguments ("srun --mpi=pmi2").
mpiexec=()
if [[ -n "${MPDA_MPIEXEC:-}" ]]; then
    if [[ -x "$MPDA_MPIEXEC" ]]; then # a path, which may hold blanks
        mpiexec=("$MPDA_MPIEXEC")
    else
        read -ra mpiexec <<<"$MPDA_MPIEXEC"
    fi
    ((${#mpiexec[@]} > 0)) || die "MPDA_MPIEXEC='$MPDA_MPIEXEC' names no command"
elif [[ -n "$venv" && -x "$venv/bin/mpiexec" ]]; then
    mpiexec=("$venv/bin/mpiexec")
elif command -v mpiexec >/dev/null 2>&1; then
    mpiexec=("$(command -v mpiexec)")
else
    die "no mpiexec: create the venv first ('make venv'), set MPDA_VENV, or set MPDA_MPIEXEC"
fi

if [[ -n "$venv" && -x "$venv/bin/mpda" ]]; then
    mpda=$venv/bin/mpda
elif command -v mpda >/dev/null 2>&1; then
    mpda=$(command -v mpda)
else
    die "no mpda command: run 'make venv' (or pip install -e .) or set MPDA_VENV"
fi

# MPICH/hydra, Open MPI and srun spell binding differently; anything else gets hydra's
# spelling (Intel MPI's launcher is hydra too).
vendor=hydra
if [[ "$(basename -- "${mpiexec[0]}")" == srun ]]; then
    vendor=srun
else
    # (the text first: `grep -q` stops reading at a match, and under pipefail the
    # launcher's SIGPIPE would make the test fail)
    version_text=$("${mpiexec[@]}" --version 2>&1 || true)
    if grep -qiE 'open ?mpi|openrte|prrte' <<<"$version_text"; then
        vendor=openmpi
    elif grep -qE '^slurm ' <<<"$version_text"; then
        vendor=srun
    fi
fi
if [[ "$vendor" == srun && " ${mpiexec[*]} ${MPDA_MPIEXEC_ARGS:-} " != *" --mpi"[=\ ]* &&
    -z "${SLURM_MPI_TYPE:-}" ]]; then
    note "note: srun without --mpi=pmi2 may start independent 1-rank copies (mpda" \
        "refuses them); set MPDA_MPIEXEC=\"srun --mpi=pmi2\" unless Slurm's MpiDefault is pmi2"
fi

# ------------------------------------------------------------------ per-rank environment
rank_env=()
set_default() { # NAME VALUE: for the ranks, unless the user set NAME
    if [[ -z "${!1+x}" ]]; then
        rank_env+=("$1=$2")
    fi
}
if [[ -n "$threads" ]]; then
    for var in OMP_NUM_THREADS OPENBLAS_NUM_THREADS MKL_NUM_THREADS; do
        set_default "$var" "$threads"
    done
    if [[ "$threads" == 1 && "${XLA_FLAGS:-}" != *xla_cpu_multi_thread_eigen* ]]; then
        rank_env+=("XLA_FLAGS=${XLA_FLAGS:+$XLA_FLAGS }--xla_cpu_multi_thread_eigen=false")
    fi
fi

if ((jemalloc)); then
    lib=""
    if [[ -n "${JEMALLOC_LIB:-}" ]]; then
        [[ -f "$JEMALLOC_LIB" ]] || die "JEMALLOC_LIB=$JEMALLOC_LIB does not exist"
        lib=$JEMALLOC_LIB
    else
        # ldconfig may be off PATH (/sbin), and awk reads to the end: no SIGPIPE under pipefail
        lib=$({ ldconfig -p || /sbin/ldconfig -p || true; } 2>/dev/null |
            awk '/libjemalloc\.so\.2 / && !found {print $NF; found = 1}')
        if [[ -z "$lib" ]]; then
            for cand in /usr/lib/x86_64-linux-gnu/libjemalloc.so.2 \
                /usr/lib/aarch64-linux-gnu/libjemalloc.so.2 /usr/lib64/libjemalloc.so.2 \
                /usr/lib/libjemalloc.so.2 /usr/local/lib/libjemalloc.so.2 \
                "${CONDA_PREFIX:-/nonexistent}/lib/libjemalloc.so.2"; do
                if [[ -f "$cand" ]]; then
                    lib=$cand
                    break
                fi
            done
        fi
    fi
    if [[ -n "$lib" ]]; then
        rank_env+=("LD_PRELOAD=$lib${LD_PRELOAD:+:$LD_PRELOAD}")
    else
        note "warning: --jemalloc: libjemalloc.so.2 not found (apt-get install libjemalloc2," \
            "or set JEMALLOC_LIB); running with the default malloc"
    fi
fi

# ------------------------------------------------------------------------- the command
cmd=("${mpiexec[@]}" -n "$ranks")
if [[ "$bind" == core ]]; then
    per_rank=${threads:-1}
    if [[ "$vendor" == srun ]]; then
        # srun does not know hydra's -bind-to: its own spelling, T CPUs per task
        cmd+=(--cpus-per-task="$per_rank" --cpu-bind=cores)
    elif [[ "$vendor" == openmpi ]]; then
        cmd+=(--bind-to core)
        ((per_rank == 1)) || cmd+=(--map-by "slot:PE=$per_rank")
    elif ((per_rank == 1)); then
        cmd+=(-bind-to core)
    else
        cmd+=(-bind-to "core:$per_rank")
    fi
elif [[ "$bind" == none ]]; then
    case "$vendor" in
    openmpi) cmd+=(--bind-to none) ;;
    srun) cmd+=(--cpu-bind=none) ;;
    *) cmd+=(-bind-to none) ;;
    esac
elif cores=$(nproc 2>/dev/null) && ((ranks * ${threads:-1} >= cores && cores > 1)); then
    note "note: $ranks rank(s) x ${threads:-1} thread(s) on $cores cores of this node;" \
        "--bind core usually helps"
fi
if [[ -n "${MPDA_MPIEXEC_ARGS:-}" ]]; then
    read -ra extra <<<"$MPDA_MPIEXEC_ARGS"
    # (${a[@]+"${a[@]}"}: an empty array is "unbound" to bash < 4.4 under set -u)
    cmd+=(${extra[@]+"${extra[@]}"})
fi
# `env` puts the settings on the ranks only, whatever the launcher forwards.
((${#rank_env[@]} == 0)) || cmd+=(env "${rank_env[@]}")
[[ -z "$gpus" ]] || cmd+=("$here/bind_gpu.sh" "$gpus")
cmd+=("$mpda" run ${mpda_args[@]+"${mpda_args[@]}"})

printf '+' >&2
printf ' %q' "${cmd[@]}" >&2
printf '\n' >&2
if ((dry_run)); then
    exit 0
fi
exec "${cmd[@]}"
