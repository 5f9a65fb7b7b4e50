#!/bin/bash
# I-JEPA pretraining on a Cloud TPU VM pod slice (v4-32, v5p-32, ...): one
# process per worker VM; `--distributed` lets jax discover the slice.
#
#   launch/tpu_pod.sh setup TPU ZONE [GIT_URL]   # every worker: code, venv, jax[tpu]
#   launch/tpu_pod.sh start TPU ZONE CONFIG WORKDIR [--config.x=y ...]
#   launch/tpu_pod.sh logs  TPU ZONE [WORKER]    # follow one worker's log (default 0)
#   launch/tpu_pod.sh stop  TPU ZONE             # SIGTERM: all save at one step, then exit
#
# setup clones GIT_URL on every worker, or without it copies this working tree
# there (git-tracked files). start runs detached (setsid nohup): closing the
# terminal does not stop training; each worker logs to ~/ijepa_logs/RUN.log,
# RUN being the work dir's last component (other characters than A-Z a-z 0-9 . _ -
# become _). Running start again resumes from the
# work dir's latest checkpoint. WORKDIR may be gs://bucket/run (orbax writes
# there natively; TensorBoard files need google-cloud-storage) or a folder that
# every worker mounts. Arguments reach the workers quoted as given.
set -euo pipefail

usage() { sed -n '5,8p' "$0" | sed 's/^# *//' >&2; exit 2; }
[ $# -ge 3 ] || usage
ACTION=$1 TPU=$2 ZONE=$3
shift 3
REMOTE_DIR='~/ijepa_jax'

on_all_workers() {  # COMMAND: run on every worker of the slice, in parallel
  gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "$1"
}

quoted() { printf ' %q' "$@"; }

case "$ACTION" in
  setup)
    if [ $# -ge 1 ]; then
      fetch="rm -rf $REMOTE_DIR && git clone --depth 1$(quoted "$1") $REMOTE_DIR"
    else
      archive=$(mktemp --suffix .tar.gz)
      git -C "$(dirname "$0")/.." archive --format=tar.gz -o "$archive" HEAD
      gcloud compute tpus tpu-vm scp "$archive" "$TPU":ijepa_jax.tar.gz --zone "$ZONE" --worker=all
      rm -f "$archive"
      fetch="rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && tar -xzf ~/ijepa_jax.tar.gz -C $REMOTE_DIR"
    fi
    on_all_workers "set -e; $fetch && cd $REMOTE_DIR && python3 -m venv .venv && . .venv/bin/activate \
&& pip install -q -r requirements.txt 'jax[tpu]' && python -c 'import jax; print(jax.device_count(), \"TPU devices\")'"
    ;;
  start)
    [ $# -ge 2 ] || usage
    CONFIG=$1 WORKDIR=$2
    shift 2
    run=$(basename "$WORKDIR" | tr -c 'A-Za-z0-9._\n-' '_')
    train="python -m ijepa_jax.train$(quoted --config "$CONFIG" --workdir "$WORKDIR" --distributed "$@")"
    on_all_workers "cd $REMOTE_DIR && . .venv/bin/activate && mkdir -p ~/ijepa_logs \
&& setsid nohup $train > ~/ijepa_logs/$run.log 2>&1 < /dev/null & sleep 1; echo started on \$(hostname)"
    echo "follow with: $0 logs $TPU $ZONE [WORKER]; stop with: $0 stop $TPU $ZONE"
    ;;
  logs)
    gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker="${1:-0}" \
      --command 'tail -n 50 -F $(ls -t ~/ijepa_logs/*.log | head -1)'
    ;;
  stop)
    on_all_workers "pkill -TERM -f 'python -m ijepa_jax.train' && echo sent SIGTERM on \$(hostname) || true"
    ;;
  *)
    usage
    ;;
esac
