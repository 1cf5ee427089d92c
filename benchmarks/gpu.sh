#!/usr/bin/env bash
# One-call GPU benchmark for mpda_dist: fits a single device call of <= 8 minutes on an
# H100 machine (JAX with CUDA, mpi4py, h5py preinstalled); the package is NOT installed,
# it runs from the repo root with PYTHONPATH=.  Every stage runs under `timeout`, and the
# stages share a deadline (GPU_BENCH_BUDGET seconds, default 400) so the whole stays
# under 7 minutes.  Stages (see benchmarks/gpu_bench.py):
#   kernel  per-iteration time at 1024², 2048², 4096² float32 of the frozen update, pads
#           against the hand-written fused pass (and its tile variants); GB/s vs the
#           3.0 TB/s floor
#   exact   (background, host CPU) exact sparse solves for the 1024² problems, if scipy
#   solve   time to solution 1024² at 1 %, 5 %, 10 % observations (first + warm run),
#           RMSE vs truth and vs exact
#   pads    1024² at 10 % and 1 % with MPDA_KERNEL_FORM=pads (first + warm run): the
#           baseline for the default, whose long frozen calls run the hand-written pass
#           (mpda_dist/fused.py; kernel.frozen_form)
#   strips  1024² at 10 % with MPDA_KERNEL_FORM=strips (first + warm run): the border
#           form that is 1.6-2.5x faster per iteration on a CPU and 5x slower on an H100
#           (benchmarks/RESULTS.md §15)
#   helpers, nohelpers  1024² at 5 %, first run only, each in a fresh process with
#           empty caches: the cold start with 4 lowering helpers
#           (mpda_dist/lowering.py), then with MPDA_LOWER_PROCESSES=0
#   prealloc  the nohelpers stage (and a warm run) with XLA_PYTHON_CLIENT_PREALLOCATE=true:
#           JAX's default, which mpda turns off
#   serial  1024² at 5 %, first run only, in a fresh process with empty caches and
#           MPDA_COMPILE_THREADS=1: the cold start without compiling in background
#           threads (the solve stage's first 5 % run compiles with one per core)
#   cached  1024² at 10 % in a fresh process after another filled its caches: "first"
#           loads every program from mpda_dist's program cache (programs.py), as a rerun
#           does (before RESULTS §28 JAX's persistent cache was filled beside it)
#   jaxcache  the same with MPDA_PROGRAM_CACHE_DIR empty: JAX's cache only (tracing and
#           lowering are paid again, as before the program cache)
#   big     4096² at 5 % (compile warm-up, then the warm run)
#   padsbig the same with MPDA_KERNEL_FORM=pads
#   mpi     two ranks sharing the GPU (mpiexec -n 2), 1024² at 5 %, if mpiexec exists,
#           empty caches, the launcher's default binding (Open MPI: a core per rank);
#           it and the solve stage print each rank's slowest programs to get (load,
#           trace and lower, compile: programs.compile_report)
#   mpinobind  the same with no binding (--bind-to none): each rank's compile threads
#           may use every core
#   runtable  `mpda run` of configs/small.yaml on 2 ranks with the launcher's default
#           binding: rank 0's start-up table (each rank's usable cores) and warnings
#   fit     8192² at 5 %, one solve capped at 20 iterations per level: peak GPU memory
#   profile one warm 1024² 10 % solve and 5 calls of 10 frozen updates under JAX's
#           profiler: per kernel name the count and device time, busy against wall
#   coldsolve  1024² at 10 %, 5 % and 1 %, each a first and a warm run in a fresh
#           process with empty caches, alternated, GPU_BENCH_ROUNDS rounds
#   coldab  the nohelpers (default) and helpers stages alternated, GPU_BENCH_ROUNDS rounds
#           (default 3): first runs only, a fresh process and empty caches each; the
#           first round's whole output is kept in $OUT/cold/
#   coldimports  the same for lowering.start()'s imports ahead (default) against none
#           (GPU_BENCH_NO_IMPORT_AHEAD=1)
#   coldprepare  the same for the solve prepared before the problem is built (default,
#           as mpda run does) against prepared in the solve (GPU_BENCH_NO_PREPARE=1);
#           compare the build and first solve together
#   coldflags  the same for XLA options that may compile faster (GPU_BENCH_COLD_FLAGS,
#           values separated by ";", "default" for none), each with a warm run
#   (the alternated stages solve at 5 %, or at GPU_BENCH_COLD_FRACTION; coldvar runs
#   GPU_BENCH_COLD_RUNS solves per process, default 1; GPU_BENCH_FUSED_MIN_NODES
#   replaces kernel.FUSED_MIN_NODES in every `gpu_bench.py solve` process, so set it
#   only for the stage compared, and not with lowering helpers, which keep the default)
#   coldvar  the same for any variable: GPU_BENCH_COLD_VAR (default MPDA_COMPILE_THREADS)
#           over GPU_BENCH_COLD_VALUES (default "default;4;8"); in a value, @CACHE@ is
#           the run's fresh cache directory
#   coldcache  the same for JAX's persistent cache beside the program store (a fresh
#           JAX_COMPILATION_CACHE_DIR, the default before RESULTS §28) against the
#           default (the store alone)
#   report  all tables again
# GPU_BENCH_STAGES (default all: "kernel solve helpers nohelpers prealloc pads cached big
# padsbig fit mpi mpinobind runtable profile strips serial jaxcache coldsolve coldab coldimports
# coldprepare coldflags coldvar coldcache"; they run in that order, and the budget skips what is left) picks stages;
# GPU_BENCH_KERNEL_CASES=sweep times the fused pass's settings against each other
# (RESULTS §17), =all makes the kernel stage time the coupled update and the strips form
# too (default frozen: the frozen update, pads against fused);
# GPU_BENCH_KERNEL_SIZES="1024" times those sizes only (default 1024 2048 4096).
# Results: $OUT/gpu_results.csv (+ .json metadata, + gpu_log.txt) when OUT is set,
# else ./gpu_results.csv.  Every stage runs and the report is printed whatever happens;
# the exit status is 1 when a stage (or the report) FAILED or hit its TIMEOUT, else 0.
#
#   bash benchmarks/gpu.sh            # on the GPU machine
#   bash benchmarks/gpu.sh --quick    # small sizes: a smoke test on a CPU
set -u
cd "$(dirname "$0")/.."

