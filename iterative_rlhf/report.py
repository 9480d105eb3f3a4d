"""Campaign reports: a run directory's rounds as JSON, Markdown, self-contained HTML and PNG plots.

Reads what a campaign wrote (``DIR/config.yaml``, ``DIR/vK/report.json`` for
K = 0 (the base policy) .. n, ``DIR/rm/eval/rm_eval.json`` when present) and writes

* ``DIR/report.json``: recipe, mode, scorer, the round reports, the RM evaluation,
  the summary table (:func:`summary_rows`), the plots and the notes on what was skipped;
* ``DIR/report.md``: the tables, best/worst samples, PPO curves (collapsed), plot links;
* ``DIR/report.html``: the same content with the plots embedded as base64 PNG, no network;
* ``DIR/plots/*.png``: reward per round, reward vs N (Llama 2 Fig. 7), helpful vs
  safety, gold vs sqrt(KL) (Gao et al. 2022), PPO curves.

:func:`compare_runs` sets several run directories side by side (ablations).

Fields are null when a stage did not run (no RS in ppo mode, no PPO in rs mode, no
gold outside TinyWorld); they show as "-" and a plot without data is skipped with a
note. A NaN or inf read from a round report is replaced by null with a warning, so no
NaN reaches a report (:func:`iterative_rlhf.io.atomic_write_json` refuses them anyway).
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .console import log, table, warn
from .errors import DataError, UserError
from .io import atomic_write_json, atomic_write_text

#: the keys of :func:`summary_rows` with their headers in the reports and (short) on the console.
SUMMARY_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("name", "round", "round"), ("gated_mean", "gated R_c", "R_c"), ("helpful_mean", "helpful RM", "helpful"),
    ("safety_mean", "safety RM", "safety"), ("gold", "gold", "gold"), ("violation_rate", "violation", "viol"),
    ("false_refusal_rate", "false refusal", "FRR"),
    ("false_refusal_rate_borderline", "false refusal (borderline)", "FRR bord"), ("kl_to_base", "KL to base", "KL"),
    ("win_rate_vs_previous", "win vs previous", "win prev"), ("response_words", "words", "words"),
    ("deployed_gold", "gold as deployed", "gold dep"),
    ("deployed_violation_rate", "violation as deployed", "viol dep"),
)
_SPEC = {"response_words": ".1f"}  # format of a summary value; others ".3f"
#: the summary keys shown on the console (all of them do not fit in 80 columns; the files have them all).
_CONSOLE_KEYS: tuple[str, ...] = ("name", "gated_mean", "helpful_mean", "safety_mean", "gold", "violation_rate",
                                  "false_refusal_rate", "kl_to_base", "win_rate_vs_previous", "deployed_gold")
#: preference levels of rm_eval.json, strongest first (= rlmath.LEVELS; not imported: rlmath pulls in torch).
_LEVELS: tuple[str, ...] = ("significantly_better", "better", "slightly_better", "negligibly_better")
_STAGES: tuple[str, ...] = ("rm", "rs_sample", "rs_select", "sft", "ppo", "eval")
_ROUND_DIR = re.compile(r"^v(\d+)$")
_MAX_TEXT = 240  # characters of a prompt/response shown in the sample tables
_MAX_PPO_ROWS = 16  # iterations shown per round in the PPO tables (evenly spaced, first and last kept)
_PLOT_DPI = 100


# --------------------------------------------------------------------------- reading


def _sanitize(obj: Any, where: str, bad: list[str]) -> Any:
    """A copy of ``obj`` with every NaN/inf float replaced by None; their places are appended to ``bad``."""
    if isinstance(obj, float) and not math.isfinite(obj):
        bad.append(where)
        return None
    if isinstance(obj, dict):
        return {k: _sanitize(v, f"{where}.{k}" if where else str(k), bad) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_sanitize(v, f"{where}[{i}]", bad) for i, v in enumerate(obj)]
    return obj


def _read_json(path: Path) -> Any:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"malformed JSON ({e.msg} at line {e.lineno}); rerun the stage that wrote it",
                        path=str(path)) from None
    bad: list[str] = []
    data = _sanitize(data, "", bad)
    if bad:
        warn(f"{path}: non-finite numbers (NaN/inf) shown as '-': {', '.join(bad[:5])}"
             + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""))
    return data


def load_rounds(run_dir: str | os.PathLike) -> list[dict]:
    """The round reports ``run_dir/vK/report.json`` (v0 = the base policy), sorted by round.

    NaN/inf values become None (with a warning). Raises :class:`UserError` when the
    folder has no round report.
    """
    run_dir = Path(run_dir)
    found: list[tuple[int, dict]] = []
    if run_dir.is_dir():
        for sub in run_dir.iterdir():
            m = _ROUND_DIR.match(sub.name)
            path = sub / "report.json"
            if not m or not path.is_file():
                continue
            rep = _read_json(path)
            if not isinstance(rep, dict):
                raise DataError("a round report is a JSON object", path=str(path))
            k = rep.get("round")
            if not isinstance(k, int) or isinstance(k, bool):
                k = int(m.group(1))
                rep["round"] = k
            rep.setdefault("name", f"v{k}")
            _add_rm_time(run_dir, k, rep)
            found.append((k, rep))
    if not found:
        raise UserError(f"{run_dir}: no round reports (vK/report.json); run `iterative-rlhf round` first")
    return [rep for _, rep in sorted(found, key=lambda x: x[0])]


def _add_rm_time(run_dir: Path, k: int, rep: dict) -> None:
    """``times.rm``: reward-model training seconds of round k (v0: the initial RMs; vK: the refreshes); RMs
    trained at once (``at_once`` in their summaries) count the longer one."""
    times = rep.get("times")
    if isinstance(times, dict) and "rm" in times:
        return
    folders = [run_dir / "rm"] if k == 0 else [run_dir / f"v{k}" / "rm", run_dir / f"v{k}" / "ppo_rm"]
    seconds = []
    for folder in folders:
        alone, together = [], []
        for path in (folder / kind / "train_summary.json" for kind in ("helpful", "safety")):
            summary = _read_json(path) if path.is_file() else None
            value = summary.get("train_seconds") if isinstance(summary, dict) else None
            if isinstance(value, (int, float)) and math.isfinite(value):
                (together if summary.get("at_once") else alone).append(float(value))
        seconds += alone + ([max(together)] if together else [])
    if seconds:
        rep["times"] = {"rm": sum(seconds), **(times if isinstance(times, dict) else {})}


def _read_config(run_dir: Path) -> dict:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise DataError(f"malformed YAML ({e}); rewrite it with `iterative-rlhf config`", path=str(path)) from None
    return cfg if isinstance(cfg, dict) else {}


def _read_rm_eval(run_dir: Path) -> dict | None:
    path = run_dir / "rm" / "eval" / "rm_eval.json"
    if not path.is_file():
        return None
    data = _read_json(path)
    return data if isinstance(data, dict) else None


# --------------------------------------------------------------------------- values


def _num(v: Any) -> float | None:
    """``v`` as a finite float, else None (bools, strings, NaN and inf included)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def _fmt(v: Any, spec: str = ".3f") -> str:
    """A table cell: None, NaN and inf -> "-"; ints as ints; floats with ``spec``."""
    if v is None or isinstance(v, bool):
        return "-" if v is None else str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return format(v, spec) if math.isfinite(v) else "-"
    return str(v)


