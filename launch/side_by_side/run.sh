#!/usr/bin/env bash
# ViT-H/14 side by side on one GPU, offline: the official PyTorch step against this project's, same
# model (ViT-H/14, 224px, predictor 12x384), batch (128) and masks (the reference multiblock values).
#   official: the official code eager, then under torch.compile (launch/side_by_side/official_step.py);
#   ours:     ijepa_jax.tools.benchmark on configs/in1k_vith14.py with cuDNN attention;
#   ratio:    ours / official img/s, against the goal of at least 2x;
#   profile:  a jax.profiler trace of our step, summarised by kernel and kind (kernels.json / .md).
# One JSON line per part in OUT (a failure too: {"check": ..., "error": ...}).
#
#   launch/side_by_side/run.sh --ijepa_src DIR [--wheels DIR] [--out FILE] [--work DIR]
#       [--parts eager,compile,ours,ratio,profile] [--batch 128] [--steps 10] [--dry_run]
#
# --ijepa_src: a folder holding the official src/ (docs/side_by_side.md); --wheels: wheels for
# packages the machine lacks (pip --no-index into WORK/site); --dry_run prints the commands only.
# Run from the repository root.
set -uo pipefail

SRC="" WHEELS="" OUT="side_by_side.jsonl" WORK="/tmp/ijepa_side_by_side" PARTS="eager,compile,ours,ratio,profile"
BATCH=128 STEPS=10 DRY=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --ijepa_src) SRC="$2"; shift 2 ;;
    --wheels) WHEELS="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --work) WORK="$2"; shift 2 ;;
    --parts) PARTS="$2"; shift 2 ;;
    --batch) BATCH="$2"; shift 2 ;;
    --steps) STEPS="$2"; shift 2 ;;
    --dry_run) DRY=1; shift ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
[[ -n "$SRC" ]] || { echo "run.sh: --ijepa_src DIR is required (docs/side_by_side.md)" >&2; exit 2; }
for part in ${PARTS//,/ }; do
  [[ ",eager,compile,ours,ratio,profile," == *",$part,"* ]] || { echo "run.sh: unknown part: $part" >&2; exit 2; }
done
[[ "$BATCH$STEPS" =~ ^[0-9]+$ ]] || { echo "run.sh: --batch and --steps take integers" >&2; exit 2; }
PY="${PYTHON:-python3}"
HERE="launch/side_by_side"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OURS=(--config configs/in1k_vith14.py --config.model.attention_impl=cudnn --config.data.source=synthetic
      --config.data.synthetic_images=256 --config.data.num_workers=0)

# part, timeout s, command...: runs it, appends its last line (or an error line) to OUT
run_part() {
  local part="$1" limit="$2"; shift 2
  [[ ",$PARTS," == *",$part,"* ]] || return 0
  if [[ $DRY -eq 1 ]]; then echo "[$part, ${limit}s] $*"; return 0; fi
  echo "== $part"
  local log="$WORK/$part.log"
  timeout "$limit" "$@" > "$log" 2>&1
  local rc=$?
  if [[ $rc -eq 0 ]]; then tail -n 1 "$log" | tee -a "$OUT"; else
    "$PY" -c 'import json,sys; print(json.dumps({"check": sys.argv[1], "error": f"exit {sys.argv[2]}",
      "log_tail": open(sys.argv[3], errors="replace").read().strip().splitlines()[-6:]}))' "$part" $rc "$log" \
      | tee -a "$OUT"
  fi
}

if [[ $DRY -eq 0 ]]; then
  mkdir -p "$WORK" "$(dirname "$OUT")"
  if [[ -n "$WHEELS" ]]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" "$WHEELS"/*.whl || exit 1
  fi
  [[ -d "$WORK/site" ]] && export PYTHONPATH="$PYTHONPATH:$WORK/site"
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv,noheader || true
fi
OFFICIAL=("$PY" "$HERE/official_step.py" --ijepa_src "$SRC" --batch "$BATCH" --steps "$STEPS")
run_part eager 240 "${OFFICIAL[@]}"
run_part compile 420 "${OFFICIAL[@]}" --compile --warmup 4
run_part ours 300 "$PY" -m ijepa_jax.tools.benchmark "${OURS[@]}" --batch_per_device="$BATCH" --steps="$STEPS" \
  --pipeline_batches=0 --xla_flops=false
run_part ratio 30 "$PY" - "$OUT" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.startswith("{")]
official = {r["check"]: r["img_per_s"] for r in rows if r.get("check", "").startswith("official") and "img_per_s" in r}
ours = [r["img_per_s"] for r in rows if "img_per_s" in r and "check" not in r]  # tools.benchmark rows
if not (official and ours):
    sys.exit(f"ratio: need an official row and ours in {sys.argv[1]}")
best = max(official, key=official.get)
ratio = ours[-1] / official[best]
print(json.dumps({"check": "ratio", "ours_img_per_s": ours[-1], "official_img_per_s": official[best],
                  "official_best": best, "ours_over_official": round(ratio, 2), "goal": 2.0, "met": ratio >= 2.0}))
EOF
run_part profile 300 "$PY" "$HERE/profile_step.py" "${OURS[@]}" --batch_per_device="$BATCH" --steps=3 \
  --trace_dir "$WORK/trace" --out "$(dirname "$OUT")/kernels.json"
