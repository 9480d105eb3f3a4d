#!/usr/bin/env bash
# Rerun the default campaign and every ablation in results/, one after the other, and export their reports.
# usage: [FORCE=1] scripts/regenerate_results.sh [NAME ...]   (no NAME = all; run directories go to runs/NAME)
# A finished runs/NAME of the same recipe is only re-exported (nothing is recomputed); one made by another
# recipe (an older default) is refused unless FORCE=1, which starts it again.
set -euo pipefail
set -f  # no globbing: arguments such as rs.temperatures=[1.0,0.9] stay as written
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
# Older defaults pin the ablations that were not rerun on the current one, so their commands still make them:
# PP = the previous default (RS pool = the previous round only); P = the one before (also no length-grouped RM
# batches, 16 refresh comparisons per train prompt); NOG = PP without length-grouped RM batches.
PP="--set rs.pool=previous"
P="$PP --set reward.refresh_comparisons_per_prompt=16 --set reward.helpful.group_by_length=false"
P+=" --set reward.safety.group_by_length=false"
NOG="$PP --set reward.helpful.group_by_length=false --set reward.safety.group_by_length=false"
# Other TinyWorlds: a noisy writer that is right more often and complies with fewer harmful requests.
W50="--set tinyworld.writer_correct=0.50 --set tinyworld.harmful_comply=0.50"
W56="--set tinyworld.writer_correct=0.56 --set tinyworld.harmful_comply=0.45"
BF="--set reward.helpful.mixed_precision=bf16 --set reward.safety.mixed_precision=bf16"  # RM training under bf16 autocast
# M1 = the default before this one: each round's policy is the one it trained (campaign.merge=1; now the average
# with the previous round's). Every folder below the default and its seeds was made without merging: the loop
# below puts M1 first in their commands.
M1="--set campaign.merge=1"
# D1 = the default before that: the helpfulness RM's 32 pairs per step in one forward pass (now two of 16).
# Every folder below ablation-merge-off* was made on it; their commands pin it (as PP, NOG and P do).
D1="--set reward.helpful.per_device_batch_size=32"
S2="--set sft.init=previous --set sft.epochs=2 --set sft.safety_weight=3"
S="$S2 --set campaign.holdout_from=ppo"
declare -A RUNS=(
  [tinyworld-rs+ppo]=""
  [default-seed1]="--set seed=1"
  [default-seed2]="--set seed=2"
  [default-seed3]="--set seed=3"
  [default-seed4]="--set seed=4"
  [default-seed5]="--set seed=5"
  [default-seed6]="--set seed=6"
  [default-seed7]="--set seed=7"
  [ablation-merge-off]=""
  [ablation-merge-off-seed1]="--set seed=1"
  [ablation-merge-off-seed2]="--set seed=2"
  [ablation-merge-off-seed3]="--set seed=3"
  [ablation-merge-off-seed4]="--set seed=4"
  [ablation-rm-per-device32]="$D1"
  [ablation-rm-per-device32-seed1]="$D1 --set seed=1"
  [ablation-rm-per-device32-seed2]="$D1 --set seed=2"
  [ablation-rm-per-device32-seed3]="$D1 --set seed=3"
  [ablation-rm-per-device32-seed4]="$D1 --set seed=4"
  [ablation-mode-rs]="$D1 --mode rs"
  [ablation-mode-ppo]="$D1 --mode ppo"
  [ablation-scorer-helpful]="$D1 --set scorer.kind=helpful"
  [ablation-scorer-safety]="$D1 --set scorer.kind=safety"
  [ablation-pool-previous]="$D1 $PP"
  [ablation-pool-previous-seed1]="$D1 $PP --set seed=1"
  [ablation-pool-previous-seed2]="$D1 $PP --set seed=2"
  [ablation-margin-none]="$D1 --set reward.helpful.margin=none --set reward.safety.margin=none"
  [ablation-margin-large]="$D1 --set reward.helpful.margin=large --set reward.safety.margin=large"
  [ablation-sft-safety-weight3]="$D1 --set sft.safety_weight=3"
  [ablation-sft-safety-weight3-seed1]="$D1 --set sft.safety_weight=3 --set seed=1"
  [ablation-sft-safety-weight3-seed2]="$D1 --set sft.safety_weight=3 --set seed=2"
  [ablation-ppo-safety-weight4]="$D1 --set ppo.safety_weight=4"
  [ablation-ppo-safety-weight4-seed1]="$D1 --set ppo.safety_weight=4 --set seed=1"
  [ablation-policy-h144]="$D1 --set tinyworld.hidden_size=144"
  [ablation-rs-top2]="$D1 --set rs.top_k=2"
  [ablation-rs-top2-seed1]="$D1 --set rs.top_k=2 --set seed=1"
  [ablation-no-refresh-before-ppo]="$D1 --set reward.refresh_before_ppo=false"
  [ablation-no-refresh-before-ppo-seed1]="$D1 --set reward.refresh_before_ppo=false --set seed=1"
  [ablation-no-refresh-before-ppo-seed2]="$D1 --set reward.refresh_before_ppo=false --set seed=2"
  [ablation-rm-prompts-per-batch4]="$D1 --set reward.helpful.prompts_per_batch=4 --set reward.safety.prompts_per_batch=4"
  [ablation-rm-prompts-per-batch4-seed1]="$D1 --set reward.helpful.prompts_per_batch=4 --set reward.safety.prompts_per_batch=4 --set seed=1"
  [ablation-rm-prompts-per-batch8-b64]="$D1 --set reward.helpful.prompts_per_batch=8 --set reward.helpful.batch_size=64 --set reward.helpful.per_device_batch_size=64 --set reward.safety.prompts_per_batch=8 --set reward.safety.batch_size=64 --set reward.safety.per_device_batch_size=64"
  [ablation-rm-prompts-per-batch8-b64-seed1]="$D1 --set reward.helpful.prompts_per_batch=8 --set reward.helpful.batch_size=64 --set reward.helpful.per_device_batch_size=64 --set reward.safety.prompts_per_batch=8 --set reward.safety.batch_size=64 --set reward.safety.per_device_batch_size=64 --set seed=1"
  [ablation-rm-bf16]="$D1 $BF"
  [ablation-rm-bf16-seed1]="$D1 $BF --set seed=1"
  [ablation-sft-init-previous]="$D1 --set sft.init=previous"
  [ablation-sft-init-previous-e2]="$D1 --set sft.init=previous --set sft.epochs=2"
  [ablation-sft-init-previous-e2-seed1]="$D1 --set sft.init=previous --set sft.epochs=2 --set seed=1"
  [ablation-sft-init-previous-e2-seed2]="$D1 --set sft.init=previous --set sft.epochs=2 --set seed=2"
  [ablation-sft-init-previous-e2-holdout-ppo]="$D1 --set sft.init=previous --set sft.epochs=2 --set campaign.holdout_from=ppo"
  [ablation-sft-init-previous-e2-safety-weight3]="$D1 --set sft.init=previous --set sft.epochs=2 --set sft.safety_weight=3"
  [ablation-sft-init-previous-e2-safety-weight3-seed1]="$D1 --set sft.init=previous --set sft.epochs=2 --set sft.safety_weight=3 --set seed=1"
  [ablation-sft-init-previous-e2-safety-weight3-seed2]="$D1 --set sft.init=previous --set sft.epochs=2 --set sft.safety_weight=3 --set seed=2"
  [ablation-sft-init-previous-e2-safety-weight3-holdout-ppo]="$D1 --set sft.init=previous --set sft.epochs=2 --set sft.safety_weight=3 --set campaign.holdout_from=ppo"
  [ablation-sft-init-previous-e2-safety-weight3-holdout-ppo-seed1]="$D1 --set sft.init=previous --set sft.epochs=2 --set sft.safety_weight=3 --set campaign.holdout_from=ppo --set seed=1"
  [ablation-sft-init-previous-e2-safety-weight3-holdout-ppo-seed2]="$D1 --set sft.init=previous --set sft.epochs=2 --set sft.safety_weight=3 --set campaign.holdout_from=ppo --set seed=2"
  [ablation-sft-init-previous-e2-safety-weight3-holdout-ppo-seed3]="$D1 --set sft.init=previous --set sft.epochs=2 --set sft.safety_weight=3 --set campaign.holdout_from=ppo --set seed=3"
  [ablation-sft-init-previous-e2-safety-weight3-holdout-ppo-seed4]="$D1 --set sft.init=previous --set sft.epochs=2 --set sft.safety_weight=3 --set campaign.holdout_from=ppo --set seed=4"
  [ablation-holdout-ppo]="$D1 --set campaign.holdout_from=ppo"
  [ablation-holdout-ppo-seed1]="$D1 --set campaign.holdout_from=ppo --set seed=1"
  [ablation-sft-epochs8-pool-all]="$D1 --set sft.epochs=8"
  [ablation-select-best]="$D1 --set campaign.select=best"
  [ablation-select-best-seed1]="$D1 --set campaign.select=best --set seed=1"
  [ablation-select-best-seed2]="$D1 --set campaign.select=best --set seed=2"
  [ablation-select-best-seed3]="$D1 --set campaign.select=best --set seed=3"
  [ablation-select-best-seed4]="$D1 --set campaign.select=best --set seed=4"
  [ablation-rs-temperature-search]="$D1 --set rs.temperature_search=[0.7,1.0,1.3]"
  [ablation-rs-temperature-search-seed4]="$D1 --set rs.temperature_search=[0.7,1.0,1.3] --set seed=4"
  [ablation-writer-correct0.50-comply0.50]="$D1 $W50"
  [ablation-writer-correct0.50-comply0.50-seed1]="$D1 $W50 --set seed=1"
  [ablation-writer-correct0.56-comply0.45]="$D1 $W56"
  [ablation-writer-correct0.56-comply0.45-seed1]="$D1 $W56 --set seed=1"
  [ablation-writer-correct0.56-comply0.45-seed2]="$D1 $W56 --set seed=2"
  [ablation-writer-correct0.56-comply0.45-seed3]="$D1 $W56 --set seed=3"
  [ablation-writer-correct0.56-comply0.45-sft-init-previous-e2-safety-weight3]="$D1 $W56 $S2"
  [ablation-writer-correct0.56-comply0.45-sft-init-previous-e2-safety-weight3-seed1]="$D1 $W56 $S2 --set seed=1"
  [ablation-writer-correct0.56-comply0.45-sft-init-previous-e2-safety-weight3-holdout-ppo]="$D1 $W56 $S"
  [ablation-writer-correct0.56-comply0.45-sft-init-previous-e2-safety-weight3-holdout-ppo-seed1]="$D1 $W56 $S --set seed=1"
  [ablation-writer-correct0.56-comply0.45-sft-init-previous-e2-safety-weight3-holdout-ppo-seed2]="$D1 $W56 $S --set seed=2"
  [ablation-writer-correct0.56-comply0.45-sft-init-previous-e2-safety-weight3-holdout-ppo-seed3]="$D1 $W56 $S --set seed=3"
  [ablation-ppo-kl0.01]="$D1 --set ppo.kl_coef=0.01"
  [ablation-ppo-kl0.01-seed4]="$D1 --set ppo.kl_coef=0.01 --set seed=4"
  [ablation-refresh-epochs0.5]="$D1 --set reward.refresh_epochs=0.5"
  [ablation-refresh-epochs0.5-seed4]="$D1 --set reward.refresh_epochs=0.5 --set seed=4"
  [ablation-refresh-8]="$D1 $NOG --set reward.refresh_comparisons_per_prompt=8"
  [ablation-refresh-16]="$D1 $PP --set reward.refresh_comparisons_per_prompt=16"
  [ablation-no-group-by-length]="$D1 $NOG"
  [ablation-no-group-by-length-seed1]="$D1 $NOG --set seed=1"
  [ablation-no-group-by-length-seed2]="$D1 $NOG --set seed=2"
  [ablation-refresh-32-no-replay]="$D1 $NOG --set reward.refresh_replay=0"
  [ablation-refresh-32-safety-weight3]="$D1 $NOG --set sft.safety_weight=3"
  [previous-default]="$D1 $P"
  [previous-default-seed1]="$D1 $P --set seed=1"
  [previous-default-seed2]="$D1 $P --set seed=2"
  [ablation-no-refresh]="$D1 $P --set reward.refresh=false"
  [ablation-rs-n16]="$D1 $P --set rs.n=16"
  [ablation-rs-temp]="$D1 $P --set rs.temperatures=[1.0,0.9,0.8,0.7,0.7]"
  [ablation-ppo-from-v5]="$D1 $P --set campaign.ppo_from_round=5"
  [ablation-sft-epochs8]="$D1 $P --set sft.epochs=8"
  [ablation-refresh-epochs2]="$D1 $P --set reward.refresh_epochs=2"
  [ablation-rm-lr2e-3]="$D1 $P --set reward.helpful.learning_rate=2e-3 --set reward.safety.learning_rate=2e-3"
  [ablation-ppo-strong]="$D1 $P --set ppo.learning_rate=3e-4 --set ppo.iterations=24"
  [ablation-ppo-lr3e-4]="$D1 $P --set ppo.learning_rate=3e-4"
  [ablation-safety-weight3]="$D1 $P --set sft.safety_weight=3"
  [ablation-safety-weight3-seed1]="$D1 $P --set sft.safety_weight=3 --set seed=1"
)
# The current default and the ablations on it first, then those on the previous default.
ORDER=(tinyworld-rs+ppo default-seed1 default-seed2 default-seed3 default-seed4 default-seed5 default-seed6
       default-seed7 ablation-merge-off
       ablation-merge-off-seed1 ablation-merge-off-seed2 ablation-merge-off-seed3 ablation-merge-off-seed4
       ablation-rm-per-device32
       ablation-rm-per-device32-seed1 ablation-rm-per-device32-seed2 ablation-rm-per-device32-seed3
       ablation-rm-per-device32-seed4 ablation-mode-rs ablation-mode-ppo ablation-scorer-helpful
       ablation-scorer-safety ablation-pool-previous ablation-pool-previous-seed1 ablation-pool-previous-seed2
       ablation-margin-none ablation-margin-large ablation-sft-safety-weight3 ablation-sft-safety-weight3-seed1
       ablation-sft-safety-weight3-seed2 ablation-ppo-safety-weight4 ablation-ppo-safety-weight4-seed1
       ablation-no-refresh-before-ppo ablation-no-refresh-before-ppo-seed1 ablation-no-refresh-before-ppo-seed2
       ablation-rm-prompts-per-batch4 ablation-rm-prompts-per-batch4-seed1 ablation-rm-prompts-per-batch8-b64
       ablation-rm-prompts-per-batch8-b64-seed1 ablation-rm-bf16 ablation-rm-bf16-seed1
       ablation-rs-top2 ablation-rs-top2-seed1 ablation-policy-h144
       ablation-sft-init-previous ablation-sft-init-previous-e2 ablation-sft-init-previous-e2-seed1
       ablation-sft-init-previous-e2-seed2 ablation-sft-init-previous-e2-holdout-ppo ablation-holdout-ppo
       ablation-holdout-ppo-seed1 ablation-sft-epochs8-pool-all ablation-sft-init-previous-e2-safety-weight3
       ablation-sft-init-previous-e2-safety-weight3-seed1 ablation-sft-init-previous-e2-safety-weight3-seed2
       ablation-sft-init-previous-e2-safety-weight3-holdout-ppo
       ablation-sft-init-previous-e2-safety-weight3-holdout-ppo-seed1
       ablation-sft-init-previous-e2-safety-weight3-holdout-ppo-seed2
       ablation-sft-init-previous-e2-safety-weight3-holdout-ppo-seed3
       ablation-sft-init-previous-e2-safety-weight3-holdout-ppo-seed4
       ablation-select-best ablation-select-best-seed1 ablation-select-best-seed2 ablation-select-best-seed3
       ablation-select-best-seed4 ablation-ppo-kl0.01 ablation-ppo-kl0.01-seed4 ablation-refresh-epochs0.5
       ablation-refresh-epochs0.5-seed4 ablation-rs-temperature-search ablation-rs-temperature-search-seed4
       ablation-writer-correct0.50-comply0.50 ablation-writer-correct0.50-comply0.50-seed1
       ablation-writer-correct0.56-comply0.45 ablation-writer-correct0.56-comply0.45-seed1
       ablation-writer-correct0.56-comply0.45-seed2 ablation-writer-correct0.56-comply0.45-seed3
       ablation-writer-correct0.56-comply0.45-sft-init-previous-e2-safety-weight3
       ablation-writer-correct0.56-comply0.45-sft-init-previous-e2-safety-weight3-seed1
       ablation-writer-correct0.56-comply0.45-sft-init-previous-e2-safety-weight3-holdout-ppo
       ablation-writer-correct0.56-comply0.45-sft-init-previous-e2-safety-weight3-holdout-ppo-seed1
       ablation-writer-correct0.56-comply0.45-sft-init-previous-e2-safety-weight3-holdout-ppo-seed2
       ablation-writer-correct0.56-comply0.45-sft-init-previous-e2-safety-weight3-holdout-ppo-seed3
       ablation-refresh-8
       ablation-refresh-16 ablation-no-group-by-length ablation-no-group-by-length-seed1
       ablation-no-group-by-length-seed2 ablation-refresh-32-no-replay ablation-refresh-32-safety-weight3
       previous-default previous-default-seed1 previous-default-seed2 ablation-no-refresh ablation-rs-n16
       ablation-rs-temp ablation-ppo-from-v5 ablation-sft-epochs8 ablation-refresh-epochs2 ablation-rm-lr2e-3
       ablation-ppo-strong ablation-ppo-lr3e-4 ablation-safety-weight3 ablation-safety-weight3-seed1)
