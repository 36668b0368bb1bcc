#!/usr/bin/env bash
# Keep a run going on a spot/preemptible TPU: recreate, set up and resume it after preemption,
# until its summary says complete.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<HELP
Usage: tpu/watchdog.sh --name NAME --zone ZONE --type TYPE --out RUN_DIR [options]
                       EXPERIMENT [EXPERIMENT ARGS...]

Every --interval seconds, check the TPU's state (gcloud ... describe) and act:
  READY                  ask every worker whether its process for RUN_DIR is alive:
                         - alive: pull the run's state to this machine (see Sync);
                         - none alive and RUN_DIR/summary.json says "complete": true:
                           pull the run a last time, unpack it here and stop (exit 0);
                         - none alive otherwise: relaunch with --resume RUN_DIR (after
                           copy + setup when the workers have no project or venv yet).
  PREEMPTED, TERMINATED  delete the TPU, then as for a missing one:
  missing                create it (tpu/create.sh), copy the project, set it up, push the
                         pulled state of the run, relaunch with --resume RUN_DIR.
  anything else          (CREATING, RESTARTING, STOPPED, ...) wait.
Every relaunch counts as a restart; past --max-restarts the watchdog gives up (exit 1).
A create that fails (no capacity) is retried at the next check and does not count.

Sync: a preempted TPU's disks are gone, so while the run goes on the watchdog keeps the
latest copy of RUN_DIR, RUN_DIR.logs and RUN_DIR's unfinished hidden siblings (.NAME.*)
here (\${OCLJAX_TPU_SYNC_DIR:-runs/tpu-sync}/TPU_NAME/NAME.tgz, as tpu/pull.sh does) and
unpacks it onto the new workers before --resume. --no-sync when RUN_DIR lives on storage
that outlives the VM.

  --out RUN_DIR        run directory (required), relative to the project folder
  --spot, --preemptible   passed to create.sh when the TPU is (re)created
  --interval S         seconds between checks (default 300)
  --max-restarts N     relaunches before giving up (default 10)
  --start              the watchdog's first launch starts the run (--out RUN_DIR, not
                       --resume): one command for a new run from nothing
  --no-sync            do not pull or push the run's state
  --delete-when-done   delete the TPU once the run is complete and copied back
                       (tpu/stop.sh --yes; with --no-sync, only if RUN_DIR outlives the VM)
  --env KEY=VALUE      passed to launch.sh (repeatable)
  --jax SPEC, --python PY   passed to setup.sh
  --once               one check, then exit (implied by --dry-run)

In --dry-run, the state and the workers' answer can be faked to see what one check does:
OCLJAX_TPU_FAKE_STATE (READY, PREEMPTED, MISSING, ...; default READY) and
OCLJAX_TPU_FAKE_STATUS (running, stopped, complete, absent; default running).

Run it where it can stay up (tmux, or a small always-on VM), e.g.
  nohup tpu/watchdog.sh --name my-tpu --zone us-central2-b --type v4-8 --spot \\
      --out runs/smnist --start split_mnist --data-dir data --seeds 1024 > watchdog.log 2>&1 &

$COMMON_HELP
HELP
}

OUT=""
CREATE_FLAGS=()
SETUP_FLAGS=()
LAUNCH_FLAGS=()
INTERVAL=300
MAX_RESTARTS=10
FRESH=0
SYNC=1
DELETE_WHEN_DONE=0
ONCE=0
while (( $# )); do
  case $1 in
    --out|--out=*) opt_value "$@"; OUT=$OPT_VALUE; shift "$TAKEN" ;;
    --spot|--preemptible) CREATE_FLAGS+=("$1"); shift ;;
    --interval|--interval=*) opt_value "$@"; INTERVAL=$OPT_VALUE; shift "$TAKEN" ;;
    --max-restarts|--max-restarts=*) opt_value "$@"; MAX_RESTARTS=$OPT_VALUE; shift "$TAKEN" ;;
    --start) FRESH=1; shift ;;
    --no-sync) SYNC=0; shift ;;
    --delete-when-done) DELETE_WHEN_DONE=1; shift ;;
    --once) ONCE=1; shift ;;
    --env|--env=*) opt_value "$@"; LAUNCH_FLAGS+=(--env "$OPT_VALUE"); shift "$TAKEN" ;;
    --jax|--jax=*|--python|--python=*)
      opt_value "$@"; SETUP_FLAGS+=("${1%%=*}" "$OPT_VALUE"); shift "$TAKEN" ;;
    --) shift; break ;;
    -*) take_common_flag "$@"; shift "$TAKEN" ;;
    *) break ;;
  esac
