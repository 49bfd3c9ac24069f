#!/usr/bin/env bash
# Download the wheels benchmarks/gpu_suite.sh installs on a GPU machine without network
# (Python 3.12, x86-64; torch, lightning, transformers, triton and peft already there).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${WHEELS:-.whl}
PIP=${PIP:-python3 -m pip}
mkdir -p "$DEST"
$PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$DEST" \
  hydra-core==1.3.8 omegaconf==2.3.1 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 liger-kernel fla-core
# antlr4-python3-runtime 4.9.3 (omegaconf's parser) is published as a source archive only: build its pure-Python wheel
$PIP wheel -q --no-deps antlr4-python3-runtime==4.9.3 -w "$DEST"
ls "$DEST"
