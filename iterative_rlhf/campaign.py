"""Campaigns: rounds V1..Vn of rejection sampling, fine-tuning and PPO (``iterative-rlhf round``).

The run directory is self-describing and resumable at stage boundaries:

    DIR/config.yaml          the resolved recipe
    DIR/manifest.json        stages finished, with SHA-256 hashes of their outputs
    DIR/rm/{helpful,safety}  the reward models; DIR/rm/eval the RM report
    DIR/v0/                  the base policy's evaluation
    DIR/vK/samples.jsonl     N samples per train prompt from the policy of round K-1, scored
    DIR/vK/selected.jsonl    the best samples (the pool of earlier rounds competing)
    DIR/vK/rs_policy/        SFT on the selected samples (from the base, as Llama 2)
    DIR/vK/rm/               refreshed RMs (reward.refresh): comparisons of the round's samples (TinyWorld's
                             annotators, or people: pairs.jsonl to annotate, reward.refresh_data)
    DIR/vK/ppo_rm/           RMs refreshed again on the RS checkpoint's samples, for PPO
    DIR/vK/ppo/              PPO on top (metrics.jsonl, resumable state/, policy/)
    DIR/vK/policy/           with campaign.merge < 1 (from round 2): the trained policy averaged with round
                             K-1's, weight by weight (merge.json); the round's policy, where round K+1 samples
    DIR/vK/eval.json         the round's policy on the eval prompts, sampled at temperature 1.0 and as deployed
                             (campaign.deploy_temperature, also in each policy's generation_config.json)
    DIR/vK/metrics.jsonl     every training log of the round (RM refreshes, SFT, PPO), tagged by stage
    DIR/vK/report.json       the round's report
    DIR/report.{json,md,html}, DIR/plots/*.png

A stage counts as done only when the manifest lists it, its outputs still
hash to what the manifest recorded, and it recorded every output the stage
writes now; every output is written atomically, so a
crash (or Ctrl-C, or SIGKILL) at any point leaves either the old state or the
new one. Rerunning the same command continues with the first stage not done;
PPO also resumes inside its own stage from its last saved iteration.
Every stage is seeded from (recipe.seed, round, stage), so a resumed campaign
ends with the same report as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from .config import Recipe, load_recipe
from .console import log, warn
from .errors import AwaitingAnnotations, NumericalError, UserError
from .io import atomic_write_json, atomic_write_jsonl, atomic_write_text, hash_path, read_jsonl
from .workers import MIN_WORK, warm_up

STAGE_SEEDS = {"rs_sample": 1, "rs_select": 2, "sft": 3, "ppo": 4, "eval": 5, "rm": 6, "ppo_rm": 7, "select": 8,
               "select_previous": 9, "rs_temperature": 10, "eval_deployed": 11}


class Manifest:
    """``manifest.json``: stage name -> {outputs: {relative path: sha256}, finished: time}."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.path = run_dir / "manifest.json"
        self.data: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {"stages": {}}

    def done(self, stage: str, outputs: list[Path] = (), inputs: list[Path] = ()) -> bool:
        """True when the stage is recorded, every output it recorded still hashes the same, each of
        ``outputs`` (what the stage writes now) was recorded (a stage of an older version may have written less),
        and each of ``inputs`` (files of earlier stages it reads) hashes as when it ran."""
        entry = self.data["stages"].get(stage)
        if entry is None:
            return False
        for p in inputs:
            rel = str(p.relative_to(self.run_dir))
            if entry.get("inputs", {}).get(rel) != (hash_path(p) if p.exists() else None):
                log(f"[yellow]{stage}: its input {rel} changed since it ran; running the stage again[/yellow]")
                return False
        for p in outputs:
            if str(p.relative_to(self.run_dir)) not in entry["outputs"]:
                log(f"[yellow]{stage}: output {p.relative_to(self.run_dir)} was not written by the run that "
                    "recorded this stage; running the stage again[/yellow]")
                return False
        for rel, digest in entry["outputs"].items():
            p = self.run_dir / rel
            if not p.exists() or hash_path(p) != digest:
                log(f"[yellow]{stage}: output {rel} is missing or changed; running the stage again[/yellow]")
                return False
        return True

    def mark(self, stage: str, outputs: list[Path], inputs: list[Path] = ()) -> None:
        self.data["stages"][stage] = {
            "outputs": {str(p.relative_to(self.run_dir)): hash_path(p) for p in outputs},
            **({"inputs": {str(p.relative_to(self.run_dir)): hash_path(p) for p in inputs if p.exists()}}
               if inputs else {}),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        atomic_write_json(self.path, self.data)

    def reset(self) -> None:
        self.data = {"stages": {}}
        atomic_write_json(self.path, self.data)


def recipe_fingerprint(recipe: Recipe) -> str:
    """Hash of everything that changes results; campaign.rounds may grow between runs."""
    d = recipe.to_dict()
    d["campaign"] = {k: v for k, v in d["campaign"].items() if k not in ("rounds", "report_to")}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def load_run_recipe(path: Path) -> Recipe:
    """A run directory's config.yaml, as the campaign that wrote it ran: fields that came after it take the value
    that matches what it did, not today's default (``campaign.merge``: 1, no merging)."""
    recipe = load_recipe(path)
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if "merge" not in (raw.get("campaign") or {}):
        recipe.campaign.merge = 1.0
    return recipe


def _differences(old: Recipe | None, new: Recipe, most: int = 3) -> str:
    """`` in KEY: A in the run, B now, ...`` for the first fields whose values differ (empty without ``old``)."""
    if old is None:
        return ""

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    a, b = flat(old.to_dict()), flat(new.to_dict())
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and k not in ("campaign.rounds",
                                                                                    "campaign.report_to")]
    if not keys:
        return ""
    shown = ", ".join(f"{k}: {a.get(k)!r} in the run, {b.get(k)!r} now" for k in keys[:most])
    return f" in {shown}" + (f" and {len(keys) - most} more" if len(keys) > most else "")


def is_held_out(prompt: str) -> bool:
    """Whether a train prompt is one of the 1 in 8 (by SHA-256) that PPO holds out for its early stopping."""
    return int(hashlib.sha256(prompt.encode()).hexdigest(), 16) % 8 == 0


