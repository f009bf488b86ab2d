#!/usr/bin/env bash
# Kill drill: one small run is SIGKILLed at KILLS random moments, each kill followed by `sdp run` again
# (which resumes from the run's checkpoint); the final metrics.csv must equal an uninterrupted run's
# apart from the wall-clock columns (img_per_s, wall_s), and each kill must lose less than one checkpoint
# interval (CKPT_STEPS optimizer steps) of work.
#
# With --ranks N (N = 2 or 4) the run is spread over N processes (`mpirun -np N`, K = 4 workers, one CPU
# thread per rank) and each kill goes to a random rank or to the launcher itself; the reference is an
# uninterrupted N-process run, and a killed rank other than 0 must be recorded as failed, naming it.
#
# Usage: scripts/kill_drill.sh [--ranks N] [KILLS]   (default 10; needs target/release/sdp: cargo build --release,
#                                                     with --features mpi for --ranks)
# Env:   SDP=path/to/sdp  CKPT_STEPS=5  KEEP=1 (keep the work folder)
# Cost:  about 3× one uninterrupted run of the built-in spec (SDP, K = 2, 64 steps): ~1 minute on 2 cores;
#        --ranks 4 (K = 4, 48 steps): ~1 minute on 2 cores.
set -euo pipefail

ranks=1
kills=10
while [ $# -gt 0 ]; do
    case "$1" in
        --ranks) ranks=$2; shift 2 ;;
        --ranks=*) ranks=${1#*=}; shift ;;
        *) kills=$1; shift ;;
    esac
done
sdp=${SDP:-target/release/sdp}
ckpt_steps=${CKPT_STEPS:-5}
work=$(mktemp -d /tmp/kill-drill.XXXXXX)
[ -n "${KEEP:-}" ] || trap 'rm -rf "$work"' EXIT

launch=("$sdp")
workers=2
epochs=4
start_s=0.3
if [ "$ranks" -gt 1 ]; then
    launch=(mpirun --oversubscribe -np "$ranks" "$sdp")
    workers=4
    epochs=6
    start_s=1.0
    export RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-1}
    if [ "$(id -u)" = 0 ]; then
        export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
    fi
fi

cat > "$work/drill.toml" <<EOF
# Kill drill: a small SDP run (block masking, forward regime) on the built-in shapes dataset.
name = "drill"
seeds = [0]

[workload]
dataset = "shapes"
train_samples = 512
test_samples = 200
model = "resnet"
widths = [8, 16]
depths = [1, 1]
epochs = $epochs
batch_size = 16
augment = { crop_pad = 2, flip = true }

[optim]
lr = 0.05
momentum = 0.9
weight_decay = 5e-4
schedule = "cosine"

[method]
kind = "sdp"
workers = $workers
masking = "block"
regime = "forward"
coverage = 0.5
EOF

# metrics.csv without the wall-clock columns.
clockless() {
    awk -F, 'NR == 1 { for (i = 1; i <= NF; i++) if ($i != "img_per_s" && $i != "wall_s") keep[i] = 1 }
             { line = ""; for (i = 1; i <= NF; i++) if (i in keep) line = line (line == "" ? "" : ",") $i; print line }' "$1"
}

# The pids of the processes whose parent is $1 (the ranks mpirun started).
children() {
    local d
    for d in /proc/[0-9]*; do
        [ "$(awk '{ print $4 }' "$d/stat" 2>/dev/null)" = "$1" ] && basename "$d"
    done
    return 0
}

# The pid of rank $2 among the children of mpirun $1.
rank_pid() {
    local p
    for p in $(children "$1"); do
        if tr '\0' '\n' < "/proc/$p/environ" 2>/dev/null | grep -qx "OMPI_COMM_WORLD_RANK=$2"; then
            echo "$p"
            return
        fi
    done
}

id=$("$sdp" check "$work/drill.toml" 2>/dev/null | cut -f2)
echo "run $id over $ranks process(es); work folder $work"

t0=$(date +%s.%N)
"${launch[@]}" run "$work/drill.toml" --results-dir "$work/reference" 2> "$work/reference.log"
ref_s=$(echo "$(date +%s.%N) - $t0" | bc)
echo "uninterrupted run: ${ref_s} s (training and the memory probe)"

