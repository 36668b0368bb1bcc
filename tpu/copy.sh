#!/usr/bin/env bash
# Copy the project to every worker of a TPU VM or pod slice (tar here, scp, untar there).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<HELP
Usage: tpu/copy.sh --name NAME --zone ZONE [--exclude PATTERN]...

Pack the project folder ($PROJECT_ROOT) without .git, .venv, runs/, caches and build
outputs, copy it to every worker (gcloud scp --worker=all) and unpack it into --remote-dir
(default ~/ocljax). Files already there are overwritten; the workers' .venv and runs/ are
kept; files deleted here are not deleted there. data/ (MNIST IDX files) is copied.

  --exclude PATTERN   leave out more (tar --exclude pattern, e.g. --exclude=./data); repeatable

$COMMON_HELP
HELP
}

EXCLUDES=(./.git ./.venv ./.venv-ci ./runs ./bench_results ./build __pycache__ '*.egg-info'
          .pytest_cache .ruff_cache '*.pyc')
while (( $# )); do
  case $1 in
    --exclude|--exclude=*) opt_value "$@"; EXCLUDES+=("$OPT_VALUE"); shift "$TAKEN" ;;
    *) take_common_flag "$@"; shift "$TAKEN" ;;
  esac
done
finish_common

WORK=$(mktemp -d "${TMPDIR:-/tmp}/ocljax-copy.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
ARCHIVE=$WORK/ocljax-src.tgz
TAR=(tar czf "$ARCHIVE" -C "$PROJECT_ROOT")
for pattern in "${EXCLUDES[@]}"; do
  TAR+=(--exclude="$pattern")
done
run "${TAR[@]}" .
tpu_scp all "$ARCHIVE" "$NAME:ocljax-src.tgz"
tpu_ssh all "mkdir -p $(quote "$REMOTE_DIR"); $(remote_cd); tar xzf ~/ocljax-src.tgz && rm -f ~/ocljax-src.tgz"
