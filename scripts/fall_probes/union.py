# ruff: noqa: E402, E501, E701, E702, UP031  (probe scripts, kept as they were run for results/README.md)
"""Offline: SFT on the union of rounds' selections (1..k, deduped), or last-m rounds."""
import sys
from pathlib import Path

ROOT = str(__import__('pathlib').Path(__file__).resolve().parents[2]); sys.path.insert(0, ROOT)
from iterative_rlhf.config import load_recipe
from iterative_rlhf.io import read_jsonl
from iterative_rlhf.sft import finetune
from iterative_rlhf.tinyworld.build import build_world
from iterative_rlhf.tinyworld.evaluate import evaluate_policy

run, k, m, epochs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
recipe = load_recipe(f'{ROOT}/results/{run}/config.yaml')
recipe.sft.epochs = epochs
base = str(build_world(recipe.tinyworld).policy)
R = Path(f'{ROOT}/runs/{run}')
rows, seen = [], set()
for j in range(max(1, k - m + 1), k + 1):
    for r in read_jsonl(R / f'v{j}/selected.jsonl'):
        key = (r['prompt'], r['response'])
        if key not in seen:
            seen.add(key); rows.append({'prompt': r['prompt'], 'response': r['response'], 'is_safety': r['is_safety']})
out = Path(f'{ROOT}/runs/fall-probes/u-{run}-v{k}-m{m}-e{epochs}')
if not (out / 'model.safetensors').exists():
    finetune(recipe, rows, base, out, 1000)
g = evaluate_policy(str(out), recipe, split='eval', samples=32, seed=0, temperature=0.6)
print(f'{run} v{k} last {m} rounds e{epochs}: {len(rows)} rows gold {g["gold"]:.3f} viol {g["violation_rate"]:.4f}', flush=True)
