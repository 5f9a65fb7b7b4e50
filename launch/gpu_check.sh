#!/usr/bin/env bash
# One-script check of a single NVIDIA GPU (H100/H200), offline, in about 8 minutes:
#   1. benchmark ViT-B/16, ViT-L/16, ViT-H/14 at 224px (reference recipe, bf16, scanned
#      blocks, synthetic input), each at the largest per-device batch of a short list that
#      fits, with XLA and with cuDNN attention;
#   2. 300 training steps of configs/cifar100.py:vit_small in bf16 through the real pipeline.
# Every result is one JSON line in OUT (failures too, as {"check": ..., "error": ...}).
#
#   launch/gpu_check.sh [--wheels DIR] [--cifar_root DIR] [--out FILE] [--work DIR]
#
# --wheels: a folder of wheels for packages the machine lacks (installed with
#   pip --no-index into a private target, nothing is downloaded);
# --cifar_root: what configs/cifar100.py's data.root accepts (default ../shared/data).
# Run from the repository root.
set -uo pipefail

WHEELS="" CIFAR_ROOT="../shared/data" OUT="gpu_check.jsonl" WORK="/tmp/ijepa_gpu_check"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --wheels) WHEELS="$2"; shift 2 ;;
    --cifar_root) CIFAR_ROOT="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --work) WORK="$2"; shift 2 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [[ -n "$WHEELS" ]]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" "$WHEELS"/*.whl || exit 1
  export PYTHONPATH="$PYTHONPATH:$WORK/site"
fi
mkdir -p "$WORK" "$(dirname "$OUT")"
: >> "$OUT"

record_error() {  # check name, exit code, log file
  "$PY" - "$1" "$2" "$3" >> "$OUT" <<'EOF'
import json, sys
check, rc, log = sys.argv[1], int(sys.argv[2]), sys.argv[3]
tail = open(log, errors="replace").read().strip().splitlines()[-6:]
print(json.dumps({"check": check, "error": f"exit {rc}", "log_tail": tail}))
EOF
}

"$PY" - >> "$OUT" <<'EOF'
import json, jax, flax, optax
print(json.dumps({"check": "environment", "jax": jax.__version__, "flax": flax.__version__,
                  "optax": optax.__version__, "devices": [d.device_kind for d in jax.devices()]}))
EOF
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv,noheader || true

# model  patch  per-device batches to try, largest first
BENCHMARKS=(
  "vit_base 16 384,256,128"
  "vit_large 16 256,128,64"
  "vit_huge 14 128,64,32"
)
for spec in "${BENCHMARKS[@]}"; do
  read -r model patch batches <<< "$spec"
  for attention in xla cudnn; do
    name="benchmark $model/$patch $attention"
    log="$WORK/${model}_${attention}.log"
    echo "== $name"
    timeout 240 "$PY" -m ijepa_jax.tools.benchmark --config configs/in1k_vith14.py \
      --config.model.name="$model" --config.model.patch_size="$patch" \
      --config.model.attention_impl="$( [[ $attention == xla ]] && echo '' || echo cudnn )" \
      --config.data.source=synthetic --config.data.synthetic_images=512 --config.data.num_workers=0 \
      --batch_per_device="$batches" --steps=10 --pipeline_batches=0 > "$log" 2>&1
    rc=$?
    if [[ $rc -eq 0 ]]; then tail -n 1 "$log" | tee -a "$OUT"; else record_error "$name" $rc "$log"; tail -n 6 "$log"; fi
  done
done

echo "== cifar100 vit_small, 300 steps, bf16"
log="$WORK/cifar100.log"
rm -rf "$WORK/cifar100"
start=$(date +%s)
timeout 300 "$PY" -m ijepa_jax.train --config configs/cifar100.py:vit_small --workdir "$WORK/cifar100" \
  --config.data.root="$CIFAR_ROOT" --config.model.dtype=bfloat16 --config.total_steps=300 \
  --config.checkpoint.every_steps=0 --config.checkpoint.export_at_end=False > "$log" 2>&1
rc=$?
if [[ $rc -eq 0 ]]; then
  "$PY" - "$WORK/cifar100/metrics.jsonl" "$(( $(date +%s) - start ))" >> "$OUT" <<'EOF'
import json, sys
records = [json.loads(line) for line in open(sys.argv[1])]
timed = [r["img_per_s"] for r in records if "img_per_s" in r]
print(json.dumps({"check": "cifar100 vit_small 300 steps bf16", "wall_s": int(sys.argv[2]),
                  "first_step_time_s": records[0].get("first_step_time_s"),
                  "first_loss": records[0]["loss"], "final_loss": records[-1]["loss"],
                  "median_img_per_s": sorted(timed)[len(timed) // 2] if timed else None,
                  "steps": records[-1]["step"]}))
EOF
  tail -n 1 "$OUT"
else
  record_error "cifar100 vit_small 300 steps" $rc "$log"; tail -n 20 "$log"
fi
echo "results: $OUT"