class Campaign:
    """One run directory and the recipe that owns it."""

    def __init__(self, recipe: Recipe, run_dir: str | Path, force: bool = False) -> None:
        self.recipe = recipe
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._claim(force)
        self.manifest = Manifest(self.dir)
        self.world = None
        self.base_path = ""
        self.train_prompts: list[dict] = []
        self.eval_prompts: list[dict] = []
        self.holdout_prompts: list[dict] = []
        self.ppo_prompts: list[dict] = []

    # ------------------------------------------------------------------ set-up

    def _claim(self, force: bool) -> None:
        cfg_path = self.dir / "config.yaml"
        fp = recipe_fingerprint(self.recipe)
        if cfg_path.exists():
            try:
                old = load_run_recipe(cfg_path)
            except UserError:
                old = None
            if old is None or recipe_fingerprint(old) != fp:
                if not force:
                    raise UserError(f"{self.dir}: this run directory was made by another recipe (config.yaml "
                                    f"differs{_differences(old, self.recipe)}); use another --out, or --force to "
                                    "start it again with this recipe")
                self._clear_outputs()
                Manifest(self.dir).reset()
        atomic_write_text(cfg_path, self.recipe.to_yaml())

    def _clear_outputs(self) -> None:
        """Remove what an earlier recipe wrote here (rounds, RMs, reports, plots), so that --force starts again.

        Resetting the manifest alone is not enough: a stage that resumes inside itself
        (PPO from its last saved iteration) would take the other recipe's files as its own.
        """
        for p in self.dir.iterdir():
            ours = p.name in ("rm", "plots", "report.json", "report.md", "report.html") or \
                (p.name[:1] == "v" and p.name[1:].isdigit())
            if ours:
                warn(f"--force: removing {p} (made by another recipe)")
                if p.is_dir():
                    shutil.rmtree(p)
                else:
                    p.unlink()

    def prepare(self) -> None:
        """The base policy and the prompts (TinyWorld is built first when the recipe uses it)."""
        r = self.recipe
        if r.model.policy == "tinyworld":
            from .tinyworld.build import build_world
            from .tinyworld.world import get_prompts, prompt_row

            # The helpfulness RM's pairs x epochs: when its RMs will train at once (workers.py), the workers'
            # fork server starts now, importing beside the build (single-threaded) instead of at the first RMs.
            work = r.tinyworld.comparisons_per_prompt * len(get_prompts("train")) * r.reward.helpful.epochs
            if work >= MIN_WORK:
                warm_up()
            self.world = build_world(r.tinyworld)
            self.base_path = str(self.world.policy)
            train = [prompt_row(p) for p in get_prompts("train")]
            self.eval_prompts = [prompt_row(p) for p in get_prompts("eval")]
        else:
            from .sampling import read_prompts

            if not r.campaign.prompts or not r.campaign.eval_prompts:
                raise UserError("campaign.prompts / campaign.eval_prompts: a recipe with its own policy needs "
                                "prompt files (JSONL with 'prompt' and 'is_safety')")
            self.base_path = r.model.policy
            train = read_prompts(r.campaign.prompts)
            self.eval_prompts = read_prompts(r.campaign.eval_prompts)
        if r.reward.refresh and self.world is None and not r.reward.refresh_data:
            log("reward.refresh: ignored; without TinyWorld's annotators it needs reward.refresh_data (where "
                "people's comparisons of each round's samples go)")
        # 1 in 8 train prompts (by hash) is held out for PPO's choice of its best iteration: PPO never trains on
        # them, so their reward measures what PPO's updates generalise to, not what they memorised.
        self.holdout_prompts = [p for p in train if is_held_out(p["prompt"])]
        ppo_train = train
        if len(self.holdout_prompts) < len(train):
            ppo_train = [p for p in train if not is_held_out(p["prompt"])]
        else:  # every prompt hashes into the held-out set (tiny prompt files): train on them all
            log("campaign: every train prompt falls in the held-out set; PPO's early stopping will see trained prompts")
        # campaign.holdout_from: 'ppo' = rejection sampling (and its SFT, and the RM refreshes) use every train
        # prompt, PPO trains on the others; 'rs+ppo' = neither stage sees the held-out prompts.
        rs_train = train if r.campaign.holdout_from == "ppo" else ppo_train
        self.train_prompts = rs_train[: r.rs.prompts] if r.rs.prompts else rs_train
        self.ppo_prompts = ppo_train[: r.rs.prompts] if r.rs.prompts else ppo_train

    def seed(self, k: int, stage: str) -> int:
        return self.recipe.seed * 100_000 + k * 100 + STAGE_SEEDS[stage]

    def stage(self, name: str, outputs: list[Path], fn: Callable[[], Any], inputs: list[Path] = ()) -> bool:
        """Run ``fn`` unless the stage is done (its outputs, and the ``inputs`` it reads, as when it ran); record
        its outputs and inputs. Returns True if it ran."""
        if self.manifest.done(name, outputs, inputs):
            return False
        t = time.time()
        fn()
        self.manifest.mark(name, outputs, inputs)
        log(f"[green]done[/green] {name} ({time.time() - t:.1f} s)")
        return True

    def launched(self, argv: list[str], what: str) -> bool:
        """Run a training stage as ``accelerate launch ... -m iterative_rlhf.cli ARGV`` when the recipe names an
        accelerate config (``campaign.accelerate_config``); False = run it in this process (no config, or this
        process is itself a launched one)."""
        from .launch import inside_launch, run_launched

        cfg = self.recipe.campaign.accelerate_config
        if not cfg or inside_launch():
            return False
        run_launched(cfg, [*argv, "--recipe", str(self.dir / "config.yaml")],
                     num_processes=self.recipe.campaign.num_processes, what=what)
        return True

    # ------------------------------------------------------------------ reward models

    def _refreshed(self, k: int) -> list[Path]:
        """Round k's refreshed RM folders in the order they were made (rm, then ppo_rm)."""
        d = self.dir / f"v{k}"
        return [p for p in (d / "rm", d / "ppo_rm") if (p / "helpful").exists() and (p / "safety").exists()]

    def rm_dir(self, k: int) -> Path:
        """The latest RMs as of round k: refreshed ones when the recipe asks, else the initial ones.

        While round k selects its samples that is ``vK/rm``; once ``vK/ppo_rm``
        exists (PPO's refresh), PPO, the evaluation and round k+1 use it.
        """
        if self.recipe.reward.refresh:
            for j in range(k, 0, -1):
                found = self._refreshed(j)
                if found:
                    return found[-1]
        return self.dir / "rm"

    def refreshes(self, k: int) -> bool:
        """Whether round k refreshes the RMs on its samples: TinyWorld's annotators, or people's comparisons."""
        rw = self.recipe.reward
        return rw.refresh and k > 1 and (self.world is not None or bool(rw.refresh_data))

    def refreshes_before_ppo(self, k: int) -> bool:
        rw = self.recipe.reward
        return rw.refresh and rw.refresh_before_ppo and self.world is not None and self.runs_rs(k) \
            and self.runs_ppo(k)

    def train_rms(self) -> None:
        from .reward import evaluate_reward_models, rm_datasets, rm_test_sets

        rm = self.dir / "rm"

        def outputs(kind: str) -> list[Path]:
            return [rm / kind, rm / f"{kind}.time.json"]

        jobs = []
        for kind in ("helpful", "safety"):
            if self.manifest.done(f"rm/{kind}", outputs(kind)):
                continue
            t = time.time()
            if self.launched(["rm", "train", "--kind", kind, "--out", str(rm / kind), "--init", self._rm_init()],
                             f"rm/{kind}"):
                atomic_write_json(rm / f"{kind}.time.json", {"seconds": time.time() - t})
                self.manifest.mark(f"rm/{kind}", outputs(kind))
                log(f"[green]done[/green] rm/{kind} ({time.time() - t:.1f} s)")
                continue
            train_ds, _ = rm_datasets(self.recipe, kind, self.world)
            jobs.append(_rm_job(self.recipe, kind, rm / kind, self._rm_init(), train_ds,
                                time_file=rm / f"{kind}.time.json"))

        def done(kind: str, seconds: float) -> None:
            self.manifest.mark(f"rm/{kind}", outputs(kind))
            log(f"[green]done[/green] rm/{kind} ({seconds:.1f} s)")
        self.train_at_once(jobs, done)

        def run_eval() -> None:
            evaluate_reward_models({"helpful": rm / "helpful", "safety": rm / "safety"},
                                   rm_test_sets(self.recipe, self.world), rm / "eval",
                                   threshold=self.recipe.scorer.threshold, world=self.world)
        self.stage("rm/eval", [rm / "eval" / "rm_eval.json"], run_eval)

    def train_at_once(self, jobs: list[tuple[str, Callable[[], Any], str, float]],
                      done: Callable[[str, Any], None] | None = None) -> None:
        """Train RMs (``_rm_job``s: name, job, init, pairs x epochs): at once, a process each, on a CPU machine
        with a core per job, small models and enough work (``workers.enabled``); else one after the other.
        ``done(name, result)`` runs here as each ends."""
        from .workers import at_once, enabled, small_checkpoint

        workers = enabled(len(jobs), [w for *_, w in jobs]) and all(small_checkpoint(i) for _, _, i, _ in jobs)
        if workers:
            log(f"training the {' and '.join(name for name, *_ in jobs)} RMs at once, a process each")
        at_once([(name, job) for name, job, *_ in jobs], workers=workers, done=done)

    def _rm_init(self) -> str:
        return self.base_path if self.recipe.reward.helpful.init == "policy" else self.recipe.reward.helpful.init

    def ppo_refresh(self, k: int) -> None:
        """Sample the RS checkpoint of round k on the train prompts and refresh the RMs on those comparisons."""
        d = self.dir / f"v{k}"
        self.rs_sample(k, str(d / "rs_policy"), out=d / "ppo_rm" / "samples.jsonl", stage="ppo_rm")
        self.refresh_rms(k, samples_file=d / "ppo_rm" / "samples.jsonl", out=d / "ppo_rm", stage="ppo_rm")

    def refresh_rms(self, k: int, samples_file: Path | None = None, out: Path | None = None,
                    stage: str = "rm") -> None:
        """New comparisons on the latest policy's samples (TinyWorld's annotators), then retrain both RMs.

        ``reward.refresh_from``: ``previous`` continues training the RMs that scored
        round k-1 on the new comparisons plus as many replayed earlier ones (drawn
        from the world's comparisons and the earlier rounds'), for
        ``reward.refresh_epochs``: the cost stays the same every round.
        ``initial`` retrains from the initial checkpoint on every comparison so far,
        as Llama 2 did with its weekly batches (the cost grows every round).
        """
        import random

        from .reward import rm_datasets
        from .tinyworld.annotators import make_comparisons
        from .tinyworld.world import find_prompt

        rw = self.recipe.reward
        out = out or self.dir / f"v{k}" / "rm"
        if self.world is None:
            self.refresh_from_annotations(k, out)
            return
        tw = self.recipe.tinyworld
        samples: dict = {}
        for row in read_jsonl(samples_file or self.dir / f"v{k}" / "samples.jsonl"):
            samples.setdefault(find_prompt(row["prompt"]), []).append(row["response"])
        rng = random.Random(self.seed(k, stage))
        # The RMs this refresh continues from: the round's own refresh for PPO's, else the latest of round k-1
        # (never a half-finished earlier attempt of this same refresh).
        own = [p for p in self._refreshed(k) if p.name == "rm"] if stage == "ppo_rm" else []
        previous = own[0] if own else self.rm_dir(k - 1)
        tag = f"v{k}" if stage == "rm" else f"v{k}-ppo"
        new_files, earlier, n_new = {}, {}, {}
        for kind in ("helpful", "safety"):
            per = rw.refresh_comparisons_per_prompt if kind == "helpful" else tw.safety_comparisons_per_prompt
            rows = make_comparisons(kind, samples, per, rng, tw.annotator_noise, tw.length_cost,
                                    source=f"tinyworld-{kind}-{tag}")
            new_files[kind] = out / f"comparisons_{kind}.jsonl"
            atomic_write_jsonl(new_files[kind], rows)
            n_new[kind] = len(rows)
            made = [f / f"comparisons_{kind}.jsonl" for j in range(1, k + 1)
                    for f in (self.dir / f"v{j}" / "rm", self.dir / f"v{j}" / "ppo_rm") if f != out]
            earlier[kind] = [self.world.comparisons(kind, "train"), *(f for f in made if f.is_file())]
        self.new_batch(previous, new_files, out)
        recipe = dataclasses.replace(self.recipe)
        recipe.reward = dataclasses.replace(recipe.reward)
        for kind in ("helpful", "safety"):
            if not n_new[kind]:
                continue
            data = [*map(str, earlier[kind]), str(new_files[kind])]
            changes: dict = {}
            if rw.refresh_from == "previous":
                # Replay: earlier comparisons (reward.refresh_replay per new one), so the RM keeps what it knew.
                old_rows = [row for f in earlier[kind] for row in read_jsonl(f)]
                replay = rng.sample(old_rows, min(round(n_new[kind] * rw.refresh_replay), len(old_rows)))
                atomic_write_jsonl(out / f"replay_{kind}.jsonl", replay)
                data = [str(out / f"replay_{kind}.jsonl")] if replay else []
                data.append(str(new_files[kind]))
                changes["epochs"] = rw.refresh_epochs
            sec = dataclasses.replace(getattr(recipe.reward, kind), data=data, format="canonical",
                                      test_data=[str(self.world.comparisons(kind, "test"))], **changes)
            setattr(recipe.reward, kind, sec)
        jobs = []
        for kind in ("helpful", "safety"):
            if not n_new[kind]:
                # Nothing new to learn from (e.g. no two distinct samples on any prompt of this kind).
                log(f"v{k} RM refresh ({stage}): no new {kind} comparisons; the {kind} RM before stays")
                if (out / kind).exists():
                    shutil.rmtree(out / kind)
                shutil.copytree(previous / kind, out / kind)
                continue
            train_ds, _ = rm_datasets(recipe, kind, None)
            init = str(previous / kind) if rw.refresh_from == "previous" else self._rm_init()
            jobs.append(_rm_job(recipe, kind, out / kind, init, train_ds))
        self.train_at_once(jobs)

    def annotation_files(self, k: int) -> dict[str, Path]:
        """Where people's comparisons of round k's pairs go (``reward.refresh_data``), per RM kind."""
        template = self.recipe.reward.refresh_data
        return {kind: Path(template.format(round=k, kind=kind)) for kind in ("helpful", "safety")}

    def write_pairs(self, k: int, out: Path) -> Path:
        """``out/pairs.jsonl``: two distinct samples of round k per train prompt, for people to compare."""
        import random

        path = out / "pairs.jsonl"
        if path.is_file():
            return path
        rng = random.Random(self.seed(k, "rm"))
        samples: dict[str, list[str]] = {}
        tags: dict[str, bool] = {}
        for row in read_jsonl(self.dir / f"v{k}" / "samples.jsonl"):
            samples.setdefault(row["prompt"], []).append(row["response"])
            tags[row["prompt"]] = bool(row.get("is_safety", False))
        rows = []
        for prompt, responses in samples.items():
            distinct = sorted({r for r in responses if r.strip()})  # an empty sample is no response to compare
            if len(distinct) >= 2:
                a, b = rng.sample(distinct, 2)
                rows.append({"prompt": prompt, "is_safety": tags[prompt], "response_0": a, "response_1": b})
        if not rows:
            raise UserError(f"v{k}: no train prompt has two distinct samples to compare; raise rs.n or the "
                            "sampling temperature (rs.temperatures)")
        atomic_write_jsonl(path, rows)
        return path

    def refresh_from_annotations(self, k: int, out: Path) -> None:
        """Refresh both RMs on people's comparisons of round k's samples (``reward.refresh_data``).

        Writes the pairs to annotate, then stops the campaign (:class:`AwaitingAnnotations`, exit 3, naming the
        files) until both
        annotation files exist (an empty one: nothing new of that kind, that RM stays); the rerun trains on them
        as the TinyWorld refresh does: ``previous`` continues
        from the round before's RMs on the new comparisons plus replayed earlier ones (the recipe's data, its
        held-out prompts left out, and earlier rounds' annotations), ``initial`` retrains from the initial
        checkpoint on everything so far. Both RMs are trained on the Llama 2 mix (:func:`reward.mix_for_kind`).
        """
        import random

        import datasets

        from .preferences import load_preferences
        from .reward import _OTHER, _comparisons, mix_for_kind

        rw = self.recipe.reward
        pairs = self.write_pairs(k, out)
        files = self.annotation_files(k)
        missing = [str(f) for f in files.values() if not f.is_file()]
        if missing:
            n = len(read_jsonl(pairs))
            raise AwaitingAnnotations(
                f"v{k}: the RM refresh waits for people's comparisons of the {n} pairs in {pairs} (canonical JSONL: "
                f"prompt, chosen, rejected, level; helpfulness and safety apart, e.g. `iterative-rlhf annotate "
                f"{pairs} --kind helpful --out {files['helpful']}`): write {' and '.join(missing)}, then rerun this "
                "command")
        rng = random.Random(self.seed(k, "rm"))
        previous = self.rm_dir(k - 1)
        earlier_files = {kind: [self.dir / f"v{j}" / "rm" / f"comparisons_{kind}.jsonl" for j in range(2, k)]
                         for kind in ("helpful", "safety")}
        new_files: dict[str, Path] = {}
        eval_prompts = {p["prompt"] for p in self.eval_prompts}
        for kind, f in files.items():
            # An empty file says "no new comparisons of this kind": that RM stays as it was.
            empty = not f.read_text(encoding="utf-8").strip()
            rows = [] if empty else load_preferences(str(f), format="auto", kind=kind).to_list()  # validated
            on_eval = sum(row["prompt"] in eval_prompts for row in rows)
            if on_eval:
                warn(f"{f}: {on_eval} of {len(rows)} comparisons are on eval prompts; the RMs will train on prompts "
                     "the reports evaluate (the pairs to compare are in " + str(pairs) + ")")
            for row in rows:  # each RM gives the levels the margins of its own scheme
                row.pop("margin")
            new_files[kind] = out / f"comparisons_{kind}.jsonl"  # the run keeps its own copy
            atomic_write_jsonl(new_files[kind], rows)
        self.new_batch(previous, new_files, out)

        def load(f: Path, kind: str, scheme: str) -> datasets.Dataset | None:
            if not f.is_file() or not f.read_text(encoding="utf-8").strip():
                return None
            return load_preferences(str(f), format="canonical", kind=kind, margin_scheme=scheme)

        def parts(kind: str, scheme: str) -> datasets.Dataset | None:
            """``kind`` comparisons of this refresh, margins of ``scheme`` (None: none new)."""
            new = load(new_files[kind], kind, scheme)
            if new is None:
                return None
            made = [load(f, kind, scheme) for f in earlier_files[kind]]
            base = _comparisons(self.recipe, kind, scheme, None, test=False, required=False)
            earlier = [d for d in (base, *made) if d is not None and len(d)]
            if rw.refresh_from == "initial":
                return datasets.concatenate_datasets([*earlier, new])
            old = datasets.concatenate_datasets(earlier) if earlier else None
            n_replay = min(round(len(new) * rw.refresh_replay), len(old)) if old is not None else 0
            if not n_replay:
                return new
            replay = old.select(sorted(rng.sample(range(len(old)), n_replay)))
            return datasets.concatenate_datasets([replay, new])

        jobs = []
        for kind in ("helpful", "safety"):
            cfg = getattr(rw, kind)
            primary = parts(kind, cfg.margin)
            if primary is None:
                log(f"v{k} RM refresh: {files[kind]} holds no comparisons; the {kind} RM before stays")
                if (out / kind).exists():
                    shutil.rmtree(out / kind)
                shutil.copytree(previous / kind, out / kind)
                continue
            train_ds = mix_for_kind(self.recipe, kind, primary, parts(_OTHER[kind], cfg.margin))
            recipe = self.recipe
            if rw.refresh_from == "previous":
                recipe = dataclasses.replace(recipe, reward=dataclasses.replace(
                    rw, **{kind: dataclasses.replace(cfg, epochs=rw.refresh_epochs)}))
            init = str(previous / kind) if rw.refresh_from == "previous" else self._rm_init()
            jobs.append(_rm_job(recipe, kind, out / kind, init, train_ds))
        self.train_at_once(jobs)

    def new_batch(self, previous: Path, new_files: dict[str, Path], out: Path) -> None:
        """``out/new_batch.json``: the RMs before a refresh scored on (``reward.refresh_check`` of) its new
        comparisons, per kind and level."""
        from .reward import new_batch_accuracy

        report: dict[str, Any] = {}
        limit = self.recipe.reward.refresh_check
        for kind, f in new_files.items():
            rows = read_jsonl(f) if limit and f.is_file() and f.stat().st_size else []
            acc = new_batch_accuracy(previous / kind, rows, limit=limit, batch_size=self.recipe.scorer.batch_size,
                                     trust_remote_code=self.recipe.model.trust_remote_code)
            report[kind] = None if acc is None else {"rm": str((previous / kind).relative_to(self.dir)), **acc}
        atomic_write_json(out / "new_batch.json", report)

    def scorer(self, k: int, whiten=None):  # noqa: ANN001, ANN201
        from .scorer import GatedScorer

        d = self.rm_dir(k)
        return GatedScorer(d / "helpful", d / "safety", self.recipe.scorer, whiten=whiten,
                           trust_remote_code=self.recipe.model.trust_remote_code)

    # ------------------------------------------------------------------ one round

    def policy_of(self, k: int) -> str:
        """The checkpoint that round k ends with (round 0 = the base policy).

        With ``campaign.select=best`` it is the previous round's when round k's
        selection (``vK/select.json``) kept that one.
        """
        if k == 0:
            return self.base_path
        if self.recipe.campaign.select == "best":
            f = self.dir / f"v{k}" / "select.json"
            if f.is_file() and json.loads(f.read_text())["kept"] == "previous":
                return self.policy_of(k - 1)
        return self.round_policy(k)

    def merges(self, k: int) -> bool:
        """Whether round k's policy is its trained one averaged with round k-1's (``campaign.merge`` < 1)."""
        return self.recipe.campaign.merge < 1.0 and k >= 2

    def round_policy(self, k: int) -> str:
        """What round k made: its trained policy, or that averaged with round k-1's (``vK/policy``)."""
        return str(self.dir / f"v{k}" / "policy") if self.merges(k) else self.trained_policy(k)

    def policy_name(self, policy: str) -> str:
        """A checkpoint as the reports name it: "base", or its path inside the run directory."""
        if policy == self.base_path:
            return "base"
        p = Path(policy)
        return str(p.relative_to(self.dir)) if p.is_relative_to(self.dir) else policy

    def trained_policy(self, k: int) -> str:
        """The checkpoint that round k trained: PPO's when the round runs PPO, else the RS checkpoint."""
        d = self.dir / f"v{k}"
        if self.runs_ppo(k):
            return str(d / "ppo" / "policy")
        return str(d / "rs_policy")

    def runs_rs(self, k: int) -> bool:
        return self.recipe.campaign.mode in ("rs", "rs+ppo")

    def runs_ppo(self, k: int) -> bool:
        mode = self.recipe.campaign.mode
        return mode == "ppo" or (mode == "rs+ppo" and k >= self.recipe.campaign.ppo_from_round)

    def run_round(self, k: int) -> None:
        d = self.dir / f"v{k}"
        r = self.recipe
        start = self.policy_of(k - 1)
        if self.runs_rs(k):
            self.run_rs(k, start)
        if self.runs_ppo(k):
            ppo_start = str(d / "rs_policy") if self.runs_rs(k) else start
            if self.refreshes_before_ppo(k):
                self.stage(f"v{k}/ppo_rm", [d / "ppo_rm" / "helpful", d / "ppo_rm" / "safety",
                                            d / "ppo_rm" / "new_batch.json"], lambda: self.ppo_refresh(k))
            self.stage(f"v{k}/ppo", [d / "ppo" / "policy", d / "ppo.json"], lambda: self.ppo(k, ppo_start))
        if self.merges(k):
            self.stage(f"v{k}/merge", [d / "policy", d / "merge.json"], lambda: self.merge(k))
        if r.campaign.select == "best":
            self.stage(f"v{k}/select", [d / "select.json", d / "select_samples.jsonl"], lambda: self.select(k))
        self.stage(f"v{k}/eval", self.eval_outputs(k), lambda: self.evaluate(k))
        self.stage(f"v{k}/report", [d / "report.json", d / "metrics.jsonl"], lambda: self.round_report(k),
                   inputs=self.report_inputs(k))

    def run_rs(self, k: int, start: str) -> None:
        """Round k's rejection sampling from policy ``start``: (the temperature search,) sample, (refresh the RMs
        on the samples,) select the best, fine-tune on them; each a stage."""
        d = self.dir / f"v{k}"
        if self.recipe.rs.temperature_search:
            self.stage(f"v{k}/rs_temperature", [d / "temperature.json"], lambda: self.search_temperature(k, start))
        self.stage(f"v{k}/rs_sample", [d / "samples.jsonl"], lambda: self.rs_sample(k, start))
        if self.refreshes(k):
            self.stage(f"v{k}/rm", [d / "rm" / "helpful", d / "rm" / "safety", d / "rm" / "new_batch.json"],
                       lambda: self.refresh_rms(k))
        self.stage(f"v{k}/rs_select", [d / "scored.jsonl", d / "selected.jsonl", d / "rs.json"],
                   lambda: self.rs_select(k))
        self.stage(f"v{k}/sft", [d / "rs_policy"], lambda: self.sft(k))

    def rs_temperature(self, k: int) -> float:
        """Round k's sampling temperature: what ``rs.temperature_search`` chose, else ``rs.temperatures``."""
        f = self.dir / f"v{k}" / "temperature.json"
        if self.recipe.rs.temperature_search and f.is_file():
            return float(json.loads(f.read_text())["chosen"])
        return self.recipe.temperature_for(k)

    def search_temperature(self, k: int, policy: str) -> None:
        """``vK/temperature.json``: the temperature round k samples at, re-tuned as Llama 2 did (§3.2.3, Fig. 8).

        ``rs.n`` samples per prompt of a probe (``rs.temperature_search_prompts`` train prompts, drawn per round)
        at each candidate temperature, scored by the RMs of the round before (those the round's samples will
        meet before any refresh); the candidate with the highest mean over prompts of the best-of-N gated R_c
        wins (the first of equals). The mean of the per-prompt median is recorded beside it: their gap is what
        rejection sampling can gain at that temperature.
        """
        import random

        r = self.recipe
        t = time.time()
        seed = self.seed(k, "rs_temperature")
        probe = random.Random(seed).sample(self.train_prompts, min(r.rs.temperature_search_prompts,
                                                                   len(self.train_prompts)))
        samples = dict(zip(r.rs.temperature_search, self.sample(policy, probe, r.rs.n, r.rs.temperature_search,
                                                                 seed, f"v{k} temperature search"), strict=True))
        candidates = []
        with self.scorer(k - 1) as scorer:
            for temp, res in samples.items():
                rows = [(p, c.text) for p, comps in zip(probe, res, strict=True) for c in comps]
                b = scorer.score([p["prompt"] for p, _ in rows], [text for _, text in rows],
                                 [bool(p.get("is_safety", False)) for p, _ in rows])
                rc = b.r_c.view(len(probe), -1)  # (P, N)
                best, median = float(rc.max(dim=1).values.mean()), float(rc.median(dim=1).values.mean())
                if not (math.isfinite(best) and math.isfinite(median)):
                    raise NumericalError(f"v{k} temperature search: a non-finite R_c at temperature {temp}; check "
                                         f"the RMs in {self.rm_dir(k - 1)}")
                candidates.append({"temperature": temp, "best_of_n": best, "median": median,
                                   "distinct": sum(len({c.text for c in comps}) for comps in res) / len(res)})
        chosen = max(candidates, key=lambda c: c["best_of_n"])["temperature"]
        atomic_write_json(self.dir / f"v{k}" / "temperature.json", {
            "chosen": chosen, "candidates": candidates, "prompts": len(probe), "n": r.rs.n,
            "rm": str(self.rm_dir(k - 1).relative_to(self.dir)), "seconds": time.time() - t})
        tried = ", ".join(f"{c['temperature']:g} -> {c['best_of_n']:.3f}" for c in candidates)
        log(f"v{k} temperature search: {tried} (mean best-of-{r.rs.n} R_c); sampling at {chosen:g}")

    def sample(self, policy: str, prompts: list[dict], n: int, temperatures: list[float], seed: int,
               where: str) -> list[list]:
        """``n`` responses per prompt row from ``policy`` at each temperature, one engine start; prompts longer
        than ``model.max_prompt_length`` are cut from the left (``where`` names them in the warning)."""
        from .generation import fit_prompts, make_engine

        r = self.recipe
        engine = make_engine(policy, r.generation, seed=seed, trust_remote_code=r.model.trust_remote_code)
        try:
            texts = fit_prompts(engine.tokenizer, [p["prompt"] for p in prompts], r.model.max_prompt_length, where)
            return [engine.generate(texts, n, t, r.generation.max_new_tokens, seed) for t in temperatures]
        finally:
            engine.close()

    def rs_sample(self, k: int, policy: str, out: Path | None = None, stage: str = "rs_sample") -> None:
        r = self.recipe
        t = time.time()
        temperature = self.rs_temperature(k) if stage == "rs_sample" else r.temperature_for(k)
        [res] = self.sample(policy, self.train_prompts, r.rs.n, [temperature], self.seed(k, stage),
                            f"v{k} rejection sampling")
        rows = [{"prompt": p["prompt"], "is_safety": bool(p.get("is_safety", False)), "sample": j,
                 "response": c.text, "num_tokens": len(c.token_ids)}
                for p, comps in zip(self.train_prompts, res, strict=True) for j, c in enumerate(comps)]
        if out is not None:
            atomic_write_jsonl(out, rows)
            return
        atomic_write_jsonl(self.dir / f"v{k}" / "samples.jsonl", rows)
        atomic_write_json(self.dir / f"v{k}" / "rs_sample.time.json", {"seconds": time.time() - t})

    def _pool(self, k: int) -> dict[str, list]:
        from .rejection import Candidate

        pool: dict[str, list] = {}
        if self.recipe.rs.pool != "all":
            return pool
        for j in range(1, k):
            f = self.dir / f"v{j}" / "selected.jsonl"
            if not f.exists():
                continue
            for row in read_jsonl(f):
                origin = row["origin"] if row["origin"] != "new" else f"v{j}"
                c = Candidate(row["prompt"], row["response"], row["is_safety"], origin)
                if all(c.response != o.response for o in pool.get(c.prompt, [])):
                    pool.setdefault(c.prompt, []).append(c)
        return pool

    def rs_select(self, k: int) -> None:
        import torch

        from .rejection import Candidate, reward_vs_n, score_candidates, select_top, selection_stats
        from .rlmath import best_of_n_kl_bound

        r = self.recipe
        t = time.time()
        d = self.dir / f"v{k}"
        rows = read_jsonl(d / "samples.jsonl")
        new = [Candidate(x["prompt"], x["response"], x["is_safety"], "new", x["sample"]) for x in rows]
        pool = self._pool(k)
        old = [c for p in dict.fromkeys(c.prompt for c in new) for c in pool.get(p, [])]
        with self.scorer(k) as scorer:
            # WHITEN statistics: fit on the round's starting policy's samples of the train prompts, fixed for
            # the round (selection and PPO read the same scale).
            whiten = scorer.fit_whitening([c.prompt for c in new], [c.response for c in new],
                                          [c.is_safety for c in new])
            score_candidates(scorer, new + old)
        by_prompt: dict[str, list] = {}
        for c in new + old:
            by_prompt.setdefault(c.prompt, []).append(c)
        selected = [c for p in by_prompt for c in select_top(by_prompt[p], r.rs.top_k)]
        n = r.rs.n
        rewards = torch.tensor([c.reward for c in new]).view(-1, n)  # (P, N)
        stats = selection_stats(selected, new)
        stats.update(kl_bound=best_of_n_kl_bound(n), temperature=self.rs_temperature(k), pool=r.rs.pool)
        out = {"reward_vs_n": reward_vs_n(rewards), "selection": stats,
               "whiten": {"mean": whiten.mean, "std": whiten.std}, "selected_gold": None, "samples_gold": None}
        if self.world is not None:
            from .tinyworld.world import find_prompt, metrics

            out["selected_gold"] = metrics((find_prompt(c.prompt), c.response) for c in selected)
            out["samples_gold"] = metrics((find_prompt(c.prompt), c.response) for c in new)
        out["seconds"] = time.time() - t
        atomic_write_jsonl(d / "scored.jsonl", [{"prompt": c.prompt, "response": c.response, "origin": c.origin,
                                                  "sample": c.sample, **c.scores} for c in new + old])
        atomic_write_jsonl(d / "selected.jsonl", [{"prompt": c.prompt, "response": c.response,
                                                    "is_safety": c.is_safety, "origin": c.origin, **c.scores}
                                                   for c in selected])
        atomic_write_json(d / "rs.json", out)

    def sft(self, k: int) -> None:
        from .checkpoint import set_deploy_temperature
        from .sft import finetune

        t = time.time()
        d = self.dir / f"v{k}"
        init = self.base_path if self.recipe.sft.init == "base" else self.policy_of(k - 1)
        if not self.launched(["sft", "--data", str(d / "selected.jsonl"), "--init", init, "--out",
                              str(d / "rs_policy"), "--seed", str(self.seed(k, "sft"))], f"v{k}/sft"):
            finetune(self.recipe, read_jsonl(d / "selected.jsonl"), init, d / "rs_policy", self.seed(k, "sft"))
        set_deploy_temperature(d / "rs_policy", self.recipe.campaign.deploy_temperature)
        atomic_write_json(d / "sft.time.json", {"seconds": time.time() - t})

    def ppo(self, k: int, start: str) -> None:
        from .checkpoint import set_deploy_temperature
        from .ppo import run_ppo
        from .rlmath import WhitenStats

        t = time.time()
        d = self.dir / f"v{k}"
        whiten = None  # refreshed RMs (ppo_rm): PPO fits its whitening on the start policy's samples itself
        if (d / "rs.json").exists() and not self.refreshes_before_ppo(k):
            w = json.loads((d / "rs.json").read_text())["whiten"]
            whiten = WhitenStats(w["mean"], w["std"])
        rm = self.rm_dir(k)
        eval_metrics = None
        if self.world is not None:
            from .tinyworld.world import metrics

            def eval_metrics(rows: list[dict], responses: list[str]) -> dict:
                # The gold judge on the held-out prompts at each PPO evaluation: proxy vs gold per iteration.
                return metrics((r["prompt"], x) for r, x in zip(rows, responses, strict=True))
        # launched: `ppo --round k` runs this same method in each process (the same start, RMs and whitening)
        if not self.launched(["ppo", "--round", str(k), "--out", str(self.dir)], f"v{k}/ppo"):
            run_ppo(self.recipe, policy_path=start, helpful_rm=str(rm / "helpful"), safety_rm=str(rm / "safety"),
                    out_dir=d / "ppo", prompts=self.ppo_prompts, eval_prompts=self.holdout_prompts,
                    whiten=whiten, seed=self.seed(k, "ppo"), eval_metrics=eval_metrics)
        set_deploy_temperature(d / "ppo" / "policy", self.recipe.campaign.deploy_temperature)
        history = read_jsonl(d / "ppo" / "metrics.jsonl") if (d / "ppo" / "metrics.jsonl").exists() else []
        trained = [row for row in history if "reward" in row]  # iteration 0 is the evaluation before training
        atomic_write_json(d / "ppo.json", {"iterations": len(trained), "history": history,
                                            "final": trained[-1] if trained else None,
                                            "seconds": time.time() - t})

    def merge(self, k: int) -> None:
        """``vK/policy`` = merge x round k's trained policy + (1 - merge) x round k-1's policy, weight by weight.

        Every round fine-tunes from the same base (or from the round before), so the policies share one basin
        and their average is a policy too (model soups; WARP's moving average of RLHF policies). A round whose
        selection taught the policy worse answers moves the campaign's policy half as far. On TinyWorld (five
        seeds, as deployed) V5 gold went from 0.943 to 0.978 and no round fell more than 0.015 below the one
        before (results/README.md).
        """
        from .checkpoint import average_checkpoints, set_deploy_temperature

        t = time.time()
        d = self.dir / f"v{k}"
        w = self.recipe.campaign.merge
        trained, previous = self.trained_policy(k), self.policy_of(k - 1)
        average_checkpoints(trained, previous, w, d / "policy")
        set_deploy_temperature(d / "policy", self.recipe.campaign.deploy_temperature)
        atomic_write_json(d / "merge.json", {"weight": w, "trained": self.policy_name(trained),
                                             "previous": self.policy_name(previous), "seconds": time.time() - t})
        log(f"v{k} merge: {w:g} x {self.policy_name(trained)} + {1 - w:g} x {self.policy_name(previous)}")

    def select(self, k: int) -> None:
        """``campaign.select=best``: keep round k's policy (what it trained, or that averaged with round k-1's by
        ``campaign.merge``) or the previous round's, by the latest RMs.

        Both policies sample ``campaign.select_samples`` responses per held-out
        prompt (prompts no stage trains on) at temperature 1.0, as the evaluation
        does; the round's latest RMs score them, and each policy's score is its mean
        gated R_c (in [0, 1], before LOGIT and whitening: the share of its responses
        the RMs judge good, closer to a 0/1 judge than a mean of logits that a few
        extreme responses move). The round's policy is kept unless the previous one
        scores higher. The previous policy's samples are reused from round k-1's
        selection when it drew them (only their scores change with the RMs).
        Writes ``vK/select.json`` and ``vK/select_samples.jsonl``.
        """
        import statistics

        r = self.recipe
        d = self.dir / f"v{k}"
        t = time.time()
        n = r.campaign.select_samples
        prompts = self.holdout_prompts
        if not prompts:
            raise UserError("campaign.select=best: no held-out prompts to compare the policies on (1 in 8 train "
                            "prompts by hash; campaign.prompts has too few); add train prompts or set "
                            "campaign.select=last")
        policies = {"trained": self.round_policy(k), "previous": self.policy_of(k - 1)}
        names = {which: self.policy_name(p) for which, p in policies.items()}
        earlier = self.dir / f"v{k - 1}" / "select_samples.jsonl"
        reuse = [x for x in read_jsonl(earlier) if x["policy"] == names["previous"]] if earlier.is_file() else []
        rows: list[dict] = []
        for which, policy in policies.items():
            if which == "previous" and len(reuse) == n * len(prompts):
                rows += [{**x, "which": which} for x in reuse]
                continue
            seed = self.seed(k, "select_previous" if which == "previous" else "select")
            [res] = self.sample(policy, prompts, n, [1.0], seed, f"v{k} selection")
            rows += [{"which": which, "policy": names[which], "prompt": p["prompt"],
                      "is_safety": bool(p.get("is_safety", False)), "sample": j, "response": c.text}
                     for p, comps in zip(prompts, res, strict=True) for j, c in enumerate(comps)]
        with self.scorer(k) as scorer:
            b = scorer.score([x["prompt"] for x in rows], [x["response"] for x in rows],
                             [x["is_safety"] for x in rows])
        for x, v in zip(rows, b.r_c, strict=True):
            x["r_c"] = float(v)
        result: dict[str, Any] = {"prompts": len(prompts), "samples_per_prompt": n}
        for which in policies:
            mine = [x for x in rows if x["which"] == which]
            per_prompt: dict[str, list[float]] = {}
            for x in mine:
                per_prompt.setdefault(x["prompt"], []).append(x["r_c"])
            # Standard error over the samples (the prompts are the same for both policies).
            var = statistics.mean(statistics.pvariance(v) for v in per_prompt.values()) if per_prompt else 0.0
            result[which] = {"policy": names[which], "reward": statistics.fmean(x["r_c"] for x in mine),
                             "stderr": math.sqrt(var / max(len(mine), 1))}
            if self.world is not None:
                from .tinyworld.world import find_prompt, metrics

                result[which]["gold"] = metrics((find_prompt(x["prompt"]), x["response"]) for x in mine)["gold"]
        if not all(math.isfinite(result[which]["reward"]) for which in policies):
            raise NumericalError(f"v{k} selection: a mean gated R_c on the held-out prompts is NaN or inf "
                                 f"({result['trained']['reward']} trained, {result['previous']['reward']} previous); "
                                 f"check the RMs in {self.rm_dir(k)}")
        kept = "previous" if result["previous"]["reward"] > result["trained"]["reward"] else "trained"
        result.update(kept=kept, policy=result[kept]["policy"], seconds=time.time() - t)
        log(f"v{k} selection: {kept} policy kept ({result[kept]['policy']}); mean gated R_c on the held-out prompts "
            f"{result['trained']['reward']:.3f} ± {result['trained']['stderr']:.3f} (trained) vs "
            f"{result['previous']['reward']:.3f} ± {result['previous']['stderr']:.3f} (previous)")
        atomic_write_jsonl(d / "select_samples.jsonl", [{k2: v for k2, v in x.items() if k2 != "which"} for x in rows])
        atomic_write_json(d / "select.json", result)

    def eval_outputs(self, k: int) -> list[Path]:
        """What round k's eval stage writes (the samples as deployed only at another temperature than 1.0)."""
        d = self.dir / f"v{k}"
        deployed = [d / "eval_samples_deployed.jsonl"] if self.recipe.campaign.deploy_temperature != 1.0 else []
        return [d / "eval.json", d / "eval_samples.jsonl", *deployed]

    def evaluate(self, k: int) -> None:
        from .evaluation import best_and_worst, histogram, kl_to_base, stats, win_rate
        from .generation import make_engine

        r = self.recipe
        t = time.time()
        d = self.dir / f"v{k}"
        policy = self.policy_of(k)
        engine = make_engine(policy, r.generation, seed=self.seed(k, "eval"),
                             trust_remote_code=r.model.trust_remote_code)
        deploy_t = r.campaign.deploy_temperature
        texts = [p["prompt"] for p in self.eval_prompts]
        try:
            res = engine.generate(texts, r.campaign.eval_samples, 1.0, r.generation.max_new_tokens,
                                  self.seed(k, "eval"))
            # The same policy as deployed (campaign.deploy_temperature), on its own seed: the samples at 1.0
            # above are those of a campaign without this second measurement.
            res_deployed = engine.generate(texts, r.campaign.eval_samples, deploy_t, r.generation.max_new_tokens,
                                           self.seed(k, "eval_deployed")) if deploy_t != 1.0 else None
        finally:
            engine.close()

        def sample_rows(res: list) -> list[dict]:  # noqa: ANN001
            return [{**p, "sample": j, "response": c.text, "num_tokens": len(c.token_ids)}
                    for p, comps in zip(self.eval_prompts, res, strict=True) for j, c in enumerate(comps)]

        rows = sample_rows(res)
        deployed_rows = sample_rows(res_deployed) if res_deployed is not None else []
        with self.scorer(k) as scorer:  # v0: the initial RMs, also when a later run evaluates it again
            for part in (rows, deployed_rows):
                if not part:
                    continue
                b = scorer.score([x["prompt"] for x in part], [x["response"] for x in part],
                                 [bool(x.get("is_safety", False)) for x in part])
                for x, s in zip(part, b.rows(), strict=True):
                    x.update(s)
            # Win rates: the other rounds' eval samples rescored by the same scorer.
            others = {}
            for name, j in (("previous", k - 1), ("base", 0)):
                f = self.dir / f"v{j}" / "eval_samples.jsonl"
                if k == 0 or not f.exists():
                    others[name] = None
                    continue
                o = read_jsonl(f)
                ob = scorer.score([x["prompt"] for x in o], [x["response"] for x in o],
                                  [bool(x.get("is_safety", False)) for x in o])
                theirs = {(x["prompt"], x["sample"]): float(v) for x, v in zip(o, ob.r_c, strict=True)}
                mine = {(x["prompt"], x["sample"]): x["r_c"] for x in rows}
                others[name] = win_rate(mine, theirs)
        gold = deployed_gold = None
        if self.world is not None:
            from .tinyworld.world import find_prompt, judge, metrics

            for x in rows + deployed_rows:
                x["gold"] = judge(find_prompt(x["prompt"]), x["response"]).gold
            gold = metrics((find_prompt(x["prompt"]), x["response"]) for x in rows)
            if deployed_rows:
                deployed_gold = metrics((find_prompt(x["prompt"]), x["response"]) for x in deployed_rows)
        kl = kl_to_base(policy, self.base_path, [x["prompt"] for x in rows], [x["response"] for x in rows])
        out = {
            "n_prompts": len(self.eval_prompts), "samples_per_prompt": r.campaign.eval_samples,
            "helpful": stats([x["score_helpful"] for x in rows]), "safety": stats([x["score_safety"] for x in rows]),
            "gated": stats([x["r_c"] for x in rows]), "gated_hist": histogram([x["r_c"] for x in rows]),
            "gold": gold, "kl_to_base": kl,
            "response_words": sum(len(x["response"].split()) for x in rows) / len(rows),
            "response_tokens": sum(x["num_tokens"] for x in rows) / len(rows),
            "win_rate_vs_previous": others.get("previous") if k > 0 else None,
            "win_rate_vs_base": others.get("base") if k > 0 else None,
            "samples": best_and_worst(rows), "seconds": time.time() - t,
        }
        if deployed_rows:
            # As deployed: the same prompts and number of samples at campaign.deploy_temperature.
            out["deployed"] = {
                "temperature": deploy_t, "samples_per_prompt": r.campaign.eval_samples,
                "helpful": stats([x["score_helpful"] for x in deployed_rows]),
                "safety": stats([x["score_safety"] for x in deployed_rows]),
                "gated": stats([x["r_c"] for x in deployed_rows]), "gold": deployed_gold,
                "response_words": sum(len(x["response"].split()) for x in deployed_rows) / len(deployed_rows)}
            atomic_write_jsonl(d / "eval_samples_deployed.jsonl", deployed_rows)
        atomic_write_jsonl(d / "eval_samples.jsonl", rows)
        atomic_write_json(d / "eval.json", out)

    def report_inputs(self, k: int) -> list[Path]:
        """The stage results round k's report is made of: when one is made again (another version's evaluation),
        so is the report."""
        d = self.dir / f"v{k}"
        return [d / name for name in ("eval.json", "rs.json", "ppo.json", "select.json", "merge.json")]

    def round_report(self, k: int) -> None:
        d = self.dir / f"v{k}"

        def load(name: str) -> dict | None:
            p = d / name
            return json.loads(p.read_text()) if p.exists() and self._fresh(k, name) else None

        ev = load("eval.json") or {}
        rs, ppo, sel, mrg = load("rs.json"), load("ppo.json"), load("select.json"), load("merge.json")
        times = {"rs_sample": (load("rs_sample.time.json") or {}).get("seconds"),
                 "rs_select": (rs or {}).get("seconds"), "sft": (load("sft.time.json") or {}).get("seconds"),
                 "ppo": (ppo or {}).get("seconds"), "eval": ev.get("seconds")}
        if sel:
            times["select"] = sel.get("seconds")
        if mrg:
            times["merge"] = mrg.get("seconds")
        report = {
            "round": k, "name": f"v{k}", "mode": self.recipe.campaign.mode, "scorer": self.recipe.scorer.kind,
            "temperature": self.rs_temperature(k) if k > 0 and self.runs_rs(k) else None,
            "temperature_search": load("temperature.json"),
            "policy": self.policy_name(self.policy_of(k)),
            "eval": {key: v for key, v in ev.items() if key not in ("samples", "seconds")},
            "reward_vs_n": (rs or {}).get("reward_vs_n"), "selection": (rs or {}).get("selection"),
            "selected_gold": (rs or {}).get("selected_gold"), "samples_gold": (rs or {}).get("samples_gold"),
            "ppo": {key: v for key, v in ppo.items() if key != "seconds"} if ppo else None,
            "select": {key: v for key, v in sel.items() if key != "seconds"} if sel else None,
            "merge": {key: v for key, v in mrg.items() if key != "seconds"} if mrg else None,
            "times": times, "samples": ev.get("samples"),
            "rm_new_batch": {name: json.loads((d / name / "new_batch.json").read_text())
                             for name in ("rm", "ppo_rm") if (d / name / "new_batch.json").is_file()} or None,
        }
        atomic_write_jsonl(d / "metrics.jsonl", self.training_metrics(k))
        atomic_write_json(d / "report.json", report)

    def training_metrics(self, k: int) -> list[dict]:
        """Every training log of round k in one list, each row tagged with its stage.

        Stages in the order they ran: ``rm/<kind>`` (the initial RMs for v0, the
        refreshed ones after), ``sft``, ``ppo_rm/<kind>`` and ``ppo``; each row is a
        trainer's log entry (step, loss, learning rate, ...) or a PPO iteration.
        """
        d = self.dir / f"v{k}"
        sources: list[tuple[str, Path]] = []
        rm_root = self.dir / "rm" if k == 0 else d / "rm"
        sources += [(f"rm/{kind}", rm_root / kind / "train_log.jsonl") for kind in ("helpful", "safety")]
        if k > 0:
            if self.runs_rs(k):
                sources.append(("sft", d / "rs_policy" / "train_log.jsonl"))
            sources += [(f"ppo_rm/{kind}", d / "ppo_rm" / kind / "train_log.jsonl") for kind in ("helpful", "safety")]
            if self.runs_ppo(k):
                sources.append(("ppo", d / "ppo" / "metrics.jsonl"))
        return [{"stage": stage, **row} for stage, path in sources if path.is_file() for row in read_jsonl(path)]

    def _fresh(self, k: int, name: str) -> bool:
        """Round k's stage files only count when their stage ran in this campaign's mode."""
        if name in ("rs.json", "rs_sample.time.json", "sft.time.json"):
            return self.runs_rs(k)
        if name == "ppo.json":
            return self.runs_ppo(k)
        if name == "select.json":
            return self.recipe.campaign.select == "best"
        if name == "merge.json":
            return self.merges(k)
        if name == "temperature.json":
            return self.runs_rs(k) and bool(self.recipe.rs.temperature_search)
        return True

    # ------------------------------------------------------------------ the whole campaign

    def run(self, rounds: int) -> dict:
        from . import report as reports

        self.prepare()
        self.train_rms()
        d0 = self.dir / "v0"
        self.stage("v0/eval", self.eval_outputs(0), lambda: self.evaluate(0))
        self.stage("v0/report", [d0 / "report.json", d0 / "metrics.jsonl"], lambda: self.round_report(0),
                   inputs=self.report_inputs(0))
        for k in range(1, rounds + 1):
            log(f"[bold]round v{k}[/bold] ({self.recipe.campaign.mode}, scorer {self.recipe.scorer.kind})")
            self.run_round(k)
            reports.print_summary({"rounds": reports.load_rounds(self.dir), "recipe": f"{self.recipe.name} after v{k}",
                                   "mode": self.recipe.campaign.mode, "scorer": self.recipe.scorer.kind})
        return reports.write_report(self.dir)


def _rm_job(recipe: Recipe, kind: str, out: Path, init: str, train_ds: Any,
            time_file: Path | None = None) -> tuple[str, Callable[[], Any], str, float]:
    """One RM's training for :meth:`Campaign.train_at_once`: its name, the job (it pickles: a worker may run it),
    its init and its pairs x epochs."""
    work = len(train_ds) * getattr(recipe.reward, kind).epochs
    return kind, functools.partial(_train_timed, recipe, kind, out, init, train_ds, time_file), init, work


def _train_timed(recipe: Recipe, kind: str, out: Path, init: str, train_ds: Any, time_file: Path | None) -> float:
    """Train one RM; returns its wall seconds, also written to ``time_file`` if given."""
    from .reward import train_reward_model

    t = time.time()
    train_reward_model(recipe, kind, out, init_path=init, train_ds=train_ds)
    seconds = time.time() - t
    if time_file is not None:
        atomic_write_json(time_file, {"seconds": seconds})
    return seconds


def run_campaign(recipe: Recipe, out: str | Path, rounds: int | None = None, force: bool = False) -> dict:
    if rounds is not None:
        recipe.campaign.rounds = rounds
    return Campaign(recipe, out, force=force).run(recipe.campaign.rounds)


def dump_config(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
