#!/usr/bin/env bash
# One command for a CUDA machine (issue "Scale", GPU part), within a 10-minute budget:
#   * the bench at 7B-shaped layers (hidden 4096, 32 heads, ffn 11008, vocab 32000, bf16; 4 layers, so the runs
#     fit the budget) for scenarios 1 (unmerged), 3 (decode), 7 (same inputs), 8 (mixed batch) and 9 at
#     N = 1,000 distinct adapters (af.pool, 64 x 1 and 64 x 16 tokens);
#   * the bitsandbytes CUDA parity tests (tests/test_quant.py, the cuda-parametrized cases).
#
# usage: bench/gpu.sh [--dry] [OUT_DIR]
#   OUT_DIR (default $OUT, else bench/gpu-out): gpu.json, gpu.md (the tables), bench.log, quant.log, summary.txt
#   --dry: the same steps on the CPU at tiny sizes (checks the script's logic where there is no GPU)
# Run from the repository root with the project's Python on PATH (or PYTHON=/path/to/python).
set -uo pipefail

DRY=0
if [[ "${1:-}" == "--dry" ]]; then DRY=1; shift; fi
OUT_DIR="${1:-${OUT:-bench/gpu-out}}"
PY="${PYTHON:-python}"
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
START=$(date +%s)

if [[ $DRY == 1 ]]; then
  SIZES=(--tiny --device cpu --dtype float32 --scaling-n 3)
  BENCH_LIMIT=300
  QUANT_ARGS=(--collect-only -q)
else
  if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "no CUDA device visible to torch; use --dry to check the script on a CPU" | tee "$OUT_DIR/summary.txt"
    exit 2
  fi
  SIZES=(--device cuda --dtype bfloat16 --hidden 4096 --heads 32 --ffn 11008 --vocab 32000 --layers 4
         --batch 8 --seq 128 --r 16 --alpha 32 --repeats 11 --warmup 3 --threads 8 --scaling-n 1000)
  BENCH_LIMIT=420
  QUANT_ARGS=(-q -x)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT_DIR/gpu.txt" 2>&1 || true
fi

echo "== bench (limit ${BENCH_LIMIT}s)"
timeout "$BENCH_LIMIT" "$PY" -m bench --scenarios unmerged,decode,same,mixed,scaling --no-scaling-layouts \
  "${SIZES[@]}" --json "$OUT_DIR/gpu.json" > "$OUT_DIR/bench.log" 2>&1
BENCH_RC=$?
tail -n 40 "$OUT_DIR/bench.log"
if [[ -s "$OUT_DIR/gpu.json" ]]; then
  "$PY" -m bench.report "$OUT_DIR/gpu.json" > "$OUT_DIR/gpu.md" 2>> "$OUT_DIR/bench.log"
fi

echo "== bitsandbytes CUDA parity (tests/test_quant.py -k cuda)"
timeout 150 "$PY" -m pytest -p no:cacheprovider tests/test_quant.py -k cuda "${QUANT_ARGS[@]}" > "$OUT_DIR/quant.log" 2>&1
QUANT_RC=$?
tail -n 15 "$OUT_DIR/quant.log"

{
  echo "bench exit status: $BENCH_RC (124: over its ${BENCH_LIMIT}s limit)"
  echo "quant tests exit status: $QUANT_RC (124: over its 150s limit)"
  echo "wall: $(( $(date +%s) - START ))s"
} | tee "$OUT_DIR/summary.txt"
[[ $BENCH_RC == 0 && $QUANT_RC == 0 ]]
