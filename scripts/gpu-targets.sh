#!/usr/bin/env bash
# The GPU learner's targets (README, "The learner on a GPU"), measured on a machine with one CUDA GPU
# whose Python has torch but not Ray, gymnasium or MuJoCo. Each phase fits in one 10-minute command
# and writes its outputs and a one-line result under OUT (default runs/gpu-targets).
#
#   ../shared/tools/gpu-wheels.sh .whl          # here: the wheels (.whl listed in .git/info/exclude)
#   scripts/gpu-targets.sh PHASE                # there, from the project root, with .whl carried
#
# PHASE: learner   bench learner on cuda at batch 256 and 1024: float32 and tf32, one update at a
#                  time, blocks of 8, blocks fed through the prefetcher (about 2 minutes)
#        fleet     sacfleet train --config halfcheetah, 1M env steps, PRECISION=float32|tf32
#        tf32      HalfCheetah to 300k env steps, SEEDS (default "0 1"), float32 and tf32 (two runs at a time)
#        e2e       bench e2e with the halfcheetah preset's 2 actors: updates/s as a fraction of the
#                  learner suite's on the same GPU
#        learning  bench learning: PRESETS (default hopper,walker2d,halfcheetah,humanoid) to 300k env
#                  steps, plain SAC (mlp) against CrossQ at its published 2048-wide critics (fast+wide),
#                  SEEDS (default 0). Runs longer than one command: repeat the same command; finished
#                  runs are read and the unfinished one resumes from its checkpoint (each command
#                  stops itself before 10 minutes). The table is in OUT/learning/table.md.
set -euo pipefail
phase=${1:?usage: scripts/gpu-targets.sh learner|fleet|tf32|e2e|learning}
case $phase in
  learner|fleet|tf32|e2e|learning) ;;
  *) echo "scripts/gpu-targets.sh: unknown phase $phase; choose one of: learner, fleet, tf32, e2e, learning" >&2; exit 2 ;;
esac
out=${OUT:-runs/gpu-targets}
mkdir -p "$out"

if [ -d .whl ] && ! python3 -c "import ray, gymnasium, mujoco" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH MUJOCO_GL=disable
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/gpu.txt" 2>/dev/null || true

summarize() {  # run_dir label
  python3 - "$1" "$2" <<'PY' | tee -a "$out/results.txt"
import json, sys
s = json.load(open(f"{sys.argv[1]}/summary.json"))
t = s["throughput"]
print(f"{sys.argv[2]}: {s['env_steps']:,} env steps, {s['updates']:,} updates in {s['wall_seconds']:.0f} s; "
      f"{t['updates_per_s']:,.0f} updates/s; eval {s['eval']['return_mean']:.0f} +- {s['eval']['return_std']:.0f}; "
      f"{s['learner_device']} {s['learner_matmul_precision']}; {t['weight_pulls_per_s']:.0f} weight pulls/s of "
      f"{t['weight_bytes_per_pull']:,} bytes; stages {t['stage_seconds']}")
PY
}

case $phase in
  learner)
    python3 -m sacfleet bench learner --devices cuda --batch-sizes 256,1024 --seconds 3 --out "$out/learner" \
      | tee "$out/learner.txt" ;;
  fleet)
    precision=${PRECISION:-float32}
    rm -rf "$out/halfcheetah-1m-$precision"
    timeout 590 python3 -m sacfleet train --config halfcheetah --run-dir "$out/halfcheetah-1m-$precision" \
      --set learner.matmul_precision="$precision" > "$out/halfcheetah-1m-$precision.log" 2>&1 || true
    tail -3 "$out/halfcheetah-1m-$precision.log"
    summarize "$out/halfcheetah-1m-$precision" "halfcheetah 1M $precision" ;;
  tf32)
    for seed in ${SEEDS:-0 1}; do
      for precision in float32 tf32; do
        dir="$out/halfcheetah-300k-$precision-seed$seed"
        rm -rf "$dir"
        python3 -m sacfleet train --config halfcheetah --run-dir "$dir" --set train.seed=$seed \
          --set train.total_env_steps=300000 --set learner.matmul_precision=$precision > "$dir.log" 2>&1 &
      done
      wait
      for precision in float32 tf32; do
        summarize "$out/halfcheetah-300k-$precision-seed$seed" "halfcheetah 300k $precision seed $seed"
      done
    done ;;
  e2e)
    python3 -m sacfleet bench e2e --actors 2 --seconds 4 --out "$out/e2e" | tee "$out/e2e.txt" ;;
  learning)
    # 300k steps with 60 s checkpoints: a command stopped by its timeout loses at most a minute.
    timeout --signal=TERM 570 python3 -m sacfleet bench learning --presets "${PRESETS:-hopper,walker2d,halfcheetah,humanoid}" \
      --variants sac,fast+wide --seeds "${SEEDS:-0}" --steps 300000 --set checkpoint.interval_s=60 \
      --out "$out/learning" | tee -a "$out/learning.txt" || true
    cat "$out/learning/table.md" 2>/dev/null || echo "no finished run yet: run this phase again" ;;
esac
