#!/usr/bin/env bash
# The GPU measurements of issue 7, as run on a host with two NVLink-connected H200s.
# Usage: OUT=runs/gpu bash examples/gpu_checks.sh
set -uo pipefail
OUT=${OUT:-runs/gpu}; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1
dp="python3 -m dualpath.cli"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpus.txt"
nvidia-smi topo -m | tee -a "$OUT/gpus.txt"
echo "== test suite (transport conformance incl. cuda backend, model) on the GPU host"
python3 -m pytest -q tests/test_transport.py tests/test_model.py tests/test_storage.py 2>&1 | tail -4
echo "== model"
$dp bench model --preset small-gqa --device cuda --dtype bfloat16 --prompt-tokens 8192 --batch 64 --context 4096 --out "$OUT/model_small_gqa.json"
$dp bench model --preset small-mla --device cuda --dtype bfloat16 --prompt-tokens 8192 --batch 64 --context 4096 --out "$OUT/model_small_mla.json"
echo "== 7a: pinned DRAM buffer -> paged HBM"
$dp bench h2d --preset small-mla --dtype bfloat16 --blocks 512 --out "$OUT/h2d_small_mla.json"
$dp bench h2d --preset small-gqa --dtype bfloat16 --blocks 512 --out "$OUT/h2d_small_gqa.json"
echo "== 7c: cuda transport vs P2P copy"
$dp bench transport --backend cuda --out "$OUT/transport_cuda.json"
echo "== store on this host"
$dp bench store --dir /tmp --threads 8 --out "$OUT/store.json"
echo "== 1P1D on two GPUs, small-gqa fp32, a 4-turn conversation"
timeout 300 $dp up --prefill 1 --decode 1 --device cuda --model small-gqa --demo --port 8800 --store /tmp/dpstore 2>&1 | tail -8
