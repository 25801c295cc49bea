#!/usr/bin/env bash
# Compiles the kernels of native/ into one fatbin (sm_80, sm_90 and compute_90 PTX) for moe-cuda's jar.
# Usage: build-fatbin.sh OUT_FILE. Where nvcc is absent it prints why and exits 0: the build passes and the
# CUDA backend reports at run time that its kernels are missing. NVCC=/path/to/nvcc picks another compiler;
# NVCC=none builds without kernels (to check that path).
set -euo pipefail
out=${1:?usage: build-fatbin.sh OUT_FILE}
here=$(cd "$(dirname "$0")" && pwd)
nvcc=${NVCC:-$(command -v nvcc || true)}
[[ -z $nvcc && -x /usr/local/cuda/bin/nvcc ]] && nvcc=/usr/local/cuda/bin/nvcc
if [[ -z $nvcc || $nvcc == none ]]; then
  rm -f "$out"
  echo "[moe4j] nvcc not found: building moe-cuda WITHOUT its CUDA kernels (the backend will say they are missing)"
  exit 0
fi
mkdir -p "$(dirname "$out")"
# Up to date: nothing in native/ is newer than the fatbin.
if [[ -f $out && -z $(find "$here" -newer "$out" \( -name '*.cu' -o -name '*.cuh' -o -name '*.sh' \) -print -quit) ]]; then
  echo "[moe4j] $out is up to date"
  exit 0
fi
"$nvcc" -fatbin -O3 -std=c++17 \
  -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 -gencode arch=compute_90,code=compute_90 \
  -o "$out.tmp" "$here/all.cu"
mv "$out.tmp" "$out"
echo "[moe4j] built $out ($(stat -c %s "$out") bytes) with $("$nvcc" --version | tail -1)"
