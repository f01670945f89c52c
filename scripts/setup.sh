#!/usr/bin/env bash
# Create (or reuse) .venv in the repository root with napari-scrollseg installed
# editable, plus test tools. Idempotent: reinstalls only when pyproject.toml changed.
# With --system, also installs the Debian packages the Qt tests need (xvfb, Mesa GL).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--system" ] && ! command -v xvfb-run >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    echo "setup: installing xvfb and OpenGL/Qt system libraries (apt-get)"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        xvfb xauth libgl1-mesa-dri libgl1 libegl1 libxkbcommon-x11-0 libxcb-cursor0 libxcb-icccm4 \
        libxcb-image0 libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-shape0 \
        libxcb-xinerama0 libxcb-xkb1 libdbus-1-3 libfontconfig1 >/dev/null
fi

PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.scrollseg-setup
want="$(cat pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setup: installing napari-scrollseg and its dependencies into .venv (a few minutes the first time)"
    .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
    .venv/bin/python -m pip install -q -e ".[dev]" 2>&1 | grep -v "is ignored" || true
    .venv/bin/python -c "import napari_scrollseg, torch, nnunetv2, napari" 
    echo "$want" > "$stamp"
fi
