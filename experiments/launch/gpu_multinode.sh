#!/usr/bin/env bash
# The recipe on several GPU nodes (8 GPUs each): one process per node that drives its
# 8 GPUs, process 0's node the coordinator. Run this on every node with its rank:
#
#   NODE_RANK=0 NNODES=2 COORD=10.0.0.2:1234 HF=/shared/Llama-2-7b-hf RUN=/shared/runs/7b \
#     bash experiments/launch/gpu_multinode.sh [preset, default gpu_7b]
#
# Under SLURM, `srun --ntasks-per-node=1 env RLHF_JAX_DISTRIBUTED=auto rlhf-jax ...`
# does the same (JAX reads SLURM's variables). HF and RUN must be on a filesystem every
# node sees (NFS, Lustre). The gpu_7b preset puts tensor parallelism (8) inside a node
# (NVLink) and data parallelism across nodes. Size it first: `rlhf-jax plan --config
# configs/scale.py:preset=gpu_7b --devices 16 --capacity-gib 80`.
# Not run by this project's CI (it has no GPU); the commands are the standard ones.
set -euo pipefail
PRESET=${1:-gpu_7b}
: "${NODE_RANK:?rank of this node}" "${NNODES:?number of nodes}" "${COORD:?host:port of rank 0}"
: "${HF:?HF checkpoint dir}" "${RUN:?work dir}"

# once per node: python3 -m venv .venv && . .venv/bin/activate && pip install -e . 'jax[cuda12]'
. .venv/bin/activate
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.92  # leave room for NCCL buffers
RLHF_JAX_COORDINATOR="$COORD" RLHF_JAX_NUM_PROCESSES="$NNODES" RLHF_JAX_PROCESS_ID="$NODE_RANK" \
  rlhf-jax pipeline --config "configs/scale.py:preset=$PRESET" --config.init.hf_dir="$HF" \
  --workdir "$RUN" 2>&1 | tee -a "rlhf_jax_node$NODE_RANK.log"
