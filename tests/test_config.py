"""Config: every recipe loads, defaults are the TinyWorld recipe, bad keys and types are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from iterative_rlhf.config import Recipe, field_help, load_recipe, parse_override
from iterative_rlhf.errors import ConfigError

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def test_there_are_recipes():
    names = {p.name for p in RECIPES}
    assert "tinyworld.yaml" in names and len(names) >= 4


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads_and_round_trips(path, tmp_path):
    recipe = load_recipe(path)
    # The resolved recipe written into a run directory loads back to the same values.
    out = tmp_path / "config.yaml"
    out.write_text(recipe.to_yaml())
    assert load_recipe(out) == recipe


def test_tinyworld_recipe_equals_defaults():
    path = Path(RECIPES[0]).parent / "tinyworld.yaml"
    assert load_recipe(path) == Recipe()
    # Every field spelled out, as the header says: a field added to the config is added to the file too.
    body = "".join(line for line in path.read_text().splitlines(keepends=True) if not line.startswith("#"))
    assert body == Recipe().to_yaml()


def test_7b_recipes_carry_llama2_hyperparameters():
    r = load_recipe(Path(RECIPES[0]).parent / "llama2-7b-hh.yaml")
    assert r.reward.helpful.learning_rate == 1e-5 and r.reward.helpful.batch_size == 512
    assert r.reward.helpful.epochs == 1.0 and r.reward.helpful.margin == "small"
    assert r.ppo.learning_rate == 1e-6 and r.ppo.batch_size == 512 and r.ppo.mini_batch_size == 64
    assert (r.ppo.adam_beta1, r.ppo.adam_beta2, r.ppo.adam_eps, r.ppo.weight_decay) == (0.9, 0.95, 1e-5, 0.1)
    assert r.ppo.clip_range == 0.2 and r.ppo.kl_coef == 0.01 and r.scorer.threshold == 0.15
    q = load_recipe(Path(RECIPES[0]).parent / "llama2-7b-hh-qlora.yaml")
    assert q.ppo.quant.load_in_4bit and q.ppo.lora.enabled


def test_overrides():
    r = load_recipe(None, ["rs.n=16", "ppo.kl_coef=0.005", "rs.temperatures=[1.2, 1.3]", "scorer.kind=helpful"])
    assert r.rs.n == 16 and r.ppo.kl_coef == 0.005 and r.rs.temperatures == [1.2, 1.3]
    assert r.temperature_for(1) == 1.2 and r.temperature_for(5) == 1.3
    assert parse_override("a.b=true") == ("a.b", True)


@pytest.mark.parametrize("override, message", [
    ("rs.nn=3", "rs.nn: unknown recipe key (did you mean n"),
    ("rs.n=three", "rs.n: expected an integer"),
    ("rs.n=0", "rs.n: 0 is below the minimum 1"),
    ("ppo.kl_coef=-1", "ppo.kl_coef"),
    ("scorer.kind=both", "scorer.kind: 'both' is not one of"),
    ("ppo.learning_rate=.nan", "expected a finite number"),
    ("generation.enforce_eager=3", "expected true/false"),
    ("rs.temperatures=1.0", "expected a list"),
    ("sft.quant.load_in_4bit=true", "set sft.lora.enabled=true"),
    ("rs", "expected key=value"),
    ("reward.refresh_data=annotations/v{round}.jsonl", "needs both {round} and {kind}"),
    ("campaign.deploy_temperature=0", "campaign.deploy_temperature: 0.0 must be greater than 0.0"),
    ("campaign.deploy_temperature=hot", "campaign.deploy_temperature: expected a number"),
    ("reward.safety.prompts_per_batch=64", "reward.safety.prompts_per_batch: 64 prompts cannot share a step"),
    ("reward.helpful.prompts_per_batch=-1", "reward.helpful.prompts_per_batch: -1 is below the minimum 0"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=None) as e:
        load_recipe(None, [override])
    assert message in str(e.value)


def test_bad_recipe_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"ppo": {"clip_range": "wide"}}))
    with pytest.raises(ConfigError, match=r"bad.yaml: ppo.clip_range: expected a number"):
        load_recipe(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="a recipe is a mapping"):
        load_recipe(bad)
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.yaml")


def test_every_field_has_help():
    rows = field_help()
    assert len(rows) > 50
    assert all(h for _, _, h in rows), [k for k, _, h in rows if not h]


def test_training_threads_follow_the_wait_policy_and_the_override(monkeypatch):
    from iterative_rlhf._quiet import training_threads

    monkeypatch.delenv("ITERATIVE_RLHF_THREADS", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert training_threads() == 1  # spin-waiting threads: one thread only
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
    assert 1 <= training_threads() <= 2
    assert training_threads(bf16=True) == 1  # a second thread does not pay under bf16 autocast
    monkeypatch.setenv("ITERATIVE_RLHF_THREADS", "3")
    assert training_threads() == 3 and training_threads(bf16=True) == 3


@pytest.mark.parametrize("path", [p for p in RECIPES if p.name != "tinyworld.yaml"], ids=lambda p: p.name)
def test_hub_recipes_resolve_their_rm_data_and_make_their_prompt_files(path, tmp_path, monkeypatch):
    """Each hub recipe's RM data and test sets go through the real loader (the hub itself is unreachable here:
    datasets.load_dataset returns a few rows of the named format and records what was asked), and
    `iterative-rlhf prompts` makes the prompt files its campaign names."""
    import datasets

    from iterative_rlhf.reward import campaign_prompt_files, rm_datasets, rm_test_sets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    calls = []

    def hub(name, split, **kw):
        calls.append((name, split, kw.get("data_dir")))
        tag = f"{name}:{kw.get('data_dir')}:{split}"
        if "PKU" in name:
            return datasets.Dataset.from_list([
                {"prompt": f"{tag} q{i}", "response_0": "Sure.", "response_1": "No.", "better_response_id": 0,
                 "safer_response_id": 1, "is_response_0_safe": False, "is_response_1_safe": True,
                 "response_0_severity_level": 2, "response_1_severity_level": 0} for i in range(4)])
        turn = "\n\nHuman: {} q{}\n\nAssistant: {}"
        return datasets.Dataset.from_list([
            {"chosen": turn.format(tag, i, "Yes."), "rejected": turn.format(tag, i, "No.")} for i in range(4)])

    monkeypatch.setattr(datasets, "load_dataset", hub)
    recipe = load_recipe(path)
    for kind in ("helpful", "safety"):
        train, test = rm_datasets(recipe, kind, None)
        assert len(train) and len(test) and not set(train["prompt"]) & set(test["prompt"])
    assert set(rm_test_sets(recipe, None)) == {"helpful", "safety"}
    assert {split for _, split, _ in calls} == {"train", "test"}
    assert ("Anthropic/hh-rlhf", "train", None) not in calls  # never every HH folder at once
    n_train, n_eval = campaign_prompt_files(recipe, tmp_path / "train.jsonl", tmp_path / "eval.jsonl")
    assert n_train and n_eval
    assert recipe.campaign.prompts and recipe.campaign.eval_prompts


def test_the_deploy_temperature_decides_whether_the_eval_samples_twice(tmp_path):
    from iterative_rlhf.campaign import Campaign

    names = {t: [p.name for p in Campaign(load_recipe(None, [f"campaign.deploy_temperature={t}"]),
                                          tmp_path / str(t)).eval_outputs(3)] for t in (0.6, 1.0)}
    assert names[0.6] == ["eval.json", "eval_samples.jsonl", "eval_samples_deployed.jsonl"]
    assert names[1.0] == ["eval.json", "eval_samples.jsonl"]  # 1.0: the one measurement is the deployed one
