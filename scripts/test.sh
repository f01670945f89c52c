#!/usr/bin/env bash
# Set up .venv and the Qt test libraries if needed, lint, then run the whole test
# suite (the napari tests in a real viewer under Xvfb).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --system
.venv/bin/ruff check src tests benchmarks scripts
.venv/bin/ruff format --check src tests benchmarks scripts
# two workers (SCROLLSEG_TEST_WORKERS), each test file on one worker so its module
# fixtures (trained models, fetched scans) are built once; most tests keep one core busy
workers="${SCROLLSEG_TEST_WORKERS:-2}"
exec xvfb-run -a -s "-screen 0 1280x1024x24" .venv/bin/python -m pytest -n "$workers" --dist loadfile "$@"
