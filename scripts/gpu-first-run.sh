#!/usr/bin/env bash
# The CUDA code's first run on a GPU machine, in one command, from the repository root:
#
#   scripts/gpu-first-run.sh                     # everything this machine allows (see below)
#   scripts/gpu-first-run.sh --no-gpu            # toolchain, builds and resource check only
#   scripts/gpu-first-run.sh --resources [F.cu]  # the resource check alone (of F.cu too)
#
# 1. Toolchain: nvcc on the PATH, else CUDA 13.0 from PyPI wheels (scripts/cuda-toolchain.sh).
# 2. Builds `--features cuda` (library, tests, examples, benches) and `--features nccl` (tests).
# 3. Resource check: compiles every kernel source to machine code for sm_80 and sm_90, prints
#    each kernel's registers, shared and local memory (`cuobjdump --dump-resource-usage`), and
#    fails where a kernel could not launch with the 1024 threads per block that the row kernels
#    use: more than 64 registers a thread (65536 per block), or more than 48 KiB of static
#    shared memory.
# 4. On a machine with a GPU (`nvidia-smi -L` lists one): the GPU tests (tests/gpu.rs and the
#    data-parallel NCCL tests, all `#[ignore]`d in a plain `cargo test`; with two GPUs, also the
#    NCCL watchdog against a hung and a dead peer), then the same tests under
#    compute-sanitizer's memcheck, racecheck and synccheck, then the CZ-NCE and encoder timings on
#    the GPU (and the PyTorch comparisons, where python has torch with CUDA).
#
# Logs go to target/gpu-first-run/; the script stops at the first failure and says which step.
# Needs: an NVIDIA driver of the 580 series or newer (CUDA 13.0) for step 4; a C compiler;
# Python 3 with venv and pip when no CUDA toolkit is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
logs=target/gpu-first-run
mkdir -p "$logs"
MAX_THREADS=1024               # MLCTL_MAX_THREADS in src/ops/cuda/common.cuh
MAX_REGS=$((65536 / MAX_THREADS))
MAX_SHARED=$((48 * 1024))
KERNELS=(src/ops/cuda/ops.cu src/ops/cuda/cz_nce.cu)

step() { printf '\n== %s\n' "$*"; }

toolchain() {
  if ! command -v nvcc >/dev/null 2>&1 || ! command -v cuobjdump >/dev/null 2>&1; then
    step "CUDA toolchain from PyPI (scripts/cuda-toolchain.sh --nccl)"
    eval "$(MLCTL_CUDA_VENV=${MLCTL_CUDA_VENV:-$HOME/.cache/mlctl-cuda-13.0} scripts/cuda-toolchain.sh --nccl)"
  fi
  nvcc --version | tail -n 2
}

# Prints `arch kernel registers shared local` per kernel of each file; fails past the limits.
resources() {
  local tmp bad=0
  tmp=$(mktemp -d)
  printf '%-6s %-28s %5s %8s %6s\n' arch kernel regs shared local
  for cu in "$@"; do
    for arch in sm_80 sm_90; do
      nvcc -cubin -std=c++17 -O3 -arch="$arch" -o "$tmp/k.cubin" "$cu"
      cuobjdump --dump-resource-usage "$tmp/k.cubin" >"$tmp/usage.txt"
      awk -v arch="$arch" -v maxr="$MAX_REGS" -v maxs="$MAX_SHARED" '
        /Function / { name = $2; sub(/:$/, "", name) }
        /REG:/ {
          for (i = 1; i <= NF; i++) { split($i, kv, ":"); v[kv[1]] = kv[2] }
          flag = (v["REG"] + 0 > maxr || v["SHARED"] + 0 > maxs) ? "  <- over the limit" : ""
          printf "%-6s %-28s %5d %8d %6d%s\n", arch, name, v["REG"], v["SHARED"], v["LOCAL"], flag
          if (flag != "") bad = 1
        }
        END { exit bad }' "$tmp/usage.txt" || bad=1
    done
  done
  rm -rf "$tmp"
  if [ "$bad" = 1 ]; then
    echo "resource check FAILED: a kernel needs more than $MAX_REGS registers or $MAX_SHARED bytes of shared memory" >&2
    return 1
  fi
  echo "resource check passed: every kernel launches with $MAX_THREADS threads"
}

