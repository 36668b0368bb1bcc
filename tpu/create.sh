#!/usr/bin/env bash
# Create a Cloud TPU VM or pod slice (gcloud compute tpus tpu-vm create).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<HELP
Usage: tpu/create.sh --name NAME --zone ZONE --type TYPE [--version V] [--spot | --preemptible]
                     [-- EXTRA GCLOUD CREATE FLAGS]

Create a TPU VM (v4-8, v5e-8, ...) or a pod slice (v4-32, ...: one VM per worker host).
The runtime version defaults to Google's recommendation for JAX on the accelerator type:
tpu-ubuntu2204-base (v2-v4), v2-alpha-tpuv5-lite (v5e), v2-alpha-tpuv5 (v5p),
v2-alpha-tpuv6e (v6e). v5e-N is gcloud's v5litepod-N.

  --spot         spot VM: cheaper, may be preempted at any time (use tpu/watchdog.sh)
  --preemptible  preemptible VM (older kind: also preempted, and stopped after 24 h)
  -- ARGS        passed to gcloud create as they are (e.g. --labels=team=ocl --async)

$COMMON_HELP
HELP
}

SPOT=0
PREEMPTIBLE=0
EXTRA=()
while (( $# )); do
  case $1 in
    --spot) SPOT=1; shift ;;
    --preemptible) PREEMPTIBLE=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    *) take_common_flag "$@"; shift "$TAKEN" ;;
  esac
done
finish_common type
if (( SPOT && PREEMPTIBLE )); then
  die "--spot and --preemptible exclude each other"
fi

FLAGS=(--accelerator-type "$TYPE" --version "$VERSION")
if (( SPOT )); then FLAGS+=(--spot); fi
if (( PREEMPTIBLE )); then FLAGS+=(--preemptible); fi
tpu_gcloud create "${FLAGS[@]}" "${EXTRA[@]}"