done
(( $# )) || die "missing EXPERIMENT (e.g. split_mnist) and its arguments"
EXPERIMENT=("$@")
finish_common type
check_run_dir "$OUT"
[[ $INTERVAL =~ ^[0-9]+$ ]] || die "--interval $INTERVAL: expected seconds"
[[ $MAX_RESTARTS =~ ^[0-9]+$ ]] || die "--max-restarts $MAX_RESTARTS: expected a number"
if (( ${#CREATE_FLAGS[@]} > 1 )); then die "--spot and --preemptible exclude each other"; fi
if is_dry_run; then
  ONCE=1
elif [[ -n ${OCLJAX_TPU_FAKE_STATE:-}${OCLJAX_TPU_FAKE_STATUS:-} ]]; then
  die "OCLJAX_TPU_FAKE_STATE/OCLJAX_TPU_FAKE_STATUS only work with --dry-run"
fi

# The sibling scripts get the same TPU flags, dry-run included, and never prompt.
mapfile -t COMMON < <(common_args)
# Bad experiment arguments are refused now, not after a TPU was created for them.
if ! OCLJAX_TPU_DRY_RUN=1 "$TPU_DIR/launch.sh" "${COMMON[@]}" --out "$OUT" \
    "${LAUNCH_FLAGS[@]}" -- "${EXPERIMENT[@]}" > /dev/null; then
  exit 2
fi
export OCLJAX_TPU_DRY_RUN=$DRY_RUN CLOUDSDK_CORE_DISABLE_PROMPTS=1
RESTARTS=0
PROVISION=0  # 1 after a create, until copy + setup + launch have all succeeded

# tpu_state: READY, PREEMPTED, ..., MISSING (no such TPU) or UNKNOWN (the query failed).
tpu_state() {
  local out err
  if is_dry_run; then
    tpu_gcloud describe --format='value(state)'
    echo "${OCLJAX_TPU_FAKE_STATE:-READY}"
    return 0
  fi
  err=$(mktemp)
  if out=$(tpu_gcloud describe --format='value(state)' 2>"$err"); then
    echo "${out:-UNKNOWN}"
  elif grep -qiE 'NOT_FOUND|not found' "$err"; then
    echo MISSING
  else
    log "describe failed: $(tr '\n' ' ' < "$err")"
    echo UNKNOWN
  fi
  rm -f "$err"
}

# run_status: running (some worker's process is alive), complete (none alive, summary.json
# complete), absent (a worker lacks the project or its venv), stopped, or unknown (no answer).
run_status() {
  local summary out
  if is_dry_run; then
    tpu_ssh all "$STATUS_COMMAND"
    echo "${OCLJAX_TPU_FAKE_STATUS:-running}"
    return 0
  fi
  out=$(tpu_ssh all "$STATUS_COMMAND") || true
  summary=$(grep -o 'ocljax-status .*' <<<"$out" || true)
  if [[ -z $summary ]]; then echo unknown
  elif [[ $summary == *" running"* ]]; then echo running
  elif [[ $summary == *" absent"* ]]; then echo absent
  elif [[ $summary == *" complete"* ]]; then echo complete
  else echo stopped
  fi
}

# shellcheck disable=SC2016
STATUS_COMMAND="cd; if ! cd $(quote "$REMOTE_DIR") 2>/dev/null || [ ! -x .venv/bin/python ]; then echo 'ocljax-status absent'; exit 0; fi; $REMOTE_WORKER_ID; L=$(quote "$(logs_dir "$OUT")"); S=$(quote "$OUT/summary.json")"\
'; if [ -f "$L/worker-$W.pid" ] && kill -0 "$(cat "$L/worker-$W.pid")" 2>/dev/null; then s=running'\
"; elif [ -f \"\$S\" ] && python3 -c $(quote 'import json, sys; sys.exit(json.load(open(sys.argv[1])).get("complete") is not True)') \"\$S\"; then s=complete"\
'; else s=stopped; fi; echo "ocljax-status worker=$W $s"'

launch() {
  local resume=(--resume)
  if (( FRESH )); then
    resume=()
  else
    if (( RESTARTS >= MAX_RESTARTS )); then
      log "giving up: $RESTARTS restarts (--max-restarts $MAX_RESTARTS)"
      exit 1
    fi
    RESTARTS=$((RESTARTS + 1))
    log "restart $RESTARTS of at most $MAX_RESTARTS"
  fi
  FRESH=0
  "$TPU_DIR/launch.sh" "${COMMON[@]}" --out "$OUT" "${resume[@]}" "${LAUNCH_FLAGS[@]}" \
    -- "${EXPERIMENT[@]}"
}

provision() {
  "$TPU_DIR/copy.sh" "${COMMON[@]}" || return 1
  "$TPU_DIR/setup.sh" "${COMMON[@]}" "${SETUP_FLAGS[@]}" || return 1
  if (( SYNC )); then
    if [[ -f $(sync_archive "$OUT") ]]; then
      push_run "$OUT" || return 1
    elif (( ! FRESH )); then
      log "no pulled state of $OUT here ($(sync_archive "$OUT")): --resume starts from what" \
        "the workers have"
    fi
  fi
  launch || return 1
  PROVISION=0
}

recreate() {
  if ! "$TPU_DIR/create.sh" "${COMMON[@]}" "${CREATE_FLAGS[@]}"; then
    log "create failed (no capacity or quota?); retrying at the next check"
    return 1
  fi
  PROVISION=1
  provision || log "setting up the new TPU failed; retrying at the next check"
}

finish() {
  log "$OUT is complete"
  if (( SYNC )); then
    if ! { pull_run "$OUT" && unpack_run "$OUT"; }; then
      log "copying the results back failed: run tpu/pull.sh --out $OUT before deleting the TPU"
      exit 1
    fi
    log "results in $PROJECT_ROOT/$OUT"
  fi
  if (( DELETE_WHEN_DONE )); then
    "$TPU_DIR/stop.sh" "${COMMON[@]}" --yes
  fi
  exit 0
}

while true; do
  state=$(tpu_state)
  log "TPU $NAME: $state"
  case $state in
    READY)
      status=$(run_status)
      log "run $OUT: $status"
      case $status in
        running)
          FRESH=0
          if (( SYNC )); then pull_run "$OUT" || log "pull failed; keeping the previous copy"; fi ;;
        complete) finish ;;
        absent) provision || log "setup failed; retrying at the next check" ;;
        stopped)
          if (( PROVISION )); then
            provision || log "setup failed; retrying at the next check"
          else
            launch || log "launch failed; retrying at the next check"
          fi ;;
        *) log "no answer from the workers; retrying at the next check" ;;
      esac ;;
    PREEMPTED|TERMINATED)
      if "$TPU_DIR/stop.sh" "${COMMON[@]}" --yes; then
        recreate || true
      else
        log "delete failed; retrying at the next check"
      fi ;;
    MISSING) recreate || true ;;
    *) log "waiting" ;;
  esac
  if (( ONCE )); then break; fi
  sleep "$INTERVAL"
done