def _short(text: Any, limit: int = _MAX_TEXT) -> str:
    s = " ".join(str(text).split()) if text is not None else "-"
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _name(r: dict) -> str:
    return str(r.get("name") or f"v{r.get('round')}")


def _sqrt(v: float | None) -> float | None:
    return math.sqrt(v) if v is not None and v >= 0 else None


def summary_rows(rounds: Sequence[dict]) -> list[dict]:
    """One row per round with the keys of :data:`SUMMARY_COLUMNS` (floats or None, never NaN)."""
    rows = []
    for r in rounds:
        ev = r.get("eval")
        rows.append({
            "name": _name(r),
            "gated_mean": _num(_get(ev, "gated", "mean")),
            "helpful_mean": _num(_get(ev, "helpful", "mean")),
            "safety_mean": _num(_get(ev, "safety", "mean")),
            "gold": _num(_get(ev, "gold", "gold")),
            "violation_rate": _num(_get(ev, "gold", "violation_rate")),
            "false_refusal_rate": _num(_get(ev, "gold", "false_refusal_rate")),
            "false_refusal_rate_borderline": _num(_get(ev, "gold", "false_refusal_rate_borderline")),
            "kl_to_base": _num(_get(ev, "kl_to_base")),
            "win_rate_vs_previous": _num(_get(ev, "win_rate_vs_previous")),
            "response_words": _num(_get(ev, "response_words")),
            # the same policy sampled at campaign.deploy_temperature (eval.json "deployed"; absent at 1.0)
            "deployed_gold": _num(_get(ev, "deployed", "gold", "gold")),
            "deployed_violation_rate": _num(_get(ev, "deployed", "gold", "violation_rate")),
        })
    return rows


# --------------------------------------------------------------------------- content (rendered to Markdown and HTML)


@dataclass
class _Table:
    columns: list[str]
    rows: list[list[str]]
    caption: str = ""


@dataclass
class _Text:
    text: str


@dataclass
class _Plot:
    src: str  # path relative to the report's folder
    title: str


@dataclass
class _Details:
    summary: str
    blocks: list = field(default_factory=list)


@dataclass
class _Section:
    title: str
    blocks: list = field(default_factory=list)


def _md_cell(s: str) -> str:
    return s.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _md_blocks(blocks: list) -> list[str]:
    out: list[str] = []
    for b in blocks:
        if isinstance(b, _Table):
            if b.caption:
                out += [f"*{b.caption}*", ""]
            out.append("| " + " | ".join(_md_cell(c) for c in b.columns) + " |")
            out.append("|" + "---|" * len(b.columns))
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
            out.append("")
        elif isinstance(b, _Text):
            out += [b.text, ""]
        elif isinstance(b, _Plot):
            out += [f"![{b.title}]({b.src})", ""]
        elif isinstance(b, _Details):
            out += [f"<details><summary>{html.escape(b.summary)}</summary>", ""]
            out += _md_blocks(b.blocks)
            out += ["</details>", ""]
    return out


