#!/usr/bin/env bash
# Copy a run directory (and its logs) from worker 0 back into this project.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<HELP
Usage: tpu/pull.sh --name NAME --zone ZONE --out RUN_DIR

On worker 0, pack RUN_DIR, RUN_DIR.logs and any unfinished hidden sibling (.NAME.*, where a
run is built before it is renamed into place); copy the archive here to
\${OCLJAX_TPU_SYNC_DIR:-runs/tpu-sync}/TPU_NAME/NAME.tgz and unpack RUN_DIR and RUN_DIR.logs
into this project (same relative path as on the workers). Works while the run goes on.

  --out RUN_DIR    the run (as given to launch.sh)

$COMMON_HELP
HELP
}

OUT=""
while (( $# )); do
  case $1 in
    --out|--out=*) opt_value "$@"; OUT=$OPT_VALUE; shift "$TAKEN" ;;
    *) take_common_flag "$@"; shift "$TAKEN" ;;
  esac
done
finish_common
check_run_dir "$OUT"
pull_run "$OUT"
unpack_run "$OUT"
