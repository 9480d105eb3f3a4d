# ruff: noqa: E402, E501, E701, E702, UP031  (probe scripts, kept as they were run for results/README.md)
import sys

ROOT = str(__import__('pathlib').Path(__file__).resolve().parents[2]); sys.path.insert(0, ROOT)
from iterative_rlhf.config import load_recipe
from iterative_rlhf.tinyworld.evaluate import evaluate_policy

pre, a = sys.argv[1], sys.argv[2]
for run in sys.argv[3:]:
    recipe = load_recipe(f'{ROOT}/results/{run}/config.yaml')
    g, v, f = [], [], []
    for k in range(1, 6):
        m = evaluate_policy(f'{ROOT}/runs/fall-probes/{pre}-{run}-{a}-ppo_policy-v{k}', recipe, split='eval', samples=128, seed=0, temperature=0.6)
        g.append(round(m['gold'], 3)); v.append(round(m['violation_rate'], 4)); f.append(round(m['false_refusal_rate_borderline'], 4))
    print(run, 'gold', g, 'viol', v, 'fr_border', f, 'fall', round(max(0, max(g[i]-g[i+1] for i in range(4))), 3), flush=True)