names=("$@"); [ ${#names[@]} -eq 0 ] && names=("${ORDER[@]}")
for name in "${names[@]}"; do
  [ -v "RUNS[$name]" ] || { echo "unknown result: $name (one of: ${ORDER[*]})" >&2; exit 2; }
  args=${RUNS[$name]}
  case $name in tinyworld-rs+ppo|default-seed*) ;; *) args="$M1${args:+ $args}" ;; esac  # made without merging
  force=(); [ "${FORCE:-0}" = 1 ] && force=(--force)
  # shellcheck disable=SC2086
  "$BIN"/iterative-rlhf round --n 5 --out "runs/$name" $args "${force[@]}"
  scripts/export_run.sh "runs/$name" "$name" "iterative-rlhf round --n 5 --out runs/$name${args:+ $args}"
  if [ "$name" = tinyworld-rs+ppo ]; then scripts/ppo_gain.sh "runs/$name"; fi  # RS vs PPO gold per round
done
# Every committed campaign side by side (results/compare), the last policies at 128 samples per eval prompt
# (results/precise-eval, and at temperature 0.7 in t0.7/: the named ones re-measured, each README from all; at
# 0.6 every round in t0.6/, and the default at 0.5-0.9 for precise-eval/temperature/), and the gold table of
# results/README.md.
set +f
"$BIN"/iterative-rlhf compare results/tinyworld-rs+ppo results/default-seed* results/ablation-* results/previous-default* \
  --out results/compare