builds() {
  step "cargo build --release --features cuda --all-targets"
  cargo build --release --features cuda --all-targets 2>&1 | tee "$logs/build-cuda.log" | tail -n 3
  step "cargo build --release --features nccl --tests"
  cargo build --release --features nccl --tests 2>&1 | tee "$logs/build-nccl.log" | tail -n 3
}

# The test binary NAME (tests/gpu.rs, or tests/it/ for `it`) built with the nccl feature.
test_bin() {
  cargo test --release --features nccl --test "$1" --no-run 2>&1 |
    grep -oE "target/release/deps/$1-[0-9a-f]+" | head -n 1
}

on_gpu() {
  step "GPU: $(nvidia-smi --query-gpu=name,driver_version,compute_cap --format=csv,noheader | head -n 1)"
  local gpu dp
  gpu=$(test_bin gpu)
  dp=$(test_bin it)
  step "GPU tests"
  "$gpu" --ignored --test-threads 1 2>&1 | tee "$logs/gpu-tests.log" | tail -n 5
  # One GPU: the one-rank NCCL tests; two or more: the multi-GPU ones too. The rank workers
  # run only as the children of their tests.
  local nccl=(data_parallel::data_parallel_nccl --skip worker)
  if [ "$(nvidia-smi -L | wc -l)" -lt 2 ]; then nccl=(data_parallel::data_parallel_nccl_one_rank); fi
  "$dp" --ignored --test-threads 1 "${nccl[@]}" 2>&1 | tee "$logs/nccl-tests.log" | tail -n 5
  if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
    step "NCCL watchdog: a peer that hangs, then one that dies"
    "$dp" --ignored --test-threads 1 dist_failures::dist_failures_nccl_a_hung 2>&1 |
      tee "$logs/nccl-watchdog.log" | tail -n 5
  fi
  for tool in memcheck racecheck synccheck; do
    step "compute-sanitizer --tool $tool"
    compute-sanitizer --tool "$tool" --error-exitcode 1 "$gpu" --ignored --test-threads 1 \
      >"$logs/sanitizer-$tool-gpu.log" 2>&1 && tail -n 2 "$logs/sanitizer-$tool-gpu.log"
    compute-sanitizer --tool "$tool" --error-exitcode 1 "$dp" --ignored --test-threads 1 "${nccl[@]}" \
      >"$logs/sanitizer-$tool-nccl.log" 2>&1 && tail -n 2 "$logs/sanitizer-$tool-nccl.log"
  done
  step "timings on the GPU"
  cargo bench --features cuda --bench cz_nce_timing -- --device cuda | tee "$logs/cz_nce_timing.log"
  cargo bench --features cuda --bench encoder_timing -- --device cuda --reps 3 |
    tee "$logs/encoder_timing.log"
  if python3 -c 'import torch, transformers, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
    python3 benches/compare_pytorch.py --device cuda | tee "$logs/compare_pytorch.log"
    python3 benches/compare_encoder.py --device cuda | tee "$logs/compare_encoder.log"
  else
    echo "(no python with torch and CUDA: PyTorch comparisons skipped)"
  fi
}

case "${1:-}" in
--resources)
  shift
  toolchain
  resources "${KERNELS[@]}" "$@"
  ;;
--no-gpu | "")
  toolchain
  builds
  step "resource check"
  resources "${KERNELS[@]}" | tee "$logs/resources.log"
  if [ "${1:-}" = "" ] && nvidia-smi -L >/dev/null 2>&1; then
    on_gpu
  else
    step "no GPU here: steps 1-3 done, the GPU steps need a machine with one"
  fi
  ;;
*)
  sed -n '2,6p' "$0"
  exit 2
  ;;
esac
