#!/usr/bin/env bash
# Builds .gpu-comm/ (git-ignored, < 64 MiB): a Java runtime, the compiled classes of moe-core and moe-comm (main and
# test) and the jars the NCCL checks need, for a GPU host without JDK, Maven or network. See moe-comm/GPU-TESTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
out=.gpu-comm
./mvnw -q -o -pl moe-core,moe-comm test-compile
rm -rf "$out/core" "$out/comm" "$out/comm-test" "$out/lib"
mkdir -p "$out/lib"
cp -r moe-core/target/classes "$out/core"
cp -r moe-comm/target/classes "$out/comm"
cp -r moe-comm/target/test-classes "$out/comm-test"
m2=${MAVEN_REPO:-$HOME/.m2/repository}
jcpp=$(sed -n 's:.*<javacpp.version>\(.*\)</javacpp.version>.*:\1:p' pom.xml)
cuda=$(sed -n 's:.*<cuda.presets.version>\(.*\)</cuda.presets.version>.*:\1:p' pom.xml)
slf4j=$(sed -n 's:.*<slf4j.version>\(.*\)</slf4j.version>.*:\1:p' pom.xml)
cp "$m2/org/bytedeco/javacpp/$jcpp/javacpp-$jcpp.jar" "$m2/org/bytedeco/javacpp/$jcpp/javacpp-$jcpp-linux-x86_64.jar" \
   "$m2/org/bytedeco/cuda/$cuda/cuda-$cuda.jar" "$m2/org/bytedeco/cuda/$cuda/cuda-$cuda-linux-x86_64.jar" \
   "$m2/org/slf4j/slf4j-api/$slf4j/slf4j-api-$slf4j.jar" "$out/lib/"
../shared/gpu/make-jre.sh "$out" >/dev/null 2>&1 || /work/shared/gpu/make-jre.sh "$out"
du -sh "$out"
