#!/usr/bin/env bash
# One sweep on all of CIFAR-100 (or the Tiny-ImageNet subset) in one call to a single GPU, inside a time
# budget: configs/cifar100.py:vit_tiny,reference (or another small-scale config), 10 epochs a point, bf16,
# data.augment_on=device, evaluated on the full train / test splits. No point is started that would not
# finish before --budget_s (measured from this script's start); run the same command again, while the
# machine still holds --work, to continue: finished points are skipped, a stopped one resumes from its checkpoint.
#
#   launch/gpu_sweep.sh [--sweep FILE] [--config CONFIG] [--data DIR|synthetic] [--out DIR] [--work DIR]
#                       [--budget_s N] [--wheels DIR] [--protocols knn,linear] [--workers N]
#                       [--first_point_s N] [--only NAME,NAME] [--config.KEY=VALUE ...]
#
# Defaults: configs/sweeps/cifar100_gpu_recipe.py, configs/cifar100.py:vit_tiny,reference (the base the
#   sweep files' points override: batch 256, lr 1e-3), ../shared/data, $OUT
#   (else WORK/out), /tmp/ijepa_gpu_sweep, 510 s (for a 600 s call), 4 data workers, 150 s assumed for the
#   first point (it also pays for the random-init baseline); the others are timed as they finish.
# --data: a folder holding cifar-100-python.tar.gz (extracted once into --work, which loads twice as
#   fast) or the extracted cifar-100-python/ folder; with configs/tiny_imagenet.py, one holding
#   tiny-imagenet-100cls.tar.gz (extracted the same way) or the train/ and val/ folders; 'synthetic'
#   trains on generated images (tests).
# --out: gets gpu_sweep.log, environment.json, summary.md, summary.jsonl, summary.png and points.tar.gz
#   (every point's config, metrics.jsonl, sweep row and results.json), refreshed after each point.
# --wheels: wheels for packages the machine lacks, installed with pip --no-index into --work/site (kept:
#   a later call without --wheels uses them). Trailing --config.KEY=VALUE flags reach every point.
# --only: run only these points of the sweep file, in this order (points finished before stay in the summary).
# The first line of output is the environment (JSON). Exit 0: every point finished; 3: stopped by the
# budget (run again to continue); 1: an error; 2: a bad argument. Run from the repository root.
# docs/gpu_sweep.md: the whole sequence of device calls, with CIFAR-100 sent in parts.
set -uo pipefail

START=$(date +%s)
SWEEP="configs/sweeps/cifar100_gpu_recipe.py" CONFIG="configs/cifar100.py:vit_tiny,reference" DATA="../shared/data"
OUT_DIR="${OUT:-}" WORK="/tmp/ijepa_gpu_sweep" BUDGET=510 WHEELS="" PROTOCOLS="knn,linear" WORKERS=4
FIRST_POINT=150 ONLY="" EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --sweep|--config|--data|--out|--work|--budget_s|--wheels|--protocols|--workers|--first_point_s|--only)
      [[ $# -ge 2 ]] || { echo "$1 needs a value" >&2; exit 2; } ;;&
    --sweep) SWEEP="$2"; shift 2 ;;
    --config) CONFIG="$2"; shift 2 ;;
    --data) DATA="$2"; shift 2 ;;
    --out) OUT_DIR="$2"; shift 2 ;;
    --work) WORK="$2"; shift 2 ;;
    --budget_s) BUDGET="$2"; shift 2 ;;
    --wheels) WHEELS="$2"; shift 2 ;;
    --protocols) PROTOCOLS="$2"; shift 2 ;;
    --workers) WORKERS="$2"; shift 2 ;;
    --first_point_s) FIRST_POINT="$2"; shift 2 ;;
    --only) ONLY="$2"; shift 2 ;;
    --config.*) EXTRA+=("$1"); shift ;;
    *) echo "unknown argument: $1 (see the head of launch/gpu_sweep.sh)" >&2; exit 2 ;;
  esac
