#!/usr/bin/env bash
# Every CUDA check of the project in one run, on an NVIDIA machine without Rust: build the binaries with
# `cargo xtask gpu-pack` (x86-64 Linux), bring this checkout with its .gpu/ folder to the GPU machine,
# and there, from the checkout's root:
#
#   bash xtask/gpu-checks.sh [SECONDS [DIR]]
#
# Steps, most important first, each with its own time limit and all within SECONDS (default 540):
# the devices seen; every CUDA op against the CPU reference; the golden fixtures and memory-bank tests
# on CUDA; the host's gather of fetched pages (one thread against all); `msa bench` at MSA-4B shapes
# over 1M memory tokens (16 routing tokens, again with the memory pool trimmed at each
# synchronisation, again with routing on cuBLAS, again with every kernel timed, and 1 routing token); Memory Parallel through a `msa shard` server on the same
# GPU; where Nsight Compute is installed, each kernel's time in a decode step; where a Vulkan loader
# is installed, the kernel benchmark (wgpu beside CUDA) and the wgpu pipeline on the same GPU; 10M
# memory tokens. A step that does not fit the time left is skipped. Logs and JSON reports go to DIR
# (default target/gpu-checks), with summary.txt; the exit status is 1 when a step failed or was
# skipped. Generated models and banks stay in msa's bench cache ($XDG_CACHE_HOME/msa/bench or
# ~/.cache/msa/bench: 27 GB at 10M).
set -uo pipefail
cd "$(dirname "$0")/.."
budget=${1:-540}
out=${2:-target/gpu-checks}
started=$(date +%s)
mkdir -p "$out"
bin=.gpu/bin
if [ ! -x "$bin/msa" ] || [ ! -f .gpu/built-in ]; then
  echo "no $bin/msa: run \`cargo xtask gpu-pack\` on a build machine first" >&2
  exit 2
fi

# The test executables read their fixtures under the checkout they were built in.
built_in=$(cat .gpu/built-in)
if [ "$(cd "$built_in" 2>/dev/null && pwd -P)" != "$(pwd -P)" ]; then
  mkdir -p "$(dirname "$built_in")" && ln -sfn "$PWD" "$built_in" ||
    echo "cannot link $built_in to this checkout: the golden tests will not find their fixtures" >&2
fi

# cudarc loads libnvrtc.so, libcublas.so, libcublasLt.so and libnccl.so (or .so.12); a CUDA 13
# install may ship .so.13 alone, and NCCL's wheel .so.2 (the pip wheels do): link what is found under
# the unversioned names.
links=$(mktemp -d)
for lib in nvrtc cublas cublasLt nccl; do
  found=$(find /usr/local/cuda/lib64 /usr/local/cuda/targets /opt /usr/lib \
    -name "lib$lib.so*" \( -type f -o -type l \) 2>/dev/null | sort | head -n 1)
  if [ -n "$found" ]; then
    ln -sf "$found" "$links/lib$lib.so"
  elif [ "$lib" = nccl ]; then
    echo "libnccl.so not found: the NCCL clique checks will skip" >&2
  else
    echo "lib$lib.so not found: the CUDA steps will say what is missing" >&2
  fi
done
export LD_LIBRARY_PATH="$links${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export MSA_REQUIRE_CUDA=1
# Where NCCL was found, a clique that fails to form fails its tests instead of skipping them.
if [ -e "$links/libnccl.so" ]; then
  export MSA_REQUIRE_NCCL=1
fi

failed=()
# check NAME SECONDS COMMAND...: runs COMMAND into $out/NAME.log within SECONDS (or the time left).
check() {
  local name=$1 limit=$2
  shift 2
  local left=$((budget - ($(date +%s) - started)))
  if ((left < 20)); then
    echo "== $name: skipped, ${left}s of the budget left" | tee -a "$out/summary.txt"
    failed+=("$name (skipped)")
    return 1
  fi
  ((limit > left)) && limit=$left
  echo "== $name (up to ${limit}s): $*"
  local t0
  t0=$(date +%s)
  timeout --signal=INT --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $(($(date +%s) - t0))s" | tee -a "$out/summary.txt"
  tail -n 25 "$out/$name.log"
  if ((rc != 0)); then
    failed+=("$name")
    return 1
  fi
}

msa=$bin/msa
cache=${XDG_CACHE_HOME:-$HOME/.cache}/msa/bench
bench=(bench --preset msa-4b --encode-tokens 1024 --queries 3 --decode-tokens 16 --cache-dir "$cache")
check devices 60 "$msa" devices
check cuda-ops 150 "$bin/cuda-ops"
check golden-msa 150 "$bin/golden_msa" cuda::
check golden-qwen3 90 "$bin/golden_qwen3" cuda::
check memory-bank 150 "$bin/memory_bank" cuda
# The host side of a fetch: a router layer's pages gathered by one thread and by all the cores.
check page-gather 60 "$bin/page_gather" --bench --warm-up-time 1 --measurement-time 3
check bench-1m-16 240 "$msa" "${bench[@]}" --backend cuda --memory-tokens 1M --query-tokens 16 \
  --json "$out/bench-1m-16.json"
