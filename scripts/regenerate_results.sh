#!/usr/bin/env bash
# Rerun the default campaign and every ablation in results/, one after the other, and export their reports.
# usage: [FORCE=1] scripts/regenerate_results.sh [NAME ...]   (no NAME = all; run directories go to runs/NAME)
# A finished runs/NAME of the same recipe is only re-exported (nothing is recomputed); one made by another
# recipe (an older default) is refused unless FORCE=1, which starts it again.
set -euo pipefail
set -f  # no globbing: arguments such as rs.temperatures=[1.0,0.9] stay as written
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
declare -A RUNS=(
  [tinyworld-rs+ppo]=""
  [ablation-mode-rs]="--mode rs"
  [ablation-mode-ppo]="--mode ppo"
  [ablation-scorer-helpful]="--set scorer.kind=helpful"
  [ablation-scorer-safety]="--set scorer.kind=safety"
  [ablation-pool-all]="--set rs.pool=all"
  [ablation-margin-none]="--set reward.helpful.margin=none --set reward.safety.margin=none"
  [ablation-margin-large]="--set reward.helpful.margin=large --set reward.safety.margin=large"
  [ablation-no-refresh]="--set reward.refresh=false"
  [ablation-rs-n16]="--set rs.n=16"
  [ablation-rs-temp]="--set rs.temperatures=[1.0,0.9,0.8,0.7,0.7]"
  [ablation-ppo-from-v5]="--set campaign.ppo_from_round=5"
  [ablation-sft-epochs8]="--set sft.epochs=8"
  [ablation-refresh-8]="--set reward.refresh_comparisons_per_prompt=8"
  [ablation-refresh-32]="--set reward.refresh_comparisons_per_prompt=32"
  [ablation-refresh-32-seed1]="--set reward.refresh_comparisons_per_prompt=32 --set seed=1"
  [ablation-refresh-32-seed2]="--set reward.refresh_comparisons_per_prompt=32 --set seed=2"
  [ablation-refresh-32-no-replay]="--set reward.refresh_comparisons_per_prompt=32 --set reward.refresh_replay=0"
  [ablation-refresh-epochs2]="--set reward.refresh_epochs=2"
  [ablation-rm-lr2e-3]="--set reward.helpful.learning_rate=2e-3 --set reward.safety.learning_rate=2e-3"
  [ablation-ppo-strong]="--set ppo.learning_rate=3e-4 --set ppo.iterations=24"
  [ablation-ppo-lr3e-4]="--set ppo.learning_rate=3e-4"
  [ablation-safety-weight3]="--set sft.safety_weight=3"
  [ablation-safety-weight3-seed1]="--set sft.safety_weight=3 --set seed=1"
  [ablation-refresh-32-safety-weight3]="--set reward.refresh_comparisons_per_prompt=32 --set sft.safety_weight=3"
  [default-seed1]="--set seed=1"
  [default-seed2]="--set seed=2"
)
ORDER=(tinyworld-rs+ppo ablation-mode-rs ablation-mode-ppo ablation-scorer-helpful ablation-scorer-safety
       ablation-pool-all ablation-margin-none ablation-margin-large ablation-no-refresh
       ablation-rs-n16 ablation-rs-temp ablation-ppo-from-v5 ablation-sft-epochs8
       ablation-refresh-8 ablation-refresh-32 ablation-refresh-32-seed1 ablation-refresh-32-seed2
       ablation-refresh-32-no-replay ablation-refresh-epochs2 ablation-rm-lr2e-3 ablation-ppo-strong
       ablation-ppo-lr3e-4 ablation-safety-weight3
       ablation-safety-weight3-seed1 ablation-refresh-32-safety-weight3
       default-seed1 default-seed2)
names=("$@"); [ ${#names[@]} -eq 0 ] && names=("${ORDER[@]}")
for name in "${names[@]}"; do
  [ -v "RUNS[$name]" ] || { echo "unknown result: $name (one of: ${ORDER[*]})" >&2; exit 2; }
  args=${RUNS[$name]}
  force=(); [ "${FORCE:-0}" = 1 ] && force=(--force)
  # shellcheck disable=SC2086
  "$BIN"/iterative-rlhf round --n 5 --out "runs/$name" $args "${force[@]}"
  scripts/export_run.sh "runs/$name" "$name" "iterative-rlhf round --n 5 --out runs/$name${args:+ $args}"
  if [ "$name" = tinyworld-rs+ppo ]; then scripts/ppo_gain.sh "runs/$name"; fi  # RS vs PPO gold per round
done
# Every committed campaign side by side (results/compare), the last policies at 128 samples per eval prompt
# (results/precise-eval, when every campaign was named), and the gold table of results/README.md.
set +f
"$BIN"/iterative-rlhf compare results/tinyworld-rs+ppo results/ablation-* results/default-seed* --out results/compare
if [ $# -eq 0 ]; then "$BIN"/python scripts/precise_eval.py; fi
"$BIN"/python scripts/results_table.py