done
[[ "$BUDGET" =~ ^[0-9]+$ ]] || { echo "--budget_s must be a whole number of seconds, not $BUDGET" >&2; exit 2; }
for n in "$WORKERS" "$FIRST_POINT"; do
  [[ "$n" =~ ^[0-9]+$ ]] || { echo "--workers and --first_point_s take whole numbers, not $n" >&2; exit 2; }
done
OUT_DIR="${OUT_DIR:-$WORK/out}"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT_DIR" "$WORK" || exit 1

main() {  # the run, its output also in OUT/gpu_sweep.log

# Line 1: the environment, before anything can fail (jax is on the machine's image; the rest may not be yet).
"$PY" - "$OUT_DIR/environment.json" 2> "$WORK/environment.err" <<'EOF'
import json, platform, subprocess, sys
env = {"check": "environment", "python": platform.python_version(), "host": platform.node()}
try:
    import jax, jaxlib
    env.update(jax=jax.__version__, jaxlib=jaxlib.__version__, backend=jax.default_backend(),
               devices=[d.device_kind for d in jax.devices()], device_count=jax.device_count())
except Exception as e:  # still one line: what failed
    env["error"] = f"jax: {type(e).__name__}: {e}"
try:
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=20)
    env["nvidia_smi"] = gpu.stdout.strip().splitlines() if gpu.returncode == 0 else None
except (OSError, subprocess.TimeoutExpired):
    env["nvidia_smi"] = None
print(json.dumps(env), flush=True)
open(sys.argv[1], "w").write(json.dumps(env, indent=2) + "\n")
sys.exit(1 if "error" in env else 0)
EOF
env_rc=$?
cat "$WORK/environment.err"  # jax's own start-up warnings, after the line
[[ $env_rc -eq 0 ]] || { echo "gpu_sweep: jax does not start here (see the first line)"; return 1; }

