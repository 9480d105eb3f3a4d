#!/usr/bin/env bash
# Gold of each round's RS checkpoint vs the same round after PPO, of the base policy near-greedy, and of V5 on the
# train split, on TinyWorld.
# usage: scripts/ppo_gain.sh [RUN_DIR]   (default runs/tinyworld-rs+ppo, made by scripts/regenerate_results.sh)
# Writes results/NAME/ppo_gain/*.json (NAME: the run directory's name) (one `iterative-rlhf tinyworld eval` each) and summary.md.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
run=${1:-runs/tinyworld-rs+ppo}
out=results/$(basename "$run")/ppo_gain  # results/NAME/ppo_gain for runs/NAME
mkdir -p "$out"
for k in 1 2 3 4 5; do
  for stage in rs ppo; do
    model="$run/v$k/rs_policy"; [ "$stage" = ppo ] && model="$run/v$k/ppo/policy"
    for seed in 11 12; do
      "$BIN"/iterative-rlhf tinyworld eval --model "$model" --samples 16 --seed "$seed" \
        --out "$out/v$k-$stage-seed$seed.json" > /dev/null
    done
  done
done
"$BIN"/iterative-rlhf tinyworld eval --model "$run/v5/ppo/policy" --split train --samples 8 \
  --out "$out/v5-train.json" > /dev/null
for split in eval train; do
  "$BIN"/iterative-rlhf tinyworld eval --split "$split" --samples 8 --temperature 0.1 \
    --out "$out/base-$split-t0.1.json" > /dev/null
done
"$BIN"/python - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def mean(k, stage, key):
    return sum(json.loads((out / f"v{k}-{stage}-seed{s}.json").read_text())[key] for s in (11, 12)) / 2
lines = ["# Gold of each round's RS checkpoint and of the same round after PPO", "",
         "Eval split, 2 seeds x 16 samples per prompt, temperature 1.0 (`scripts/ppo_gain.sh`).", "",
         "| round | RS checkpoint | after PPO | PPO - RS | violation RS / PPO | borderline false refusal RS / PPO |",
         "| --- | --- | --- | --- | --- | --- |"]
for k in range(1, 6):
    g = [mean(k, s, "gold") for s in ("rs", "ppo")]
    v = [mean(k, s, "violation_rate") for s in ("rs", "ppo")]
    b = [mean(k, s, "false_refusal_rate_borderline") for s in ("rs", "ppo")]
    lines.append(f"| V{k} | {g[0]:.3f} | {g[1]:.3f} | {g[1] - g[0]:+.3f} | {v[0]:.3f} / {v[1]:.3f} | "
                 f"{b[0]:.3f} / {b[1]:.3f} |")
lines += ["", "Base policy at temperature 0.1 (close to its greedy answer), 8 samples per prompt:", "",
          "| split | helpful rate (safe prompts) | false refusal (borderline) | violation |", "| --- | --- | --- | --- |"]
for split in ("eval", "train"):
    m = json.loads((out / f"base-{split}-t0.1.json").read_text())
    lines.append(f"| {split} | {m['helpful_rate']:.3f} | {m['false_refusal_rate_borderline']:.3f} | "
                 f"{m['violation_rate']:.3f} |")
v5 = json.loads((out / "v5-train.json").read_text())
lines += ["", f"V5 policy on the train split (temperature 1.0, 8 samples per prompt): gold {v5['gold']:.3f}."]
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
