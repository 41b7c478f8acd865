#!/usr/bin/env bash
# Create .venv-sglang: SGLang 0.5.23 on the CPU, with this package, apart from the vLLM venv
# (SGLang wants torch 2.14.1; vLLM's CPU build wants 2.13.0). Idempotent: a second run only checks.
# torch 2.14.1 is pinned in every pip call (its wheel runs without a GPU; nothing may swap it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv-sglang
VPY=$VENV/bin/python
PIN=(-c .ci/sglang-constraints.txt)
if "$VPY" -c "import sglang, loader_plugins, torch, torchvision, sys; sys.exit(0 if torch.__version__.startswith('2.14.1') and sglang.__version__ == '0.5.23' else 1)" 2>/dev/null; then
    "$VPY" -m pip install -q --no-deps -e . >/dev/null   # this checkout (the entry points may have changed)
    echo "sglang venv: ready"
    exit 0
fi
[ -x "$VPY" ] || "$PY" -m venv "$VENV"
touch /tmp/pip-sglang.lock 2>/dev/null || true
flock /tmp/pip-sglang.lock "$VPY" -m pip install -q "${PIN[@]}" torch==2.14.1 torchvision==0.29.1
flock /tmp/pip-sglang.lock "$VPY" -m pip install -q "${PIN[@]}" --no-deps sglang==0.5.23
flock /tmp/pip-sglang.lock "$VPY" -m pip install -q "${PIN[@]}" -r .ci/sglang-requirements.txt
flock /tmp/pip-sglang.lock "$VPY" -m pip install -q "${PIN[@]}" --no-deps -e .
"$VPY" -c "import torch, sglang, loader_plugins; assert torch.__version__.startswith('2.14.1'), torch.__version__; print('sglang', sglang.__version__, 'torch', torch.__version__, 'loader_plugins', loader_plugins.__version__)"
