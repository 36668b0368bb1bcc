#!/usr/bin/env bash
# Start an experiment on every worker in the background (nohup), one log file per worker.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<HELP
Usage: tpu/launch.sh --name NAME --zone ZONE --out RUN_DIR [--resume] [--env KEY=VALUE]...
                     EXPERIMENT [EXPERIMENT ARGS...]

Run \`python -m EXPERIMENT ARGS --out RUN_DIR\` with the workers' .venv on every worker at
once (--worker=all), detached (nohup setsid), with OCLJAX_DISTRIBUTED=1 so that the
processes of a pod slice join one JAX program (jax.distributed.initialize()). EXPERIMENT is
a module (experiments.split_mnist) or an experiment's short name (split_mnist).

Each worker W logs to RUN_DIR.logs/worker-W.log (appended to on every launch) and records
the process id in RUN_DIR.logs/worker-W.pid; a worker whose process for RUN_DIR is still
alive refuses a second launch. RUN_DIR is relative to the project folder on the workers.

  --out RUN_DIR     run directory (required; e.g. runs/split-mnist-tpu)
  --resume          continue the run in RUN_DIR: passes --resume RUN_DIR instead of --out
  --env KEY=VALUE   extra environment for the experiment (repeatable), e.g.
                    --env OCLJAX_DATA_DIR=data

Example:
  tpu/launch.sh --name my-tpu --zone us-central2-b --out runs/smnist \\
      split_mnist --data-dir data --seeds 1024

$COMMON_HELP
HELP
}

OUT=""
RESUME=0
ENVS=(OCLJAX_DISTRIBUTED=1)
EXPERIMENT=""
EXP_ARGS=()
while (( $# )); do
  case $1 in
    --out|--out=*) opt_value "$@"; OUT=$OPT_VALUE; shift "$TAKEN" ;;
    --resume) RESUME=1; shift ;;
    --env|--env=*)
      opt_value "$@"
      [[ $OPT_VALUE =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env $OPT_VALUE: expected KEY=VALUE"
      ENVS+=("$OPT_VALUE")
      shift "$TAKEN" ;;
    --) shift; break ;;
    -*) take_common_flag "$@"; shift "$TAKEN" ;;
    *) break ;;
  esac
done
(( $# )) || die "missing EXPERIMENT (e.g. split_mnist or experiments.split_mnist)"
EXPERIMENT=$1
shift
EXP_ARGS=("$@")
finish_common
check_run_dir "$OUT"
[[ $EXPERIMENT =~ ^[A-Za-z_][A-Za-z0-9_.]*$ ]] || die "EXPERIMENT $EXPERIMENT: not a module name"
if [[ $EXPERIMENT != *.* ]]; then
  EXPERIMENT=experiments.$EXPERIMENT
fi
for arg in "${EXP_ARGS[@]}"; do
  case $arg in
    --out|--out=*|--resume|--resume=*|--no-out|--overwrite)
      die "$arg among the experiment's arguments: launch.sh sets the run directory (--out RUN_DIR before EXPERIMENT; --resume to continue it)" ;;
    --dry-run)
      die "--dry-run after EXPERIMENT would go to the experiment: put it before EXPERIMENT" ;;
  esac
done

if (( RESUME )); then
  DIR_ARGS=(--resume "$OUT")
else
  DIR_ARGS=(--out "$OUT")
fi
COMMAND=$(quote_all "${ENVS[@]}" nohup setsid .venv/bin/python -m "$EXPERIMENT" \
  "${EXP_ARGS[@]}" "${DIR_ARGS[@]}")
LOGS=$(logs_dir "$OUT")
# Remote shell (W: worker index, L: log folder); the experiment's own words are quoted.
# shellcheck disable=SC2016
STEPS=(
  "$(remote_cd)"
  "$REMOTE_WORKER_ID"
  "L=$(quote "$LOGS")"
  'mkdir -p "$L"'
  'if [ -f "$L/worker-$W.pid" ] && kill -0 "$(cat "$L/worker-$W.pid")" 2>/dev/null; then echo "worker $W: already running (pid $(cat "$L/worker-$W.pid")); not launched" >&2; exit 1; fi'
  "echo \"=== \$(date -u +%Y-%m-%dT%H:%M:%SZ) worker \$W: \"$(quote "$COMMAND") >> \"\$L/worker-\$W.log\""
  "$COMMAND"' >> "$L/worker-$W.log" 2>&1 < /dev/null & echo $! > "$L/worker-$W.pid"'
  'echo "worker $W: started pid $(cat "$L/worker-$W.pid"), log $L/worker-$W.log"'
)
REMOTE=$(printf '%s; ' "${STEPS[@]}")
tpu_ssh all "${REMOTE%; }"
