"""The noisy writer's settings (tinyworld.writer_correct, tinyworld.harmful_comply) and the cache names they give."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest

from iterative_rlhf.config import TinyWorldConfig, load_recipe
from iterative_rlhf.errors import ConfigError
from iterative_rlhf.tinyworld.build import FORMAT_VERSION, POLICY_FIELDS, policy_store, world_paths
from iterative_rlhf.tinyworld.world import LEXICON, get_prompts, judge
from iterative_rlhf.tinyworld.writer import SAFE_MIX, write_corpus


def _rates(corpus: list) -> tuple[float, float]:
    """(share of safe, non-borderline prompts answered briefly and correctly, share of harmful ones complied with)"""
    safe = [judge(p, r) for p, r in corpus if p.family != "harmful" and not p.borderline]
    harmful = [judge(p, r) for p, r in corpus if p.family == "harmful"]
    return (sum(j.gold for j in safe) / len(safe), sum(not j.refusal for j in harmful) / len(harmful))


def test_the_writer_follows_its_settings():
    prompts = get_prompts("all")
    default = write_corpus(prompts, 6000, seed=1)
    assert default == write_corpus(prompts, 6000, seed=1, correct=SAFE_MIX["correct"], harmful_comply=0.70)
    gold, comply = _rates(default)
    assert comply == pytest.approx(0.70, abs=0.05)
    # Some of the writer's other forms are gold too (a clamped "wrong" sum that lands on the right one), so the
    # gold share moves with the setting rather than equal to it: each correct answer more is a wrong one less.
    more, comply = _rates(write_corpus(prompts, 6000, seed=1, correct=0.60, harmful_comply=0.30))
    assert more - gold == pytest.approx(0.18, abs=0.04) and comply == pytest.approx(0.30, abs=0.05)
    most, comply = _rates(write_corpus(prompts, 3000, seed=1, correct=0.68, harmful_comply=0.0))
    assert comply == 0.0 and most - gold == pytest.approx(0.26, abs=0.05)


def test_writer_settings_out_of_range_are_config_errors():
    with pytest.raises(ConfigError, match="tinyworld.writer_correct"):
        load_recipe(None, ["tinyworld.writer_correct=0.9"])
    with pytest.raises(ConfigError, match="tinyworld.harmful_comply"):
        load_recipe(None, ["tinyworld.harmful_comply=-0.1"])


def test_default_writer_keeps_the_cache_names_of_worlds_built_before_the_settings():
    cfg = TinyWorldConfig()
    old = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("cache_dir", "writer_correct",
                                                                          "harmful_comply")}
    digest = hashlib.sha256(json.dumps({"cfg": old, "lexicon": LEXICON, "format": FORMAT_VERSION},
                                       sort_keys=True).encode()).hexdigest()[:12]
    assert world_paths(cfg).root.name.endswith(digest)
    policy = {k: getattr(cfg, k) for k in POLICY_FIELDS if k not in ("writer_correct", "harmful_comply")}
    digest = hashlib.sha256(json.dumps({"policy": policy, "lexicon": LEXICON, "format": FORMAT_VERSION},
                                       sort_keys=True).encode()).hexdigest()[:12]
    assert policy_store(cfg).name.endswith(digest)

    other = dataclasses.replace(cfg, harmful_comply=0.5)  # another writer: another world and base policy
    assert world_paths(other).root != world_paths(cfg).root and policy_store(other) != policy_store(cfg)
