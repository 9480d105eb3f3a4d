# ruff: noqa: E402, E501, E701, E702, UP031  (probe scripts, kept as they were run for results/README.md)
"""Offline: round k's selection with hysteresis against round k-1's actual selection; SFT from base; gold at 0.6."""
import collections
import sys
from pathlib import Path

ROOT = str(__import__('pathlib').Path(__file__).resolve().parents[2]); sys.path.insert(0, ROOT)
from iterative_rlhf.config import load_recipe
from iterative_rlhf.io import read_jsonl
from iterative_rlhf.sft import finetune
from iterative_rlhf.tinyworld.build import build_world
from iterative_rlhf.tinyworld.evaluate import evaluate_policy

run, k = sys.argv[1], int(sys.argv[2]); deltas = [float(x) for x in sys.argv[3:]]
recipe = load_recipe(f'{ROOT}/results/{run}/config.yaml')
base = str(build_world(recipe.tinyworld).policy)
R = Path(f'{ROOT}/runs/{run}')
scored = read_jsonl(R / f'v{k}/scored.jsonl')
prev = {r['prompt']: r['response'] for r in read_jsonl(R / f'v{k-1}/selected.jsonl')}
by = collections.defaultdict(dict)
for c in scored:
    by[c['prompt']][c['response']] = c
issafety = {r['prompt']: r['is_safety'] for r in read_jsonl(R / f'v{k}/selected.jsonl')}
for d in deltas:
    rows, switched = [], 0
    for p, cands in by.items():
        best = sorted(cands.values(), key=lambda c: (-c['reward'], len(c['response']), c['response']))[0]
        inc = cands.get(prev.get(p))
        pick = best
        if inc is not None and best['reward'] <= inc['reward'] + d:
            pick = inc
        switched += pick['response'] != prev.get(p)
        rows.append({'prompt': p, 'response': pick['response'], 'is_safety': issafety[p]})
    out = Path(f'{ROOT}/runs/fall-probes/h-{run}-v{k}-d{d}')
    if not (out / 'model.safetensors').exists():
        finetune(recipe, rows, base, out, 1000)
    m = evaluate_policy(str(out), recipe, split='eval', samples=32, seed=0, temperature=0.6)
    print(f'{run} v{k} delta {d}: switched {switched}/{len(rows)} gold {m["gold"]:.3f} viol {m["violation_rate"]:.4f}', flush=True)
