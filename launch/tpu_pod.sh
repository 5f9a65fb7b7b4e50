#!/bin/bash
# I-JEPA pretraining on a Cloud TPU VM pod slice: the same command on every
# worker; jax.distributed.initialize() discovers the slice by itself.
#
#   launch/tpu_pod.sh TPU_NAME ZONE configs/in1k_vith14.py /mnt/shared/workdir \
#       --config.data.root=/mnt/imagenet
#
# WORKDIR must be a path on a filesystem every worker mounts (e.g. a Filestore
# or gcsfuse mount): config, metrics and checkpoints are plain files there.
#
# Assumes the repository is cloned at ~/ijepa_jax on every worker with
# `python3 -m venv .venv && . .venv/bin/activate && pip install -r requirements.txt "jax[tpu]"`.
set -euo pipefail

TPU=${1:?usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.x=y ...]}
ZONE=${2:?zone}
CONFIG=${3:?config}
WORKDIR=${4:?workdir}
shift 4

ARGS=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command \
    "cd ~/ijepa_jax && . .venv/bin/activate && python -m ijepa_jax.train --config $CONFIG --workdir $WORKDIR --distributed$ARGS"