run_dir="$work/killed/drill/$id"
ckpt_step() { sed -n 's/.*"step": \([0-9]*\).*/\1/p' "$run_dir/checkpoint/checkpoint.json" 2>/dev/null | head -1; }
max_lost=0
landed=0
named=0
rank_kills=0
for k in $(seq 1 "$kills"); do
    # A random moment within about twice an even share of the run, so that most kills land mid-run (after
    # the launcher's start, about 1 s, with --ranks).
    delay=$(awk -v r="$RANDOM" -v t="$ref_s" -v n="$kills" -v s="$start_s" \
        'BEGIN { printf "%.2f", s + (r / 32767) * 2 * t / n }')
    "${launch[@]}" run "$work/drill.toml" --results-dir "$work/killed" --checkpoint-steps "$ckpt_steps" \
        --progress-secs 0 2> "$work/kill-$k.log" &
    pid=$!
    sleep "$delay"
    victim=$pid
    what="the run"
    if [ "$ranks" -gt 1 ]; then
        # A random rank, or (one time in N + 1) the launcher.
        v=$((RANDOM % (ranks + 1)))
        what="the launcher"
        if [ "$v" -lt "$ranks" ]; then
            victim=$(rank_pid "$pid" "$v")
            what="rank $v"
        fi
        kids=$(children "$pid")
    fi
    if [ -n "$victim" ] && kill -0 "$pid" 2>/dev/null && kill -9 "$victim" 2>/dev/null; then
        wait "$pid" 2>/dev/null || true
        if [ "$ranks" -gt 1 ]; then
            # Every rank gone before the rerun (else the rerun would find the run held by a live rank 0).
            for _ in $(seq 1 300); do
                alive=0
                for p in $kids; do kill -0 "$p" 2>/dev/null && alive=1; done
                [ "$alive" = 0 ] && break
                sleep 0.1
            done
        fi
        # Steps done when killed (the last progress line), and where the checkpoint will resume.
        done_step=$(sed -n 's/.* step \([0-9]*\)\/[0-9]* loss .*/\1/p' "$work/kill-$k.log" | tail -1)
        resume=$(ckpt_step)
        lost=$(( ${done_step:-0} - ${resume:-0} ))
        [ "$lost" -lt 0 ] && lost=0
        [ "$lost" -gt "$max_lost" ] && max_lost=$lost
        landed=$((landed + 1))
        recorded=$(sed -n 's/.*"status": "\([^"]*\)".*/\1/p' "$run_dir/manifest.json" 2>/dev/null)
        if [ "$ranks" -gt 1 ] && [ "${what#rank }" != "$what" ] && [ "$what" != "rank 0" ]; then
            rank_kills=$((rank_kills + 1))
            case "$recorded" in "failed: $what (pid"*) named=$((named + 1)) ;; esac
        fi
        echo "kill $k ($what) after ${delay} s: at step ${done_step:-0}, checkpoint at step ${resume:-none}," \
            "lost $lost step(s); recorded: ${recorded:-nothing}"
    else
        wait "$pid" || true
        echo "kill $k after ${delay} s: the run had already ended"
    fi
done

"${launch[@]}" run "$work/drill.toml" --results-dir "$work/killed" 2> "$work/final.log"
status=$(sed -n 's/.*"status": "\([^"]*\)".*/\1/p' "$run_dir/manifest.json")
resumes=$(tr -d ' \n' < "$run_dir/manifest.json" | sed -n 's/.*"resumed_at_steps":\[\([0-9,]*\)\].*/\1/p')
echo "final status: $status; resumed at steps: ${resumes:-none}"
echo "kills that landed mid-run: $landed of $kills; most work lost by one kill: $max_lost step(s) (checkpoint every $ckpt_steps)"
if [ "$ranks" -gt 1 ]; then
    echo "kills of a rank other than 0 recorded as failed, naming the rank: $named of $rank_kills"
fi
if diff <(clockless "$work/reference/drill/$id/metrics.csv") <(clockless "$run_dir/metrics.csv"); then
    echo "PASS: metrics.csv equals the uninterrupted run's (wall-clock columns aside)"
else
    echo "FAIL: metrics.csv differs from the uninterrupted run's"
    exit 1
fi
