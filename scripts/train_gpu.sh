#!/usr/bin/env bash
# The recipe behind the drafters, in stages: SmolLM2-135M-Instruct by default (chat
# conversations); another target with CORAL_NAME (prefix of everything sent back),
# CORAL_TARGET (its directory) and, for a base model, CORAL_TEXTS (plain-text passages
# from `coral-vllm train texts` instead of conversations), e.g. CORAL_NAME=gemma3
# CORAL_TARGET=~/.cache/coral-vllm/models/gemma3-270m CORAL_TEXTS=.gpu-data/texts.jsonl.xz.
# A target's settings can come as a preset: CORAL_PRESET=qwen2.5-coder-1.5b sources
# scripts/targets/qwen2.5-coder-1.5b.sh (name, model, prompts, epochs, the ship tables).
# Run from the repo root after `source scripts/gpu_host_setup.sh`; every stage resumes
# where the last one stopped (rerun it). Carry .gpu-data/ (the conversations file from
# `coral-vllm train conversations --out .gpu-data/conversations.jsonl.xz`, and what
# earlier leases sent back, in any subfolder).
#   bash scripts/train_gpu.sh data     # the target regenerates every assistant turn, over
#                                      # CORAL_DATA_ENGINES (3) vLLM engines on one GPU;
#                                      # data/ keeps looping replies, data-trim/ trims them
#                                      # (with CORAL_TEXTS: continues each passage)
#   bash scripts/train_gpu.sh loops    # data/ vs data-trim/: two runs side by side, one plan
#   bash scripts/train_gpu.sh long     # the shipped drafter's run (6 epochs of data/), resumed
#   bash scripts/train_gpu.sh router   # its router refit per group count (CORAL_ROUTER_SWEEP)
#                                      # at equal active rows; the best by held-out recall
#   bash scripts/train_gpu.sh pinned   # the router drafter with its first P groups always on,
#                                      # P by vLLM tau on the dev prompts (ship: head `pinned`)
#   bash scripts/train_gpu.sh ship     # its exports, vLLM tau (k=5, MT-bench, HumanEval), e2e
#   bash scripts/train_gpu.sh profile  # 10 steps of that recipe under torch.profiler
#   bash scripts/train_gpu.sh levers   # the recipe's levers (LEVERS), 4 epochs each, one at
#                                      # a time, resumed; table by dev tau, vLLM tau of the best 2
#   bash scripts/train_gpu.sh curves   # EAGLE, HASS, CORAL: 1 epoch each, validated
#   bash scripts/train_gpu.sh finish   # exports, vLLM tau vs offline tau, tables
#   bash scripts/train_gpu.sh ablate   # CORAL preset, one lever per run, same data
#                                              # and budget (CORAL_ABLATIONS), the table
#   bash scripts/train_gpu.sh scaling  # multi-GPU host: 1/2/4/8 GPUs, same global batch
#   bash scripts/train_gpu.sh check STAGE...  # their carried inputs are here (first call)
#   bash scripts/train_gpu.sh collect  # what the stages made so far (replies, manifests,
#                                      # logs, metrics, unfinished runs' state, drafters in
#                                      # pieces) -> $OUT, 8 files a call; `collect more`: the
#                                      # rest (while or after a job: scripts/gpu_job.sh);
#                                      # `collect feed`: all of it, into a job's OUT as it
#                                      # is sent
# Time: a stage stops in time for CORAL_DEADLINE (epoch seconds; default now +
# CORAL_TIME_LIMIT_MIN, 8.5), leaving what it made usable, so one job can run several
# stages across the 10-minute commands of a lease.
# Extra flags for a stage (later flags win): CORAL_DATA_ARGS, CORAL_TRAIN_ARGS, CORAL_ROUTER_ARGS,
# CORAL_TAU_ARGS, CORAL_ACCEPTANCE_ARGS, CORAL_E2E_ARGS (a small rehearsal on the CPU sets these).
# Work and results live in $CORAL_WORK (default /root/coral-work/$CORAL_NAME, kept while the host is);
# each stage also copies what it produced to $OUT (default results/), at most 8 files.
# What a stage makes outlives the host: it comes back in $OUT as xz pieces of <= 15 MiB,
# $CORAL_NAME-PART.tar.xz.00, .01, ... (`data`, `collect`: the generated replies, from which
# the data is rebuilt; `curves`, `ablate`: a run that stopped on the time limit,
# its resumable state included), and the finished runs' metrics ($CORAL_NAME-runs.tgz,
# -ablation.tgz, -loops.tgz; `curves` also $CORAL_NAME-drafter_PRESET.tgz, bf16).
# Copy them into .gpu-data/ here; every stage, on any later lease, first unpacks into
# $CORAL_WORK whatever is there and missing there, so the stage rerun resumes.
set -uo pipefail
# a target's settings (scripts/targets/NAME.sh), e.g. CORAL_PRESET=qwen2.5-coder-1.5b
if [ -n "${CORAL_PRESET:-}" ]; then
  preset=$(dirname "$0")/targets/$CORAL_PRESET.sh
  [ -f "$preset" ] || { echo "CORAL_PRESET=$CORAL_PRESET: no $preset; choose one of" \
    $(ls "$(dirname "$0")/targets" | sed 's/\.sh$//'); exit 2; }
  source "$preset"
