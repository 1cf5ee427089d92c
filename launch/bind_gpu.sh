#!/usr/bin/env bash
# launch/bind_gpu.sh: per-rank helper: give this MPI rank one GPU, chosen by its
# node-local rank, then run the command.  Launch it under the MPI launcher:
#
#   mpiexec -n 8 launch/bind_gpu.sh 4 .venv/bin/mpda run CONFIG     # 4 GPUs per node
#   srun --mpi=pmi2 launch/bind_gpu.sh auto .venv/bin/mpda run CONFIG
#
# Usage: bind_gpu.sh GPUS_PER_NODE|auto COMMAND [ARGS...]
#
# - Node-local rank from MPI_LOCALRANKID (MPICH/hydra), OMPI_COMM_WORLD_LOCAL_RANK
#   (Open MPI), PALS_LOCAL_RANKID (Cray PALS), MV2_COMM_WORLD_LOCAL_RANK (MVAPICH2) or
#   SLURM_LOCALID (srun).  Without any of them (not under a launcher) the command runs
#   unchanged (a bad GPUS_PER_NODE is an error all the same).
# - GPU = local rank mod GPUS_PER_NODE, taken from the list in CUDA_VISIBLE_DEVICES when
#   the job already has one (Slurm sets it for allocated GPUs; spaces in it are ignored),
#   else 0..N-1.  "auto" counts that list, or `nvidia-smi -L`.  CUDA_VISIBLE_DEVICES is
#   then narrowed to that one GPU, so each rank initialises only its own device
#   (mpda_dist picks the device by node-local rank too; with one visible it takes that
#   one).
# - When the number of ranks on the node is known, each rank gets an even share of its
#   GPU's memory: XLA_PYTHON_CLIENT_MEM_FRACTION = 0.9 / (ranks on that GPU), and
#   XLA_PYTHON_CLIENT_PREALLOCATE=false when several ranks share one (mpda_dist itself
#   turns preallocation off for every rank).  Ranks on that GPU = the local ranks r with
#   r mod N equal to this one's; only when Slurm narrowed CUDA_VISIBLE_DEVICES per task
#   (fewer listed than SLURM_GPUS_ON_NODE, and N = all of them) are the ranks assumed to
#   be spread round-robin over SLURM_GPUS_ON_NODE GPUs.  Variables the user set are
#   never changed.
# - MPDA_BIND_VERBOSE=1 prints one line per rank to stderr.
set -euo pipefail

die() {
    printf 'bind_gpu.sh: error: %s\n' "$*" >&2
    exit 2
}