if [[ -n "$WHEELS" ]]; then
  compgen -G "$WHEELS/*.whl" > /dev/null || { echo "gpu_sweep: no wheels in --wheels $WHEELS"; return 1; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
    "$WHEELS"/*.whl || { echo "gpu_sweep: installing the wheels of $WHEELS failed"; return 1; }
fi
[[ -d "$WORK/site" ]] && export PYTHONPATH="$PYTHONPATH:$WORK/site"
"$PY" - <<'EOF' || return 1
import importlib, json, sys
versions, missing = {}, []
for name in ("flax", "optax", "orbax.checkpoint", "grain", "ml_collections", "tensorboardX", "etils", "PIL",
             "matplotlib", "safetensors"):
    try:
        versions[name] = getattr(importlib.import_module(name), "__version__", "?")
    except Exception as e:
        missing.append(f"{name} ({type(e).__name__}: {e})")
print(json.dumps({"check": "packages", **versions}), flush=True)
if missing:
    sys.exit("gpu_sweep: missing packages: " + "; ".join(missing) + ". Bring them as wheels (--wheels DIR; "
             "docs/gpu_sweep.md says which).")
EOF

extract_once() {  # ARCHIVE DIR: unpack into DIR unless DIR already holds this file's contents, as it is now
  local stamp
  stamp="$(realpath "$1") $(stat -c '%s %Y' "$1")"
  [[ "$(cat "$2/.extracted_from" 2>/dev/null)" == "$stamp" ]] && return 0
  echo "gpu_sweep: extracting $1 into $2"
  rm -rf "$2" && mkdir -p "$2" && tar -xzf "$1" -C "$2" \
    || { echo "gpu_sweep: could not extract $1"; rm -rf "$2"; return 1; }
  echo "$stamp" > "$2/.extracted_from"
}

DATA_FLAGS=()
archive="$DATA"
if [[ "$DATA" == synthetic ]]; then
  DATA_FLAGS=(--config.data.source=synthetic)
elif [[ "$(basename "${CONFIG%%:*}")" == tiny_imagenet.py ]]; then  # JPEG folders: train/ and val/
  [[ "$DATA" == *.tar.gz ]] || archive="$DATA/tiny-imagenet-100cls.tar.gz"
  if [[ -f "$archive" ]]; then
    extract_once "$archive" "$WORK/tiny_imagenet" || return 1
    DATA_FLAGS=(--config.data.root="$WORK/tiny_imagenet/tiny-imagenet-100cls")
  elif [[ -d "$DATA/train" && -d "$DATA/val" ]]; then
    DATA_FLAGS=(--config.data.root="$DATA")
  else
    echo "gpu_sweep: no Tiny-ImageNet in --data $DATA (expected tiny-imagenet-100cls.tar.gz or a folder with"
    echo "  train/ and val/)."
    return 1
  fi
elif [[ -f "$DATA/cifar-100-python.tar.gz" || "$DATA" == *.tar.gz ]]; then
  [[ "$DATA" == *.tar.gz ]] || archive="$DATA/cifar-100-python.tar.gz"
  extract_once "$archive" "$WORK/cifar100" || return 1
  DATA_FLAGS=(--config.data.root="$WORK/cifar100/cifar-100-python")
elif [[ -f "$DATA/train" && -f "$DATA/meta" || -f "$DATA/cifar-100-python/train" ]]; then
  DATA_FLAGS=(--config.data.root="$DATA")
else
  echo "gpu_sweep: no CIFAR-100 in --data $DATA (expected cifar-100-python.tar.gz or the extracted folder)."
  echo "  Sent in parts? launch/cifar_parts.sh join --to $DATA assembles and checks them first."
  return 1
fi

# The sweep's folder is named by the config: points of one name under two configs must not meet.
name=$(basename "${CONFIG%%:*}" .py)_$(echo "${CONFIG#*:}" | tr -c 'A-Za-z0-9_\n' '_')
[[ "$CONFIG" == *:* ]] || name=$(basename "$CONFIG" .py)
SWEEP_DIR="$WORK/sweep_$name"
[[ "$DATA" == synthetic ]] && SWEEP_DIR="${SWEEP_DIR}_synthetic"
DEADLINE=$(( START + BUDGET ))
HARD=$(( DEADLINE + 20 - $(date +%s) ))  # SIGTERM 20 s past the budget (training saves first), KILL 30 s later
(( HARD > 0 )) || HARD=1
echo "gpu_sweep: $SWEEP on $CONFIG in $SWEEP_DIR, $(( DEADLINE - $(date +%s) )) s of budget left," \
  "protocols $PROTOCOLS, $WORKERS data workers"
timeout -s TERM -k 30 "$HARD" "$PY" launch/budget_sweep.py --config "$CONFIG" --workdir "$SWEEP_DIR" \
  --sweep "$SWEEP" --protocols "$PROTOCOLS" --deadline "$DEADLINE" --out "$OUT_DIR" \
  --config.model.dtype=bfloat16 --config.data.augment_on=device --config.data.num_workers="$WORKERS" \
  --first_point_s "$FIRST_POINT" --only "$ONLY" \
  --config.compilation_cache_dir="${JAX_COMPILATION_CACHE_DIR:-$WORK/jax_cache}" "${DATA_FLAGS[@]}" "${EXTRA[@]}"
rc=$?
case $rc in
  0) echo "gpu_sweep: every point finished in $(( $(date +%s) - START )) s; results in $OUT_DIR" ;;
  3) echo "gpu_sweep: stopped by the budget after $(( $(date +%s) - START )) s; run the same command again" \
       "while the machine holds $WORK to continue" ;;
  124|137) echo "gpu_sweep: killed at the hard limit ($HARD s); the finished points are in $OUT_DIR"; rc=3 ;;
  *) echo "gpu_sweep: the sweep failed (exit $rc)"; rc=1 ;;
esac
return $rc
}

main 2>&1 | tee "$OUT_DIR/gpu_sweep.log"  # the whole output, also in OUT/gpu_sweep.log
exit "${PIPESTATUS[0]}"