fi
N=${CORAL_NAME:-smollm2}
M=${CORAL_TARGET:-$HOME/.cache/coral-vllm/models/smollm2-135m-instruct}
W=${CORAL_WORK:-/root/coral-work/$N}
R=$W/results
O=${OUT:-results}
TL=${CORAL_TIME_LIMIT_MIN:-8.5}
DEADLINE=${CORAL_DEADLINE:-$(python3 -c "import time; print(int(time.time() + 60 * $TL))")}
PRESETS=${CORAL_PRESETS:-eagle hass coral}
mkdir -p "$W" "$R" "$O"
runs() { for p in $PRESETS; do printf '%s=%s ' "$p" "$W/runs/$p"; done; }
pack() {  # pack PART DIR [tar options]: $W/DIR -> $O/$N-PART.tar.xz.NN, each piece
  # moved into $O whole (a job's OUT is sent while the job runs: a piece still being
  # written must not be), replacing an earlier pack of that name
  local name=$N-$1 dir=$2 tmp; shift 2
  tmp=$O/.packing-$name; rm -rf "$tmp" && mkdir -p "$tmp"
  tar -C "$W" -cf - "$@" "$dir" | xz -T0 -6 | split -b 15M -d - "$tmp/$name.tar.xz."
  rm -f "$O/$name".tar.xz.*; mv "$tmp"/* "$O/" && rmdir "$tmp"
  ls -l "$O/$name".tar.xz.* | awk -v n="$name" \
    '{s += $5} END {printf "%s: %d piece(s), %.1f MiB\n", n, NR, s / 2^20}'
}
left_min() {  # minutes to the deadline, less $1; never 0, which --time-limit-min reads as
  # "no limit": a stage at its deadline gets 0.01 and starts nothing
  python3 -c "print(round(max(0.01, ($DEADLINE - $(date +%s)) / 60 - ${1:-0}), 2))"
}
pieces() {  # every piece of the pack named $1 anywhere under .gpu-data, in order (the
  # pieces of one pack may come up in different commands' folders)
  find -L .gpu-data -name "$1.[0-9][0-9]" 2>/dev/null | awk -F/ '{print $NF "\t" $0}' \
    | sort | cut -f2
}
restore() {  # every .gpu-data/**/$N-PART.tar.xz.* whose folder (data, runs/RUN) $W lacks;
  # PART as `pack` names them, so that another target's pieces whose name starts with this
  # one's (qwen2.5-coder-1.5b-all-data0 beside qwen2.5-coder-1.5b) are not taken for its
  local first name top
  for first in $(find -L .gpu-data -name "$N-*.tar.xz.00" 2>/dev/null | sort); do
    name=$(basename "${first%.00}")
    [[ ${name#"$N-"} =~ ^(data[0-9]*|run-.+|drafter-.+)\.tar\.xz$ ]] || continue
    if [ -n "$(pieces "$name" | awk -F/ '{print $NF}' | uniq -d)" ]; then
      echo "restore: two copies of a piece of $name under .gpu-data; carry one:"; pieces "$name"
      continue
    fi
    top=$(cat $(pieces "$name") | xz -d | tar -t | head -n 1); top=${top%/}
    [ -e "$W/$top" ] || { cat $(pieces "$name") | xz -d | tar -x -C "$W" && echo "restored $top"; }
  done
}
restore
long_done() {  # the long run (the shipped drafter's) reached its end: its log says so, here
  # or in the run folder where the finished run came back from a lease without its state
  grep -qs "^stage 1 done" "$R/train_long.log" "$W/runs/long/train_long.log"
}
export_run() {  # run -> bf16 drafter dir -> $O/$N-drafter_RUN.tgz (fits the 16 MiB per file)
  local dense; dense=$([ "$1" = coral ] || echo --dense)
  python3 -m coral_vllm.cli train export --run "$W/runs/$1" --dest "$W/drafters/$1" \
    $dense --dtype bfloat16 > /dev/null && tar -C "$W/drafters" -czf "$O/$N-drafter_$1.tgz" "$1"
}
variant() {  # variant SRC DEST KEY=VALUE...: an exported drafter with other "coral" settings
  # (same weights), checked by reading it back: a bad setting fails naming its field
  local src=$W/drafters/$1 dest=$W/drafters/$2; shift 2
  [ -d "$dest" ] && return 0
  cp -r "$src" "$dest" && python3 -c "import json, sys
from coral_vllm.format.checkpoint import read_checkpoint
p = sys.argv[1] + '/config.json'; c = json.load(open(p))
for kv in sys.argv[2:]:
    key, value = kv.split('=', 1); c['coral'][key] = json.loads(value) if value[:1].isdigit() else value
json.dump(c, open(p, 'w'), indent=2); read_checkpoint(sys.argv[1])" "$dest" "$@" \
    || { rm -rf "$dest"; return 1; }
}
unpack_metrics() {  # finished runs' metrics sent back as $N-NAME.tgz (in any .gpu-data
  # subfolder), where $W lacks them
  local f
  for f in $(find -L .gpu-data -name "$N-$1.tgz" 2>/dev/null | sort); do
    tar -C "$W" --skip-old-files -xzf "$f"
  done
}
# how `data` generates, and rebuilds from the replies (one definition: a rebuild with other
# settings would be other data)
DATA_ARGS=(--max-new-tokens 512 --max-len 2048 --shards "${CORAL_DATA_ENGINES:-3}" ${CORAL_DATA_ARGS:-})
CONVERSATIONS=(--conversations "$W/conversations.jsonl.xz" --max-turns "${CORAL_MAX_TURNS:-3}")
PROMPTS=${CORAL_CONVERSATIONS:-.gpu-data/conversations.jsonl.xz}  # copied there once
recipe_run() {  # recipe_run DATA RUN FLAGS...: the CORAL recipe's run (one definition of
  # its preset, lr and batch); FLAGS after it (later flags win: a lever's --lr)
  python3 -m coral_vllm.cli train train --preset coral --target "$M" --data "$1" --out "$2" \
    --lr 3e-4 --batch-tokens 32768 "${@:3}"
}
conversations_ready() {  # the prompt set, under the one name every stage reads it by;
  # missing, the stage stops here naming it (not in a traceback after the target loads)
  [ -f "$W/conversations.jsonl.xz" ] && return 0
  [ -f "$PROMPTS" ] || { echo "$N: no prompt set $PROMPTS (CORAL_CONVERSATIONS): carry its folder" \
    "($(dirname "$PROMPTS")) in this call"; exit 2; }
  cp "$PROMPTS" "$W/conversations.jsonl.xz"
}
data_ready() {  # the data of `data`, rebuilt from its replies (parts) where only they came back
  conversations_ready
  [ -f "$W/data/manifest.json" ] || python3 -m coral_vllm.cli train data --target "$M" \
    "${CONVERSATIONS[@]}" "${DATA_ARGS[@]}" --loops keep \
    --out "$W/data" --write-only | tail -c 300
}
train_runs() {  # train_runs TGZ NAME:PRESET:FLAGS... (commas for spaces in FLAGS)
  # Each run to its end (marked DONE, skipped on any later call or lease), in order, with
  # one epoch on the same data; one is started only with CORAL_MIN_RUN_MIN (4; an H200
  # run is ~1 min features + 2-3 min epoch) left, so that it rarely has to travel. One
  # that stops on the time limit anyway is packed for the next call (without best.pt:
  # its ~50 MB optimizer state already fills most of the 64 MiB). A --export flag sends
  # the finished run back as a bf16 drafter. Finished runs' metrics go to $O/$N-TGZ.tgz.
  local tgz=$1 spec name preset flags run left; shift
  unpack_metrics "$tgz"
  for spec in "$@"; do
    IFS=: read -r name preset flags <<< "$spec"; run=$W/runs/$name
    [ -f "$run/DONE" ] && continue
    left=$(left_min)
    if python3 -c "import sys; sys.exit($left >= ${CORAL_MIN_RUN_MIN:-4})"; then
      echo "$name: not started ($left min left); the next call starts it"; break
    fi
    flags=${flags//,/ }
    python3 -m coral_vllm.cli train train --preset "$preset" --target "$M" --data "$W/data" \
      --out "$run" --epochs 1 --lr 3e-4 --batch-tokens 32768 --eval-every 100 \
      --log-every 20 --time-limit-min "$left" ${CORAL_TRAIN_ARGS:-} ${flags//--export/} \
      >> "$R/train_$name.log" 2>&1
    echo "$name: exit $? $(grep -E '^eval|done|stopped' "$R/train_$name.log" | tail -n 2)"
    if grep -q "^stage 1 done" "$R/train_$name.log"; then
      touch "$run/DONE"; cp "$R/train_$name.log" "$run/train.log"
      [[ " $flags " == *" --export "* ]] && export_run "$name"
    else
      pack "run-$name" "runs/$name" --exclude=best.pt; break
    fi
  done
  # finished runs only: a stopped run's metrics without its state would be resumed from
  # scratch on top of them
  local finished; finished=$(cd "$W" && for d in runs/*/DONE; do d=${d%/DONE}; \
    [ -d "$d" ] && echo "$d/DONE $d/metrics.jsonl $d/train_config.json $d/train.log"; done)
  [ -z "$finished" ] || tar -C "$W" -czf "$O/$N-$tgz.tgz" $finished
}
restore_runs() {  # what `curves` sent back, for `finish` on a later lease
  for p in $PRESETS; do
    [ -d "$W/drafters/$p" ] || [ ! -f ".gpu-data/$N-drafter_$p.tgz" ] || {
      mkdir -p "$W/drafters"; tar -C "$W/drafters" -xzf ".gpu-data/$N-drafter_$p.tgz"; }
  done
  unpack_metrics runs
}
# NAME:FLAGS, commas for spaces; the first is the baseline every other run differs from
ABLATIONS=${CORAL_ABLATIONS:-base: depth2:--num-layers,2 fused:--fused-layers,auto \
init-target:--init-from-target csra-off:--csra-weight,0 csra-t1:--csra-temperature,1.0}
# Group counts the router stage compares, each at the long run's active share of the
# vocabulary (top_k_groups / num_groups, 1/8 for the coral preset: 8, 16, 32 groups active)
ROUTER_SWEEP=${CORAL_ROUTER_SWEEP:-64 128 256}
# The recipe levers at a converged budget, NAME:FLAGS as above, the baseline first; ordered
# by what they are expected to move, so that the first sessions run the likeliest
LEVERS=${CORAL_LEVERS:-base: steps5:--num-steps,5 depth2:--num-layers,2 \
distill1:--distill-weight,1.0 ce-only:--feature-loss-weight,0,--distill-weight,1.0 decay08:--step-weight-decay,0.8 \
csra-off:--csra-weight,0 csra-tok:--csra-negatives,other-token fused:--fused-layers,auto,--feature-store,online lr1e-3:--lr,1e-3}
case "${1:?stage: data | loops | long | router | pinned | ship | profile | levers | curves | finish | ablate | scaling | collect | check}" in
  check)  # check STAGE...: what those stages read that must come up with the job's first
          # call (the prompt set; for ship, the evaluation sets' wheels), so that a folder
          # not carried is named in that call's reply, not minutes later in the job's log
    shift; bad=0
    for stage in "$@"; do
      case $stage in
        data|loops|long|router|pinned|profile|levers|curves|ablate)
          [ -f "$W/conversations.jsonl.xz" ] || [ -f "$PROMPTS" ] \
            || { echo "$N $stage: no prompt set $PROMPTS (CORAL_CONVERSATIONS): carry $(dirname "$PROMPTS")"; bad=1; } ;;
        ship)
          python3 -c "import sys
from coral_vllm.data.sources import EVAL_SETS
from coral_vllm.data.wheels import cached_wheel, wheel_cache
gone = [p for p in EVAL_SETS if cached_wheel(p) is None]
gone and print(f'$N ship: no wheel of {\", \".join(gone)} in {wheel_cache()} (CORAL_VLLM_WHEELS): '
               'carry the folder \`coral-vllm wheels --dest DIR\` filled')
sys.exit(bool(gone))" || bad=1 ;;
      esac
    done
    [ "$bad" = 0 ] && echo "$N: inputs of $* here"; exit "$bad" ;;
  data)  # engines side by side (a 135M target leaves one vLLM engine CPU-bound), each
         # packing its replies ($N-dataS) into $O the moment it ends: they are what cannot be
         # remade, and session 8 lost a host, and 6 minutes of replies, while the data was
         # still being written from them. Then the data from all their parts: looping
         # replies kept (data/), trimmed (data-trim/)
    conversations_ready
    prompts=("${CONVERSATIONS[@]}")
    [ -n "${CORAL_TEXTS:-}" ] && prompts=(--texts "$CORAL_TEXTS")
    E=${CORAL_DATA_ENGINES:-3}
    gen=(python3 -m coral_vllm.cli train data --target "$M" "${prompts[@]}" "${DATA_ARGS[@]}")
    shard_parts() { [ "$E" -gt 1 ] && echo "data/parts/shard$1-of-$E" || echo data/parts; }
    pack_shard() { [ -d "$W/$(shard_parts "$1")" ] && pack "data$1" "$(shard_parts "$1")" --exclude='*.tmp'; }
    tl=$(left_min "${CORAL_DATA_RESERVE_MIN:-0}")
    for s in $(seq 0 $((E - 1))); do  # own compile caches: the engines start at once
      ( VLLM_CACHE_ROOT=$HOME/.cache/vllm-engine$s "${gen[@]}" --out "$W/data" --shard "$s" \
          --time-limit-min "$tl" > "$R/data_engine$s.log" 2>&1
        pack_shard "$s" >> "$R/data_engine$s.log" 2>&1 ) &
    done
    wait
    for s in $(seq 0 $((E - 1))); do echo "engine $s: $(grep '^{' "$R/data_engine$s.log" | tail -n 1)"; done
    # parts an engine did not make (it failed) are generated here by one engine, in time;
    # if it made any, the shards are packed again
    made=$(find "$W/data/parts" -type f ! -name '*.tmp' 2>/dev/null | sort)
    "${gen[@]}" --out "$W/data" --loops keep --time-limit-min "$(left_min "${CORAL_DATA_RESERVE_MIN:-0}")" \
      2>&1 | grep -v "^INFO\|^(" | tail -n 5
    [ "$(find "$W/data/parts" -type f ! -name '*.tmp' 2>/dev/null | sort)" = "$made" ] \
      || for s in $(seq 0 $((E - 1))); do pack_shard "$s"; done
    touch "$W/data/parts.packed"  # `collect` need not pack them again
    [ -f "$W/data/manifest.json" ] || { echo "data: none written (see $R/data_engine*.log)"; exit 1; }
    mkdir -p "$W/data-trim" && ln -sfn "$W/data/parts" "$W/data-trim/parts"
    "${gen[@]}" --out "$W/data-trim" --loops trim --write-only | tail -n 1
    cp "$W/data/manifest.json" "$O/dataset_manifest_$N.json"
    cp "$W/data-trim/manifest.json" "$O/dataset_manifest_${N}_trim.json" ;;
  loops)  # the two data sets side by side on one GPU, one plan, compared by dev tau at
          # the last evaluation both reached (the deadline may stop them)
    for v in keep trim; do
      d=$W/data; [ "$v" = trim ] && d=$W/data-trim
      recipe_run "$d" "$W/runs/loops-$v" --epochs 1 --max-steps "${CORAL_LOOPS_STEPS:-400}" \
        --eval-every 50 --log-every 20 --time-limit-min "$(left_min 1.5)" \
        ${CORAL_TRAIN_ARGS:-} > "$R/train_loops-$v.log" 2>&1 &
    done
    wait
    python3 -m coral_vllm.cli bench training ablation --runs keep="$W/runs/loops-keep" \
      trim="$W/runs/loops-trim" --out "$R/loops.json" && cat "$R/loops.json" ;;
  long)  # the shipped drafter's run: one plan (below) to its end, resumed by every later
          # call or lease from what came back; the deadline stops it (state saved)
    long_done && { echo "long: done"; exit 0; }  # (a run restored without state starts nothing)
    data_ready
    recipe_run "$W/data" "$W/runs/long" --epochs 6 --eval-every 200 --log-every 50 \
      --time-limit-min "$(left_min 1.5)" ${CORAL_TRAIN_ARGS:-} >> "$R/train_long.log" 2>&1
    echo "long: exit $? $(grep -E '^eval|done|stopped' "$R/train_long.log" | tail -n 2)" ;;
  profile)  # where a training step's time goes: 10 steps of the long run's recipe under
             # torch.profiler (after 3 warm ones), a scratch run -> $O/profile_$N.txt;
             # logging as the long run does (a log step reads the device: a sync), to
             # step 100: the rate of steps 51-100 is one unprofiled, early-run figure
    data_ready
    rm -rf "$W/runs/profile"
    recipe_run "$W/data" "$W/runs/profile" --epochs 6 --max-steps 100 --eval-every 0 \
      --log-every 50 --profile-steps 10 ${CORAL_TRAIN_ARGS:-} \
      > "$R/train_profile.log" 2>&1 || { tail -n 20 "$R/train_profile.log"; exit 1; }
    head -n 3 "$W/runs/profile/profile.txt"; grep "^step" "$R/train_profile.log"
    cp "$W/runs/profile/profile.txt" "$O/profile_$N.txt"
    cp "$W/runs/profile/profile.json" "$O/profile_$N.json"
    cp "$W/runs/profile/metrics.jsonl" "$O/profile_metrics_$N.jsonl"  # the steps 51-100 rate
    cp "$R/train_profile.log" "$O/train_profile_$N.log" ;;
  router)  # stage 2 of the finished long run once per ROUTER_SWEEP group count, all at its
           # active share (equal k x G rows: one head cost, so recall alone decides), on
           # one pass of the drafter over the data; the best by recall@k on the run's
           # held-out split (never a test set) is what ship exports. The table is written
           # last and marks the stage done; one cut off by the deadline chose nothing and
           # the next call starts it over (minutes on a GPU).
    long_done || { echo "long: not done"; exit 3; }
    sweep=$W/runs/long/router_sweep.json
    if [ ! -f "$sweep" ]; then
      data_ready  # the run's held-out split and training counts come from its data
      left=$(left_min 0.5)  # (`timeout 0m` would not stop it at all)
      if python3 -c "import sys; sys.exit($left >= 1)"; then
        echo "router: not started ($left min left); the next call starts it"; exit 0
      fi
      # --data, --target: where they are now (the run's config holds the paths it was
      # trained with, elsewhere when the run was restored under another CORAL_WORK)
      timeout "${left}m" python3 -m coral_vllm.cli train router --out "$W/runs/long" \
        --data "$W/data" --target "$M" --sweep-groups $ROUTER_SWEEP ${CORAL_ROUTER_ARGS:-} \
        > "$R/router_sweep.log" 2>&1
      echo "router: exit $?"
    fi
    [ -f "$sweep" ] || { tail -n 5 "$R/router_sweep.log"; exit 3; }
    grep -E '^ +g[0-9]+-k|^chosen' "$R/router_sweep.log"
    cp "$sweep" "$O/router_sweep_$N.json" ;;
  pinned)  # the router drafter with its first P groups pinned (the frequency partition's
            # most frequent tokens always scored, the router picking the other k - P; see
            # docs/training.md), P chosen by vLLM's tau on the run's dev prompts (never a
            # test set) among 0 (the router alone) and CORAL_PINNED (default: stage 2's
            # candidates, k/4 k/2 3k/4 of its top_k_groups) -> drafters/long-pinned. CORAL_PINNED_CHOSEN=P (an earlier
            # lease's choice, $O/pinned_dev_tau_$N.json) makes it without the sweep.
    [ -d "$W/drafters/long-router" ] || { echo "pinned: no long-router drafter (ship's export)"; exit 3; }
    if [ -z "${CORAL_PINNED_CHOSEN:-}" ]; then
      data_ready
      pins=${CORAL_PINNED:-$(python3 -c "import json, sys
from coral_vllm.training.router_train import pinned_candidates  # stage 2's candidates
k = json.load(open(sys.argv[1]))['coral']['top_k_groups']
print(*[p for p in pinned_candidates(k) if p])" "$W/drafters/long-router/config.json")}
      specs="p0=$W/drafters/long-router"
      for p in $pins; do
        variant long-router "long-router-p$p" "pinned_groups=$p" || exit 1
        specs="$specs p$p=$W/drafters/long-router-p$p"
      done
      python3 -m coral_vllm.cli train vllm-tau --target "$M" --data "$W/data" --k 5 \
        --drafters $specs --json "$R/pinned_dev_tau_$N.json" ${CORAL_TAU_ARGS:-} 2>&1 | grep '^{' || exit 1
      cp "$R/pinned_dev_tau_$N.json" "$O/"
      CORAL_PINNED_CHOSEN=$(python3 -c "import json, sys
rows = json.load(open(sys.argv[1]))['rows']  # the best vLLM tau; ties to fewer pinned groups
best = max(rows, key=lambda r: (r['vllm_tau'], -int(r['drafter'][1:])))
print(best['drafter'][1:])" "$R/pinned_dev_tau_$N.json") || exit 1
    fi
    echo "pinned: P = $CORAL_PINNED_CHOSEN"
    variant long-router long-pinned "pinned_groups=$CORAL_PINNED_CHOSEN" ;;
  ship)  # the finished long run exported three ways (router: CORAL, with the router,
         # partition and group count the router stage chose; dense: the EAGLE head;
         # static: the frequency partition's first groups of that grouping, at the
         # router's active rows); vLLM's tau at k=5 (and every smaller k) on all of
         # MT-bench and HumanEval (T=0; the heads' engines side by side on the one
         # GPU, the same counters); bench e2e at CORAL_SHIP_K (3 5), batch 1, T=0,
         # MT-bench, plain vs the CORAL_SHIP_E2E heads (router). Other targets:
         # CORAL_ACCEPTANCE_ARGS (e.g. `-k 6 --datasets humaneval mtbench gsm8k`),
         # CORAL_E2E_ARGS (later flags win); CORAL_SHIP_TABLES (acceptance e2e) picks tables,
         # CORAL_SHIP_TAU (router dense static) the acceptance table's heads, CORAL_SHIP_TAG
         # a suffix for its file (acceptance_NAME_TAG.json)
    # shared: the router drafter with one set of groups per draft step (group_sharing
    # batch), made from long-router when CORAL_SHIP_E2E names it
    declare -A as=([router]=coral [dense]=dense-head [static]=static [shared]=coral-shared
      [pinned]=coral-pinned)
    heads_used=$(printf '%s\n' ${CORAL_SHIP_TAU:-router dense static} ${CORAL_SHIP_E2E:-router} | awk '!seen[$0]++')
    for head in $heads_used; do  # exported here, or sent back by an earlier lease
      [ -n "${as[$head]:-}" ] || { echo "CORAL_SHIP_TAU / CORAL_SHIP_E2E: no head $head; choose of ${!as[*]}"; exit 2; }
      [ -d "$W/drafters/long-$head" ] || [ "$head" = shared ] || [ "$head" = pinned ] && continue
      long_done || { echo "long: not done"; exit 3; }
      [ -f "$W/runs/long/router_sweep.json" ] || { echo "router: not done (run that stage)"; exit 3; }
    done
    for head in $heads_used; do
      case $head in  # router, static, shared: the grouping the router stage chose
        dense) flag=--dense ;; static) flag="--selection static --router-sweep" ;;
        *) flag=--router-sweep ;;
      esac
      if [ "$head" = shared ]; then variant long-router long-shared group_sharing=batch || exit 1; fi
      if [ "$head" = pinned ] && [ ! -d "$W/drafters/long-pinned" ]; then
        echo "ship: no long-pinned drafter; run the pinned stage first"; exit 3
      fi
      [ -d "$W/drafters/long-$head" ] || python3 -m coral_vllm.cli train export --run "$W/runs/long" \
        --dest "$W/drafters/long-$head" $flag --dtype bfloat16 > /dev/null || exit 1
    done
    heads() { for h in "$@"; do printf '%s=%s ' "${as[$h]}" "$W/drafters/long-$h"; done; }
    tables=" ${CORAL_SHIP_TABLES:-acceptance e2e} "  # one lease may take the tau table, the next the timings
    tag=${CORAL_SHIP_TAG:+_$CORAL_SHIP_TAG}  # a later table beside the first (e.g. pinned)
    if [[ $tables == *" acceptance "* ]]; then
      tau_heads=(${CORAL_SHIP_TAU:-router dense static})  # their engines side by side
      python3 -m coral_vllm.cli bench acceptance --model "$M" --drafters $(heads "${tau_heads[@]}") \
        -k 5 --limit 164 --max-tokens 256 --engines ${#tau_heads[@]} \
        --out "$R/acceptance_$N$tag.json" ${CORAL_ACCEPTANCE_ARGS:-} \
        2>&1 | grep -v "^INFO\|^(\|^WARN" | tail -n 9
      cp "$R/acceptance_$N$tag.json" "$O/"
    fi
    [[ $tables == *" e2e "* ]] || exit 0
    for k in ${CORAL_SHIP_K:-3 5}; do
      python3 -m coral_vllm.cli bench e2e --model "$M" -k "$k" --drafters $(heads ${CORAL_SHIP_E2E:-router}) \
        --datasets mtbench --temperatures 0 --concurrency 1 --requests 16 --repeats 5 \
        --speedup-target 1.4 \
        --out "$R/e2e_${N}_k$k.json" --log-dir "$R/logs_e2e_k$k" ${CORAL_E2E_ARGS:-} 2>&1 \
        | grep -v "^INFO\|^(" | tail -n 6
      cp "$R/e2e_${N}_k$k.json" "$O/"
    done ;;
  levers)  # one run per lever (the CORAL preset on data/, CORAL_LEVER_EPOCHS (4) epochs,
           # one flag changed), in order, CORAL_LEVER_PARALLEL (1) at a time, while a run
           # can still make CORAL_MIN_RUN_MIN (4) minutes of progress; each resumed from
           # what came back until DONE; then the table by dev tau, and vLLM's tau on the
           # dev prompts for the best two. One at a time: on an H200, 3 side by side
           # trained at ~75k + 65k + 46k tokens/s (186k together), one alone at 236k (medians,
           # another lease; benchmarks/results/train_throughput_levers_side_by_side.json).
    data_ready
    unpack_metrics levers
    todo=(); for spec in $LEVERS; do [ -f "$W/runs/lever-${spec%%:*}/DONE" ] || todo+=("$spec"); done
    P=${CORAL_LEVER_PARALLEL:-1}
    for ((i = 0; i < ${#todo[@]}; i += P)); do
      left=$(left_min 1.5)
      python3 -c "import sys; sys.exit($left < ${CORAL_MIN_RUN_MIN:-4})" \
        || { echo "levers: ${todo[*]:i} not run ($left min left)"; break; }
      for spec in "${todo[@]:i:P}"; do
        name=lever-${spec%%:*} flags=${spec#*:}
        ( recipe_run "$W/data" "$W/runs/$name" --epochs "${CORAL_LEVER_EPOCHS:-4}" \
            --eval-every 200 --log-every 50 --time-limit-min "$left" ${flags//,/ } \
            ${CORAL_TRAIN_ARGS:-} >> "$R/train_$name.log" 2>&1
          grep -q "^stage 1 done" "$R/train_$name.log" && touch "$W/runs/$name/DONE" \
            && cp "$R/train_$name.log" "$W/runs/$name/train.log"
          echo "$name: $(grep -E '^eval|done|stopped' "$R/train_$name.log" | tail -n 1)" ) &
      done
      wait
    done
    done_runs=$(for spec in $LEVERS; do n=${spec%%:*}; [ -f "$W/runs/lever-$n/DONE" ] \
      && printf '%s=%s ' "$n" "$W/runs/lever-$n"; done)
    [ -f "$W/runs/lever-${LEVERS%%:*}/DONE" ] || { echo "levers: the baseline is not done yet"; exit 0; }
    python3 -m coral_vllm.cli bench training ablation --runs $done_runs --out "$R/ablation.json" \
      || exit 1
    cp "$R/ablation.json" "$O/"
    for spec in $LEVERS; do  # vLLM's tau (an engine start per drafter) once, at the end
      [ -f "$W/runs/lever-${spec%%:*}/DONE" ] || { echo "levers: not all done; no vLLM tau yet"; exit 0; }
    done
    best=$(python3 -c "import json; r = json.load(open('$R/ablation.json'))['rows']
print(' '.join(x['lever'] for x in sorted(r, key=lambda x: -x['heldout_tau'])[:2]))")
    for n in $best; do
      [ -d "$W/drafters/lever-$n" ] || python3 -m coral_vllm.cli train export \
        --run "$W/runs/lever-$n" --dest "$W/drafters/lever-$n" --dtype bfloat16 > /dev/null
    done
    python3 -m coral_vllm.cli train vllm-tau --target "$M" --data "$W/data" --k 5 \
      --drafters $(for n in $best; do printf '%s=%s ' "$n" "$W/drafters/lever-$n"; done) \
      --json "$R/levers_vllm_tau_dev.json" ${CORAL_TAU_ARGS:-} 2>&1 | grep '^{' | tail -n 2
    python3 -m coral_vllm.cli bench training ablation --runs $done_runs \
      --vllm-tau "$R/levers_vllm_tau_dev.json" --out "$R/ablation.json" && cp "$R/ablation.json" "$O/" ;;
  collect)  # for the commands that wait on a job: what it made so far (the replies, the
            # manifests, logs, run metrics) packed into $W/outbox, then sent to $OUT at
            # most 8 files / 60 MiB a command: `collect more` sends the rest, if any;
            # `collect feed` (a job's last stage; `collect more feed` after a collect)
            # keeps refilling the job's OUT as the waiting commands send it
    X=$W/outbox
    if [[ " $* " != *" more "* ]]; then  # collect, collect feed: pack afresh
      rm -rf "$X" && mkdir -p "$X"
      # the replies, unless the data stage sent them or they came up from here
      [ -d "$W/data/parts" ] && [ ! -f "$W/data/parts.packed" ] \
        && [ -z "$(find -L .gpu-data -name "$N-data*.tar.xz.00" 2>/dev/null)" ] \
        && O=$X pack data data/parts --exclude='*.tmp'
      [ -f "$W/data/manifest.json" ] && cp "$W/data/manifest.json" "$X/dataset_manifest_$N.json"
      [ -f "$W/data-trim/manifest.json" ] && cp "$W/data-trim/manifest.json" "$X/dataset_manifest_${N}_trim.json"
      tar -C "$R" -czf "$X/$N-logs.tgz" . 2>/dev/null
      runs=$(cd "$W" && ls -d runs/loops-* 2>/dev/null | while read -r d; do \
        for f in metrics.jsonl train_config.json; do [ -f "$d/$f" ] && echo "$d/$f"; done; done)
      [ -z "$runs" ] || tar -C "$W" -czf "$X/$N-loops.tgz" $runs
      # the long run: its metrics first (small); whole (state included: the next lease
      # resumes it) while unfinished; finished but not exported (ship did not get to it),
      # its best.pt and log without the state (the optimizer's moments: 2/3 of it), what
      # router and ship need; its drafters in pieces (Qwen's: ~100 MB each)
      [ -d "$W/runs/long" ] && tar -C "$W" -czf "$X/$N-long-metrics.tgz" \
        $(cd "$W" && ls runs/long/{metrics.jsonl,train_config.json,router_sweep.json,profile.txt,profile.json} \
          runs/profile/profile.txt runs/profile/profile.json 2>/dev/null)
      if ! long_done; then
        [ -d "$W/runs/long" ] && O=$X pack run-long runs/long
      elif [ -z "$(ls -d "$W"/drafters/long-* 2>/dev/null)" ]; then
        cp "$R/train_long.log" "$W/runs/long/" 2>/dev/null
        O=$X pack run-long runs/long --exclude=state
      fi
      for d in $(cd "$W" && ls -d drafters/*/ 2>/dev/null); do  # each restored on its own
        d=${d%/}; case $d in drafters/long-shared|drafters/long-pinned|drafters/long-router-p*)
          continue ;; esac  # variants of long-router, remade from it (the pinned choice: its json)
        O=$X pack "drafter-${d#drafters/}" "$d"
      done
      # the lever runs: finished ones' metrics, the others whole (resumed next lease)
      done_levers=$(cd "$W" && for d in runs/lever-*/DONE; do d=${d%/DONE}; [ -d "$d" ] && \
        echo "$d/DONE $d/metrics.jsonl $d/train_config.json $d/train.log"; done)
      [ -z "$done_levers" ] || tar -C "$W" -czf "$X/$N-levers.tgz" $done_levers
      for d in $(cd "$W" && ls -d runs/lever-* 2>/dev/null); do
        [ -f "$W/$d/DONE" ] || O=$X pack "run-${d#runs/}" "$d" --exclude=best.pt
      done
    fi
    batch() {  # the outbox's next 8 files / 60 MiB -> $O
      local f size sent=0 bytes=0
      for f in $(ls "$X" | sort); do
        size=$(stat -c %s "$X/$f")
        [ $((bytes + size)) -gt $((60 << 20)) ] || [ "$sent" -ge 8 ] && break
        mv "$X/$f" "$O/" && sent=$((sent + 1)) bytes=$((bytes + size))
      done
    }
    if [[ " $* " == *" feed "* ]]; then  # in a job whose $O other commands send (gpu_job.sh
      # send moves what it sent out of it): the next batch each time $O is empty, until
      # the outbox is, or 10 minutes past the deadline
      while [ -n "$(ls "$X")" ] && [ "$(date +%s)" -lt $((DEADLINE + 600)) ]; do
        [ -z "$(find "$O" -maxdepth 1 -type f -print -quit)" ] && batch; sleep 3
      done
    else
      batch
    fi
    ls -l "$O"; left=$(ls "$X" | wc -l)
    [ "$left" = 0 ] && echo "outbox empty" || echo "$left file(s) left: run \`collect more\`" ;;
  curves)
    train_runs runs $(for p in $PRESETS; do printf '%s:%s:--export ' "$p" "$p"; done) ;;
  scaling)  # multi-GPU host: the CORAL preset at 1, 2, 4, 8 GPUs, same global batch
    n_gpu=$(nvidia-smi -L | wc -l)
    for g in 1 2 4 8; do
      [ "$g" -gt "$n_gpu" ] && break
      python3 -m torch.distributed.run --standalone --nproc-per-node "$g" -m coral_vllm.cli \
        train train --preset coral --target "$M" --data "$W/data" --out "$W/scaling/$g" \
        --epochs 1 --lr 3e-4 --batch-tokens 32768 --grad-accum $(( 8 / g )) \
        --max-steps "${CORAL_SCALING_STEPS:-120}" --eval-every 0 --log-every 10 \
        ${CORAL_TRAIN_ARGS:-} > "$R/scaling_$g.log" 2>&1
      echo "$g GPU(s): exit $? $(grep -E '^eval' "$R/scaling_$g.log" | tail -n 1)"
    done
    python3 -m coral_vllm.cli bench training scaling \
      --runs $(for g in 1 2 4 8; do [ -d "$W/scaling/$g" ] && printf '%s=%s ' "$g" "$W/scaling/$g"; done) \
      --out "$R/train_scaling.json"
    cp "$R"/train_scaling.* "$R"/scaling_*.log "$O/" ;;
  ablate)
    train_runs ablation $(for spec in $ABLATIONS; do printf 'abl-%s:coral:%s ' "${spec%%:*}" "${spec#*:}"; done)
    base=${ABLATIONS%%:*}
    [ -f "$W/runs/abl-$base/DONE" ] && python3 -m coral_vllm.cli bench training ablation \
      --runs $(for spec in $ABLATIONS; do n=${spec%%:*}; [ -f "$W/runs/abl-$n/DONE" ] && \
               printf '%s=%s ' "$n" "$W/runs/abl-$n"; done) --out "$O/ablation.json" ;;
  finish)  # on the lease of `curves`, or a later one with its files in .gpu-data/
    restore_runs
    python3 -m coral_vllm.cli train vllm-tau --target "$M" --data "$W/data" \
      --drafters $(for p in $PRESETS; do printf '%s=%s ' "$p" "$W/drafters/$p"; done) \
      --k 5 --json "$R/vllm_tau_dev.json" ${CORAL_TAU_ARGS:-} 2>&1 | grep '^{' | tail -n 5
    earlier=$R/train_throughput.json; [ -f "$earlier" ] || earlier=benchmarks/results/train_throughput.json
    python3 -m coral_vllm.cli bench training throughput --runs $(runs) \
      --extend "$earlier" --out "$R/train_throughput.json" | tail -n 3
    python3 -m coral_vllm.cli bench training curve --runs $(runs) --vllm-tau "$R/vllm_tau_dev.json" \
      --out "$R/learning_curve.json"
    cp "$R"/vllm_tau_dev.json "$R"/train_throughput.json "$R"/learning_curve.* "$O/" ;;
esac