# The same with the memory pool trimmed at every synchronisation (CUDA's default): what keeping it saves.
check bench-1m-16-trim 150 env MSA_CUDA_TRIM_POOL=1 "$msa" "${bench[@]}" --backend cuda \
  --memory-tokens 1M --query-tokens 16 --json "$out/bench-1m-16-trim.json"
# The same with a head mean's routing on cuBLAS and a reduction kernel: what the fused routing_mma saves.
check bench-1m-16-cublas 120 env MSA_CUDA_ROUTING_CUBLAS=1 "$msa" "${bench[@]}" --backend cuda \
  --memory-tokens 1M --query-tokens 16 --json "$out/bench-1m-16-cublas.json"
# Every launch timed by events (no profiler needed): each kernel's share of a decode step.
check bench-1m-16-timed 120 env MSA_CUDA_TIME_KERNELS=1 "$msa" "${bench[@]}" --backend cuda \
  --memory-tokens 1M --query-tokens 16 --json "$out/bench-1m-16-timed.json"
check bench-1m-1 120 "$msa" "${bench[@]}" --backend cuda --memory-tokens 1M --query-tokens 1 \
  --json "$out/bench-1m-1.json"
# Memory Parallel through a shard server: rank 1 of 2 on the same GPU, this process rank 0.
bank=$(find "$cache/banks" -maxdepth 1 -name '*-1000000-tokens-*' 2>/dev/null | head -n 1)
if [ -n "$bank" ]; then
  "$msa" shard --bank "$bank" --rank 1 --of 2 --backend cuda --listen 127.0.0.1:7070 \
    >"$out/shard-server.log" 2>&1 &
  server=$!
  for _ in $(seq 120); do
    grep -q listening "$out/shard-server.log" && break
    kill -0 $server 2>/dev/null || break
    sleep 1
  done
  check bench-1m-shards 150 "$msa" "${bench[@]}" --backend cuda --bank "$bank" \
    --shards 127.0.0.1:7070 --query-tokens 16 --json "$out/bench-1m-shards.json"
  kill $server 2>/dev/null
  wait $server 2>/dev/null
fi

# Where a decode step's time goes: Nsight Compute times every kernel of 4 decode steps (the bench marks
# them as the profiled region), summed per kernel name.
ncu=$(command -v ncu ||
  find /usr/local/cuda/bin /opt/nvidia -maxdepth 3 -name ncu -type f 2>/dev/null | sort | head -n 1)
if [ -n "$ncu" ]; then
  # Caches as the decode step leaves them, and the clocks as they run.
  if check decode-kernels 150 "$ncu" --profile-from-start off --metrics gpu__time_duration.sum \
    --cache-control none --clock-control none --print-units base --csv \
    --log-file "$out/decode-kernels.csv" "$msa" bench --preset msa-4b --encode-tokens 64 --queries 1 \
    --decode-tokens 5 --cache-dir "$cache" --backend cuda --memory-tokens 1M --query-tokens 16; then
    python3 - "$out/decode-kernels.csv" 4 <<'PY' | tee "$out/decode-kernels.txt" ||
import csv, sys
from collections import defaultdict
path, steps = sys.argv[1], int(sys.argv[2])
lines = open(path).read().splitlines()
start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
if start is None:
    sys.exit(f"{path}: no kernel was profiled")
scale = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3,
         "second": 1e6, "s": 1e6}
times, counts = defaultdict(float), defaultdict(int)
for row in csv.DictReader(lines[start:]):
    if row.get("Metric Name") != "gpu__time_duration.sum":
        continue
    name = row["Kernel Name"].split("(")[0][:70]
    times[name] += float(row["Metric Value"].replace(",", "")) * scale[row["Metric Unit"]]
    counts[name] += 1
total = sum(times.values())
print(f"{sum(counts.values()) / steps:.0f} kernels, {total / steps:.1f} us of kernel time per decode step")
for name, t in sorted(times.items(), key=lambda kv: -kv[1]):
    print(f"{t / steps:10.1f} us {100 * t / total:5.1f}% {counts[name] / steps:6.1f}x  {name}")
PY
      failed+=("decode-kernels (summary)")
  fi
fi

# wgpu needs a Vulkan loader (libvulkan.so.1) beside the NVIDIA driver.
if ldconfig -p 2>/dev/null | grep -q libvulkan; then
  check kernels 150 "$msa" bench --kernels --preset msa-4b --backend cuda --json "$out/kernels.json"
  check bench-1m-wgpu 240 "$msa" "${bench[@]}" --backend wgpu --memory-tokens 1M --query-tokens 16 \
    --json "$out/bench-1m-wgpu.json"
fi
check bench-10m-16 300 "$msa" "${bench[@]}" --backend cuda --memory-tokens 10M --query-tokens 16 \
  --json "$out/bench-10m-16.json"

echo "== $(($(date +%s) - started))s in all" | tee -a "$out/summary.txt"
if ((${#failed[@]})); then
  echo "failed or skipped: ${failed[*]}" | tee -a "$out/summary.txt"
  exit 1
fi
