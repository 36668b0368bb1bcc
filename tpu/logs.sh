#!/usr/bin/env bash
# Show the last lines of the workers' logs of a run (or follow them).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<HELP
Usage: tpu/logs.sh --name NAME --zone ZONE --out RUN_DIR [--worker all|N] [--lines N] [--follow]

Print the last lines of RUN_DIR.logs/worker-*.log, as tpu/launch.sh wrote them, from every
worker (default) or one; each file starts with a "==> RUN_DIR.logs/worker-W.log <==" header.

  --out RUN_DIR    the run (as given to launch.sh)
  --worker W       all (default), a worker index, or a list/range such as 1,3 or 0-3
  --lines N        lines per worker (default 50)
  --follow         keep printing new lines (tail -f) until Ctrl-C

$COMMON_HELP
HELP
}

OUT=""
WORKER=all
LINES=50
FOLLOW=0
while (( $# )); do
  case $1 in
    --out|--out=*) opt_value "$@"; OUT=$OPT_VALUE; shift "$TAKEN" ;;
    --worker|--worker=*) opt_value "$@"; WORKER=$OPT_VALUE; shift "$TAKEN" ;;
    --lines|--lines=*) opt_value "$@"; LINES=$OPT_VALUE; shift "$TAKEN" ;;
    --follow|-f) FOLLOW=1; shift ;;
    *) take_common_flag "$@"; shift "$TAKEN" ;;
  esac
done
finish_common
check_run_dir "$OUT"
[[ $WORKER =~ ^(all|[0-9]+([,-][0-9]+)*)$ ]] || die "--worker $WORKER: expected all, N, N,M or N-M"
[[ $LINES =~ ^[0-9]+$ ]] || die "--lines $LINES: expected a number"

TAIL="tail -v -n $LINES"
if (( FOLLOW )); then TAIL+=" -F"; fi
tpu_ssh "$WORKER" "$(remote_cd); $TAIL $(quote "$(logs_dir "$OUT")")/worker-*.log"
