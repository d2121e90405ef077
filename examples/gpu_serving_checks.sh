#!/usr/bin/env bash
# Serving-level GPU measurements of issue 7 (1P1D on two NVLink-connected GPUs): token agreement
# with forward_reference, load/compute overlap, decode TPOT under path-B traffic, and where the
# cuda data plane spends its time.   Usage: OUT=runs/gpu bash examples/gpu_serving_checks.sh [steps]
set -uo pipefail
OUT=${OUT:-runs/gpu}; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1
dp="python3 -m dualpath.cli"
STEPS=${1:-"profile agree overlap interference"}
for step in $STEPS; do
  echo "== $step"
  case $step in
    profile) python3 examples/cuda_ipc_profile.py 2>&1 | tee "$OUT/cuda_ipc_profile.txt" ;;
    agree)
      $dp bench agreement --model small-gqa --dtype float32 --device cuda --out "$OUT/agreement_small_gqa_fp32.json"
      $dp bench agreement --model small-gqa --dtype bfloat16 --device cuda --out "$OUT/agreement_small_gqa_bf16.json"
      $dp bench agreement --model small-mla --dtype bfloat16 --device cuda --out "$OUT/agreement_small_mla_bf16.json" ;;
    overlap)
      $dp bench overlap --model small-gqa --dtype bfloat16 --device cuda --cached 32768 --new 512 --out "$OUT/overlap_small_gqa.json" ;;
    interference)
      $dp bench interference --model small-gqa --dtype bfloat16 --device cuda --context 16384 --out "$OUT/interference_small_gqa.json" ;;
    transport) $dp bench transport --backend cuda --out "$OUT/transport_cuda.json" ;;
    *) echo "unknown step $step" ;;
  esac
done
