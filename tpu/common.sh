# shellcheck shell=bash disable=SC2034
# (SC2034: the variables set here are used by the scripts that source this file.)
# Sourced by every tpu/*.sh script: flags shared by all of them, defaults from the environment,
# and `run`, through which every gcloud/ssh/scp/tar call goes so that --dry-run (or
# OCLJAX_TPU_DRY_RUN=1) prints the exact commands instead of running them.
#
# Shared flags (environment variable giving the default):
#   --name NAME        TPU VM / pod slice name           (OCLJAX_TPU_NAME)
#   --zone ZONE        e.g. us-central2-b                (OCLJAX_TPU_ZONE)
#   --project PROJECT  Google Cloud project              (OCLJAX_TPU_PROJECT; else gcloud config)
#   --type TYPE        accelerator type: v4-8, v4-32, v5e-8 (= v5litepod-8), v6e-8 ...
#                                                        (OCLJAX_TPU_TYPE)
#   --version VERSION  TPU runtime version (OCLJAX_TPU_VERSION; default from --type)
#   --remote-dir DIR   project folder on the workers, relative to $HOME or absolute
#                                                        (OCLJAX_TPU_REMOTE_DIR; default ocljax)
#   --dry-run          print the commands, run nothing  (OCLJAX_TPU_DRY_RUN=1)
#   -h, --help

if [[ -z ${BASH_VERSINFO[0]:-} ]] || (( BASH_VERSINFO[0] < 4 ||
    (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 4) )); then
  echo "tpu scripts need bash >= 4.4 (this is ${BASH_VERSION:-not bash}; on macOS:" \
    "brew install bash)" >&2
  exit 2
fi

TPU_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PROJECT_ROOT=$(dirname "$TPU_DIR")
SCRIPT=$(basename "$0")

NAME=${OCLJAX_TPU_NAME:-}
ZONE=${OCLJAX_TPU_ZONE:-}
PROJECT=${OCLJAX_TPU_PROJECT:-}
TYPE=${OCLJAX_TPU_TYPE:-}
VERSION=${OCLJAX_TPU_VERSION:-}
REMOTE_DIR=${OCLJAX_TPU_REMOTE_DIR:-ocljax}
DRY_RUN=${OCLJAX_TPU_DRY_RUN:-0}
LOC=()        # --zone/--project words appended to every gcloud call (set by finish_common)
TAKEN=0       # how many arguments the last take_* call consumed
OPT_VALUE=""  # the value read by opt_value

# fd 3: where dry-run lines go (stdout, even inside $(...)); fd 4: trace lines of real runs.
exec 3>&1 4>&2

# shellcheck disable=SC2016
COMMON_HELP='Shared flags (default from the environment variable in brackets):
  --name NAME        TPU VM or pod slice name [OCLJAX_TPU_NAME]
  --zone ZONE        zone, e.g. us-central2-b [OCLJAX_TPU_ZONE]
  --project PROJECT  Google Cloud project [OCLJAX_TPU_PROJECT; else the gcloud config]
  --type TYPE        accelerator type: v4-8, v4-32, v5e-8 (v5litepod-8), v5p-8, v6e-8 [OCLJAX_TPU_TYPE]
  --version VERSION  TPU runtime version [OCLJAX_TPU_VERSION; default from --type]
  --remote-dir DIR   project folder on the workers, relative to $HOME [OCLJAX_TPU_REMOTE_DIR; ocljax]
  --dry-run          print every command (one per line, prefixed "+ ") and run none
                     [OCLJAX_TPU_DRY_RUN=1]
  -h, --help         this help'

die() {
  printf '%s: error: %s\n' "$SCRIPT" "$*" >&2
  exit 2
}

log() {
  printf '[%s] %s: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$SCRIPT" "$*" >&2
}

is_dry_run() {
  [[ $DRY_RUN == 1 || $DRY_RUN == true || $DRY_RUN == yes ]]
}

