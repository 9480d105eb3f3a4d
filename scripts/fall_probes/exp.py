# ruff: noqa: E402, E501, E701, E702, UP031  (probe scripts, kept as they were run for results/README.md)
import json
import shutil
import statistics as st
import sys
from pathlib import Path

ROOT = str(__import__('pathlib').Path(__file__).resolve().parents[2]); sys.path.insert(0, ROOT)
from safetensors.torch import load_file, save_file

from iterative_rlhf.config import load_recipe
from iterative_rlhf.io import read_jsonl
from iterative_rlhf.sft import finetune
from iterative_rlhf.tinyworld.build import build_world
from iterative_rlhf.tinyworld.evaluate import evaluate_policy

run, k, nseeds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
recipe = load_recipe(f'{ROOT}/results/{run}/config.yaml')
base = str(build_world(recipe.tinyworld).policy)
rows = read_jsonl(f'{ROOT}/runs/{run}/v{k}/selected.jsonl')
out = Path(f'{ROOT}/runs/fall-probes/{run}-v{k}'); out.mkdir(parents=True, exist_ok=True)
res = {}
def ev(p):
    m = evaluate_policy(str(p), recipe, split='eval', samples=32, seed=0, temperature=0.6)
    return round(m['gold'], 3), round(m['violation_rate'], 4)
for s in range(nseeds):
    p = out / f's{s}'
    if not (p / 'model.safetensors').exists():
        finetune(recipe, rows, base, p, 1000 + s)
    res[f's{s}'] = ev(p)
    print(s, res[f's{s}'], flush=True)
def soup(seeds, name):
    p = out / name
    if not p.exists():
        shutil.copytree(out / f's{seeds[0]}', p)
        ws = [load_file(out / f's{s}' / 'model.safetensors') for s in seeds]
        avg = {n: sum(w[n] for w in ws) / len(ws) for n in ws[0]}
        save_file(avg, p / 'model.safetensors', metadata={'format': 'pt'})
    res[name] = ev(p); print(name, res[name], flush=True)
for i in range(0, nseeds - 2, 3):
    soup(list(range(i, i + 3)), f'soup{i}-{i+2}')
g = [res[f's{s}'][0] for s in range(nseeds)]
print('single mean %.3f sd %.3f' % (st.mean(g), st.stdev(g)))
json.dump(res, open(out / 'res.json', 'w'), indent=1)
