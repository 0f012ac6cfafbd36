#!/usr/bin/env bash
# Trains LaVi on Cloud TPU queued resources, one slice or several (multislice): request the
# slices, wait until they are ACTIVE, install the project on every worker of every slice, run
# `python -m lavi_jax.main` on all of them. The TPU runtime sets the MEGASCALE_* variables that
# join the slices; jax.distributed starts by itself.
#
#   launch/tpu_queued.sh [options] [STEP...] [-- MAIN_FLAGS...]
#
# Steps (default: create wait install train): create, wait, install, train, delete.
# Options (environment variable in brackets):
#   --id ID                queued resource id [QR_ID, default lavi-qr]
#   --node-prefix PREFIX   slice names PREFIX-0 .. PREFIX-(N-1) [NODE_PREFIX, default lavi]
#   --slices N             slices (--node-count); N > 1 adds --config.mesh.num_slices=N and
#                          --config.mesh.data=N (data parallel across slices) [NUM_SLICES, 1]
#   --zone ZONE            [ZONE, default us-east5-a]
#   --project PROJECT      [PROJECT, default: gcloud's configured project]
#   --accelerator TYPE     per slice [ACCELERATOR_TYPE, default v5p-128]
#   --runtime VERSION      [RUNTIME_VERSION, default v2-alpha-tpuv5]
#   --spot                 Spot capacity [SPOT=1]
#   --config FILE          [CONFIG, default configs/7b.py]
#   --workdir gs://...     checkpoints and metrics [WORKDIR, required for train]
#   --repo URL, --ref REF  install with git clone instead of copying this checkout's HEAD
#                          [LAVI_REPO, LAVI_REF, default main]
#   --dry-run              print the commands instead of running them [DRY_RUN=1]
# Flags after `--` go to lavi_jax.main. LIBTPU_INIT_ARGS, XLA_PYTHON_CLIENT_MEM_FRACTION,
# XLA_FLAGS (see launch/README.md) are forwarded to the workers when set.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

QR_ID=${QR_ID:-lavi-qr}
NODE_PREFIX=${NODE_PREFIX:-lavi}
NUM_SLICES=${NUM_SLICES:-1}
ZONE=${ZONE:-us-east5-a}
PROJECT=${PROJECT:-}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v5p-128}
RUNTIME_VERSION=${RUNTIME_VERSION:-v2-alpha-tpuv5}
SPOT=${SPOT:-0}
CONFIG=${CONFIG:-configs/7b.py}
WORKDIR=${WORKDIR:-}
LAVI_REPO=${LAVI_REPO:-}
LAVI_REF=${LAVI_REF:-main}
POLL_SECONDS=${POLL_SECONDS:-60}
steps=()
main_flags=()

while [[ $# -gt 0 ]]; do
  tpu_option "$@"
  if ((OPTION_WORDS)); then
    shift "$OPTION_WORDS"
    continue
  fi
  case $1 in
    --id) QR_ID=$2; shift 2 ;;
    --node-prefix) NODE_PREFIX=$2; shift 2 ;;
    --slices) NUM_SLICES=$2; shift 2 ;;
    -h|--help) usage ;;
    --) shift; main_flags=("$@"); break ;;
    create|wait|install|train|delete) steps+=("$1"); shift ;;
    *) echo "unknown argument: $1" >&2; usage 2 ;;
  esac
done
[[ ${#steps[@]} -gt 0 ]] || steps=(create wait install train)
[[ "$NUM_SLICES" =~ ^[1-9][0-9]*$ ]] || die "--slices must be a positive integer"

scope=(--zone="$ZONE")
[[ -z "$PROJECT" ]] || scope+=(--project="$PROJECT")

all_ssh() {
  run gcloud compute tpus queued-resources ssh "$QR_ID" "${scope[@]}" --node=all --worker=all \
    --command="$1"
}

wait_active() {
  local state
  if [[ "$DRY_RUN" == 1 ]]; then
    run gcloud compute tpus queued-resources describe "$QR_ID" "${scope[@]}" \
      --format='value(state.state)'
    return
  fi
  while true; do
    state=$(gcloud compute tpus queued-resources describe "$QR_ID" "${scope[@]}" \
      --format='value(state.state)')
    echo "queued resource $QR_ID: $state"
    case $state in
      ACTIVE) return ;;
      FAILED|SUSPENDED) die "queued resource $QR_ID is $state" ;;
    esac
    sleep "$POLL_SECONDS"
  done
}

for step in "${steps[@]}"; do
  case $step in
    create)
      capacity=()
      [[ "$SPOT" != 1 ]] || capacity=(--spot)
      run gcloud compute tpus queued-resources create "$QR_ID" "${scope[@]}" \
        --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" \
        --node-count="$NUM_SLICES" --node-prefix="$NODE_PREFIX" "${capacity[@]}"
      ;;
    wait)
      wait_active
      ;;
    install)
      if [[ -z "$LAVI_REPO" ]]; then
        tarball=$(mktemp -u /tmp/lavi-jax.XXXXXX.tar.gz)
        pack_checkout "$tarball"
        for ((i = 0; i < NUM_SLICES; i++)); do
          run gcloud compute tpus tpu-vm scp "$tarball" "$NODE_PREFIX-$i:lavi-jax.tar.gz" \
            "${scope[@]}" --worker=all
        done
      fi
      all_ssh "$(install_command "$LAVI_REPO" "$LAVI_REF")"
      ;;
    train)
      require_gs "$WORKDIR"
      slice_flags=()
      if [[ "$NUM_SLICES" -gt 1 ]]; then
        slice_flags=(--config.mesh.num_slices="$NUM_SLICES" --config.mesh.data="$NUM_SLICES")
      fi
      all_ssh "$(train_command "$CONFIG" "$WORKDIR" "${slice_flags[@]}" "${main_flags[@]}")"
      ;;
    delete)
      run gcloud compute tpus queued-resources delete "$QR_ID" "${scope[@]}" --force --quiet
      ;;
  esac
done
