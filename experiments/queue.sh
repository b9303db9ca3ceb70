#!/usr/bin/env bash
# Run experiments/queue.txt's commands in order, SLOTS at a time (default 1; a 2-core machine runs
# at most two 1-thread runs side by side). A command taken by a slot is noted in runs/queue/taken
# and each one's output goes to runs/queue/<line number>.log; a finished one is noted in
# runs/queue/done with its exit status. Run it again to take the lines no slot has taken yet.
#
#   bash experiments/queue.sh 2 &
set -euo pipefail
cd "$(dirname "$0")/.."
slots=${1:-1}
state=runs/queue
mkdir -p "$state"
touch "$state/taken" "$state/done"

take() {  # the number of the next line that no slot has taken, noted as taken; none: fail
    exec 9>"$state/lock"
    flock 9
    local n=0 line
    while IFS= read -r line; do
        n=$((n + 1))
        [[ -z "$line" || "$line" == \#* ]] && continue
        if ! grep -qx "$n" "$state/taken"; then
            echo "$n" >>"$state/taken"
            flock -u 9
            echo "$n"
            return 0
        fi
    done <experiments/queue.txt
    flock -u 9
    return 1
}

slot() {
    local n line status
    while n=$(take); do
        line=$(sed -n "${n}p" experiments/queue.txt)
        echo "$(date -u +%FT%TZ) slot $1: line $n: $line"
        status=0
        bash -c "$line" >"$state/$n.log" 2>&1 || status=$?
        echo "$n $status $line" >>"$state/done"
        echo "$(date -u +%FT%TZ) slot $1: line $n ended (exit $status)"
    done
}

for s in $(seq 1 "$slots"); do
    slot "$s" &
done
wait
