# ruff: noqa: E402, E501, E701, E702, UP031  (probe scripts, kept as they were run for results/README.md)
"""Offline: weight averages across rounds: D1 = V1, Dk = a*Vk + (1-a)*D(k-1); gold at 0.6 (32 samples)."""
import shutil
import sys
from pathlib import Path

ROOT = str(__import__('pathlib').Path(__file__).resolve().parents[2]); sys.path.insert(0, ROOT)
from safetensors.torch import load_file, save_file

from iterative_rlhf.config import load_recipe
from iterative_rlhf.tinyworld.evaluate import evaluate_policy

run, a, which = sys.argv[1], float(sys.argv[2]), (sys.argv[3] if len(sys.argv) > 3 else 'ppo/policy')
recipe = load_recipe(f'{ROOT}/results/{run}/config.yaml')
R = Path(f'{ROOT}/runs/{run}')
D = None
gs, vs = [], []
for k in range(1, 6):
    W = load_file(R / f'v{k}/{which}/model.safetensors')
    D = W if D is None else {n: a * W[n] + (1 - a) * D[n] for n in W}
    out = Path(f'{ROOT}/runs/fall-probes/ema-{run}-{a}-{which.replace("/","_")}-v{k}')
    if out.exists(): shutil.rmtree(out)
    shutil.copytree(R / f'v{k}/{which}', out)
    save_file(D, out / 'model.safetensors', metadata={'format': 'pt'})
    m = evaluate_policy(str(out), recipe, split='eval', samples=32, seed=0, temperature=0.6)
    gs.append(round(m['gold'], 3)); vs.append(round(m['violation_rate'], 3))
fall = max(max(gs[i] - gs[i + 1] for i in range(4)), 0)
print(f'{run} a={a}: gold {gs} viol {vs} largest fall {fall:.3f}', flush=True)
