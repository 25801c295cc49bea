#!/usr/bin/env bash
# Packages everything the GPU tests need on a GPU host that has no JDK and no Maven:
#   OUT/jre.tgz            a jlink'd Java runtime (unpacked to /tmp/jre by run-gpu-tests.sh)
#   OUT/lib/*.jar          the module jars, their dependencies (the bytedeco CUDA natives cut down to
#                          cudart + cuBLAS) and the JUnit console launcher
#   OUT/test-classes/      moe-cuda's compiled tests
#   OUT/comm-test-classes/ moe-comm's compiled tests (the NCCL checks, dev.moe4j.comm.nccl.NcclGpuCheck)
#   OUT/bundle-env.sh      what the scripts below share (sourced): the runtime unpacked, the reports folder
#   OUT/run-gpu-tests.sh   runs the @Tag("gpu") tests (extra arguments go to the JUnit console launcher)
#   OUT/run-bench.sh       the MoE layer benchmark (dev.moe4j.cuda.MoeLayerBench)
#   OUT/moe4j              the moe4j command line (train, doctor) on the bundled runtime
#   OUT/run-nccl-checks.sh the NCCL checks, one process per GPU under torchrun (see moe-comm/GPU-TESTS.md)
#   OUT/run-ep-bench.sh    the expert-parallel MoE layer benchmark (dev.moe4j.comm.ep.EpLayerBench) and its
#                          PyTorch peer, both under torchrun, one process per GPU
#   OUT/run-comm-bench.sh  all-to-all / all-reduce bandwidth (dev.moe4j.comm.nccl.CommBench) and its PyTorch peer
#   OUT/run-scaling-bench.sh weak scaling of a GPT-MoE training step over EP degrees (dev.moe4j.comm.ep.ScalingBench)
#   OUT/run-train-bench.sh the end-to-end training benchmark on one GPU (dev.moe4j.cuda.TrainBench), then its
#                          PyTorch peer train_reference.py
#   OUT/run-train-profile.sh the training step's time per kernel (Nsight Compute over TrainBench, ncu_summary.py)
#   OUT/moe_layer_reference.py, ep_layer_reference.py, comm_bench_reference.py, train_reference.py  the PyTorch
#                          peers of the benchmarks (python3 there has PyTorch)
# Usage: bin/gpu-bundle.sh [OUT_DIR]   (default .gpu/). MVN_FLAGS="-o" builds offline. Stays under 64 MiB.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root/.gpu}
mkdir -p "$out"
out=$(cd "$out" && pwd)
junit_console=1.11.4

cd "$root"
echo "[bundle] building moe-cuda, moe-comm, moe-examples and their dependencies (tests compiled, not run)"
rm -rf "$out/lib" "$out/test-classes" "$out/comm-test-classes"
mkdir -p "$out/lib"
./mvnw -q ${MVN_FLAGS:-} -pl moe-cuda,moe-comm,moe-examples -am -DskipTests package dependency:copy-dependencies \
  -DincludeScope=test -DoutputDirectory="$out/lib" \
  -DexcludeGroupIds=org.junit.jupiter,org.junit.platform,org.opentest4j,org.apiguardian
./mvnw -q ${MVN_FLAGS:-} -N dependency:copy -Dartifact=org.junit.platform:junit-platform-console-standalone:$junit_console \
  -DoutputDirectory="$out/lib"
cp moe-cuda/target/moe-cuda-*.jar moe-comm/target/moe-comm-*.jar moe-examples/target/moe-examples-*.jar "$out/lib/"
[[ -f moe-cuda/target/classes/dev/moe4j/cuda/moe4j.fatbin ]] || echo "[bundle] WARNING: no kernels fatbin (nvcc missing): the GPU tests will report it"
cp -r moe-cuda/target/test-classes "$out/test-classes"
cp -r moe-comm/target/test-classes "$out/comm-test-classes"
cp moe-cuda/src/test/python/moe_layer_reference.py moe-cuda/src/test/python/train_reference.py moe-cuda/src/test/python/cuda_timing.py "$out/"   # the PyTorch peers of the benchmarks and their timing helper
cp moe-cuda/src/test/python/ncu_summary.py "$out/"   # per-kernel summary of an Nsight Compute CSV (run-train-profile.sh)
cp moe-comm/src/test/python/ep_layer_reference.py moe-comm/src/test/python/comm_bench_reference.py "$out/"