"$BIN"/python scripts/precise_eval.py "$@"  # the named campaigns (all by default); README from every JSON
"$BIN"/python scripts/precise_eval.py --temperature 0.7 "$@"  # the same at 0.7 (results/precise-eval/t0.7)
# As deployed (0.6, every round) and the default's temperature curve, for the campaigns measured there.
DEPLOYED=(tinyworld-rs+ppo default-seed1 default-seed2 default-seed3 default-seed4 default-seed5 default-seed6
          default-seed7 ablation-merge-off
          ablation-merge-off-seed1 ablation-merge-off-seed2 ablation-merge-off-seed3 ablation-merge-off-seed4
          ablation-rm-per-device32
          ablation-rm-per-device32-seed1 ablation-rm-per-device32-seed2 ablation-rm-per-device32-seed3
          ablation-rm-per-device32-seed4 ablation-no-refresh-before-ppo
          ablation-no-refresh-before-ppo-seed1 ablation-no-refresh-before-ppo-seed2 ablation-rm-prompts-per-batch4
          ablation-rm-prompts-per-batch4-seed1 ablation-rm-prompts-per-batch8-b64 ablation-rm-prompts-per-batch8-b64-seed1
          ablation-rm-bf16 ablation-rm-bf16-seed1)
DEFAULT5=(tinyworld-rs+ppo default-seed1 default-seed2 default-seed3 default-seed4)
NOMERGE5=(ablation-merge-off ablation-merge-off-seed1 ablation-merge-off-seed2 ablation-merge-off-seed3
          ablation-merge-off-seed4)  # the default before: its own curve