[[ $# -ge 2 ]] || die "usage: bind_gpu.sh GPUS_PER_NODE|auto COMMAND [ARGS...]"
want=$1
shift
[[ "$want" == auto || "$want" =~ ^[1-9][0-9]*$ ]] ||
    die "GPUS_PER_NODE must be a positive integer or 'auto', got '$want'"

local_rank=${MPI_LOCALRANKID:-${OMPI_COMM_WORLD_LOCAL_RANK:-${PALS_LOCAL_RANKID:-${MV2_COMM_WORLD_LOCAL_RANK:-${SLURM_LOCALID:-}}}}}
if [[ -z "$local_rank" ]]; then
    exec "$@"
fi
[[ "$local_rank" =~ ^[0-9]+$ ]] || die "node-local rank '$local_rank' is not a number"

# Ranks on this node; empty when the launcher does not say.
slurm_tasks_on_node() {
    # SLURM_STEP_TASKS_PER_NODE looks like "4(x2),3": entry SLURM_NODEID of its expansion.
    local spec=${SLURM_STEP_TASKS_PER_NODE:-${SLURM_TASKS_PER_NODE:-}} node=${SLURM_NODEID:-}
    [[ -n "$spec" && -n "$node" ]] || return 0
    local item count times idx=0
    local -a items
    IFS=, read -ra items <<<"$spec"
    for item in ${items[@]+"${items[@]}"}; do
        if [[ "$item" =~ ^([0-9]+)\(x([0-9]+)\)$ ]]; then
            count=${BASH_REMATCH[1]}
            times=${BASH_REMATCH[2]}
        elif [[ "$item" =~ ^[0-9]+$ ]]; then
            count=$item
            times=1
        else
            return 0
        fi
        if ((node < idx + times)); then
            printf '%s\n' "$count"
            return 0
        fi
        idx=$((idx + times))
    done
}
local_size=${MPI_LOCALNRANKS:-${OMPI_COMM_WORLD_LOCAL_SIZE:-${PALS_LOCAL_SIZE:-${MV2_COMM_WORLD_LOCAL_SIZE:-}}}}
if [[ -z "$local_size" && -n "${SLURM_LOCALID:-}" ]]; then
    local_size=$(slurm_tasks_on_node)
fi

# "0, 1" is a list of two GPUs, as CUDA reads it: drop the blanks.
visible=${CUDA_VISIBLE_DEVICES-}
visible=${visible//[[:space:]]/}
if [[ -n "${CUDA_VISIBLE_DEVICES+set}" && -z "$visible" ]]; then
    # The user hid every GPU (CUDA_VISIBLE_DEVICES set and empty): leave it so.
    [[ "${MPDA_BIND_VERBOSE:-0}" == 1 ]] && printf 'bind_gpu.sh: CUDA_VISIBLE_DEVICES is empty\n' >&2
    exec "$@"
fi
gpus=()
if [[ -n "$visible" ]]; then
    IFS=, read -ra gpus <<<"$visible"
fi
if [[ "$want" == auto ]]; then
    if ((${#gpus[@]} > 0)); then
        n=${#gpus[@]}
    elif command -v nvidia-smi >/dev/null 2>&1; then
        n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    else
        n=0
    fi
    if ((n == 0)); then
        # No GPU to bind: run unchanged (JAX falls back to the CPU).
        [[ "${MPDA_BIND_VERBOSE:-0}" == 1 ]] && printf 'bind_gpu.sh: no GPU found\n' >&2
        exec "$@"
    fi
else
    n=$want
fi

slot=$((local_rank % n))
if ((${#gpus[@]} > 0)); then
    ((slot < ${#gpus[@]})) || die "local rank $local_rank wants GPU slot $slot but CUDA_VISIBLE_DEVICES=$visible lists ${#gpus[@]}"
    gpu=${gpus[$slot]}
else
    gpu=$slot
fi
export CUDA_VISIBLE_DEVICES=$gpu

if [[ "$local_size" =~ ^[1-9][0-9]*$ ]]; then
    # GPUs the ranks of this node use: the N asked for.  Slurm may have narrowed
    # CUDA_VISIBLE_DEVICES per task (--gpus-per-task, --gpu-bind), so that each task
    # lists fewer than SLURM_GPUS_ON_NODE; when this rank then takes every GPU it sees,
    # the node's ranks are spread over all SLURM_GPUS_ON_NODE.  A smaller N of the
    # user's (`bind_gpu.sh 2` with 4 allocated) uses N GPUs, not the allocation.
    node_gpus=$n
    if [[ "${SLURM_GPUS_ON_NODE:-}" =~ ^[0-9]+$ ]] && ((${#gpus[@]} > 0)) &&
        ((n == ${#gpus[@]} && SLURM_GPUS_ON_NODE > ${#gpus[@]})); then
        node_gpus=$SLURM_GPUS_ON_NODE
    fi
    # Local ranks r with r mod node_gpus == this one's share its GPU.
    share=$(((local_size - local_rank % node_gpus + node_gpus - 1) / node_gpus))
    ((share >= 1)) || share=1
    # the user's share under either name (jaxlib refuses both at once)
    if [[ -z "${XLA_PYTHON_CLIENT_MEM_FRACTION:-}" && -z "${XLA_CLIENT_MEM_FRACTION:-}" ]]; then
        XLA_PYTHON_CLIENT_MEM_FRACTION=$(awk -v s="$share" 'BEGIN { printf "%.3f", 0.9 / s }')
        export XLA_PYTHON_CLIENT_MEM_FRACTION
    fi
    if ((share > 1)) && [[ -z "${XLA_PYTHON_CLIENT_PREALLOCATE:-}" ]]; then
        export XLA_PYTHON_CLIENT_PREALLOCATE=false
    fi
fi

if [[ "${MPDA_BIND_VERBOSE:-0}" == 1 ]]; then
    printf 'bind_gpu.sh: %s local rank %s -> CUDA_VISIBLE_DEVICES=%s (memory fraction %s)\n' \
        "${HOSTNAME:-?}" "$local_rank" "$gpu" "${XLA_PYTHON_CLIENT_MEM_FRACTION:-default}" >&2
fi
exec "$@"
