# ruff: noqa: E402, E501, E701, E702, UP031  (probe scripts, kept as they were run for results/README.md)
import json
import sys

ROOT = str(__import__('pathlib').Path(__file__).resolve().parents[2]); sys.path.insert(0, ROOT)
from iterative_rlhf.config import load_recipe
from iterative_rlhf.tinyworld.evaluate import evaluate_policy

rows = {}
for run in sys.argv[1:]:
    recipe = load_recipe(f'{ROOT}/results/{run}/config.yaml')
    rp = json.load(open(f'{ROOT}/results/precise-eval/t0.6/rounds/{run}.json'))
    sft = []
    for k in range(1, 6):
        m = evaluate_policy(f'{ROOT}/runs/{run}/v{k}/rs_policy', recipe, split='eval', samples=32, seed=0, temperature=0.6)
        sft.append(round(m['gold'], 3))
    fin = [round(r['gold'], 3) for r in rp['rounds']]
    print(run, 'sft', sft, 'final', fin, flush=True)
