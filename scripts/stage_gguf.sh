#!/usr/bin/env bash
# Stages a model's GGUF on the GPU host piece by piece, then converts it once.
#
# A GPU-host call uploads at most 64 MiB with the checkout, so a GGUF of 1.1 GB
# (Qwen2.5-Coder-1.5B-Instruct) travels in ~21 pieces, one per call. On the development
# machine, once:
#     coral-vllm gguf-pieces qwen2.5-coder-1.5b-instruct      # -> .gpu-model/NAME/p00 ...
# (each pNN holds one byte range and the MANIFEST; .gpu-model/ is git-ignored). Then one
# call per piece, back to back (an idle host is given back ~30 s after a call), each
# carrying its piece folder and running, from the repo root:
#     bash scripts/stage_gguf.sh .gpu-model/qwen2.5-coder-1.5b-instruct/p00
#     bash scripts/stage_gguf.sh .gpu-model/qwen2.5-coder-1.5b-instruct/p01   ...
# Pieces accumulate in $CORAL_GGUF_STORE/NAME (default /root/coral-gguf), each checked
# against the MANIFEST's sha256 as it arrives (pieces of another cut are kept apart); the call that brings the last one joins
# them, checks the whole file's sha256, and converts it with
# `coral-vllm fetch-model NAME --gguf FILE` into the cache fetch-model reads
# (/root/.cache/coral-vllm/models/NAME, bf16 safetensors for Qwen), which needs the vLLM
# bundle staged before (../shared/gpu-host/README.md: gguf and transformers come from
# there). Later commands get the directory with `coral-vllm fetch-model NAME` (no
# download, no --gguf).
#
# With --detach (on the last piece's call) the conversion runs as a job
# (scripts/gpu_job.sh) named convert-NAME that first waits for the bundle's install, so
# the call returns at once and no call waits on either.
#
# Idempotent and resumable: a piece already stored is not copied again, pieces can come
# in any order and a call can be repeated; once joined and converted, any piece's call
# only prints the model directory. Exit 0 while pieces are missing (it lists them),
# 1 on a piece or a whole file whose sha256 is wrong (the bad file is removed: carry it
# again).
set -euo pipefail
PIECE=${1:?usage: bash scripts/stage_gguf.sh .gpu-model/NAME/pNN}
MANIFEST="$PIECE/MANIFEST"
[ -f "$MANIFEST" ] || { echo "$MANIFEST: no MANIFEST (cut pieces with coral-vllm gguf-pieces)"; exit 1; }
NAME=$(awk '$1 == "model" {print $2}' "$MANIFEST")
SUM=$(awk '$1 == "sha256" {print $2}' "$MANIFEST")
STORE=${CORAL_GGUF_STORE:-/root/coral-gguf}/$NAME
GGUF="$STORE/$NAME.gguf"
# pieces of one cut (one MANIFEST) only: a re-cut, e.g. after the checkout grew, starts over
PIECES="$STORE/cut-$(sha256sum "$MANIFEST" | cut -c1-12)"

if [ ! -f "$GGUF" ]; then
  mkdir -p "$PIECES"
  # this call's piece(s), each checked on arrival (.ok marks a checked one)
  while read -r _ label sum _; do
    src="$PIECE/$NAME.gguf.$label"
    [ -f "$src" ] && [ ! -f "$PIECES/$label.ok" ] || continue
    cp "$src" "$PIECES/$label"
    if [ "$(sha256sum "$PIECES/$label" | cut -d' ' -f1)" != "$sum" ]; then
      rm -f "$PIECES/$label"; echo "$label: sha256 differs from the MANIFEST; carry it again"; exit 1
    fi
    touch "$PIECES/$label.ok"; echo "stored $label"
  done < <(awk '$1 == "piece"' "$MANIFEST")
  order=$(awk '$1 == "piece" {print $2}' "$MANIFEST")
  missing=$(for label in $order; do [ -f "$PIECES/$label.ok" ] || printf '%s ' "$label"; done)
  if [ -n "$missing" ]; then echo "$NAME: still missing $missing"; exit 0; fi
  echo "$NAME: all pieces present; joining"
  (cd "$PIECES" && cat $order) > "$GGUF.partial"
  whole=$(sha256sum "$GGUF.partial" | cut -d' ' -f1)
  rm -rf "$STORE"/cut-*
  if [ "$whole" != "$SUM" ]; then
    rm -f "$GGUF.partial"; echo "$NAME: joined file's sha256 is not $SUM; carry every piece again"; exit 1
  fi
  mv "$GGUF.partial" "$GGUF"
fi

SITE=${CORAL_SITE:-/root/coral-site}
case "${2:-}" in
  --detach)  # the conversion as a job that waits for the bundle; this call returns now, so
    # the bundle's install (itself a job) and the conversion overlap the calls still
    # bringing pieces up. A later command waits for it: gpu_job.sh wait convert-NAME MIN
    bash scripts/gpu_job.sh start "convert-$NAME" bash scripts/stage_gguf.sh "$PIECE" --after-bundle
    exit 0 ;;
  --after-bundle)  # (the job's side of --detach)
    for _ in $(seq 300); do [ -f "$SITE/.ready" ] && break; sleep 2; done ;;
  "") ;;
  *) echo "stage_gguf.sh: unknown option $2 (--detach: convert in a job)"; exit 2 ;;
esac
[ -f "$SITE/.ready" ] || {
  echo "$NAME: GGUF joined in $GGUF; stage the vLLM bundle (../shared/gpu-host/README.md), then rerun with any piece to convert"; exit 0; }
source scripts/gpu_host_setup.sh > /tmp/gpu_host_setup.log 2>&1 || { tail -n 20 /tmp/gpu_host_setup.log; exit 1; }
python3 -m coral_vllm.cli fetch-model "$NAME" --gguf "$GGUF"
