#!/usr/bin/env bash
# Delete a TPU VM or pod slice (asks first unless --yes).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<HELP
Usage: tpu/stop.sh --name NAME --zone ZONE [--yes]

Delete the TPU VM (every worker of a pod slice), which stops its billing. Its disks go with
it: copy results back first (tpu/pull.sh --out RUN_DIR). Asks for confirmation on a
terminal; without one, --yes is required.

  --yes   do not ask

$COMMON_HELP
HELP
}

YES=0
while (( $# )); do
  case $1 in
    --yes|-y) YES=1; shift ;;
    *) take_common_flag "$@"; shift "$TAKEN" ;;
  esac
done
finish_common

if (( ! YES )) && ! is_dry_run; then
  [[ -t 0 ]] || die "not deleting $NAME without confirmation: pass --yes"
  read -r -p "Delete TPU $NAME in $ZONE (its disks and any results on them)? [y/N] " answer
  [[ $answer == [yY] || $answer == [yY][eE][sS] ]] || { echo "not deleted" >&2; exit 1; }
fi
tpu_gcloud delete --quiet
