#!/usr/bin/env bash
# Trains LaVi on a Cloud TPU VM slice: create it, install the project on every worker, run
# `python -m lavi_jax.main` on all workers (jax.distributed starts by itself on TPU pods).
#
#   launch/tpu_vm.sh [options] [STEP...] [-- MAIN_FLAGS...]
#
# Steps (default: create install train): create, install, train, delete.
# Options (environment variable in brackets):
#   --name NAME            TPU VM name [TPU_NAME, default lavi]
#   --zone ZONE            [ZONE, default us-central2-b]
#   --project PROJECT      [PROJECT, default: gcloud's configured project]
#   --accelerator TYPE     [ACCELERATOR_TYPE, default v4-64]
#   --runtime VERSION      [RUNTIME_VERSION, default tpu-ubuntu2204-base]
#   --spot                 create a Spot VM [SPOT=1]
#   --config FILE          [CONFIG, default configs/7b.py]
#   --workdir gs://...     checkpoints and metrics [WORKDIR, required for train]
#   --repo URL, --ref REF  install with git clone instead of copying this checkout's HEAD
#                          [LAVI_REPO, LAVI_REF, default main]
#   --dry-run              print the commands instead of running them [DRY_RUN=1]
# Flags after `--` go to lavi_jax.main, e.g. -- --config.init_from=gs://BUCKET/converted
# LIBTPU_INIT_ARGS, XLA_PYTHON_CLIENT_MEM_FRACTION, XLA_FLAGS (see launch/README.md) are
# forwarded to the workers when set.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

TPU_NAME=${TPU_NAME:-lavi}
ZONE=${ZONE:-us-central2-b}
PROJECT=${PROJECT:-}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v4-64}
RUNTIME_VERSION=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
SPOT=${SPOT:-0}
CONFIG=${CONFIG:-configs/7b.py}
WORKDIR=${WORKDIR:-}
LAVI_REPO=${LAVI_REPO:-}
LAVI_REF=${LAVI_REF:-main}
steps=()
main_flags=()

while [[ $# -gt 0 ]]; do
  tpu_option "$@"
  if ((OPTION_WORDS)); then
    shift "$OPTION_WORDS"
    continue
  fi
  case $1 in
    --name) TPU_NAME=$2; shift 2 ;;
    -h|--help) usage ;;
    --) shift; main_flags=("$@"); break ;;
    create|install|train|delete) steps+=("$1"); shift ;;
    *) echo "unknown argument: $1" >&2; usage 2 ;;
  esac
done
[[ ${#steps[@]} -gt 0 ]] || steps=(create install train)

scope=(--zone="$ZONE")
[[ -z "$PROJECT" ]] || scope+=(--project="$PROJECT")

tpu_ssh() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${scope[@]}" --worker=all --command="$1"
}

for step in "${steps[@]}"; do
  case $step in
    create)
      spot=()
      [[ "$SPOT" != 1 ]] || spot=(--spot)
      run gcloud compute tpus tpu-vm create "$TPU_NAME" "${scope[@]}" \
        --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" "${spot[@]}"
      ;;
    install)
      if [[ -z "$LAVI_REPO" ]]; then
        tarball=$(mktemp -u /tmp/lavi-jax.XXXXXX.tar.gz)
        pack_checkout "$tarball"
        run gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:lavi-jax.tar.gz" \
          "${scope[@]}" --worker=all
      fi
      tpu_ssh "$(install_command "$LAVI_REPO" "$LAVI_REF")"
      ;;
    train)
      require_gs "$WORKDIR"
      tpu_ssh "$(train_command "$CONFIG" "$WORKDIR" "${main_flags[@]}")"
      ;;
    delete)
      run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${scope[@]}" --quiet
      ;;
  esac
done
