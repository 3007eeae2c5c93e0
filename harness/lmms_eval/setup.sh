#!/usr/bin/env bash
# lmms-eval in its own virtual environment (it pins av<16: never in the project's), CPU torch.
# usage: harness/lmms_eval/setup.sh [VENV]   (default: .lmms-venv in the clone)
set -euo pipefail
VENV="${1:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/.lmms-venv}"
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q torch==2.13.0 lmms-eval==0.7.3 'filelock<4' decord
# The registry's torchvision is a CUDA build that does not import next to the CPU torch; lmms-eval's
# openai model does not need it.
"$VENV/bin/pip" uninstall -q -y torchvision || true
echo "lmms-eval is in $VENV"
