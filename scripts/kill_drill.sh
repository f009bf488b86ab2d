#!/usr/bin/env bash
# Kill drill: one small run is SIGKILLed at KILLS random moments, each kill followed by `sdp run` again
# (which resumes from the run's checkpoint); the final metrics.csv must equal an uninterrupted run's
# apart from the wall-clock columns (img_per_s, wall_s), and each kill must lose less than one checkpoint
# interval (CKPT_STEPS optimizer steps) of work.
#
# Usage: scripts/kill_drill.sh [KILLS]          (default 10; needs target/release/sdp: cargo build --release)
# Env:   SDP=path/to/sdp  CKPT_STEPS=5  KEEP=1 (keep the work folder)
# Cost:  about 3× one uninterrupted run of the built-in spec (SDP, K = 2, 64 steps): ~1 minute on 2 cores.
set -euo pipefail

kills=${1:-10}
sdp=${SDP:-target/release/sdp}
ckpt_steps=${CKPT_STEPS:-5}
work=$(mktemp -d /tmp/kill-drill.XXXXXX)
[ -n "${KEEP:-}" ] || trap 'rm -rf "$work"' EXIT

cat > "$work/drill.toml" <<'EOF'
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
epochs = 4
batch_size = 16
augment = { crop_pad = 2, flip = true }

[optim]
lr = 0.05
momentum = 0.9
weight_decay = 5e-4
schedule = "cosine"

[method]
kind = "sdp"
workers = 2
masking = "block"
regime = "forward"
coverage = 0.5
EOF

# metrics.csv without the wall-clock columns.
clockless() {
    awk -F, 'NR == 1 { for (i = 1; i <= NF; i++) if ($i != "img_per_s" && $i != "wall_s") keep[i] = 1 }
             { line = ""; for (i = 1; i <= NF; i++) if (i in keep) line = line (line == "" ? "" : ",") $i; print line }' "$1"
}

id=$("$sdp" check "$work/drill.toml" 2>/dev/null | cut -f2)
echo "run $id; work folder $work"

t0=$(date +%s.%N)
"$sdp" run "$work/drill.toml" --results-dir "$work/reference" 2> "$work/reference.log"
ref_s=$(echo "$(date +%s.%N) - $t0" | bc)
echo "uninterrupted run: ${ref_s} s (training and the memory probe)"

run_dir="$work/killed/drill/$id"
ckpt_step() { sed -n 's/.*"step": \([0-9]*\).*/\1/p' "$run_dir/checkpoint/checkpoint.json" 2>/dev/null | head -1; }
max_lost=0
landed=0
for k in $(seq 1 "$kills"); do
    # A random moment within about twice an even share of the run, so that most kills land mid-run.
    delay=$(awk -v r="$RANDOM" -v t="$ref_s" -v n="$kills" 'BEGIN { printf "%.2f", 0.3 + (r / 32767) * 2 * t / n }')
    "$sdp" run "$work/drill.toml" --results-dir "$work/killed" --checkpoint-steps "$ckpt_steps" \
        --progress-secs 0 2> "$work/kill-$k.log" &
    pid=$!
    sleep "$delay"
    if kill -9 "$pid" 2>/dev/null; then
        wait "$pid" 2>/dev/null || true
        # Steps done when killed (the last progress line), and where the checkpoint will resume.
        done_step=$(sed -n 's/.* step \([0-9]*\)\/[0-9]* loss .*/\1/p' "$work/kill-$k.log" | tail -1)
        resume=$(ckpt_step)
        lost=$(( ${done_step:-0} - ${resume:-0} ))
        [ "$lost" -lt 0 ] && lost=0
        [ "$lost" -gt "$max_lost" ] && max_lost=$lost
        landed=$((landed + 1))
        echo "kill $k after ${delay} s: at step ${done_step:-0}, checkpoint at step ${resume:-none}, lost $lost step(s)"
    else
        wait "$pid" || true
        echo "kill $k after ${delay} s: the run had already ended"
    fi
done

"$sdp" run "$work/drill.toml" --results-dir "$work/killed" 2> "$work/final.log"
status=$(sed -n 's/.*"status": "\([^"]*\)".*/\1/p' "$run_dir/manifest.json")
resumes=$(tr -d ' \n' < "$run_dir/manifest.json" | sed -n 's/.*"resumed_at_steps":\[\([0-9,]*\)\].*/\1/p')
echo "final status: $status; resumed at steps: ${resumes:-none}"
echo "kills that landed mid-run: $landed of $kills; most work lost by one kill: $max_lost step(s) (checkpoint every $ckpt_steps)"
if diff <(clockless "$work/reference/drill/$id/metrics.csv") <(clockless "$run_dir/metrics.csv"); then
    echo "PASS: metrics.csv equals the uninterrupted run's (wall-clock columns aside)"
else
    echo "FAIL: metrics.csv differs from the uninterrupted run's"
    exit 1
fi
