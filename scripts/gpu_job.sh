#!/usr/bin/env bash
# A GPU-host job that outlives the command that starts it. A host command may run for
# 10 minutes, but a lease holds the host for 30: work longer than one command (data
# generation, then training) runs as one job in its own session, and the commands after
# the one that starts it (issued back to back, since an idle host is given back after
# ~30 s) wait for it and bring back what it has made so far.
#   bash scripts/gpu_job.sh start NAME CMD...   run CMD detached; log in $CORAL_JOBS/NAME.log
#   bash scripts/gpu_job.sh wait NAME MINUTES [DIR]
#                                               until the job ends, MINUTES pass or DIR (a
#                                               job's OUT) holds a file to send, then the
#                                               log's tail; exit: the job's status once it
#                                               ended, 99 while it still runs, 3 at once
#                                               when this host never ran it. With DIR the
#                                               call can send what the job made as soon as
#                                               it is made, not when the minutes are up
#   bash scripts/gpu_job.sh send DIR            what DIR (a job's OUT) holds and no earlier
#                                               call sent -> $OUT, within what one reply
#                                               brings back (8 files, 60 MiB, counting what
#                                               $OUT holds): pieces (*.tar.xz.NN) first, as
#                                               the rest is small and remade; sent files move
#                                               to DIR/sent (kept for a retry); prints what is
#                                               left. A plain `cp DIR/* $OUT` past 8 files
#                                               loses the rest silently (session 6 lost its
#                                               generated data that way).
# Jobs live in $CORAL_JOBS (default /root/coral-jobs), gone with the host.
set -uo pipefail
J=${CORAL_JOBS:-/root/coral-jobs}
mkdir -p "$J"
case "${1:?start NAME CMD... | wait NAME MINUTES | send DIR}" in
  start)
    name=${2:?name}; shift 2
    rm -f "$J/$name.rc"
    # setsid: the job is not in this command's process group, so it is not ended when
    # the command returns; its status goes to NAME.rc when it ends
    setsid bash -c '"${@:2}"; echo $? > "$1"' _ "$J/$name.rc" "$@" \
      > "$J/$name.log" 2>&1 < /dev/null &
    echo "started $name (pid $!), log $J/$name.log" ;;
  wait)
    name=${2:?name}
    # no log: this host never ran the job, so the lease's host was replaced (session 8 lost
    # one between two calls) and the job and its files went with it; say so now rather
    # than spend the call's minutes waiting on nothing
    [ -f "$J/$name.log" ] || { echo "no job $name on this host: a fresh host (the job's" \
      "host was given back, and its job and files with it); start again"; exit 3; }
    until=$(python3 -c "import time; print(int(time.time() + 60 * ${3:?minutes}))")
    dir=${4:-}
    to_send() { [ -n "$dir" ] && [ -n "$(find "$dir" -maxdepth 1 -type f -print -quit 2>/dev/null)" ]; }
    while [ ! -f "$J/$name.rc" ] && [ "$(date +%s)" -lt "$until" ] && ! to_send; do sleep 5; done
    tail -n "${CORAL_JOB_TAIL:-30}" "$J/$name.log"
    if [ -f "$J/$name.rc" ]; then
      echo "$name ended: exit $(cat "$J/$name.rc")"; exit "$(cat "$J/$name.rc")"
    fi
    to_send && echo "$name still running; files to send in $dir" || echo "$name still running"
    exit 99 ;;
  send)
    dir=${2:?dir}; out=${OUT:?OUT: the folder whose files come back}
    mkdir -p "$dir/sent"
    files=$(find "$out" -maxdepth 1 -type f | wc -l)
    bytes=$(find "$out" -maxdepth 1 -type f -printf '%s\n' | awk '{s += $1} END {print s + 0}')
    left=0
    for f in $(cd "$dir" && { ls -p | grep -v / | grep -E '\.tar\.xz\.[0-9]+$'; \
                              ls -p | grep -v / | grep -vE '\.tar\.xz\.[0-9]+$'; }); do
      size=$(stat -c %s "$dir/$f")
      if [ "$files" -ge 8 ] || [ $((bytes + size)) -gt $((60 << 20)) ]; then
        left=$((left + 1)); continue
      fi
      cp "$dir/$f" "$out/" && mv "$dir/$f" "$dir/sent/" && files=$((files + 1)) bytes=$((bytes + size))
    done
    [ "$left" = 0 ] && echo "send: all sent" || echo "send: $left file(s) left in $dir: send again" ;;
  *) echo "unknown verb $1: start | wait | send" >&2; exit 2 ;;
esac
