#!/usr/bin/env bash
# The ablation behind quest_12_2's defaults: each row trains the quickstart-sized model (4,000 shipped digits,
# base 32, batch 32) with the script's defaults (linear-scaled betas, warm-up + cosine lr, Min-SNR-5, peak lr
# 2e-3) or with some of them switched back to the spec, then bench_ddpm.py quality scores 256 DDPM and 256
# DDIM-50 samples (confident share, classes, Frechet distance in the judge's features vs real-vs-real).
#   bash bench/ddpm_ablation.sh [OUT_DIR] [SEEDS] [EPOCHS] [ROWS]   e.g. bash bench/ddpm_ablation.sh bench/out/ablation "0 1" 15
# ROWS: a regular expression picking rows by name (default: all).
# On a 2-core CPU a row takes about as long as the quickstart (~5 min); on a GPU, seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/out/ablation}; seeds=${2:-0}; epochs=${3:-15}; pick=${4:-.}
py=${PYTHON:-python3}  # e.g. PYTHON="flock /tmp/torch.lock .venv/bin/python" on a shared machine
mkdir -p "$out"
common="--data-dir assets/mnist-5k --epochs $epochs --batch-size 32 --base-channels 32 --num-samples 8"
rows=(
  "spec|--beta-schedule linear --lr-schedule constant --warmup-steps 0 --snr-gamma 0 --lr 1e-3"
  "scaled-betas|--lr-schedule constant --warmup-steps 0 --snr-gamma 0 --lr 1e-3"
  "scaled+lr-sched|--snr-gamma 0 --lr 1e-3"
  "scaled+lr-sched+minsnr|--lr 1e-3"
  "default|"
)
for seed in $seeds; do
  for row in "${rows[@]}"; do
    name=${row%%|*}; flags=${row#*|}
    [[ $name =~ $pick ]] || continue
    run="$out/$name-seed$seed"
    if [ ! -f "$run/ddim.json" ]; then
      $py quest_12_2.py $common $flags --seed "$seed" --out-dir "$run" > "$run.log" 2>&1
      for sampler in ddpm ddim; do
        $py bench/bench_ddpm.py quality --checkpoint "$run/checkpoint.pt" --sampler "$sampler" --sample-steps 50 \
          --num-samples 256 --seed "$seed" --grid "$run/$sampler-256.png" | tail -1 > "$run/$sampler.tmp"
        mv "$run/$sampler.tmp" "$run/$sampler.json"
      done
    fi
    echo "$name seed $seed ddpm $(cat "$run/ddpm.json") ddim $(cat "$run/ddim.json")"
  done
done
