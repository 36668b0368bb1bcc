#!/usr/bin/env bash
# Set up every worker: a venv in the project folder with jax[tpu] and the project's [tpu] extra.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<HELP
Usage: tpu/setup.sh --name NAME --zone ZONE [--python PY] [--jax SPEC] [--check]

On every worker (--worker=all, concurrently), in the project folder that tpu/copy.sh filled
(run that first): create .venv with PY (installing python3-venv with apt if the image lacks
it), then pip install SPEC and the project with its [tpu] extra (editable).

  --python PY   interpreter for the venv (default python3; the project needs >= 3.10)
  --jax SPEC    the JAX requirement (default 'jax[tpu]'; pin e.g. 'jax[tpu]==0.6.2')
  --check       afterwards print each worker's JAX process index and device counts (all
                workers take part, as a multi-host JAX program must)

$COMMON_HELP
HELP
}

PY=python3
JAX_SPEC='jax[tpu]'
CHECK=0
while (( $# )); do
  case $1 in
    --python|--python=*) opt_value "$@"; PY=$OPT_VALUE; shift "$TAKEN" ;;
    --jax|--jax=*) opt_value "$@"; JAX_SPEC=$OPT_VALUE; shift "$TAKEN" ;;
    --check) CHECK=1; shift ;;
    *) take_common_flag "$@"; shift "$TAKEN" ;;
  esac
done
finish_common

PIP=".venv/bin/pip install -q"
STEPS=(
  "set -e"
  "$(remote_cd)"
  "test -f pyproject.toml || { echo \"no project in $(quote "$REMOTE_DIR"): run tpu/copy.sh first\" >&2; exit 1; }"
  "$(quote "$PY") -m venv .venv || { sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv && $(quote "$PY") -m venv .venv; }"
  "$PIP -U pip"
  "$PIP $(quote "$JAX_SPEC")"
  "$PIP -e $(quote '.[tpu]')"
)
if (( CHECK )); then
  STEPS+=(".venv/bin/python -c $(quote 'import jax; print("process", jax.process_index(), "of", jax.process_count(), "local devices", jax.local_device_count(), "devices", jax.device_count())')")
fi
REMOTE=$(printf '%s; ' "${STEPS[@]}")
tpu_ssh all "${REMOTE%; }"