OLD5=(ablation-rm-per-device32 ablation-rm-per-device32-seed1 ablation-rm-per-device32-seed2
      ablation-rm-per-device32-seed3 ablation-rm-per-device32-seed4)  # the one before that: its own curve
pick() {  # those of "$@" that this run regenerated
  local n
  for n in "$@"; do
    if [[ " ${names[*]} " == *" $n "* ]]; then echo "$n"; fi
  done
}
mapfile -t deployed < <(pick "${DEPLOYED[@]}")
mapfile -t default5 < <(pick "${DEFAULT5[@]}")
mapfile -t nomerge5 < <(pick "${NOMERGE5[@]}")
mapfile -t old5 < <(pick "${OLD5[@]}")
if [ ${#deployed[@]} -gt 0 ]; then
  "$BIN"/python scripts/precise_eval.py --temperature 0.6 --rounds "${deployed[@]}"
fi
if [ ${#default5[@]} -gt 0 ]; then
  for t in 0.5 0.8 0.9; do "$BIN"/python scripts/precise_eval.py --temperature $t "${default5[@]}"; done
  "$BIN"/python scripts/temperature_curve.py  # results/precise-eval/temperature
fi
if [ ${#nomerge5[@]} -gt 0 ]; then
  for t in 0.5 0.8 0.9; do "$BIN"/python scripts/precise_eval.py --temperature $t "${nomerge5[@]}"; done
  "$BIN"/python scripts/temperature_curve.py --group "no merging of rounds"
fi
if [ ${#old5[@]} -gt 0 ]; then
  for t in 0.5 0.8 0.9; do "$BIN"/python scripts/precise_eval.py --temperature $t "${old5[@]}"; done
  "$BIN"/python scripts/temperature_curve.py --group "helpfulness RM one pass of 32 pairs"
fi
"$BIN"/python scripts/results_table.py
