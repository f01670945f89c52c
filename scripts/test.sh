#!/usr/bin/env bash
# Set up .venv and the Qt test libraries if needed, lint, then run the whole test
# suite (the napari tests in a real viewer under Xvfb).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --system
.venv/bin/ruff check src tests benchmarks scripts
.venv/bin/ruff format --check src tests benchmarks scripts
# Two workers (SCROLLSEG_TEST_WORKERS; 0: one process), each test file on one worker so
# its module fixtures (trained models, a fetched scan) are built once, the dearest files
# first (tests/conftest.py); one torch/OpenMP thread per process, as many as cores.
workers="${SCROLLSEG_TEST_WORKERS:-2}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec xvfb-run -a -s "-screen 0 1280x1024x24" .venv/bin/python -m pytest \
    -n "$workers" --dist loadfile --no-loadscope-reorder "$@"
