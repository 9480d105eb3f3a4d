"""``iterative-rlhf tinyworld build``: the base policy, prompts and comparisons, cached.

The world is built once per TinyWorld config and cached under
``$ITERATIVE_RLHF_CACHE`` (default ``~/.cache/iterative-rlhf``) in a folder
named by a hash of the config and the lexicon. Each part is written
atomically and recorded in the folder's ``manifest.json``; an interrupted
build continues with the parts not yet done.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..config import GenerationConfig, TinyWorldConfig
from ..console import log
from ..io import atomic_dir, atomic_write_json, atomic_write_jsonl, commit_dir
from .annotators import make_comparisons
from .world import LEXICON, Prompt, get_prompts, prompt_row
from .writer import write_corpus, write_response

FORMAT_VERSION = 4  # bump when the build's outputs change meaning
SAMPLE_TEMPERATURES = (0.7, 1.0, 1.3)


@dataclass(frozen=True)
class WorldPaths:
    root: Path

    @property
    def policy(self) -> Path:
        return self.root / "policy"

    def prompts(self, split: str) -> Path:
        return self.root / "prompts" / f"{split}.jsonl"

    def comparisons(self, kind: str, split: str) -> Path:
        """Canonical preference file: kind helpful|safety, split train|test (test = eval prompts)."""
        return self.root / "comparisons" / f"{kind}_{split}.jsonl"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"


def cache_root(cfg: TinyWorldConfig) -> Path:
    base = cfg.cache_dir or os.environ.get("ITERATIVE_RLHF_CACHE") or "~/.cache/iterative-rlhf"
    return Path(base).expanduser()


#: The config fields the base policy depends on; worlds that differ only in the
#: annotators or the comparisons share one trained policy.
POLICY_FIELDS = ("seed", "hidden_size", "num_layers", "num_heads", "vocab_size", "corpus_size", "train_steps",
                 "train_batch_size", "learning_rate", "writer_correct", "harmful_comply")
#: Fields added after worlds were first cached: they enter the cache names only when set to another value than
#: their default, so a world (or policy) built before they existed keeps its name and is reused.
LATER_FIELDS = {f.name: f.default for f in dataclasses.fields(TinyWorldConfig)
                if f.name in ("writer_correct", "harmful_comply")}


def _digest(obj: dict) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def _named(cfg: TinyWorldConfig, fields: tuple[str, ...] | None = None) -> dict:
    """The settings that name ``cfg``'s cache folders (all but cache_dir, or ``fields``), later ones when set."""
    keys = fields or tuple(f.name for f in dataclasses.fields(cfg) if f.name != "cache_dir")
    return {k: getattr(cfg, k) for k in keys if k not in LATER_FIELDS or getattr(cfg, k) != LATER_FIELDS[k]}


def world_paths(cfg: TinyWorldConfig) -> WorldPaths:
    digest = _digest({"cfg": _named(cfg), "lexicon": LEXICON, "format": FORMAT_VERSION})
    return WorldPaths(cache_root(cfg) / f"tinyworld-v{LEXICON['version']}-{digest}")


def policy_store(cfg: TinyWorldConfig) -> Path:
    """Where the base policy of ``cfg`` is kept, shared by every world with the same policy fields."""
    digest = _digest({"policy": _named(cfg, POLICY_FIELDS), "lexicon": LEXICON, "format": FORMAT_VERSION})
    return cache_root(cfg) / "policies" / f"tinyworld-policy-{digest}"


def _manifest(paths: WorldPaths) -> dict:
    if paths.manifest.exists():
        return json.loads(paths.manifest.read_text())
    return {"done": []}


def _mark(paths: WorldPaths, part: str, config: TinyWorldConfig) -> None:
    m = _manifest(paths)
    m["config"] = dataclasses.asdict(config)
    if part not in m["done"]:
        m["done"].append(part)
    atomic_write_json(paths.manifest, m)


def is_built(cfg: TinyWorldConfig) -> bool:
    paths = world_paths(cfg)
    return set(_manifest(paths)["done"]) >= {"prompts", "policy", "comparisons"}


def build_world(cfg: TinyWorldConfig, force: bool = False) -> WorldPaths:
    """Build (or finish building) the world for ``cfg``; returns its paths."""
    paths = world_paths(cfg)
    paths.root.mkdir(parents=True, exist_ok=True)
    done = set() if force else set(_manifest(paths)["done"])
    if force and paths.manifest.exists():
        paths.manifest.unlink()

    if "prompts" not in done:
        for split in ("train", "eval"):
            atomic_write_jsonl(paths.prompts(split), [prompt_row(p) for p in get_prompts(split)])
        _mark(paths, "prompts", cfg)

    if "policy" not in done:
        store = policy_store(cfg)
        if force or not (store / "config.json").exists():  # --force trains the shared policy again too
            from .policy import train_policy

            log(f"TinyWorld: training the base policy ({cfg.train_steps} steps) -> {store}")
            corpus = write_corpus(get_prompts("all"), cfg.corpus_size, cfg.seed, cfg.writer_correct,
                                  cfg.harmful_comply)
            tmp = atomic_dir(store)
            train_policy(cfg, corpus, tmp)
            commit_dir(tmp, store)
        else:
            log(f"TinyWorld: reusing the base policy trained for the same policy settings: {store}")
        tmp = atomic_dir(paths.policy)
        shutil.rmtree(tmp)
        shutil.copytree(store, tmp)
        commit_dir(tmp, paths.policy)
        _mark(paths, "policy", cfg)

    if "comparisons" not in done:
        log("TinyWorld: sampling the base policy and collecting comparisons")
        samples = sample_for_annotation(paths.policy, cfg)
        rng = random.Random(cfg.seed + 1)
        for split, prompts in (("train", get_prompts("train")), ("test", get_prompts("eval"))):
            sub = {p: samples[p] for p in prompts}
            for kind in ("helpful", "safety"):
                per = cfg.comparisons_per_prompt if kind == "helpful" else cfg.safety_comparisons_per_prompt
                rows = make_comparisons(kind, sub, per, rng, cfg.annotator_noise, cfg.length_cost,
                                        source=f"tinyworld-{kind}")
                atomic_write_jsonl(paths.comparisons(kind, split), rows)
        _mark(paths, "comparisons", cfg)
    return paths


def sample_for_annotation(policy: Path, cfg: TinyWorldConfig) -> dict[Prompt, list[str]]:
    """Responses from model variants (base policy at three temperatures, and the writer) per prompt."""
    from ..generation import HFEngine

    prompts = get_prompts("all")
    engine = HFEngine(str(policy), GenerationConfig(engine="hf", batch_size=512))
    out: dict[Prompt, list[str]] = {p: [] for p in prompts}
    for i, t in enumerate(SAMPLE_TEMPERATURES):
        res = engine.generate([p.text for p in prompts], cfg.samples_per_prompt, t, 32, seed=cfg.seed + i)
        for p, comps in zip(prompts, res, strict=True):
            out[p].extend(c.text for c in comps)
    engine.close()
    rng = random.Random(cfg.seed + 7)
    for p in prompts:
        out[p].extend(write_response(p, rng, cfg.writer_correct, cfg.harmful_comply)
                      for _ in range(cfg.samples_per_prompt))
    return out
