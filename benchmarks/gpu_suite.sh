#!/usr/bin/env bash
# The GPU suite on one H100/H200 in under ten minutes: tests/gpu, then the headline
# figures of benchmarks/gpu_bench.py as JSON records (benchmarks/report.py renders them).
#
#   bash benchmarks/gpu_suite.sh                 # everything
#   SECTIONS=kernels,mamba2 TESTS=0 bash benchmarks/gpu_suite.sh
#   SECTIONS=none TEST_ARGS=tests/gpu/test_serve_cuda.py bash benchmarks/gpu_suite.sh   # some tests only
#
# For a machine that has torch, lightning, transformers, triton and peft but no network:
# the missing packages (hydra-core, omegaconf, datasets, liger-kernel, fla-core, ...)
# are installed from the wheels in $WHEELS (default .whl/), which
# `bash benchmarks/gpu_wheels.sh` downloads on a machine that has pip access.
# Results: $RESULTS (default $OUT/gpu.jsonl when $OUT is set, else benchmarks/results/gpu.jsonl).
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-.whl}
PY=${PYTHON:-python3}
RESULTS=${RESULTS:-${OUT:+$OUT/gpu.jsonl}}
RESULTS=${RESULTS:-benchmarks/results/gpu.jsonl}
SECTIONS=${SECTIONS:-kernels,fused_ce,mamba2,moe,train_1b,fsdp_ac,decode_7b,medusa}
[ "$SECTIONS" = none ] && SECTIONS=  # tests only
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/llmzoo-site "$WHEELS"/*.whl \
    || { echo "installing the wheels in $WHEELS failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/llmzoo-site${PYTHONPATH:+:$PYTHONPATH}
fi
# llmzoo itself, editable, so its entry points (the built-in plugins) are registered
$PY -m pip install -q --no-index --no-deps --no-build-isolation -e . || { echo "installing llmzoo failed" >&2; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, llmzoo; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" \
  || exit 1

status=0
if [ "${TESTS:-1}" = 1 ]; then
  echo "== tests/gpu"
  per_test=$($PY -c "import pytest_timeout" 2>/dev/null && echo "--timeout=${TEST_TIMEOUT:-150}")
  timeout ${TESTS_TIMEOUT:-420} $PY -m pytest -q -m gpu -p no:cacheprovider -rfEs --tb=short $per_test \
    ${OUT:+--junitxml=$OUT/gpu_tests.xml} ${TEST_ARGS:-tests/gpu} || status=1
fi
mkdir -p "$(dirname "$RESULTS")"
BENCH_SECTIONS=$(echo "$SECTIONS" | tr , '\n' | grep -vx medusa | paste -sd, -)
if [ -n "$BENCH_SECTIONS" ]; then
  echo "== benchmarks ($BENCH_SECTIONS) -> $RESULTS"
  timeout ${BENCH_TIMEOUT:-480} $PY benchmarks/gpu_bench.py --out "$RESULTS" --sections "$BENCH_SECTIONS" || status=1
fi
if [[ ",$SECTIONS," == *",medusa,"* ]]; then
  # batch-1 decoders on the GPU: trains the small target, Medusa heads and a draft (~1 min), then times them
  echo "== medusa: benchmarks/decode.py bench.device=cuda -> $(dirname "$RESULTS")/decode_gpu.jsonl"
  timeout ${MEDUSA_TIMEOUT:-300} $PY benchmarks/decode.py bench.device=cuda bench.work_dir=/tmp/llmzoo-decode \
    'bench.methods=[hf_generate,greedy,static_compile,medusa,medusa_compile,eagle,eagle_tree,speculative_draft,greedy_batch,medusa_batch,eagle_batch,speculative_draft_batch]' \
    bench.out="$(dirname "$RESULTS")/decode_gpu.jsonl" || status=1
fi
exit $status