# The bytedeco CUDA natives jar holds JNI libraries for every CUDA library; keep cudart, cuBLAS and NCCL.
for j in "$out"/lib/cuda-*-linux-x86_64.jar; do
  [[ -f $j ]] || continue
  zip -q -d "$j" $(unzip -Z1 "$j" | grep -E '^org/bytedeco/cuda/linux-x86_64/libjni' | grep -vE '/libjni(cudart|cublas|nccl)\.so$') >/dev/null || true
done

# The Java runtime (the logic of shared/gpu/make-jre.sh): jlink of the newest JDK 21+ found here, with JFR (jdk.jfr)
# so that host-side time can be profiled on the GPU host (-XX:StartFlightRecording).
if [[ ! -f $out/jre.tgz ]]; then
  jdk=""
  for cand in "${JAVA_HOME:-}" /usr/lib/jvm/*; do
    [[ -n $cand && -x $cand/bin/jlink ]] || continue
    v=$("$cand/bin/java" -XshowSettings:properties -version 2>&1 | sed -n 's/.*java.specification.version = //p')
    if [[ ${v%%.*} -ge 21 ]]; then jdk=$cand; fi
  done
  [[ -n $jdk ]] || { echo "[bundle] no JDK 21+ with jlink found (set JAVA_HOME)" >&2; exit 1; }
  tmp=$(mktemp -d)
  "$jdk/bin/jlink" --add-modules java.base,java.logging,java.management,jdk.unsupported,jdk.incubator.vector,java.xml,java.naming,jdk.zipfs,jdk.jfr \
    --strip-debug --no-header-files --no-man-pages --compress=zip-9 --output "$tmp/jre" 2>&1 | grep -v 'incubator modules' || true
  tar czf "$out/jre.tgz" -C "$tmp" jre
  rm -rf "$tmp"
  echo "[bundle] runtime from $jdk"
fi

cat > "$out/bundle-env.sh" <<'RUN'
# What every script of the bundle starts with (sourced): here = the bundle folder, the runtime unpacked once to
# /tmp/jre, java = its command line, reports = $OUT or ./reports (created), NCCL without NVLink multicast.
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
[[ -x /tmp/jre/bin/java ]] || tar xzf "$here/jre.tgz" -C /tmp
java=(/tmp/jre/bin/java --enable-native-access=ALL-UNNAMED -Xss4m)
reports=${OUT:-$here/reports}
mkdir -p "$reports"
export NCCL_NVLS_ENABLE=0
RUN
cat > "$out/run-gpu-tests.sh" <<'RUN'
#!/usr/bin/env bash
# Runs the @Tag("gpu") tests of moe-cuda with the bundled runtime. Reports go to $OUT (or ./reports).
set -uo pipefail
source "$(dirname "$0")/bundle-env.sh"
nvidia-smi -L 2>/dev/null || echo "(no nvidia-smi)"
cp=$here/test-classes
for j in "$here"/lib/*.jar; do [[ $j == *console-standalone* ]] || cp=$cp:$j; done
"${java[@]}" \
  -jar "$here"/lib/junit-platform-console-standalone-*.jar execute --disable-banner --disable-ansi-colors \
  --class-path "$cp" --scan-class-path "$here/test-classes" --include-tag gpu --details=tree \
  --reports-dir "$reports" "$@"
RUN
cat > "$out/run-bench.sh" <<'RUN'
#!/usr/bin/env bash
# The MoE layer benchmark (dev.moe4j.cuda.MoeLayerBench): run-bench.sh [iterations] [capped|dropless|attention] [config...]
set -uo pipefail
source "$(dirname "$0")/bundle-env.sh"
"${java[@]}" ${JAVA_OPTS:-} -cp "$here/test-classes:$here/lib/*" dev.moe4j.cuda.MoeLayerBench "$@"
RUN
cat > "$out/run-train-bench.sh" <<'RUN'
#!/usr/bin/env bash
# The end-to-end training benchmark on one GPU: run-train-bench.sh [preset] [micro_batch] [seq_len] [steps]
# (defaults 350M+MoE-16 8 1024 10). First MoE4J (dev.moe4j.cuda.TrainBench), then PyTorch eager (train_reference.py)
# with the same arguments; each prints one JSON line (also kept in $OUT or ./reports). run-train-bench.sh --smoke
# needs no GPU: TrainBench's CPU smoke run, then train_reference.py --cpu-check.
set -uo pipefail
source "$(dirname "$0")/bundle-env.sh"
nvidia-smi -L 2>/dev/null || echo "(no nvidia-smi)"
"${java[@]}" ${JAVA_OPTS:-} -cp "$here/test-classes:$here/lib/*" \
  dev.moe4j.cuda.TrainBench "$@" 2>&1 | tee "$reports/train_moe4j.log"
rc1=${PIPESTATUS[0]}
pyargs=("$@")
[[ ${1:-} == --smoke ]] && pyargs=(--cpu-check)
python3 "$here/train_reference.py" "${pyargs[@]}" 2>&1 | tee "$reports/train_torch.log"
rc2=${PIPESTATUS[0]}
echo "[run-train-bench] moe4j exit $rc1, torch exit $rc2"
[[ $rc1 -eq 0 && $rc2 -eq 0 ]]
RUN
cat > "$out/run-train-profile.sh" <<'RUN'
#!/usr/bin/env bash
# Where a training step's GPU time goes, kernel by kernel: run-train-profile.sh [preset] [micro_batch] [seq_len]
# (defaults 350M+MoE-16 8 1024). Nsight Compute times every kernel of TrainBench's 3 warm-up steps and 1 timed step
# (ncu serialises them, so this says which kernels cost what, not the step's time); ncu_summary.py prints each
# kernel's time per step, largest first. The CSV stays in $OUT (or ./reports).
set -uo pipefail
source "$(dirname "$0")/bundle-env.sh"
ncu --clock-control none --target-processes all --metrics gpu__time_duration.sum --csv --print-units base \
  "${java[@]}" ${JAVA_OPTS:-} -cp "$here/test-classes:$here/lib/*" \
  dev.moe4j.cuda.TrainBench "${1:-350M+MoE-16}" "${2:-8}" "${3:-1024}" 1 > "$reports/train_profile.csv" 2> "$reports/train_profile.err"
rc=$?
[[ $rc -eq 0 ]] || { echo "[run-train-profile] ncu exit $rc:"; tail -5 "$reports/train_profile.err"; exit $rc; }
python3 "$here/ncu_summary.py" "$reports/train_profile.csv" 4
RUN
cat > "$out/run-nccl-checks.sh" <<'RUN'
#!/usr/bin/env bash
# The NCCL checks on the real CUDA backend, one process per GPU: run-nccl-checks.sh MODE [NPROC]
# MODE: collectives | hang | die (moe-comm/GPU-TESTS.md says what each proves).
set -uo pipefail
source "$(dirname "$0")/bundle-env.sh"
python3 -m torch.distributed.run --no-python --nproc_per_node="${2:-2}" "${java[@]}" \
  -Dmoe4j.backend=cuda ${JAVA_OPTS:-} -cp "$here/comm-test-classes:$here/lib/*" dev.moe4j.comm.nccl.NcclGpuCheck "$1"
RUN
cat > "$out/run-ep-bench.sh" <<'RUN'
#!/usr/bin/env bash
# The expert-parallel MoE layer benchmark, one process per GPU: run-ep-bench.sh [NPROC] [--iters N] [--node-size G] [--overlap] [config...]
# (--node-size: MoE4J's expert-parallel all-to-alls hierarchical, G ranks per node; the PyTorch peer stays flat)
# First MoE4J (dev.moe4j.comm.ep.EpLayerBench), then PyTorch (ep_layer_reference.py), each under torchrun with
# NCCL_NVLS_ENABLE=0; rank 0 of each prints one JSON line per config and mode (also kept in $OUT or ./reports).
set -uo pipefail
source "$(dirname "$0")/bundle-env.sh"
nproc=2
if [[ $# -gt 0 && $1 =~ ^[0-9]+$ ]]; then nproc=$1; shift; fi
nvidia-smi -L 2>/dev/null || echo "(no nvidia-smi)"
python3 -m torch.distributed.run --no-python --nproc_per_node="$nproc" "${java[@]}" \
  ${JAVA_OPTS:-} -cp "$here/comm-test-classes:$here/lib/*" dev.moe4j.comm.ep.EpLayerBench "$@" 2>&1 | tee "$reports/ep_layer_moe4j.log"
rc1=${PIPESTATUS[0]}
python3 -m torch.distributed.run --nproc_per_node="$nproc" "$here/ep_layer_reference.py" "$@" 2>&1 | tee "$reports/ep_layer_torch.log"
rc2=${PIPESTATUS[0]}
echo "[run-ep-bench] moe4j exit $rc1, torch exit $rc2"
[[ $rc1 -eq 0 && $rc2 -eq 0 ]]
RUN
cat > "$out/run-comm-bench.sh" <<'RUN'
#!/usr/bin/env bash
# All-to-all and all-reduce bus bandwidth, one process per GPU: run-comm-bench.sh [NPROC] [--node-size G]
# (with G: the hierarchical all-to-all too, G ranks per node)
# First MoE4J (dev.moe4j.comm.nccl.CommBench), then torch.distributed (comm_bench_reference.py), NCCL_NVLS_ENABLE=0.
set -uo pipefail
source "$(dirname "$0")/bundle-env.sh"
nproc=${1:-2}
shift || true
python3 -m torch.distributed.run --no-python --nproc_per_node="$nproc" "${java[@]}" \
  ${JAVA_OPTS:-} -cp "$here/comm-test-classes:$here/lib/*" dev.moe4j.comm.nccl.CommBench "$@" 2>&1 | tee "$reports/comm_moe4j.log"
rc1=${PIPESTATUS[0]}
python3 -m torch.distributed.run --nproc_per_node="$nproc" "$here/comm_bench_reference.py" 2>&1 | tee "$reports/comm_torch.log"
rc2=${PIPESTATUS[0]}
echo "[run-comm-bench] moe4j exit $rc1, torch exit $rc2"
[[ $rc1 -eq 0 && $rc2 -eq 0 ]]
RUN
cat > "$out/run-scaling-bench.sh" <<'RUN'
#!/usr/bin/env bash
# Weak scaling of a GPT-MoE training step (dev.moe4j.comm.ep.ScalingBench): run-scaling-bench.sh NPROC EP_LIST [options]
# e.g. run-scaling-bench.sh 8 1,2,4,8 --layers 12 [--node-size 4]. First the baseline on one GPU (a world of one,
# EP 1), then NPROC processes under torchrun with NCCL_NVLS_ENABLE=0; rank 0 prints one JSON line per EP degree
# (also kept in $OUT or ./reports: scaling_1gpu.log, scaling_world.log).
set -uo pipefail
source "$(dirname "$0")/bundle-env.sh"
nproc=$1 eps=$2; shift 2
J=("${java[@]}" ${JAVA_OPTS:-} -cp "$here/comm-test-classes:$here/lib/*" dev.moe4j.comm.ep.ScalingBench)
"${J[@]}" --ep 1 "$@" 2>&1 | tee "$reports/scaling_1gpu.log"
rc1=${PIPESTATUS[0]}
python3 -m torch.distributed.run --no-python --nproc_per_node="$nproc" "${J[@]}" --ep "$eps" "$@" 2>&1 | tee "$reports/scaling_world.log"
rc2=${PIPESTATUS[0]}
echo "[run-scaling-bench] one GPU exit $rc1, world exit $rc2"
[[ $rc1 -eq 0 && $rc2 -eq 0 ]]
RUN
cat > "$out/moe4j" <<'RUN'
#!/usr/bin/env bash
# The moe4j command line on the bundled runtime: moe4j train [options] (see moe4j train --help).
set -uo pipefail
source "$(dirname "$0")/bundle-env.sh"
cp=""
for j in "$here"/lib/*.jar; do [[ $j == *console-standalone* || $j == *-tests.jar ]] || cp=$cp:$j; done
exec /tmp/jre/bin/java --enable-native-access=ALL-UNNAMED ${JAVA_OPTS:-} -cp "${cp#:}" dev.moe4j.examples.Main "$@"
RUN
chmod +x "$out/run-gpu-tests.sh" "$out/run-bench.sh" "$out/run-train-bench.sh" "$out/run-train-profile.sh" "$out/run-nccl-checks.sh" "$out/run-ep-bench.sh" "$out/run-comm-bench.sh" "$out/run-scaling-bench.sh" "$out/moe4j"
echo "[bundle] $out: $(du -sh "$out" | cut -f1) ($(du -sb "$out" | cut -f1) bytes; limit 64 MiB)"
