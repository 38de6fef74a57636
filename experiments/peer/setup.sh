#!/usr/bin/env bash
# The peer's environment for experiments/peer/peer.py: MONAI and a CPU torch in their own venv,
# outside the project's dependencies and outside git (/.venv-peer/ is in .gitignore).
# Idempotent: a venv that already imports monai is left as it is.
#
#   bash experiments/peer/setup.sh            # creates <repo>/.venv-peer
#   PEER_VENV=/some/where bash experiments/peer/setup.sh
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
VENV="${PEER_VENV:-$ROOT/.venv-peer}"
# The same interpreter as the project's venv, so both sides run one Python version.
BASE_PY="${PEER_BASE_PYTHON:-$(readlink -f "$ROOT/.venv/bin/python" 2>/dev/null || command -v python3)}"

if [ ! -x "$VENV/bin/python" ]; then
    "$BASE_PY" -m venv "$VENV"
fi
PY="$VENV/bin/python"
if ! "$PY" -c "import monai, torch" 2>/dev/null; then
    # PyPI's default Linux torch wheel carries CUDA (gigabytes); a CPU build found among pip's
    # find-links is used when there is one. No torchvision: MONAI's FlexibleUNet needs none.
    CPU_WHEEL=""
    for dir in $("$PY" -m pip config list 2>/dev/null | sed -n "s/.*find-links='\(.*\)'/\1/p"); do
        for whl in "$dir"/torch-*+cpu-*.whl; do
            [ -f "$whl" ] && CPU_WHEEL="$whl"
        done
    done
    if [ -n "$CPU_WHEEL" ]; then
        "$PY" -m pip install --quiet "$CPU_WHEEL" 2> >(grep -v "is ignored: it is neither" >&2)
    fi
    "$PY" -m pip install --quiet monai 2> >(grep -v "is ignored: it is neither" >&2)
fi
"$PY" - <<'PY'
import sys

import monai
import numpy
import torch

print(f"peer venv: {sys.prefix}")
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, monai {monai.__version__}, numpy {numpy.__version__}")
print(f"torch threads {torch.get_num_threads()}, mkldnn {torch.backends.mkldnn.is_available()}")
PY