QUICK=""
case "${1:-}" in
    --quick) QUICK="--quick" ;;
    -h | --help)
        sed -n '2,/^set -u/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    "") ;;
    *)
        echo "usage: $0 [--quick | --help]" >&2
        exit 2
        ;;
esac
PY=${PYTHON:-python3}
# An absolute interpreter path: mpiexec (Open MPI in particular) may put its own bin
# directory first on the ranks' PATH, where `python3` can be another Python without
# our dependencies (seen on the H100 image: the ranks found no yaml).
PY=$(command -v "$PY") || { echo "no python interpreter '${PYTHON:-python3}'"; exit 1; }
OUTDIR=${OUT:-.}
mkdir -p "$OUTDIR"
CSV="$OUTDIR/gpu_results.csv"
LOG="$OUTDIR/gpu_log.txt"
rm -f "$CSV" "$CSV.json"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
BUDGET=${GPU_BENCH_BUDGET:-400}
STAGES=" ${GPU_BENCH_STAGES:-kernel solve helpers nohelpers prealloc pads cached big padsbig fit mpi mpinobind runtable profile strips serial jaxcache coldsolve coldab coldimports coldprepare coldflags coldvar coldcache} "
START=$(date +%s)
EXACT_DIR=$(mktemp -d /tmp/mpda_exact.XXXXXX)

exec > >(tee "$LOG") 2>&1

remaining() { echo $((BUDGET - ($(date +%s) - START))); }

BAD="" # the stages that failed or timed out: the exit status at the end

# stage NAME LIMIT CMD...: run CMD under timeout min(LIMIT, time left); never stops the
# script (a failure or timeout is noted in BAD)
stage() {
    local name=$1 limit=$2
    shift 2
    case "$STAGES" in *" $name "*) ;; *) return 0 ;; esac
    local left
    left=$(remaining)
    local t=$((limit < left ? limit : left))
    if [ "$t" -lt 15 ]; then
        echo "SKIPPED stage $name: only ${left} s of the ${BUDGET} s budget left"
        return 0
    fi
    echo
    echo "=== stage $name (limit ${t} s, $(remaining) s of budget left) ==="
    local t0
    t0=$(date +%s)
    timeout -k 10 "$t" "$@"
    local rc=$?
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        echo "TIMEOUT stage $name after ${t} s (its rows so far, if any, are in the CSV)"
        BAD="$BAD $name (TIMEOUT)"
    elif [ $rc -ne 0 ]; then
        echo "FAILED stage $name (exit $rc)"
        BAD="$BAD $name (FAILED, exit $rc)"
    fi
    echo "=== stage $name took $(($(date +%s) - t0)) s ==="
    return 0
}