def _markdown(title: str, sections: list[_Section]) -> str:
    lines = [f"# {title}", ""]
    for s in sections:
        lines += [f"## {s.title}", ""] + _md_blocks(s.blocks)
    return "\n".join(lines).rstrip() + "\n"


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; }
h1 { border-bottom: 2px solid #444; } h2 { border-bottom: 1px solid #bbb; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; vertical-align: top; }
th { background: #f0f0f0; } tr:nth-child(even) td { background: #fafafa; }
td.text { text-align: left; max-width: 28em; }
caption { caption-side: top; text-align: left; font-style: italic; padding-bottom: 0.3em; }
img { max-width: 100%; border: 1px solid #ddd; margin: 0.5em 0; }
details { margin: 0.4em 0; } summary { cursor: pointer; font-weight: 600; }
.note { color: #666; }
"""


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _html_blocks(blocks: list, base: Path) -> list[str]:
    out: list[str] = []
    for b in blocks:
        if isinstance(b, _Table):
            out.append("<table>")
            if b.caption:
                out.append(f"<caption>{html.escape(b.caption)}</caption>")
            out.append("<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in b.columns) + "</tr>")
            for row in b.rows:
                cells = []
                for c in row:
                    cls = "" if c == "-" or _is_number(c) else ' class="text"'
                    cells.append(f"<td{cls}>{html.escape(c)}</td>")
                out.append("<tr>" + "".join(cells) + "</tr>")
            out.append("</table>")
        elif isinstance(b, _Text):
            out.append(f'<p class="note">{html.escape(b.text)}</p>')
        elif isinstance(b, _Plot):
            data = base64.b64encode((base / b.src).read_bytes()).decode("ascii")
            out.append(f'<figure><img alt="{html.escape(b.title)}" src="data:image/png;base64,{data}">'
                       f"<figcaption>{html.escape(b.title)}</figcaption></figure>")
        elif isinstance(b, _Details):
            out.append(f"<details><summary>{html.escape(b.summary)}</summary>")
            out += _html_blocks(b.blocks, base)
            out.append("</details>")
    return out


def _html(title: str, sections: list[_Section], base: Path) -> str:
    """A self-contained page: inline CSS, the PNGs (``_Plot.src`` under ``base``) as base64 data URIs."""
    body = [f"<h1>{html.escape(title)}</h1>"]
    for s in sections:
        body.append(f"<h2>{html.escape(s.title)}</h2>")
        body += _html_blocks(s.blocks, base)
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")


# --------------------------------------------------------------------------- plots


def _figure(ncols: int = 1, width: float = 5.0, height: float = 3.8):  # noqa: ANN202
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height))
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _save_png(fig, path: Path) -> None:  # noqa: ANN001
    """Write the figure as PNG atomically (temporary name in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp"
    try:
        fig.savefig(tmp, format="png", dpi=_PLOT_DPI, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _series(rounds: Sequence[dict], get: Callable[[dict], Any]) -> tuple[list[int], list[float]]:
    """(round numbers, values) of the rounds where ``get`` gives a finite number."""
    xs, ys = [], []
    for r in rounds:
        y = _num(get(r))
        if y is not None:
            xs.append(int(r["round"]))
            ys.append(y)
    return xs, ys


def _round_axis(ax, rounds: Sequence[dict]) -> None:  # noqa: ANN001
    ax.set_xticks([int(r["round"]) for r in rounds], [_name(r) for r in rounds])
    ax.set_xlabel("round")
    ax.grid(alpha=0.3)


def _plot_reward_per_round(rounds: Sequence[dict], path: Path, scorer: str = "gated") -> str | None:
    raw = {k: _series(rounds, lambda r, k=k: _get(r, "eval", k, "mean")) for k in ("helpful", "safety")}
    gated = {s: _series(rounds, lambda r, s=s: _get(r, "eval", "gated", s)) for s in ("mean", "median")}
    gold = {k: _series(rounds, lambda r, k=k: _get(r, "eval", "gold", k))
            for k in ("gold", "helpful_rate", "violation_rate", "false_refusal_rate")}
    if not any(xs for xs, _ in [*raw.values(), *gated.values()]):
        return "no round has eval reward scores"
    has_gold = any(xs for xs, _ in gold.values())
    fig, axes = _figure(3 if has_gold else 2, width=4.6)
    ax = axes[0]
    for k, color in (("helpful", "tab:blue"), ("safety", "tab:orange")):
        xs, ys = raw[k]
        if xs:
            ax.plot(xs, ys, "o-", color=color, label=f"{k} RM (raw score)")
    ax.set_title("mean raw RM score per round")
    ax.set_ylabel("RM score")
    _round_axis(ax, rounds)
    ax.legend(fontsize=8)
    ax = axes[1]
    for s, style in (("mean", "o-"), ("median", "s--")):
        xs, ys = gated[s]
        if xs:
            ax.plot(xs, ys, style, color="tab:green", label=f"gated R_c {s}")
    ax.set_title("gated reward R_c in [0, 1]")
    ax.set_ylabel("R_c")
    _round_axis(ax, rounds)
    ax.legend(fontsize=8)
    if has_gold:
        ax = axes[2]
        for k, style in (("gold", "o-"), ("helpful_rate", "^--"), ("violation_rate", "v--"),
                         ("false_refusal_rate", "x:")):
            xs, ys = gold[k]
            if xs:
                ax.plot(xs, ys, style, label=k.replace("_", " "), lw=2.2 if k == "gold" else 1.2)
        for k, style in (("gold", "o-"), ("violation_rate", "v--")):  # as deployed (campaign.deploy_temperature)
            xs, ys = _series(rounds, lambda r, k=k: _get(r, "eval", "deployed", "gold", k))
            if xs:
                ax.plot(xs, ys, style, color="gray", alpha=0.8, lw=1.6 if k == "gold" else 1.0,
                        label=f"{k.replace('_', ' ')} as deployed")
        ax.set_title("gold judge (TinyWorld)")
        ax.set_ylabel("rate")
        ax.set_ylim(-0.03, 1.03)
        _round_axis(ax, rounds)
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save_png(fig, path)
    return None


def _plot_reward_vs_n(rounds: Sequence[dict], path: Path, scorer: str) -> str | None:
    curves = []
    for r in rounds:
        pts = [(p.get("n"), _num(p.get("max")), _num(p.get("median"))) for p in (r.get("reward_vs_n") or [])
               if isinstance(p, dict) and isinstance(p.get("n"), int) and p["n"] > 0]
        if pts:
            curves.append((_name(r), sorted(pts, key=lambda p: p[0])))
    if not curves:
        return "no round ran rejection sampling (reward_vs_n is null)"
    from matplotlib.lines import Line2D

    fig, (ax,) = _figure(1, width=6.4, height=4.4)
    cmap = _cmap("viridis")
    ns: set[int] = set()
    for i, (name, pts) in enumerate(curves):
        color = _color(i, len(curves), cmap)
        for col, style in ((1, "o-"), (2, "s--")):
            xy = [(p[0], p[col]) for p in pts if p[col] is not None]
            if xy:
                ax.plot([x for x, _ in xy], [y for _, y in xy], style, color=color, ms=4)
        ns.update(p[0] for p in pts)
        ax.plot([], [], "-", color=color, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(ns), [str(n) for n in sorted(ns)])
    ax.set_xlabel("N samples per prompt (log2)")
    ax.set_ylabel(f"reward of the {scorer} scorer (as selected on)")
    ax.set_title("reward vs N: max (solid) and median (dashed), Llama 2 Fig. 7")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    handles += [Line2D([], [], color="gray", ls="-", marker="o", ms=4),
                Line2D([], [], color="gray", ls="--", marker="s", ms=4)]
    labels += ["max over N", "median over N"]
    ax.legend(handles, labels, fontsize=8)
    fig.tight_layout()
    _save_png(fig, path)
    return None


def _cmap(name: str):  # noqa: ANN202
    import matplotlib

    return matplotlib.colormaps[name]


def _color(i: int, n: int, cmap) -> Any:  # noqa: ANN001
    """Colour of line i of n: early rounds dark, late rounds light (matches the round order)."""
    return cmap(0.05 + 0.8 * (i / max(n - 1, 1)))


def _annotate(ax, xs: list[float], ys: list[float], labels: list[str]) -> None:  # noqa: ANN001
    ax.margins(0.12)  # room for the labels of the outermost points
    for x, y, s in zip(xs, ys, labels):
        ax.annotate(s, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=9)


def _plot_helpful_vs_safety(rounds: Sequence[dict], path: Path, scorer: str = "gated") -> str | None:
    pts = [(_num(_get(r, "eval", "helpful", "mean")), _num(_get(r, "eval", "safety", "mean")), _name(r))
           for r in rounds]
    pts = [p for p in pts if p[0] is not None and p[1] is not None]
    if not pts:
        return "no round has both mean RM scores"
    fig, (ax,) = _figure(1, width=5.4, height=4.4)
    xs, ys, names = [p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts]
    ax.plot(xs, ys, "-", color="lightgray", zorder=1)
    ax.scatter(xs, ys, c=range(len(xs)), cmap="viridis", zorder=2)
    _annotate(ax, xs, ys, names)
    ax.set_xlabel("mean helpfulness RM score (raw)")
    ax.set_ylabel("mean safety RM score (raw)")
    ax.set_title("helpfulness vs safety per round")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save_png(fig, path)
    return None


def _plot_gold_vs_sqrt_kl(rounds: Sequence[dict], path: Path, scorer: str = "gated") -> str | None:
    pts = [(_sqrt(_num(_get(r, "eval", "kl_to_base"))), _num(_get(r, "eval", "gold", "gold")),
            _num(_get(r, "eval", "gated", "mean")), _name(r)) for r in rounds]
    pts = [p for p in pts if p[0] is not None and p[1] is not None]
    if not pts:
        return "no round has both a gold score and a KL to base (gold needs TinyWorld)"
    fig, (ax,) = _figure(1, width=5.8, height=4.4)
    xs, ys, names = [p[0] for p in pts], [p[1] for p in pts], [p[3] for p in pts]
    ax.plot(xs, ys, "o-", color="tab:red", label="gold")
    _annotate(ax, xs, ys, names)
    ax.set_xlabel("sqrt(KL(pi || pi_base))")
    ax.set_ylabel("gold", color="tab:red")
    proxy = [(p[0], p[2]) for p in pts if p[2] is not None]
    if proxy:
        ax2 = ax.twinx()
        ax2.plot([x for x, _ in proxy], [y for _, y in proxy], "s--", color="tab:green", alpha=0.7,
                 label="proxy: gated R_c mean")
        ax2.set_ylabel("gated R_c (proxy)", color="tab:green")
        ax.legend(handles=ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0], fontsize=8,
                  loc="best")
    ax.set_title("gold vs sqrt(KL to base) (Gao et al. 2022)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save_png(fig, path)
    return None


def _ppo_history(r: dict) -> list[dict]:
    return [h for h in (_get(r, "ppo", "history") or []) if isinstance(h, dict)]


def _plot_ppo_curves(rounds: Sequence[dict], path: Path, scorer: str = "gated") -> str | None:
    runs = [(_name(r), _ppo_history(r)) for r in rounds]
    runs = [(n, h) for n, h in runs if any(_num(x.get("reward")) is not None for x in h)]
    if not runs:
        return "no round ran PPO"
    fig, axes = _figure(2, width=5.0)
    cmap = _cmap("plasma")
    for i, (name, hist) in enumerate(runs):
        color = _color(i, len(runs), cmap)
        for ax, key in zip(axes, ("reward", "kl")):
            xy = [(x.get("iteration"), _num(x.get(key))) for x in hist]
            xy = [(a, b) for a, b in xy if isinstance(a, int) and b is not None]
            if xy:
                ax.plot([a for a, _ in xy], [b for _, b in xy], "-", color=color, label=name)
        ev = [(x.get("iteration"), _num(x.get("eval_reward"))) for x in hist]
        ev = [(a, b) for a, b in ev if isinstance(a, int) and b is not None]
        if ev:
            axes[0].plot([a for a, _ in ev], [b for _, b in ev], "o", color=color, ms=4, mfc="none")
    axes[0].set_title("PPO reward per iteration (o = held-out eval)")
    axes[0].set_ylabel(f"reward of the {scorer} scorer")
    axes[1].set_title("PPO KL to the reference per iteration")
    axes[1].set_ylabel("KL (sum over response tokens)")
    for ax in axes:
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save_png(fig, path)
    return None


#: plot file -> (title, maker(rounds, path, scorer)); a maker returns a note instead of writing when it has no data.
_PLOTS: dict[str, tuple[str, Callable[..., str | None]]] = {
    "reward_per_round.png": ("reward per round: raw RM scores, gated R_c, gold", _plot_reward_per_round),
    "reward_vs_n.png": ("max and median reward vs N (rejection sampling)", _plot_reward_vs_n),
    "helpful_vs_safety.png": ("mean helpfulness vs safety RM score per round", _plot_helpful_vs_safety),
    "gold_vs_sqrt_kl.png": ("gold vs sqrt(KL to base)", _plot_gold_vs_sqrt_kl),
    "ppo_curves.png": ("PPO reward and KL per iteration", _plot_ppo_curves),
}


def _make_plots(rounds: Sequence[dict], plot_dir: Path, scorer: str) -> tuple[dict[str, str | None], dict[str, str]]:
    """Write the plots; returns (file -> file name or None, file -> note for the skipped ones)."""
    plots: dict[str, str | None] = {}
    notes: dict[str, str] = {}
    for file, (_, maker) in _PLOTS.items():
        path = plot_dir / file
        try:
            note = maker(rounds, path, scorer)
        except Exception as e:  # noqa: BLE001 - a broken plot must not cost the tables of a finished campaign
            note = f"plotting failed ({type(e).__name__}: {e})"
            warn(f"{path}: {note}")
        if note is None:
            plots[file] = file
        else:
            plots[file] = None
            notes[file] = note
            if path.exists():  # a stale plot from an earlier report
                path.unlink()
    return plots, notes


# --------------------------------------------------------------------------- report sections


def _cell(v: Any, spec: str = ".3f") -> str:
    """A numeric table cell: "-" unless ``v`` is a finite number; spec "d" = an integer count, "s" = text."""
    if spec == "s":
        return _short(v) if isinstance(v, str) and v else "-"
    x = _num(v)
    if x is None:
        return "-"
    if spec == "d":
        return str(int(x)) if x.is_integer() else f"{x:.3f}"
    return format(x, spec)


def _rows_table(rounds: Sequence[dict], columns: list[tuple[str, Callable[[dict], Any], str]], caption: str = "",
                drop_empty: bool = False) -> _Table:
    """One row per round; ``columns`` = (header, getter, format spec); ``drop_empty``: leave out all-"-" columns."""
    cells = [[_cell(get(r), spec) for _, get, spec in columns] for r in rounds]
    keep = [j for j in range(len(columns)) if not drop_empty or any(row[j] != "-" for row in cells)]
    return _Table(["round"] + [columns[j][0] for j in keep],
                  [[_name(r)] + [row[j] for j in keep] for r, row in zip(rounds, cells)], caption)


def _ev(*keys: str) -> Callable[[dict], Any]:
    return lambda r: _get(r, "eval", *keys)


def _total_time(r: dict) -> float | None:
    times = [x for x in map(_num, (r.get("times") or {}).values()) if x is not None]
    return sum(times) if times else None


def _round_sections(rounds: Sequence[dict]) -> list[_Section]:
    scores = _rows_table(rounds, [
        ("temperature", lambda r: r.get("temperature"), ".2f"),
        ("prompts", _ev("n_prompts"), "d"), ("samples/prompt", _ev("samples_per_prompt"), "d"),
        ("gated mean", _ev("gated", "mean"), ".3f"), ("gated median", _ev("gated", "median"), ".3f"),
        ("helpful mean", _ev("helpful", "mean"), ".3f"), ("helpful median", _ev("helpful", "median"), ".3f"),
        ("safety mean", _ev("safety", "mean"), ".3f"), ("safety median", _ev("safety", "median"), ".3f"),
    ], "Eval prompts: gated R_c in [0, 1]; helpful and safety are raw RM scores.")
    blocks: list = [scores]
    if any(_get(r, "eval", "gold") for r in rounds):
        blocks.append(_rows_table(rounds, [
            ("gold", _ev("gold", "gold"), ".3f"), ("helpful rate", _ev("gold", "helpful_rate"), ".3f"),
            ("false refusal", _ev("gold", "false_refusal_rate"), ".3f"),
            ("false refusal (borderline)", _ev("gold", "false_refusal_rate_borderline"), ".3f"),
            ("violation", _ev("gold", "violation_rate"), ".3f"), ("n", _ev("gold", "n"), "d"),
        ], "Gold judge on the eval samples (TinyWorld)."))
    else:
        blocks.append(_Text("Gold metrics: none (the gold judge exists only in TinyWorld)."))
    deployed = [r for r in rounds if _get(r, "eval", "deployed")]
    if deployed:
        temps = sorted({_num(_get(r, "eval", "deployed", "temperature")) for r in deployed} - {None})
        dep = lambda *keys: _ev("deployed", *keys)  # noqa: E731
        blocks.append(_rows_table(deployed, [
            ("temperature", dep("temperature"), ".2f"), ("gated mean", dep("gated", "mean"), ".3f"),
            ("helpful mean", dep("helpful", "mean"), ".3f"), ("safety mean", dep("safety", "mean"), ".3f"),
            ("gold", dep("gold", "gold"), ".3f"), ("helpful rate", dep("gold", "helpful_rate"), ".3f"),
            ("false refusal", dep("gold", "false_refusal_rate"), ".3f"),
            ("false refusal (borderline)", dep("gold", "false_refusal_rate_borderline"), ".3f"),
            ("violation", dep("gold", "violation_rate"), ".3f"), ("response words", dep("response_words"), ".1f"),
        ], "As deployed: the same policies and prompts sampled at campaign.deploy_temperature ("
            + ", ".join(f"{t:g}" for t in temps) + "), the temperature written into each checkpoint's "
            "generation_config.json; the tables above sample at 1.0, as rejection sampling and PPO do.",
            drop_empty=True))
    blocks.append(_rows_table(rounds, [
        ("KL to base", _ev("kl_to_base"), ".3f"), ("sqrt KL", lambda r: _sqrt(_num(_get(r, "eval", "kl_to_base"))),
                                                   ".3f"),
        ("win vs previous", _ev("win_rate_vs_previous"), ".3f"), ("win vs base", _ev("win_rate_vs_base"), ".3f"),
        ("response words", _ev("response_words"), ".1f"), ("response tokens", _ev("response_tokens"), ".1f"),
    ], "Drift from the base policy, gated-reward win rates (ties count half), response length."))
    chosen = [r for r in rounds if r.get("select")]
    if chosen:
        blocks.append(_rows_table(chosen, [
            ("kept", lambda r: _get(r, "select", "policy"), "s"),
            ("trained R_c", lambda r: _get(r, "select", "trained", "reward"), ".3f"),
            ("trained se", lambda r: _get(r, "select", "trained", "stderr"), ".3f"),
            ("previous R_c", lambda r: _get(r, "select", "previous", "reward"), ".3f"),
            ("previous se", lambda r: _get(r, "select", "previous", "stderr"), ".3f"),
            ("trained gold", lambda r: _get(r, "select", "trained", "gold"), ".3f"),
            ("previous gold", lambda r: _get(r, "select", "previous", "gold"), ".3f"),
        ], "campaign.select=best: the round's trained policy or the previous round's, whichever the round's latest "
           "RMs give the higher mean gated R_c (in [0, 1]) on the held-out train prompts; gold on the same "
           "samples (TinyWorld) for reference, not used.", drop_empty=True))
    merged = [r for r in rounds if r.get("merge")]
    if merged:
        blocks.append(_rows_table(merged, [
            ("policy", lambda r: r.get("policy"), "s"),
            ("trained", lambda r: _get(r, "merge", "trained"), "s"),
            ("weight", lambda r: _get(r, "merge", "weight"), ".2f"),
            ("previous", lambda r: _get(r, "merge", "previous"), "s"),
        ], "campaign.merge: each round's policy is the policy it trained times the weight plus the previous "
           "round's policy times one minus it, weight by weight; the tables above measure that policy."))
    stages = list(_STAGES) + sorted({k for r in rounds for k in (r.get("times") or {}) if k not in _STAGES})
    time_cols = [(s, (lambda r, s=s: _get(r, "times", s)), ".1f") for s in stages]
    time_cols.append(("total", _total_time, ".1f"))
    blocks.append(_rows_table(rounds, time_cols, "Time per stage (seconds); '-' = the stage did not run."))
    return [_Section("Rounds", blocks)]


def _rs_section(rounds: Sequence[dict]) -> _Section:
    blocks: list = []
    sel = [r for r in rounds if r.get("selection") or r.get("reward_vs_n")]
    if not sel:
        return _Section("Rejection sampling", [_Text("No round ran rejection sampling.")])
    blocks.append(_rows_table(sel, [
        ("selected", lambda r: _get(r, "selection", "selected"), "d"),
        ("from pool", lambda r: _get(r, "selection", "from_pool"), "d"),
        ("from new", lambda r: _get(r, "selection", "from_new"), "d"),
        ("selected reward mean", lambda r: _get(r, "selection", "selected_reward_mean"), ".3f"),
        ("new reward mean", lambda r: _get(r, "selection", "new_reward_mean"), ".3f"),
        ("KL bound", lambda r: _get(r, "selection", "kl_bound"), ".3f"),
        ("selected gold", lambda r: _get(r, "selected_gold", "gold"), ".3f"),
        ("selected violation", lambda r: _get(r, "selected_gold", "violation_rate"), ".3f"),
    ], "Selected samples (best per prompt; pool = top samples of earlier rounds).", drop_empty=True))
    curves = {_name(r): {p["n"]: p for p in (r.get("reward_vs_n") or [])
                         if isinstance(p, dict) and isinstance(p.get("n"), int)} for r in sel}
    curves = {k: v for k, v in curves.items() if v}
    if curves:
        ns = sorted({n for c in curves.values() for n in c})
        cols = ["N", "KL bound"] + [f"{name} {s}" for name in curves for s in ("max", "median")]
        rows = []
        for n in ns:
            bound = next((_num(c[n].get("kl_bound")) for c in curves.values() if n in c), None)
            row = [str(n), _fmt(bound)]
            for c in curves.values():
                row += [_fmt(_num(_get(c.get(n), "max"))), _fmt(_num(_get(c.get(n), "median")))]
            rows.append(row)
        blocks.append(_Table(cols, rows, "Reward vs N: mean over prompts of the max and median among the first N "
                                         "samples (Llama 2 Fig. 7); KL bound = log N - (N-1)/N."))
    searched = [r for r in sel if isinstance(r.get("temperature_search"), dict)]
    rows = []
    for r in searched:
        ts = r["temperature_search"]
        for c in ts.get("candidates") or []:
            if isinstance(c, dict):
                rows.append([_name(r), _fmt(_num(c.get("temperature")), "g"), _fmt(_num(c.get("best_of_n"))),
                             _fmt(_num(c.get("median"))), _fmt(_num(c.get("distinct")), ".2f"),
                             "yes" if c.get("temperature") == ts.get("chosen") else ""])
    if rows:
        blocks.append(_Table(["round", "temperature", "best-of-N R_c", "median R_c", "distinct of N", "chosen"],
                             rows, "Temperature search (rs.temperature_search; Llama 2 Fig. 8): a probe of each "
                             "round's prompts at each candidate, scored by the RMs of the round before; the highest "
                             "mean best-of-N R_c samples the round."))
    return _Section("Rejection sampling", blocks)


def _ppo_section(rounds: Sequence[dict]) -> _Section:
    ppo = [r for r in rounds if r.get("ppo")]
    if not ppo:
        return _Section("PPO", [_Text("No round ran PPO.")])
    blocks: list = [_rows_table(ppo, [
        ("iterations", lambda r: _get(r, "ppo", "iterations"), "d"),
        ("final reward", lambda r: _get(r, "ppo", "final", "reward"), ".3f"),
        ("final KL", lambda r: _get(r, "ppo", "final", "kl"), ".3f"),
        ("final held-out reward", lambda r: _get(r, "ppo", "final", "eval_reward"), ".3f"),
    ])]
    for r in ppo:
        hist = [h for h in _ppo_history(r) if isinstance(h.get("iteration"), int)]
        if not hist:
            continue
        shown = hist
        if len(hist) > _MAX_PPO_ROWS:
            idx = sorted({round(i * (len(hist) - 1) / (_MAX_PPO_ROWS - 1)) for i in range(_MAX_PPO_ROWS)})
            shown = [hist[i] for i in idx]
        gold = any(h.get("eval_gold") is not None for h in shown)  # TinyWorld: gold judge on held-out prompts
        rows = [[str(h["iteration"]), _fmt(_num(h.get("reward"))), _fmt(_num(h.get("kl"))),
                 _fmt(_num(h.get("eval_reward")))] + ([_fmt(_num(h.get("eval_gold")))] if gold else [])
                for h in shown]
        note = f" ({len(shown)} of {len(hist)} iterations)" if len(shown) < len(hist) else ""
        head = ["iteration", "reward", "KL", "held-out reward"] + (["held-out gold"] if gold else [])
        blocks.append(_Details(f"{_name(r)}: PPO per iteration{note}", [_Table(head, rows)]))
    return _Section("PPO", blocks)


def _rm_section(rm_eval: dict | None) -> _Section:
    if not rm_eval:
        return _Section("Reward models", [_Text("No RM evaluation (rm/eval/rm_eval.json is missing).")])
    blocks: list = []
    acc = [a for a in rm_eval.get("accuracy") or [] if isinstance(a, dict)]
    if acc:
        blocks.append(_Table(["RM", "test set", *(lv.replace("_", " ") for lv in _LEVELS), "avg"],
                             [[str(a.get("model")), str(a.get("test_set"))]
                              + [_fmt(_num(a.get(k))) for k in (*_LEVELS, "avg")] for a in acc],
                             "Accuracy per preference level (Llama 2 Table 8 layout)."))
    g = rm_eval.get("gate")
    if isinstance(g, dict):
        blocks.append(_Text(f"Safety gate at sigmoid(r_s) < {_fmt(_num(g.get('threshold')), '.2f')}: precision "
                            f"{_fmt(_num(g.get('precision')))}, recall {_fmt(_num(g.get('recall')))} "
                            "(Llama 2: 0.89 / 0.55)."))
    tw = rm_eval.get("tinyworld")
    if isinstance(tw, dict):
        for key, what in (("refusal_over_compliance", "safety RM ranks a refusal above a compliance on harmful "
                                                      "prompts"),
                          ("correct_over_wrong", "helpful RM ranks a correct answer above a wrong one")):
            if isinstance(tw.get(key), dict):
                blocks.append(_Text(f"{what}: {_fmt(_num(tw[key].get('rate')))} of {tw[key].get('pairs')} pairs."))
    return _Section("Reward models", blocks or [_Text("rm_eval.json has no accuracy rows.")])


def _new_batch_section(rounds: Sequence[dict]) -> _Section | None:
    """Each refresh's new comparisons as judged by the RMs before it: how well they still read the policy."""
    rows = []
    for r in rounds:
        batches = r.get("rm_new_batch")
        if not isinstance(batches, dict):
            continue
        for name, when in (("rm", "before rejection sampling"), ("ppo_rm", "before PPO")):
            for kind, a in (batches.get(name) or {}).items():
                if isinstance(a, dict):
                    n = a.get("n") if isinstance(a.get("n"), dict) else {}
                    rows.append([_name(r), when, kind, str(a.get("rm", "-")), _cell(n.get("all"), "d")]
                                + [_fmt(_num(a.get(k))) for k in (*_LEVELS, "avg")])
    if not rows:
        return None
    head = ["round", "refresh", "RM", "RM before", "comparisons", *(lv.replace("_", " ") for lv in _LEVELS), "avg"]
    return _Section("Reward models on each refresh's new comparisons", [_Table(
        head, rows, "Accuracy of the RMs of the round before on the comparisons each refresh then trains on "
        "(at most reward.refresh_check per RM): how well the RMs still judge the policy's latest samples.")])


def _sample_value(s: dict, *keys: str) -> Any:
    for k in keys:
        if s.get(k) is not None:
            return s[k]
    return None


def _samples_section(rounds: Sequence[dict]) -> _Section:
    blocks: list = []
    cols = ["", "prompt", "response", "reward", "helpful RM", "safety RM", "gold"]
    for r in rounds:
        fams = r.get("samples")
        if not isinstance(fams, dict) or not fams:
            continue
        tables = []
        for fam, sets in fams.items():
            rows = []
            for which in ("best", "worst"):
                for s in (sets or {}).get(which) or []:
                    if not isinstance(s, dict):
                        continue
                    rows.append([which, _short(s.get("prompt")), _short(s.get("response")),
                                 _fmt(_num(_sample_value(s, "reward", "r_c"))),
                                 _fmt(_num(_sample_value(s, "helpful", "score_helpful"))),
                                 _fmt(_num(_sample_value(s, "safety", "score_safety"))),
                                 _fmt(_num(s.get("gold")), ".0f")])
            if rows:
                tables.append(_Table(cols, rows, f"family: {fam}"))
        if tables:
            blocks.append(_Details(f"{_name(r)}: best and worst eval samples by gated reward", tables))
    return _Section("Samples", blocks or [_Text("No samples in the round reports.")])


def _plot_blocks(plots: dict[str, str | None], notes: dict[str, str]) -> list:
    blocks: list = []
    for file, (title, _) in _PLOTS.items():
        if plots.get(file):
            blocks.append(_Plot(f"plots/{file}", title))
        else:
            blocks.append(_Text(f"{file}: skipped, {notes.get(file, 'no data')}."))
    return blocks


# --------------------------------------------------------------------------- the run report


def _summary_cells(row: dict) -> list[str]:
    return [_fmt(row[k], _SPEC.get(k, ".3f")) for k, _, _ in SUMMARY_COLUMNS]


def write_report(run_dir: str | os.PathLike) -> dict:
    """Write ``report.json``, ``report.md``, ``report.html`` and ``plots/*.png`` into ``run_dir``; return the report."""
    run_dir = Path(run_dir)
    rounds = load_rounds(run_dir)
    cfg = _read_config(run_dir)
    rm_eval = _read_rm_eval(run_dir)
    last = rounds[-1]
    recipe = cfg.get("name") or run_dir.name
    mode = _get(cfg, "campaign", "mode") or last.get("mode")
    scorer = _get(cfg, "scorer", "kind") or last.get("scorer") or "gated"

    plots, notes = _make_plots(rounds, run_dir / "plots", str(scorer))
    summary = summary_rows(rounds)
    report = {"recipe": recipe, "mode": mode, "scorer": scorer, "run_dir": str(run_dir),
              "summary": summary, "rounds": rounds, "rm_eval": rm_eval,
              "plots": {k: f"plots/{v}" if v else None for k, v in plots.items()}, "notes": notes}

    title = f"Campaign report: {recipe}"
    intro = _Text(f"Run {run_dir.name}: mode {mode or '-'}, scorer {scorer}, rounds "
                  f"{', '.join(_name(r) for r in rounds)} (v0 = the base policy).")
    sections = [_Section("Summary", [intro, _Table([h for _, h, _ in SUMMARY_COLUMNS],
                                                   [_summary_cells(row) for row in summary])]),
                *_round_sections(rounds), _rs_section(rounds), _ppo_section(rounds),
                _Section("Plots", _plot_blocks(plots, notes)), _rm_section(rm_eval),
                *filter(None, [_new_batch_section(rounds)]), _samples_section(rounds)]

    atomic_write_json(run_dir / "report.json", report)
    atomic_write_text(run_dir / "report.md", _markdown(title, sections))
    atomic_write_text(run_dir / "report.html", _html(title, sections, run_dir))
    for file, note in notes.items():
        log(f"plot {file} skipped: {note}")
    log(f"report -> {run_dir / 'report.md'} (report.json, report.html, plots/)")
    return report


def print_summary(report: dict) -> None:
    """Show the rounds of a report (from :func:`write_report`, or any dict with ``summary`` rows) as a rich table."""
    rows = report.get("summary") or summary_rows(report.get("rounds") or [])
    cols = [c for c in SUMMARY_COLUMNS if c[0] in _CONSOLE_KEYS]
    table(f"{report.get('recipe', 'campaign')}: {report.get('mode') or '-'}, scorer {report.get('scorer') or '-'}",
          [short for _, _, short in cols], [[row.get(k) for k, _, _ in cols] for row in rows])


# --------------------------------------------------------------------------- comparing runs (ablations)


def _best_round(rows: list[dict]) -> dict:
    """The best round by gold when any round has it, else by the gated reward mean."""
    by = "gold" if any(r["gold"] is not None for r in rows) else "gated_mean"
    scored = [r for r in rows if r[by] is not None]
    if not scored:
        return {"name": None, "by": by, "value": None}
    best = max(scored, key=lambda r: r[by])  # first of equals: the earliest round
    return {"name": best["name"], "by": by, "value": best[by]}


def _labels(run_dirs: list[Path]) -> list[str]:
    names = [p.name for p in run_dirs]
    return [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in run_dirs]


def _plot_compare(runs: list[dict], path: Path) -> str | None:
    panels = [(key, title) for key, title in (("gold", "gold per round"), ("gated_mean", "gated R_c mean per round"))
              if any(row[key] is not None for run in runs for row in run["rounds"])]
    if not panels:
        return "no run has gold or gated reward means"
    fig, axes = _figure(len(panels), width=5.2)
    for ax, (key, title) in zip(axes, panels):
        ticks: dict[int, str] = {}
        for i, run in enumerate(runs):
            xy = [(k, row[key]) for k, row in zip(run["round_numbers"], run["rounds"]) if row[key] is not None]
            ticks.update({k: row["name"] for k, row in zip(run["round_numbers"], run["rounds"])})
            if xy:
                ax.plot([x for x, _ in xy], [y for _, y in xy], "o-", color=f"C{i % 10}", label=run["run"])
        ax.set_xticks(sorted(ticks), [ticks[k] for k in sorted(ticks)])
        ax.set_xlabel("round")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save_png(fig, path)
    return None


_COMPARE_COLUMNS = tuple(c for c in SUMMARY_COLUMNS if c[0] not in ("name", "false_refusal_rate_borderline",
                                                                     "response_words"))


def _recipe_but_seed(run_dir: Path) -> tuple[str | None, int | None]:
    """``(the run's resolved recipe less its seed, the seed)``, defaults filled in so that runs of older versions
    match; ``(None, None)`` when the folder has no config.yaml or it does not load."""
    import dataclasses

    from .config import load_recipe

    path = run_dir / "config.yaml"
    if not path.is_file():
        return None, None
    try:
        cfg = dataclasses.asdict(load_recipe(path))
    except UserError:
        return None, None
    seed = cfg.pop("seed")
    return json.dumps(cfg, sort_keys=True), seed


def _seed_groups(runs: list[dict], keys: list[str]) -> list[dict]:
    """Runs whose recipes differ only in ``seed``: mean and sample sd of each final-round metric (2+ runs)."""
    by_recipe: dict[str, list[dict]] = {}
    for r in runs:
        if r.get("recipe_but_seed"):
            by_recipe.setdefault(r["recipe_but_seed"], []).append(r)
    groups = []
    for members in by_recipe.values():
        if len(members) < 2:
            continue
        mean, sd = {}, {}
        for k in keys:
            xs = [float(m["final"][k]) for m in members if _num(m["final"].get(k)) is not None]
            mean[k] = sum(xs) / len(xs) if xs else None
            sd[k] = math.sqrt(sum((x - mean[k]) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else None
        groups.append({"group": members[0]["run"], "runs": [m["run"] for m in members], "n": len(members),
                       "seeds": [m.get("seed") for m in members], "mean": mean, "sd": sd})
    return groups


def _mean_sd(mean: Any, sd: Any) -> str:
    if _num(mean) is None:
        return "-"
    return f"{mean:.3f} ± {sd:.3f}" if _num(sd) is not None else f"{mean:.3f}"


def compare_runs(run_dirs: Sequence[str | os.PathLike], out: str | os.PathLike | None = None) -> dict:
    """Set run directories side by side: final-round metrics and the best round of each, and for runs whose
    recipes differ only in the seed, the mean and sd of their final rounds.

    Writes ``compare.json``, ``compare.md`` and ``compare.png`` (gold and gated reward
    per round, one line per run) to ``out`` (default: the first run's parent / "compare"),
    shows a rich table, and returns the comparison.
    """
    dirs = [Path(d) for d in run_dirs]
    if not dirs:
        raise UserError("compare: give at least one run directory")
    out = Path(out) if out is not None else dirs[0].parent / "compare"
    runs = []
    for label, d in zip(_labels(dirs), dirs):
        rounds = load_rounds(d)
        cfg = _read_config(d)
        rows = summary_rows(rounds)
        but_seed, seed = _recipe_but_seed(d)
        runs.append({"run": label, "path": str(d), "recipe": cfg.get("name"), "seed": seed,
                     "recipe_but_seed": but_seed,
                     "mode": _get(cfg, "campaign", "mode") or rounds[-1].get("mode"),
                     "scorer": _get(cfg, "scorer", "kind") or rounds[-1].get("scorer"),
                     "round_numbers": [int(r["round"]) for r in rounds], "rounds": rows, "final": rows[-1],
                     "best": _best_round(rows)})
    note = _plot_compare(runs, out / "compare.png")
    if note is not None and (out / "compare.png").exists():
        (out / "compare.png").unlink()
    groups = _seed_groups(runs, [k for k, _, _ in _COMPARE_COLUMNS])
    for r in runs:
        r.pop("recipe_but_seed")
    result = {"runs": runs, "seed_groups": groups, "plot": "compare.png" if note is None else None, "note": note}

    columns = ["run", "mode", "scorer", "final round", *(h for _, h, _ in _COMPARE_COLUMNS), "best round",
               "best by", "best value"]
    rows = [[r["run"], r["mode"], r["scorer"], r["final"]["name"], *(r["final"][k] for k, _, _ in _COMPARE_COLUMNS),
             r["best"]["name"], r["best"]["by"], r["best"]["value"]] for r in runs]
    blocks: list = [_Table(columns, [[_fmt(v) for v in row] for row in rows],
                           "Final-round metrics of each run; best round by gold (TinyWorld) else by gated R_c.")]
    if groups:
        blocks.append(_Table(["group", "seeds", "runs", *(h for _, h, _ in _COMPARE_COLUMNS)],
                             [[g["group"], str(g["n"]), ", ".join(g["runs"]),
                               *(_mean_sd(g["mean"][k], g["sd"][k]) for k, _, _ in _COMPARE_COLUMNS)]
                              for g in groups],
                             "Seed groups: runs whose recipes differ only in the seed, final round, mean ± sample "
                             "sd over the seeds (named after the group's first run)."))
    blocks.append(_Plot("compare.png", "gold and gated reward per round") if note is None
                  else _Text(f"compare.png: skipped, {note}."))
    for r in runs:
        blocks.append(_Details(f"{r['run']}: all rounds", [_Table(
            [h for _, h, _ in SUMMARY_COLUMNS], [_summary_cells(row) for row in r["rounds"]])]))
    atomic_write_json(out / "compare.json", result)
    atomic_write_text(out / "compare.md", _markdown("Run comparison", [_Section("Runs", blocks)]))
    console_keys = ("gated_mean", "gold", "violation_rate", "false_refusal_rate", "kl_to_base")
    table("runs: final round, and the best round by " + " / ".join(sorted({r["best"]["by"] for r in runs})),
          ["run", "final", *(short for k, _, short in _COMPARE_COLUMNS if k in console_keys), "best", "value"],
          [[r["run"], r["final"]["name"], *(r["final"][k] for k in console_keys), r["best"]["name"],
            r["best"]["value"]] for r in runs])
    if groups:
        keys = ("gold", "violation_rate", "gated_mean", "deployed_gold", "deployed_violation_rate")
        table("seed groups: final round, mean ± sd over the seeds",
              ["group", "seeds", "gold", "viol", "R_c", "gold dep", "viol dep"],
              [[g["group"], g["n"], *(_mean_sd(g["mean"][k], g["sd"][k]) for k in keys)] for g in groups])
    log(f"comparison -> {out / 'compare.md'} (compare.json, compare.png)")
    return result
