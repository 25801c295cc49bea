#!/usr/bin/env bash
# Compiles the kernels of native/ into one fatbin (sm_80, sm_90 and compute_90 PTX) for moe-cuda's jar, and the
# Hopper-only kernels (grouped_gemm_sm90.cu: wgmma, TMA) into a second one beside it (OUT_FILE's name + _sm90a),
# for sm_90a alone: its instructions run only on compute capability 9.0, where the backend loads it.
# Usage: build-fatbin.sh OUT_FILE. Where nvcc is absent it prints why and exits 0: the build passes and the
# CUDA backend reports at run time that its kernels are missing. NVCC=/path/to/nvcc picks another compiler;
# NVCC=none builds without kernels (to check that path).
set -euo pipefail
out=${1:?usage: build-fatbin.sh OUT_FILE}
out_sm90a=${out%.fatbin}_sm90a.fatbin
here=$(cd "$(dirname "$0")" && pwd)
nvcc=${NVCC:-$(command -v nvcc || true)}
[[ -z $nvcc && -x /usr/local/cuda/bin/nvcc ]] && nvcc=/usr/local/cuda/bin/nvcc
if [[ -z $nvcc || $nvcc == none ]]; then
  rm -f "$out" "$out_sm90a"
  echo "[moe4j] nvcc not found: building moe-cuda WITHOUT its CUDA kernels (the backend will say they are missing)"
  exit 0
fi
mkdir -p "$(dirname "$out")"
# Up to date: nothing in native/ is newer than the fatbin.
if [[ -f $out && -f $out_sm90a && -z $(find "$here" -newer "$out" \( -name '*.cu' -o -name '*.cuh' -o -name '*.sh' \) -print -quit) ]]; then
  echo "[moe4j] $out is up to date"
  exit 0
fi
"$nvcc" -fatbin -O3 -std=c++17 \
  -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 -gencode arch=compute_90,code=compute_90 \
  -o "$out.tmp" "$here/all.cu"
# the -gencode form: the -arch=sm_90a shorthand also runs a plain sm_90 pass, which rejects wgmma (HOPPER.md)
"$nvcc" -fatbin -O3 -std=c++17 -gencode arch=compute_90a,code=sm_90a -o "$out_sm90a.tmp" "$here/grouped_gemm_sm90.cu"
mv "$out_sm90a.tmp" "$out_sm90a"
mv "$out.tmp" "$out"
echo "[moe4j] built $out ($(stat -c %s "$out") bytes) and $(basename "$out_sm90a") ($(stat -c %s "$out_sm90a") bytes) with $("$nvcc" --version | tail -1)"