echo "mpda_dist GPU benchmark $QUICK on $(hostname) at $(date -u +%FT%TZ)"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
    --format=csv,noheader || echo "nvidia-smi: not found"
"$PY" -c "import sys, jax; print('python', sys.version.split()[0], 'jax', jax.__version__, jax.devices())" \
    || { echo "JAX does not import: nothing to measure"; exit 1; }

# Dependencies the package needs beyond JAX/mpi4py/h5py: install carried wheels if any
# are missing (never from the network).
missing=""
for mod in numpy scipy yaml; do
    "$PY" -c "import $mod" 2>/dev/null || missing="$missing $mod"
done
if [ -n "$missing" ]; then
    echo "missing python modules:$missing"
    if ls .whl/*.whl >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
            && export PYTHONPATH="/tmp/site:$PYTHONPATH" && echo "installed .whl/*.whl into /tmp/site"
    else
        echo "no .whl/ wheels to install: stages that need$missing will fail or fall back"
    fi
fi
HAVE_SCIPY=0
"$PY" -c "import scipy" 2>/dev/null && HAVE_SCIPY=1

# Exact reference solves on the host CPU, in the background (they overlap the GPU stages;
# the solve stage waits for them at most --exact-wait seconds).
EXACT_PIDS=""
if [ $HAVE_SCIPY -eq 1 ]; then
    for f in 0.01 0.05 0.1; do
        timeout -k 5 $((BUDGET - 30)) "$PY" benchmarks/gpu_bench.py exact $QUICK \
            --fractions $f --dir "$EXACT_DIR" >>"$EXACT_DIR/exact.log" 2>&1 &
        EXACT_PIDS="$EXACT_PIDS $!"
    done
    echo "exact reference solves started in the background (pids$EXACT_PIDS)"
else
    echo "scipy missing: RMSE vs exact skipped"
fi

if [ -n "$QUICK" ]; then
    L_K=120 L_S=120 L_R=90 L_T=90 L_C=60 L_B=90 L_M=90 L_F=60 L_P=90
else
    L_K=200 L_S=110 L_R=80 L_T=70 L_C=40 L_B=150 L_M=150 L_F=90 L_P=90
fi

stage kernel $L_K "$PY" benchmarks/gpu_bench.py kernel $QUICK --csv "$CSV" \
    --cases "${GPU_BENCH_KERNEL_CASES:-frozen}" ${GPU_BENCH_KERNEL_SIZES:+--sizes $GPU_BENCH_KERNEL_SIZES}
stage solve $L_S "$PY" benchmarks/gpu_bench.py solve $QUICK --csv "$CSV" \
    --exact-dir "$EXACT_DIR" --exact-wait 40
# the cold start with and without lowering helpers, each with empty caches
COLD_A=$(mktemp -d /tmp/mpda_cold.XXXXXX) COLD_B=$(mktemp -d /tmp/mpda_cold.XXXXXX)
stage helpers $L_R env XDG_CACHE_HOME="$COLD_A" MPDA_LOWER_PROCESSES=4 "$PY" benchmarks/gpu_bench.py solve $QUICK \
    --csv "$CSV" --fractions 0.05 --runs 1 --label " lowering helpers" --exact-wait 0
stage nohelpers $L_R env XDG_CACHE_HOME="$COLD_B" MPDA_LOWER_PROCESSES=0 "$PY" \
    benchmarks/gpu_bench.py solve $QUICK --csv "$CSV" --fractions 0.05 --runs 1 \
    --label " no lowering helpers" --exact-wait 0
# the same cold start (no helpers) with JAX's default preallocation of 75 % of the GPU,
# which mpda turns off (runtime.configure_jax_env; RESULTS §25): first and warm run
COLD_C=$(mktemp -d /tmp/mpda_cold.XXXXXX)
stage prealloc $L_R env XDG_CACHE_HOME="$COLD_C" XLA_PYTHON_CLIENT_PREALLOCATE=true "$PY" \
    benchmarks/gpu_bench.py solve $QUICK --csv "$CSV" --fractions 0.05 --runs 2 \
    --label " preallocated" --exact-wait 0
rm -rf "$COLD_A" "$COLD_B" "$COLD_C"
stage pads $L_S env MPDA_KERNEL_FORM=pads "$PY" benchmarks/gpu_bench.py solve $QUICK \
    --csv "$CSV" --fractions 0.1 0.01 --label " pads" --exact-dir "$EXACT_DIR" --exact-wait 20
export PY QUICK CSV OUTDIR
# rerun CACHEDIR ENV... LABEL: 1024² 10 % in a fresh process whose caches are in CACHEDIR,
# filled first (by another fresh process) when CACHEDIR is empty: "first" then loads
# what a rerun loads, whichever stages ran before
rerun() {
    local dir=$1 label=${*: -1}
    local -a env=("${@:2:$#-2}")
    if [ -z "$(ls -A "$dir" 2>/dev/null)" ]; then
        env XDG_CACHE_HOME="$dir" ${env[@]+"${env[@]}"} "$PY" benchmarks/gpu_bench.py solve \
            $QUICK --fractions 0.1 --runs 1 --exact-wait 0 >/dev/null 2>&1 \
            || { echo "filling the caches in $dir failed"; return 1; }
    fi
    env XDG_CACHE_HOME="$dir" ${env[@]+"${env[@]}"} "$PY" benchmarks/gpu_bench.py solve $QUICK \
        --csv "$CSV" --fractions 0.1 --label "$label" --exact-wait 0
}
export -f rerun
CACHED=$(mktemp -d /tmp/mpda_cached.XXXXXX)
stage cached $L_C bash -c 'rerun "$1" " disk caches"' _ "$CACHED"
stage big $L_B "$PY" benchmarks/gpu_bench.py big $QUICK --csv "$CSV"
stage padsbig $L_B env MPDA_KERNEL_FORM=pads "$PY" benchmarks/gpu_bench.py big $QUICK \
    --csv "$CSV" --label " pads"
stage fit $L_F "$PY" benchmarks/gpu_bench.py fit $QUICK --csv "$CSV"

MPIEXEC=$(command -v mpiexec || true)
[ -z "$MPIEXEC" ] && [ -x "$(dirname "$(command -v "$PY")")/mpiexec" ] \
    && MPIEXEC="$(dirname "$(command -v "$PY")")/mpiexec"
if [ -n "$MPIEXEC" ]; then
    MPIFLAGS="" NOBIND="-bind-to none"
    if "$MPIEXEC" --version 2>&1 | grep -qi "open mpi\|open-mpi\|openrte"; then
        # -x: Open MPI does not pass PYTHONPATH (the package and /tmp/site) on by itself
        MPIFLAGS="--allow-run-as-root --oversubscribe -x PYTHONPATH -x PYTHONUNBUFFERED"
        NOBIND="--bind-to none"
        export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
    fi
    # whether this MPI can take GPU buffers (what a GPU-direct exchange would need)
    command -v ompi_info >/dev/null \
        && ompi_info --parsable --all 2>/dev/null | grep -m1 "mpi_built_with_cuda_support:value"
    # each with empty caches: the launcher's default binding (Open MPI binds each of 2
    # ranks to one core), then no binding
    COLD_M=$(mktemp -d /tmp/mpda_cold.XXXXXX) COLD_N=$(mktemp -d /tmp/mpda_cold.XXXXXX)
    stage mpi $L_M env XDG_CACHE_HOME="$COLD_M" "$MPIEXEC" $MPIFLAGS -n 2 "$PY" \
        benchmarks/gpu_bench.py mpi $QUICK --csv "$CSV"
    stage mpinobind $L_M env XDG_CACHE_HOME="$COLD_N" "$MPIEXEC" $MPIFLAGS $NOBIND -n 2 "$PY" \
        benchmarks/gpu_bench.py mpi $QUICK --csv "$CSV" --label " $NOBIND"
    rm -rf "$COLD_M" "$COLD_N"
    # `mpda run` on 2 ranks (configs/small.yaml) with the launcher's default binding:
    # rank 0's start-up table (rank, host, device, usable cores) and its warnings
    RUNDIR=$(mktemp -d /tmp/mpda_run.XXXXXX)
    stage runtable $L_M bash -c '"$@" >"$0/run.log" 2>&1; rc=$?
        grep -a "mpda_dist .* on \|  rank \|usable core\|done in\|error" "$0/run.log"
        [ $rc -ne 0 ] && tail -30 "$0/run.log"; exit $rc' \
        "$RUNDIR" env XDG_CACHE_HOME="$RUNDIR" "$MPIEXEC" $MPIFLAGS -n 2 "$PY" -c \
        "from mpda_dist.cli import main; main()" run configs/small.yaml -o "$RUNDIR/small.h5"
    rm -rf "$RUNDIR"
else
    echo
    echo "SKIPPED stages mpi, mpinobind, runtable: no mpiexec on PATH or next to $PY"
fi

stage profile $L_P "$PY" benchmarks/gpu_bench.py profile $QUICK --csv "$CSV"
stage strips $L_T env MPDA_KERNEL_FORM=strips "$PY" benchmarks/gpu_bench.py solve $QUICK \
    --csv "$CSV" --fractions 0.1 --label " strips" --exact-wait 0
COLD_CACHE=$(mktemp -d /tmp/mpda_cold.XXXXXX)
stage serial $L_R env XDG_CACHE_HOME="$COLD_CACHE" MPDA_COMPILE_THREADS=1 \
    "$PY" benchmarks/gpu_bench.py solve $QUICK --csv "$CSV" --fractions 0.05 --runs 1 \
    --label " 1 compile thread" --exact-wait 0
rm -rf "$COLD_CACHE"
JAXCACHED=$(mktemp -d /tmp/mpda_cached.XXXXXX)
stage jaxcache $L_C bash -c 'rerun "$1" MPDA_PROGRAM_CACHE_DIR= " JAX cache only"' _ "$JAXCACHED"
rm -rf "$CACHED" "$JAXCACHED"
# the cold-start comparisons last: each is minutes of fresh processes
# alternate VAR RUNS VALUES: a 1024² 5 % solve (RUNS runs: the first, then warm ones)
# in a fresh process with empty caches for each of VALUES (separated by ";"; "default"
# leaves VAR unset), the values in turn, GPU_BENCH_ROUNDS rounds (default 3): one run
# each (RESULTS §25) could not tell two settings apart.  The exit status is the first
# failing run's (the stage is then FAILED).  The first round's output is kept in $OUTDIR/cold/.
alternate() {
    local var=$1 runs=$2 r v d st rc=0 frac
    local -a values
    IFS=';' read -ra values <<<"$3"
    trap 'rm -rf "$d" "$d.log"' EXIT
    trap 'rm -rf "$d" "$d.log"; exit 143' TERM
    for r in $(seq "$ROUNDS"); do
        for v in "${values[@]}"; do
            d=$(mktemp -d /tmp/mpda_cold.XXXXXX)
            local -a set=()
            [ "$v" = default ] || set=("$var=${v//@CACHE@/$d}")
            # GPU_BENCH_FRACTION is the solve's observation fraction (default 5 %, or
            # GPU_BENCH_COLD_FRACTION)
            frac=${GPU_BENCH_COLD_FRACTION:-0.05}
            [ "$var" = GPU_BENCH_FRACTION ] && [ "$v" != default ] && frac=$v
            env -u "$var" XDG_CACHE_HOME="$d" ${set[@]+"${set[@]}"} "$PY" benchmarks/gpu_bench.py \
                solve $QUICK --csv "$CSV" --fractions "$frac" --runs "$runs" \
                --label " $var=$v r$r" --exact-wait 0 >"$d.log" 2>&1
            st=$?
            [ $st -ne 0 ] && [ $rc -eq 0 ] && rc=$st
            # the first solve, where the rank waited and for what, and the helpers' line
            grep -a "^  start-up:" "$d.log"
            grep -a -A6 "^  solve \|waited" "$d.log" | grep -av "^--$\|slowest programs"
            grep -a "lowering helpers:" "$d.log"
            [ $st -ne 0 ] && tail -5 "$d.log"
            # the first round's whole output (the main thread's samples) beside the CSV
            [ "$r" = 1 ] && mkdir -p "$OUTDIR/cold" \
                && mv "$d.log" "$OUTDIR/cold/${var}_$(printf '%s' "$v" | tr -c 'A-Za-z0-9_.' _ | cut -c1-60).log"
            rm -rf "$d" "$d.log"
        done
    done
    return $rc
}
ROUNDS=${GPU_BENCH_ROUNDS:-3}
export ROUNDS
ALTERNATE="$(declare -f alternate); alternate \"\$@\""
# the cold start at each observation fraction, with its warm run: 10 %, 5 %, 1 %
stage coldsolve $((L_R * ROUNDS * 3 / 3)) bash -c "$ALTERNATE" _ GPU_BENCH_FRACTION 2 \
    '0.1;0.05;0.01'
# no lowering helpers (the default) against 4
stage coldab $((L_R * ROUNDS * 2 / 3)) bash -c "$ALTERNATE" _ MPDA_LOWER_PROCESSES 1 'default;4'
# the first solve's imports ahead, in a thread that lowering.start() starts (the
# default), against none
stage coldimports $((L_R * ROUNDS * 2 / 3)) bash -c "$ALTERNATE" _ GPU_BENCH_NO_IMPORT_AHEAD 1 \
    'default;1'
# the solve prepared (its programs compiling) before the problem is built, as `mpda run`
# does (the default), against prepared in the solve
stage coldprepare $((L_R * ROUNDS * 2 / 3)) bash -c "$ALTERNATE" _ GPU_BENCH_NO_PREPARE 1 \
    'default;1'
# XLA's options that may make compiling cheaper, with the warm run they give: autotuning
# off; LLVM's optimisation off; ptxas's optimisation off (RESULTS §26).
# GPU_BENCH_COLD_FLAGS replaces the list (";" between values).
COLD_FLAGS=${GPU_BENCH_COLD_FLAGS:-"default;--xla_gpu_autotune_level=0;\
--xla_gpu_autotune_level=0 --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true;\
--xla_gpu_autotune_level=0 --xla_gpu_disable_gpuasm_optimizations=true"}
n_flags=$(($(tr -cd ';' <<<"$COLD_FLAGS" | wc -c) + 1))
stage coldflags $((L_R * ROUNDS * n_flags / 3)) bash -c "$ALTERNATE" _ XLA_FLAGS 2 "$COLD_FLAGS"
# any other setting: GPU_BENCH_COLD_VAR (default MPDA_COMPILE_THREADS) over
# GPU_BENCH_COLD_VALUES (default "default;4;8": fewer compiles at once may finish the
# programs needed first sooner)
COLD_VAR=${GPU_BENCH_COLD_VAR:-MPDA_COMPILE_THREADS}
COLD_VALUES=${GPU_BENCH_COLD_VALUES:-"default;4;8"}
n_values=$(($(tr -cd ';' <<<"$COLD_VALUES" | wc -c) + 1))
stage coldvar $((L_R * ROUNDS * n_values * ${GPU_BENCH_COLD_RUNS:-1} / 3)) bash -c "$ALTERNATE" _ \
    "$COLD_VAR" "${GPU_BENCH_COLD_RUNS:-1}" "$COLD_VALUES"
# the program store alone (the default since RESULTS §28) against JAX's cache beside it
stage coldcache $((L_R * ROUNDS * 2 / 3)) bash -c "$ALTERNATE" _ JAX_COMPILATION_CACHE_DIR 1 \
    'default;@CACHE@/jax'

for pid in $EXACT_PIDS; do kill "$pid" 2>/dev/null; done
[ -f "$EXACT_DIR/exact.log" ] && { echo; echo "--- exact stage log:"; cat "$EXACT_DIR/exact.log"; }
echo
echo "=== report ($(($(date +%s) - START)) s since start) ==="
timeout 30 "$PY" benchmarks/gpu_bench.py report --csv "$CSV" || BAD="$BAD report (exit $?)"
rm -rf "$EXACT_DIR"
if [ -n "$BAD" ]; then
    echo "total $(($(date +%s) - START)) s; exit 1: failed or timed out:$BAD"
    exit 1
fi
echo "total $(($(date +%s) - START)) s; every stage that ran succeeded"
