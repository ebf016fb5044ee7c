#!/usr/bin/env bash
# The recipe on a Cloud TPU pod slice: one process per host, every host runs the same
# command, JAX finds the slice's topology itself (RLHF_JAX_DISTRIBUTED=auto).
#
#   TPU=my-v5p-128 ZONE=us-east5-a HF=/gcs/models/Llama-2-7b-hf RUN=/gcs/runs/7b \
#     bash experiments/launch/tpu_pod.sh [preset, default tpu_7b]
#
# HF and RUN must be a filesystem every host sees (e.g. a GCS bucket mounted with
# gcsfuse at the same path on every worker): checkpoints are written collectively by
# Orbax, the rest by process 0. Size the slice first: `rlhf-jax plan --config
# configs/scale.py:preset=tpu_7b --devices 64 --capacity-gib 95`.
# Not run by this project's CI (it has no TPU); the commands are the standard ones.
set -euo pipefail
PRESET=${1:-tpu_7b}
: "${TPU:?name of the TPU VM}" "${ZONE:?its zone}" "${HF:?HF checkpoint dir}" "${RUN:?work dir}"
: "${REPO:?git URL of your rlhf_jax clone}"

gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "
  set -e
  [ -d rlhf_jax ] || git clone $REPO rlhf_jax
  cd rlhf_jax && python3 -m venv .venv && . .venv/bin/activate
  pip install -q -e . 'jax[tpu]'
  RLHF_JAX_DISTRIBUTED=auto rlhf-jax pipeline --config configs/scale.py:preset=$PRESET \
    --config.init.hf_dir=$HF --workdir $RUN 2>&1 | tee -a \$HOME/rlhf_jax_\$(hostname).log
"
