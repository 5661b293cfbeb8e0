#!/usr/bin/env bash
# The GPU check: every GPU test, then the benchmarks, then the demo on the GPU, on a host with a
# CUDA device. Builds nothing when the addon (build/Release/ or, after `npm run build`,
# prebuilds/), the JS (dist/) and the native benchmark (bench/native/out/) came with the tree;
# each step has its own time limit, a failing step does not stop the next, full logs go to $OUT
# (or .gpu-check/), and a table of steps comes last.
#   bash scripts/check-gpu.sh    (npm run check:gpu; the GPU host has node but no npm)
set -uo pipefail
cd "$(dirname "$0")/.."
logs=${OUT:-.gpu-check}
mkdir -p "$logs"
declare -a summary=()

step() {
  local name=$1 limit=$2
  shift 2
  local started=$SECONDS
  echo "== $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" >"$logs/$name.log" 2>&1
  local rc=$?
  local verdict=ok
  [ $rc -eq 0 ] || verdict="FAILED rc=$rc"
  [ $rc -eq 124 ] && verdict="TIMED OUT"
  summary+=("$(printf '%-12s %-16s %4ss' "$name" "$verdict" $((SECONDS - started)))")
  tail -n 15 "$logs/$name.log"
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,compute_mode --format=csv,noheader 2>&1 || echo "nvidia-smi: not found"
  echo "MPS control: $(command -v nvidia-cuda-mps-control || echo 'not on PATH')"
  node --version
  node -e "import('./dist/index.js').then(({ cuda, nccl }) => console.log(JSON.stringify({ cuda: cuda.available ? { driver: cuda.driverVersion, devices: cuda.devices() } : cuda.reason, nccl: nccl.available ? nccl.versionString : nccl.reason })))" 2>&1
} | tee "$logs/host.log"

# CHECK_STEPS picks steps (a rerun after a fix: CHECK_STEPS=bench), CHECK_TESTS the test files.
steps=" ${CHECK_STEPS:-tests native bench probe llm demo} "
wanted() { [[ $steps == *" $1 "* ]]; }

# Correctness first: the GPU layer, CUDA IPC edges of compiled graphs, then the data layer's GPU pool.
# shellcheck disable=SC2086
wanted tests && step tests 300 node node_modules/vitest/vitest.mjs run --reporter=verbose ${CHECK_TESTS:-test/gpu test/dag/ipc.test.ts test/dag/compiled.test.ts test/data/actor-pool.test.ts test/llm/device-layers.test.ts}
[ -x bench/native/out/gpu_native ] || make -C bench/native >"$logs/make.log" 2>&1
wanted native && step native 60 bench/native/out/gpu_native --json
wanted bench && step bench 150 env TRELLIS_GPU_BENCH_SHARING=time-slice node --import tsx bench/run.ts gpu --json
# The actor figures again with the workers as clients of a CUDA MPS server of the cluster's own.
command -v nvidia-cuda-mps-control >/dev/null && wanted bench && step bench-mps 120 env TRELLIS_GPU_BENCH_SHARING=mps node --import tsx bench/run.ts gpu --json
# Actor calls with the connections' rings and with sockets only (busy-polling on and off).
wanted bench && step calls 60 node --import tsx bench/run.ts calls --json
# Where a small transfer's time goes: with each process's own GPU context, under MPS, and without
# busy-polling (on by default on hosts with 8 cores or more).
wanted probe && step probe 60 node --import tsx bench/gpu-probe.ts
wanted probe && step probe-nospin 60 env TRELLIS_BUSY_POLL_US=0 node --import tsx bench/gpu-probe.ts
command -v nvidia-cuda-mps-control >/dev/null && wanted probe && step probe-mps 60 node --import tsx bench/gpu-probe.ts --mps
# A model's layers on the GPU (the device path): decode and prefill against their floors.
wanted llm && step llm 300 node --import tsx bench/run.ts llm-gpu --json
# The processor end to end on a GPU rank: per-row JSON schemas, LoRA adapters, speculation.
wanted llm && step llm-demo 120 node --import tsx examples/structured-extraction.ts --device cuda
wanted demo && step demo 60 node --import tsx examples/batch-inference.ts

echo
echo "step         result           time"
printf '%s\n' "${summary[@]}" | tee "$logs/summary.txt"
grep -h '^{' "$logs/native.log" "$logs/bench.log" "$logs/bench-mps.log" "$logs/calls.log" "$logs/llm.log" 2>/dev/null | tee "$logs/figures.jsonl" >/dev/null
echo "logs in $logs/"
