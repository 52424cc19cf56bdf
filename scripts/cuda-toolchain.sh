#!/usr/bin/env bash
# A CUDA 13.0 toolchain from PyPI wheels, for building `--features cuda` / `--features nccl` on a
# machine without a system CUDA toolkit (with or without a GPU).
#
#   eval "$(scripts/cuda-toolchain.sh)"          # nvcc, ptxas, cuobjdump, compute-sanitizer, cuBLAS, cuRAND
#   eval "$(scripts/cuda-toolchain.sh --nccl)"   # also NCCL 2.32
#   cargo build --release --features cuda --examples --tests --benches
#
# It installs the wheels into a virtual environment (once, about 1.5 GB; `MLCTL_CUDA_VENV`
# chooses where, default ~/.cache/mlctl-cuda-13.0), adds the unversioned library links the linker
# looks for and, when no driver is installed, a link-time stub of libcuda.so (the driver API's
# entry points, each returning an error: programs link, and nothing runs without a real driver).
# It prints the variables to export. A system toolkit (nvcc on PATH) is left alone: the script
# then prints nothing but CUDA_COMPUTE_CAP's default.
#
# Versions: CUDA 13.0 (nvcc 13.0.88) is what cudarc 0.19 (through candle 0.11) accepts; running
# needs an NVIDIA driver of the 580 series or newer (CUDA 13.0). cuobjdump is only published from
# 13.2 on; it reads 13.0 cubins.
set -euo pipefail
nccl=0
[ "${1:-}" = "--nccl" ] && nccl=1
if command -v nvcc >/dev/null 2>&1 && [ -z "${MLCTL_CUDA_VENV:-}" ]; then
  echo 'export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-80}'
  exit 0
fi
venv=${MLCTL_CUDA_VENV:-$HOME/.cache/mlctl-cuda-13.0}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv" >&2
if [ ! -f "$venv/.complete" ]; then
  "$venv/bin/pip" install -q \
    "nvidia-cuda-nvcc==13.0.88" "nvidia-cuda-crt==13.0.88" "nvidia-nvvm==13.0.88" \
    "nvidia-cuda-runtime==13.0.96" "nvidia-cuda-cccl==13.0.85" "nvidia-cublas==13.0.2.14" \
    "nvidia-curand==10.4.0.35" "nvidia-cuda-nvrtc==13.0.88" \
    "nvidia-cuda-cuobjdump==13.2.51" "nvidia-cuda-sanitizer-api==13.0.85" >&2
  touch "$venv/.complete"
fi
root=$(echo "$venv"/lib/python3*/site-packages/nvidia/cu13)
[ -x "$root/bin/nvcc" ] || { echo "echo 'nvcc not found under $root' >&2; false"; exit 1; }
lib="$root/lib"
# The linker looks for libX.so; the wheels ship libX.so.N only.
for so in libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13 libcudart.so.13; do
  [ -e "$lib/${so%.*}" ] || ln -s "$so" "$lib/${so%.*}"
done
# No driver here: a stub libcuda.so with every `CUresult cuX(...)` of cuda.h, for linking only.
# Where a driver is installed (the same environment reused on a GPU machine) the stub goes, so
# that nothing loads it in place of the real libcuda.
if ldconfig -p 2>/dev/null | grep -q 'libcuda.so.1 '; then
  [ -f "$lib/.libcuda-stub" ] && rm -f "$lib/libcuda.so" "$lib/.libcuda-stub"
elif [ ! -e "$lib/libcuda.so" ]; then
  stub=$(mktemp -d)
  echo '#include <cuda.h>' | cc -E -I"$root/include" -x c - | tr '\n' ' ' |
    grep -oE 'CUresult +cu[A-Za-z0-9_]+ *\(' | sed -E 's/CUresult +//; s/ *\($//' | sort -u |
    sed 's/.*/int &(void) { return 999; }/' >"$stub/cuda_stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$lib/libcuda.so" "$stub/cuda_stub.c"
  touch "$lib/.libcuda-stub"
  rm -rf "$stub"
fi
if [ $nccl = 1 ]; then
  if [ ! -f "$venv/.complete-nccl" ]; then
    "$venv/bin/pip" install -q "nvidia-nccl-cu13==2.32.3" >&2
    touch "$venv/.complete-nccl"
  fi
  ndir=$(echo "$venv"/lib/python3*/site-packages/nvidia/nccl)
  [ -f "$ndir/include/nccl.h" ] || { echo "echo 'nccl.h not found under $ndir' >&2; false"; exit 1; }
  # Where cudarc and the linker look: beside the CUDA libraries and headers.
  ln -sf "$ndir/lib/libnccl.so.2" "$lib/libnccl.so.2"
  ln -sf libnccl.so.2 "$lib/libnccl.so"
  for h in "$ndir"/include/*; do ln -sfn "$h" "$root/include/$(basename "$h")"; done
fi
cat <<EOT
export CUDA_ROOT="$root" CUDA_PATH="$root" CUDA_HOME="$root"
export PATH="$root/bin:\$PATH"
export LIBRARY_PATH="$lib\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
export CUDA_COMPUTE_CAP=\${CUDA_COMPUTE_CAP:-80}
EOT
