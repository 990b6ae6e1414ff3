#!/usr/bin/env bash
# Issue 16's GPU session (a lent GPU machine whose image holds CUDA builds of JAX and
# PyTorch; nothing is installed). Everything lands in $OUT:
#   env.txt                  versions and the GPU
#   recheck.json, .txt       the six quick-suite GPU ratios above 1.05 that the first GPU
#                            run measured one implementation after the other, rerun
#                            with interleaved rounds
#   large.json, .png, .txt   fgrad bench --suite large
#   *.jsonl                  every record as measured (kept if a run is cut short)
# Usage: OUT=/some/dir BUDGET_S=400 tools/gpu_perf.sh
set -u
OUT=${OUT:-/tmp/fgrad-gpu}; BUDGET_S=${BUDGET_S:-400}
mkdir -p "$OUT"
start=$(date +%s)
left() { echo $((BUDGET_S - ($(date +%s) - start))); }
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 FGRAD_PROGRESS=
PY=${PY:-python3}

$PY - <<'PY' 2>&1 | tee "$OUT/env.txt"
import jax, torch, platform
print("python", platform.python_version(), "| jax", jax.__version__, jax.default_backend(),
      jax.devices(), "| torch", torch.__version__, "cuda", torch.cuda.is_available())
PY
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1 | tee -a "$OUT/env.txt"

RECHECK='mlp-256x3/microbatch,mlp-256x3/hvp,mlp-1024x3/microbatch_unrolled,'
RECHECK+='transformer-d128/backward_accumulate,transformer-d128/microbatch_unrolled,'
RECHECK+='transformer-d128/hvp,transformer-d128/grad'
echo "== recheck ($(left) s left)"
timeout 150 $PY -m fgrad.cli bench --device gpu --only "$RECHECK" --json "$OUT/recheck.json" \
  --log "$OUT/recheck.jsonl" > "$OUT/recheck.txt" 2>&1
tail -30 "$OUT/recheck.txt"

echo "== large suite ($(left) s left)"
timeout $(( $(left) - 10 )) $PY -m fgrad.cli bench --suite large --device gpu \
  --json "$OUT/large.json" --plot "$OUT/large.png" --log "$OUT/large.jsonl" \
  > "$OUT/large.txt" 2>&1
tail -40 "$OUT/large.txt"
echo "== done in $(( $(date +%s) - start )) s"
