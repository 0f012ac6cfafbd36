# Shared helpers of the launch scripts (sourced, not run).
# shellcheck shell=bash

# Empty arrays under `set -u` need bash >= 4.4 (macOS ships 3.2: `brew install bash`).
if ((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] < 404)); then
  echo "error: these scripts need bash >= 4.4, this is $BASH_VERSION" >&2
  exit 2
fi

DRY_RUN=${DRY_RUN:-0}
# Environment variables forwarded to every worker when set here.
FORWARDED_ENV=(LIBTPU_INIT_ARGS XLA_PYTHON_CLIENT_MEM_FRACTION XLA_FLAGS TPU_STDERR_LOG_LEVEL
  TPU_MIN_LOG_LEVEL JAX_COMPILATION_CACHE_DIR)

die() {
  echo "error: $*" >&2
  exit 2
}

# Prints the script's header comment (its help) and exits with $1 (default 0).
usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
  exit "${1:-0}"
}

# The options both TPU scripts take: sets the variable of option $1 (value $2) and OPTION_WORDS
# to the number of words used, 0 when $1 is none of them.
# shellcheck disable=SC2034  # the variables belong to the sourcing script
tpu_option() {
  OPTION_WORDS=2
  case $1 in
    --zone) ZONE=$2 ;;
    --project) PROJECT=$2 ;;
    --accelerator) ACCELERATOR_TYPE=$2 ;;
    --runtime) RUNTIME_VERSION=$2 ;;
    --config) CONFIG=$2 ;;
    --workdir) WORKDIR=$2 ;;
    --repo) LAVI_REPO=$2 ;;
    --ref) LAVI_REF=$2 ;;
    --spot) SPOT=1; OPTION_WORDS=1 ;;
    --dry-run) DRY_RUN=1; OPTION_WORDS=1 ;;
    *) OPTION_WORDS=0 ;;
  esac
}

# One shell word: as is when plain, else single-quoted.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Runs a command, or with --dry-run prints it (shell-quoted, one line) instead.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    local arg line=''
    for arg in "$@"; do
      line+="$(quote "$arg") "
    done
    echo "${line% }"
  else
    "$@"
  fi
}

require_gs() {
  [[ "$1" == gs://* ]] || die "--workdir must be a gs:// URL shared by all workers (got '$1')"
}

# `export NAME=VALUE; ` for each forwarded variable that is set here.
env_exports() {
  local name out=''
  for name in "${FORWARDED_ENV[@]}"; do
    if [[ -n "${!name:-}" ]]; then
      out+="export ${name}=$(quote "${!name}"); "
    fi
  done
  printf '%s' "$out"
}

# Packs the committed tree (HEAD) of this checkout into $1.
pack_checkout() {
  run git -C "$(dirname "${BASH_SOURCE[0]}")/.." archive --format=tar.gz --prefix=lavi-jax/ \
    -o "$1" HEAD
}

# Worker command: unpack the copied tarball (or clone $1 when given), then install.
install_command() {
  local repo=$1 ref=$2 fetch
  if [[ -n "$repo" ]]; then
    fetch="rm -rf ~/lavi-jax && git clone $(quote "$repo") ~/lavi-jax && git -C ~/lavi-jax checkout $(quote "$ref")"
  else
    fetch="rm -rf ~/lavi-jax && tar -xzf ~/lavi-jax.tar.gz -C ~"
  fi
  printf '%s' "$fetch && python3 -m pip install -U pip && python3 -m pip install -U 'jax[tpu]' && python3 -m pip install -e ~/lavi-jax"
}

# Worker command: the training job, with $@ appended to its flags.
train_command() {
  local config=$1 workdir=$2 arg flags=''
  shift 2
  for arg in "$@"; do
    flags+=" $(quote "$arg")"
  done
  printf '%s' "$(env_exports)cd ~/lavi-jax && python3 -m lavi_jax.main --config=$(quote "$config") --workdir=$(quote "$workdir")${flags}"
}
