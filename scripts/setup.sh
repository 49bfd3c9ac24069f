#!/usr/bin/env bash
# Create .venv and install llmzoo with its test extras on a CPU-only machine.
# torch is pinned to its CPU build first (constraints-cpu.txt keeps it there), so
# nothing pulls the multi-GB CUDA wheels. Safe to run again: it reuses .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints-cpu.txt "torch==2.13.0"
.venv/bin/python -m pip install -q -c constraints-cpu.txt -e ".[dev]"
.venv/bin/python -c "import torch, llmzoo; print(f'llmzoo {llmzoo.__version__} ready (torch {torch.__version__})')"