# quote WORD: WORD as one POSIX-shell word (the rules of Python's shlex.quote).
quote() {
  local word=$1 escaped="'\\''"
  if [[ $word =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$word"
  else
    printf "'%s'" "${word//\'/$escaped}"
  fi
}

# quote_all WORD...: the words quoted and joined by spaces.
quote_all() {
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(quote "$word")"
  done
  printf '%s' "$out"
}

# run CMD...: print CMD (shell-quoted, "+ " first) and, unless dry-running, run it.
run() {
  if is_dry_run; then
    printf '+ %s\n' "$(quote_all "$@")" >&3
    return 0
  fi
  printf '+ %s\n' "$(quote_all "$@")" >&4
  "$@"
}

# opt_value "$@": the value of the option in $1 (--flag=VALUE or --flag VALUE).
opt_value() {
  if [[ $1 == --*=* ]]; then
    OPT_VALUE=${1#*=}
    TAKEN=1
  elif (( $# >= 2 )) && [[ $2 != -* ]]; then
    OPT_VALUE=$2
    TAKEN=2
  else
    die "${1%%=*} needs a value (see $SCRIPT --help)"
  fi
}

# take_common_flag "$@": consume one shared flag at $1 (sets TAKEN); unknown options are errors.
take_common_flag() {
  case $1 in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1; TAKEN=1; return 0 ;;
    --name|--name=*) opt_value "$@"; NAME=$OPT_VALUE ;;
    --zone|--zone=*) opt_value "$@"; ZONE=$OPT_VALUE ;;
    --project|--project=*) opt_value "$@"; PROJECT=$OPT_VALUE ;;
    --type|--type=*) opt_value "$@"; TYPE=$OPT_VALUE ;;
    --version|--version=*) opt_value "$@"; VERSION=$OPT_VALUE ;;
    --remote-dir|--remote-dir=*) opt_value "$@"; REMOTE_DIR=$OPT_VALUE ;;
    -*) die "unknown option $1 (see $SCRIPT --help)" ;;
    *) die "unexpected argument $1 (see $SCRIPT --help)" ;;
  esac
}

# require VALUE FLAG [ENVVAR]: die with a clear message when VALUE is empty.
require() {
  [[ -n $1 ]] && return 0
  if [[ -n ${3:-} ]]; then
    die "missing $2 (or set $3)"
  fi
  die "missing $2"
}

# default_version TYPE: the runtime version Google recommends for JAX on TYPE.
default_version() {
  case $1 in
    v2-*|v3-*|v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) return 1 ;;
  esac
}

