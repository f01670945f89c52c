#!/usr/bin/env bash
# Set up .venv if needed, then run the whole loop on the synthetic scroll.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/scrollseg demo "$@"
