#!/usr/bin/env bash
# The ablation behind quest_12_2's defaults, at the Quickstart's budget (4,000 shipped digits, batch 32, about
# 4 min of training on a 2-core CPU): each row trains with some of the script's choices switched back to the
# spec, then bench_ddpm.py quality scores 256 DDPM-300 and 256 DDIM samples (confident share, classes, Frechet
# distance in the judge's features vs real-vs-real), with the --guidance, --eta and --sample-steps the row's script
# ran with. Rows are cumulative down to "ddim-100" (today's Quickstart); the rows after it are variants measured and
# not kept.
#   bash bench/ddpm_ablation.sh [OUT_DIR] [SEEDS] [ROWS]      e.g. bash bench/ddpm_ablation.sh bench/out/ablation "0 1" 'narrow'
# ROWS: a regular expression picking rows by name (default: all). Finished rows are read back, not rerun.
# On a 2-core CPU a row takes about as long as the Quickstart plus 2 min of scoring; on a GPU, seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/out/ablation}; seeds=${2:-0}; pick=${3:-.}
py=${PYTHON:-python3}  # e.g. PYTHON="flock /tmp/torch.lock .venv/bin/python" on a shared machine
mkdir -p "$out"
common="--data-dir assets/mnist-5k --batch-size 32 --num-samples 8"
wide="--base-channels 32 --channel-mult 1,2,2 --epochs 15"  # the Quickstart's model before "narrow"
plain="--guidance 1 --eta 0 --sample-steps 50"  # sampling before autoguidance and stochastic DDIM
rows=(
  "spec|$wide --beta-schedule linear --lr-schedule constant --warmup-steps 0 --snr-gamma 0 --lr 1e-3 $plain"
  "scaled-betas|$wide --lr-schedule constant --warmup-steps 0 --snr-gamma 0 --lr 1e-3 $plain"
  "lr-sched|$wide --snr-gamma 0 --lr 1e-3 $plain"
  "minsnr|$wide --lr 1e-3 $plain"
  "lr2e-3|$wide $plain"
  "narrow|--base-channels 16 --epochs 30 $plain"  # 16-32-64 channels: twice the images/s, twice the epochs
  "autoguidance|--base-channels 16 --epochs 30 --eta 0 --sample-steps 50"  # guided by the EMA of epoch 8, w 2
  "ddim-eta1|--base-channels 16 --epochs 30 --sample-steps 50"  # DDIM adds fresh noise at every step
  "ddim-100|--base-channels 16 --epochs 30"  # ... over 100 steps instead of 50: today's Quickstart
  "cosine-betas|$wide --beta-schedule cosine $plain"
  "w16x148-e18|--base-channels 16 --channel-mult 1,4,8 --epochs 18 $plain"
  "w16x124-e30-lr3e-3|--base-channels 16 --epochs 30 --lr 3e-3 $plain"
  "w16x122-e35|--base-channels 16 --channel-mult 1,2,2 --epochs 35 $plain"
  "narrow-b16-e27|--base-channels 16 --epochs 27 --batch-size 16 $plain"
  "narrow-e60|--base-channels 16 --epochs 60 $plain"  # twice the Quickstart's minutes: what more compute buys
  "ddim-eta0-w3|--base-channels 16 --epochs 30 --eta 0 --guidance 3 --sample-steps 50"  # deterministic DDIM's best w
)
declare -A trained_in  # training flags -> this invocation's run with those weights: rows that differ only in
                       # sampling share one training
for seed in $seeds; do
  trained_in=()
  for row in "${rows[@]}"; do
    name=${row%%|*}; flags=${row#*|}
    [[ $name =~ $pick ]] || continue
    run="$out/$name-seed$seed"
    sampling=$(grep -oE -- '--(guidance|eta|sample-steps) [0-9.]+' <<< "$flags" || true)  # as the script samples
    training=$(sed -E 's/ ?--(guidance|eta|sample-steps) [0-9.]+//g' <<< "$flags")
    if [ ! -f "$run/ddim.json" ]; then
      if [ -n "${trained_in[$training]:-}" ]; then  # the same training and seed give the same weights: reuse them
        mkdir -p "$run" && cp "${trained_in[$training]}/checkpoint.pt" "$run/"
      else
        rm -f "$run/checkpoint.pt"  # an interrupted row's: the script refuses a new run over it, so start over
        $py quest_12_2.py $common $flags --seed "$seed" --out-dir "$run" > "$run.log" 2>&1 \
          || { echo "$name seed $seed: training failed: $(tail -1 "$run.log")" >&2; exit 1; }
      fi
      trained_in[$training]=$run
      for sampler in ddpm ddim; do
        $py bench/bench_ddpm.py quality --checkpoint "$run/checkpoint.pt" --sampler "$sampler" $sampling \
          --num-samples 256 --seed "$seed" --grid "$run/$sampler-256.png" | tail -1 > "$run/$sampler.tmp"
        mv "$run/$sampler.tmp" "$run/$sampler.json"
      done
    fi
    echo "$name seed $seed ddpm $(cat "$run/ddpm.json") ddim $(cat "$run/ddim.json")"
  done
done