# finish_common [type]: check the shared flags every script needs (--name, --zone; with "type"
# also --type, and --version from it), then set LOC.
finish_common() {
  require "$NAME" --name OCLJAX_TPU_NAME
  require "$ZONE" --zone OCLJAX_TPU_ZONE
  require "$REMOTE_DIR" --remote-dir OCLJAX_TPU_REMOTE_DIR
  [[ $NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
    die "--name $NAME: use lower-case letters, digits and '-', starting with a letter"
  if [[ ${1:-} == type ]]; then
    require "$TYPE" --type OCLJAX_TPU_TYPE
    if [[ $TYPE == v5e-* ]]; then  # gcloud's name for v5e slices
      TYPE=v5litepod-${TYPE#v5e-}
    fi
    if [[ -z $VERSION ]]; then
      VERSION=$(default_version "$TYPE") ||
        die "no default runtime version for --type $TYPE: give --version" \
          "(gcloud compute tpus tpu-vm versions list --zone $ZONE)"
    fi
  fi
  LOC=(--zone "$ZONE")
  if [[ -n $PROJECT ]]; then
    LOC+=(--project "$PROJECT")
  fi
}

# common_args: the shared flags as arguments for another tpu/ script (one per line).
common_args() {
  printf '%s\n' --name "$NAME" --zone "$ZONE" --remote-dir "$REMOTE_DIR"
  if [[ -n $PROJECT ]]; then printf '%s\n' --project "$PROJECT"; fi
  if [[ -n $TYPE ]]; then printf '%s\n' --type "$TYPE"; fi
  if [[ -n $VERSION ]]; then printf '%s\n' --version "$VERSION"; fi
}

# tpu_gcloud SUBCOMMAND ARGS...: `gcloud compute tpus tpu-vm SUBCOMMAND NAME --zone ... ARGS`.
tpu_gcloud() {
  local sub=$1
  shift
  run gcloud compute tpus tpu-vm "$sub" "$NAME" "${LOC[@]}" "$@"
}

# tpu_ssh WORKERS COMMAND: run the remote shell COMMAND on WORKERS (all, 0, 1-3 ...).
tpu_ssh() {
  tpu_gcloud ssh --worker="$1" --command "$2"
}

# tpu_scp WORKERS SRC DEST: copy with gcloud's scp (remote paths as NAME:PATH).
tpu_scp() {
  run gcloud compute tpus tpu-vm scp "$2" "$3" "${LOC[@]}" --worker="$1"
}

# remote_cd: remote shell text that enters the project folder on a worker (or exits 1).
remote_cd() {
  printf 'cd && cd %s || exit 1' "$(quote "$REMOTE_DIR")"
}

# Remote shell text that sets W to the worker's index (metadata server; else the hostname's
# "-w-N" suffix).
# shellcheck disable=SC2016
REMOTE_WORKER_ID='W=$(curl -sf -m 5 -H "Metadata-Flavor: Google" http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number) || W=$(hostname | sed "s/.*-w-//")'

# check_run_dir DIR: a run directory given by --out must be relative to the project folder.
check_run_dir() {
  require "$1" --out
  [[ $1 != /* ]] || die "--out $1: give a path relative to the project folder (e.g. runs/NAME)"
  [[ $1 != *..* ]] || die "--out $1: '..' is not allowed"
  [[ $1 != */ ]] || die "--out $1: drop the trailing '/'"
}

# logs_dir RUN_DIR: where the workers' logs of RUN_DIR go (a sibling of RUN_DIR).
logs_dir() {
  printf '%s.logs' "$1"
}

# sync_archive RUN_DIR: the local archive the latest pulled state of RUN_DIR is kept in.
sync_archive() {
  local base
  base=$(basename "$1")
  printf '%s/%s/%s.tgz' "${OCLJAX_TPU_SYNC_DIR:-$PROJECT_ROOT/runs/tpu-sync}" "$NAME" "$base"
}

REMOTE_ARCHIVE=.tpu-sync.tgz  # inside the remote project folder

# pull_run RUN_DIR: pack RUN_DIR, its logs and any hidden partial siblings (.NAME.*) on worker 0
# and copy the archive here (kept as sync_archive; the previous one survives a failed copy).
pull_run() {
  local run_dir=$1 archive pack
  archive=$(sync_archive "$run_dir")
  # shellcheck disable=SC2016
  pack="$(remote_cd); set --; for p in $(quote "$run_dir") $(quote "$(logs_dir "$run_dir")")"
  pack+=" $(quote "$(dirname "$run_dir")/.$(basename "$run_dir").")*"
  # shellcheck disable=SC2016
  pack+='; do if [ -e "$p" ]; then set -- "$@" "$p"; fi; done'
  # shellcheck disable=SC2016
  pack+='; if [ $# -eq 0 ]; then echo "nothing to pull yet" >&2; exit 3; fi'
  # shellcheck disable=SC2016
  pack+="; tar czf $REMOTE_ARCHIVE"' "$@" || [ $? -eq 1 ]'
  tpu_ssh 0 "$pack" || return $?
  run mkdir -p "$(dirname "$archive")"
  tpu_scp 0 "$NAME:$REMOTE_DIR/$REMOTE_ARCHIVE" "$archive.part" || return $?
  run mv -f "$archive.part" "$archive"
}

# push_run RUN_DIR: unpack the local archive of RUN_DIR into the project folder of every worker.
push_run() {
  local archive
  archive=$(sync_archive "$1")
  tpu_scp all "$archive" "$NAME:$REMOTE_DIR/$REMOTE_ARCHIVE" || return $?
  tpu_ssh all "$(remote_cd); tar xzf $REMOTE_ARCHIVE && rm -f $REMOTE_ARCHIVE"
}

# unpack_run RUN_DIR: unpack the local archive into the local project (the run dir and its
# logs; hidden partial siblings stay in the archive).
unpack_run() {
  local run_dir=$1
  run tar --exclude="$(dirname "$run_dir")/.$(basename "$run_dir").*" -xzf \
    "$(sync_archive "$run_dir")" -C "$PROJECT_ROOT"
}
