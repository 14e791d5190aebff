"""Leaderboards: which defense holds against which attack, and at what cost -- read from a result store.

One leaderboard per *setting* (everything a cell specifies except attack, defense and seed:
dataset, partition, model, scenario, protocol, rounds, warm start); each states the protocol that
produced it. One row per defense stack; per attack, a group of columns. Every number is the mean
(and sample standard deviation) over seeds of a per-cell quantity:

``clean_accuracy``
    final benign accuracy of the clean run (attack ``none``) with this defense.
``clean_cost``
    clean ``fedavg`` accuracy minus ``clean_accuracy`` (same seed): what the defense costs.
``<attack>/accuracy``
    final benign accuracy under the attack.
``<attack>/drop``
    clean ``fedavg`` accuracy minus ``<attack>/accuracy`` (same seed).
``<attack>/success_peak``
    the attack's ``success`` metric right after each adversarial round, averaged over those rounds:
    its immediate effect (misclassification confidence for ``poison``, attack success rate for
    ``backdoor``).
``<attack>/success_avg``
    the ``success`` metric averaged over every round from the first adversarial round to the end:
    its lasting effect, which is what a defense that mitigates attacks lowers.
``<attack>/mitigation_avg``, ``<attack>/mitigation_max``
    attack-mitigation rounds (:class:`fedbench.metrics.Mitigation`), mean and max over the
    adversarial rounds of a run. A count cut short by the next attack or the end of the run is
    censored: the attack was still active, so the count is a lower bound, and so is any mean over
    it. ``*_censored`` (a column of its own in every export) is true when any count behind the mean
    (for the max: the largest count) was censored; the formatted tables show such a value as
    ``≥k`` and explain the sign under the table (:data:`CENSORED_NOTE`).
``<attack>/status``, ``clean_status``
    ``ok``, or how many seeds failed or diverged (e.g. ``1 ok, 1 diverged``).

**Robustness score** (the ranking, higher is better, in [0, 1])::

    score = mean over attacks a of  accuracy_a x (1 - clip(success_avg_a, 0, 1))

computed per seed, then averaged over seeds (``score_mean``, ``score_std``). It rewards keeping the
benign accuracy under attack and suppressing the attack's lasting effect, and needs both: a defense
that stops the attack by destroying the model scores as badly as one that lets the attack through.
A diverged cell counts 0; a run without an adversarial round counts its accuracy alone; an attack
that reports no ``success`` metric is left out of the score (its success and mitigation columns are
n/a, never 0: a missing measurement must not read as a perfect defense), and with no attack left the
score is n/a; a failed or missing cell leaves that seed unscored, and a defense with no scored seed
ranks last. Untargeted attacks have the benign error as their success, so their term is accuracy
squared: still higher for the defense that keeps more accuracy. Ties go to the higher clean accuracy. With no attack in the grid the
score is the clean accuracy.

Diverged cells count with the accuracy they ended at (the defense broke the model); failed cells
have no numbers. Exports: CSV and JSON hold the numeric table exactly as :func:`load_results`
returns it (censoring as the ``*_censored`` flag columns); Markdown, HTML (self-contained, every plugin-provided string escaped) and LaTeX
(``booktabs``) hold the formatted tables with their protocol captions and notes.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd

from fedbench.store import Store

FORMATS = ("table", "md", "csv", "json", "html", "latex")

#: Per attack: (column stem, header, decimals, has a censored flag).
ATTACK_METRICS = (
    ("accuracy", "acc", 3, False),
    ("drop", "drop", 3, False),
    ("success_peak", "success peak", 3, False),
    ("success_avg", "success avg", 3, False),
    ("mitigation_avg", "mitig. avg", 1, True),
    ("mitigation_max", "mitig. max", 1, True),
)
SETTING_COLUMNS = ("setting", "dataset", "partition", "model", "protocol", "rounds", "warmup_rounds")
ROW_COLUMNS = ("rank", "defense", "score_mean", "score_std", "seeds",
               "clean_accuracy_mean", "clean_accuracy_std", "clean_cost_mean", "clean_cost_std", "clean_status")


def attack_columns(attack: str) -> list[str]:
    """The leaderboard columns of one attack, in order."""
    cols = []
    for stem, _, _, censored in ATTACK_METRICS:
        cols += [f"{attack}/{stem}_mean", f"{attack}/{stem}_std"] + ([f"{attack}/{stem}_censored"] if censored else [])
    return cols + [f"{attack}/status"]


# --------------------------------------------------------------------------------------------------
# From the store to tables
# --------------------------------------------------------------------------------------------------
def cell_frame(store: Store, keys: Iterable[str] | None = None) -> pd.DataFrame:
    """One row per cell with the per-cell quantities the leaderboard averages."""
    records = store.cells(keys)
    success: dict[str, dict[int, float]] = {}
    for key, rnd, name, value in store.rounds([r.key for r in records]):
        if name == "success":
            success.setdefault(key, {})[rnd] = value
    rows = []
    for rec in records:
        spec, mit = rec.spec, rec.mitigation
        measured = rec.status == "ok"
        first = min(rec.adversarial) if rec.adversarial else None
        lasting = [v for r, v in success.get(rec.key, {}).items() if first is not None and r >= first]
        counts = [m["rounds"] for m in mit]
        top = max(counts) if counts else None
        rows.append({
            "key": rec.key,
            "setting": rec.setting_label,
            "setting_key": rec.setting,
            "dataset": rec.dataset,
            "partition": rec.partition,
            "model": rec.model,
            "protocol": spec["protocol"],
            "rounds": spec["rounds"],
            "warmup_rounds": rec.warmup_rounds,
            "attack": rec.attack,
            "defense": rec.defense,
            "seed": rec.seed,
            "clean": spec["attack"]["name"] == "none",
            "status": rec.status,
            "message": rec.message,
            "final_accuracy": rec.final_accuracy if rec.status in ("ok", "diverged") else math.nan,
            "adversarial_rounds": len(rec.adversarial),
            "success_measured": bool(success.get(rec.key)),
            "success_peak": _mean([m["peak"] for m in mit]) if measured else math.nan,
            "success_avg": _mean(lasting) if measured else math.nan,
            "mitigation_avg": _mean(counts) if measured else math.nan,
            "mitigation_avg_censored": any(m["censored"] for m in mit),
            "mitigation_max": float(top) if measured and top is not None else math.nan,
            "mitigation_max_censored": any(m["censored"] and m["rounds"] == top for m in mit),
            "seconds": rec.seconds,
        })
    return pd.DataFrame(rows, columns=list(_CELL_COLUMNS))


_CELL_COLUMNS = ("key", "setting", "setting_key", "dataset", "partition", "model", "protocol", "rounds",
                 "warmup_rounds", "attack", "defense", "seed", "clean", "status", "message", "final_accuracy",
                 "adversarial_rounds", "success_measured", "success_peak", "success_avg", "mitigation_avg", "mitigation_avg_censored",
                 "mitigation_max", "mitigation_max_censored", "seconds")


_ROUND_LABELS = ("key", "setting", "dataset", "partition", "attack", "defense", "seed", "warmup_rounds", "status")
_ROUND_COLUMNS = (*_ROUND_LABELS, "round", "adversarial", "accuracy", "loss", "eval_n")


def rounds_frame(store: Store, keys: Iterable[str] | None = None) -> pd.DataFrame:
    """The per-round metrics, one row per (cell, round): the cell's labels, then ``round``,
    ``adversarial``, ``accuracy``, ``loss``, ``eval_n`` and the attack's own metrics."""
    records = {r.key: r for r in store.cells(keys)}
    by_round: dict[tuple[str, int], dict[str, Any]] = {}
    for key, rnd, name, value in store.rounds(records):
        by_round.setdefault((key, rnd), {})[name] = value
    rows = []
    for (key, rnd), metrics in by_round.items():
        rec = records[key]
        rows.append({"key": key, "setting": rec.setting_label, "dataset": rec.dataset, "partition": rec.partition,
                     "attack": rec.attack, "defense": rec.defense, "seed": rec.seed,
                     "warmup_rounds": rec.warmup_rounds, "status": rec.status, "round": rnd, **metrics})
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame(columns=list(_ROUND_COLUMNS))
    if "adversarial" in frame:
        frame["adversarial"] = frame["adversarial"].astype(bool)
    if "eval_n" in frame:
        frame["eval_n"] = frame["eval_n"].astype("Int64")
    first = [c for c in _ROUND_COLUMNS if c in frame]
    frame = frame[first + [c for c in frame.columns if c not in first]]
    return frame.sort_values(["key", "round"], kind="stable").reset_index(drop=True)


def rounds_long(store: Store, keys: Iterable[str] | None = None) -> pd.DataFrame:
    """The per-round metrics in long (tidy) form: one row per cell, round and metric -- the cell's
    labels, ``round``, ``adversarial``, ``metric``, ``value``. Unlike :func:`rounds_frame`, a metric
    a cell does not report (another attack's) has no row, and an empty ``value`` is a NaN the run
    produced (a diverged loss)."""
    records = {r.key: r for r in store.cells(keys)}
    entries = store.rounds(records)
    adversarial = {(key, rnd): bool(value) for key, rnd, name, value in entries if name == "adversarial"}
    rows = []
    for key, rnd, name, value in entries:
        if name == "adversarial":
            continue
        rec = records[key]
        rows.append({"key": key, "setting": rec.setting_label, "dataset": rec.dataset, "partition": rec.partition,
                     "attack": rec.attack, "defense": rec.defense, "seed": rec.seed,
                     "warmup_rounds": rec.warmup_rounds, "status": rec.status, "round": rnd,
                     "adversarial": adversarial.get((key, rnd), False), "metric": name, "value": value})
    return pd.DataFrame(rows, columns=[*_ROUND_LABELS, "round", "adversarial", "metric", "value"])


def build(cells: pd.DataFrame) -> pd.DataFrame:
    """The leaderboard (see the module docstring for every column) from :func:`cell_frame`."""
    tables = []
    for _, group in cells.groupby("setting_key", sort=False):
        tables.append(_build_setting(group))
    if not tables:
        return pd.DataFrame(columns=[*SETTING_COLUMNS, *ROW_COLUMNS])
    return pd.concat(tables, ignore_index=True)


def _build_setting(cells: pd.DataFrame) -> pd.DataFrame:
    first = cells.iloc[0]
    attacks = list(dict.fromkeys(cells.loc[~cells["clean"], "attack"]))
    defenses = list(dict.fromkeys(cells["defense"]))
    seeds = sorted(set(cells["seed"]))
    index = {(r.defense, r.attack, r.seed): r for r in cells.itertuples(index=False)}
    clean_fedavg = {s: _acc(index.get(("fedavg", "none", s))) for s in seeds}
    clean_attack = next(iter(cells.loc[cells["clean"], "attack"]), "none")

    rows = []
    for defense in defenses:
        row: dict[str, Any] = {c: first[c] for c in SETTING_COLUMNS}
        row["defense"] = defense
        clean = [index.get((defense, clean_attack, s)) for s in seeds]
        clean_acc = [_acc(c) for c in clean]
        row.update(_mean_std("clean_accuracy", clean_acc))
        row.update(_mean_std("clean_cost", [clean_fedavg[s] - a for s, a in zip(seeds, clean_acc)]))
        row["clean_status"] = _status(clean)
        terms: dict[int, list[float]] = {s: [] for s in seeds}
        for attack in attacks:
            runs = [index.get((defense, attack, s)) for s in seeds]
            acc = [_acc(r) for r in runs]
            row.update(_mean_std(f"{attack}/accuracy", acc))
            row.update(_mean_std(f"{attack}/drop", [clean_fedavg[s] - a for s, a in zip(seeds, acc)]))
            for stem, _, _, censored in ATTACK_METRICS[2:]:
                row.update(_mean_std(f"{attack}/{stem}", [getattr(r, stem) if r is not None else math.nan for r in runs]))
                if censored:
                    row[f"{attack}/{stem}_censored"] = any(bool(getattr(r, f"{stem}_censored")) for r in runs if r is not None)
            row[f"{attack}/status"] = _status(runs)
            for s, r in zip(seeds, runs):
                terms[s].append(_score_term(r))
        per_seed = [_seed_score(t, a) if attacks else a for t, a in zip(terms.values(), clean_acc)]
        row.update(_mean_std("score", per_seed))
        row["seeds"] = sum(1 for v in per_seed if not math.isnan(v))
        rows.append(row)

    columns = [*SETTING_COLUMNS, *ROW_COLUMNS] + [c for a in attacks for c in attack_columns(a)]
    frame = pd.DataFrame(rows).reindex(columns=columns)
    frame = frame.sort_values(["score_mean", "clean_accuracy_mean", "defense"], ascending=[False, False, True],
                              na_position="last", kind="stable").reset_index(drop=True)
    frame["rank"] = range(1, len(frame) + 1)
    return frame


def _score_term(run) -> float | None:
    """One attack's term of a seed's score: NaN when the cell has no result, ``None`` when the attack
    reports no success metric (left out of the score)."""
    if run is None or run.status not in ("ok", "diverged"):
        return math.nan
    if run.status == "diverged":
        return 0.0
    if run.adversarial_rounds and not run.success_measured:
        return None
    success = 0.0 if math.isnan(run.success_avg) else min(max(run.success_avg, 0.0), 1.0)
    return run.final_accuracy * (1.0 - success)


def _seed_score(terms: list, clean_accuracy: float) -> float:
    """Mean of a seed's terms; NaN when a cell is missing or no attack could be scored."""
    scored = [t for t in terms if t is not None]
    if not scored or any(math.isnan(t) for t in scored):
        return math.nan
    return _mean(scored)


def _acc(run) -> float:
    return math.nan if run is None else float(run.final_accuracy)


def _status(runs: Sequence[Any]) -> str:
    counts: dict[str, int] = {}
    for r in runs:
        status = "missing" if r is None else r.status
        counts[status] = counts.get(status, 0) + 1
    if set(counts) == {"ok"}:
        return "ok"
    return ", ".join(f"{n} {s}" for s, n in counts.items())


def _mean(values: Iterable[float]) -> float:
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return sum(vals) / len(vals) if vals else math.nan


def _mean_std(name: str, values: Sequence[float]) -> dict[str, float]:
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    mean = sum(vals) / len(vals) if vals else math.nan
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else math.nan
    return {f"{name}_mean": mean, f"{name}_std": std}


def load_results(store: str | Path = "fedbench-runs.db") -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(leaderboard, per-round metrics)`` of every cell in a result store, as DataFrames.

    The store is opened read-only, so this works while a matrix is still writing it."""
    with Store.read(store) as st:
        return build(cell_frame(st)), rounds_frame(st)


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------
@dataclass
class _Table:
    """One setting's leaderboard, formatted: caption, column groups, string cells and notes."""

    caption: str
    groups: list[tuple[str, int]]  # (attack label or "", number of columns)
    headers: list[str]
    rows: list[list[str]]
    notes: list[str]


#: The sign of a censored value in the formatted tables, and the note under every table.
CENSORED_SIGN = "≥"
CENSORED_NOTE = ("≥: at least one attack was still active when the next attack or the end of the run came; "
                 "the mean (or max) of mitigation rounds is a lower bound")


def _fmt(mean: float, std: float, digits: int, censored: bool = False) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    spread = std is not None and not (isinstance(std, float) and math.isnan(std))
    if not spread and float(mean).is_integer() and digits == 1:
        digits = 0  # a single count of rounds
    text = f"{CENSORED_SIGN if censored else ''}{mean:.{digits}f}"
    return text + (f" ± {std:.{digits}f}" if spread else "")


def _tables(board: pd.DataFrame, cells: pd.DataFrame | None) -> list[_Table]:
    tables = []
    for setting, frame in board.groupby("setting", sort=False):
        attacks = [c[: -len("/status")] for c in frame.columns if c.endswith("/status")
                   and not frame[c].isna().all()]
        headers = ["#", "defense", "score", "clean acc", "cost"]
        groups = [("", len(headers))]
        for attack in attacks:
            groups.append((attack, len(ATTACK_METRICS)))
            headers += [h for _, h, _, _ in ATTACK_METRICS]
        rows = []
        for r in frame.to_dict("records"):
            line = [str(r["rank"]), str(r["defense"]), _fmt(r["score_mean"], r["score_std"], 3),
                    _fmt(r["clean_accuracy_mean"], r["clean_accuracy_std"], 3),
                    _fmt(r["clean_cost_mean"], r["clean_cost_std"], 3)]
            for attack in attacks:
                for stem, _, digits, censored in ATTACK_METRICS:
                    flag = bool(r.get(f"{attack}/{stem}_censored")) if censored else False
                    line.append(_fmt(r[f"{attack}/{stem}_mean"], r[f"{attack}/{stem}_std"], digits, flag))
            rows.append(line)
        notes = []
        if cells is not None:
            bad = cells[(cells["setting"] == setting) & (cells["status"] != "ok")]
            for c in bad.itertuples(index=False):
                notes.append(f"{c.status}: {c.attack} vs {c.defense}, seed {c.seed}" + (f" -- {c.message}" if c.message else ""))
        tables.append(_Table(f"Setting: {setting}", groups, headers, rows, notes))
    return tables


def footer() -> str:
    """The notes under every formatted leaderboard: how the score is made, and what ``≥`` means."""
    return ("score = mean over attacks of accuracy x (1 - success avg), mean ± std over seeds; "
            f"drop and cost vs clean fedavg.\n{CENSORED_NOTE}")


def render(board: pd.DataFrame, fmt: str, cells: pd.DataFrame | None = None) -> str:
    """The leaderboard as text in ``fmt`` (``md``, ``csv``, ``json``, ``html``, ``latex``)."""
    if fmt == "csv":
        return board.to_csv(index=False)
    if fmt == "json":
        return json.dumps(json.loads(board.to_json(orient="records")), indent=2) + "\n"
    tables = _tables(board, cells)
    if fmt == "md":
        return _markdown(tables)
    if fmt == "html":
        return _html(tables)
    if fmt == "latex":
        return _latex(tables)
    raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS[1:])}")


def rich_tables(board: pd.DataFrame, cells: pd.DataFrame | None = None) -> list[Any]:
    """The leaderboard as rich renderables (one table per setting, with notes)."""
    from rich.table import Table
    from rich.text import Text

    out: list[Any] = []
    for t in _tables(board, cells):
        table = Table(title=Text(t.caption), title_justify="left", caption=Text(footer()), caption_justify="left")
        pos = 0
        for group, width in t.groups:
            for i, header in enumerate(t.headers[pos: pos + width]):
                # the attack's name heads the first column of its group
                title = f"{group if i == 0 else ''}\n{header}" if group else header
                table.add_column(Text(title), justify="left" if header == "defense" else "right",
                                 no_wrap=header != "defense")
            pos += width
        for row in t.rows:
            table.add_row(*(Text(cell) for cell in row))
        out.append(table)
        for note in t.notes:
            out.append(Text(f"  {note}", style="red"))
    return out


def _markdown(tables: list[_Table]) -> str:
    def esc(text: str) -> str:
        """Table-safe and HTML-inert: ``<`` could open a tag in a Markdown renderer, ``>`` (as in the
        censored ">k") cannot inside a table cell, so it stays readable as plain text."""
        return text.replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;")

    parts = []
    for t in tables:
        labels = []
        for group, width in t.groups:
            labels += [f"{group} {h}".strip() for h in t.headers[len(labels): len(labels) + width]]
        parts.append(f"**{esc(t.caption)}**\n")
        parts.append("| " + " | ".join(esc(h) for h in labels) + " |")
        parts.append("|" + "|".join("---" if h == "defense" else "---:" for h in t.headers) + "|")
        parts += ["| " + " | ".join(esc(c) for c in row) + " |" for row in t.rows]
        parts.append("")
        parts += [f"- {esc(n)}" for n in t.notes]
        parts.append("\n" + "\n\n".join(f"_{esc(line)}_" for line in footer().splitlines()) + "\n")
    return "\n".join(parts)


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}
th,td{padding:4px 10px;border-bottom:1px solid #ddd;text-align:right;white-space:nowrap}
th{background:#f4f4f4}td.name,th.name{text-align:left}caption{text-align:left;font-weight:600;padding:6px 0}
.notes{color:#a00}.foot{color:#666;font-size:13px}"""


def _html(tables: list[_Table]) -> str:
    e = html.escape
    body = []
    for t in tables:
        body.append(f"<table>\n<caption>{e(t.caption)}</caption>\n<thead>\n<tr>")
        body += [f'<th colspan="{w}">{e(g)}</th>' for g, w in t.groups]
        body.append("</tr>\n<tr>")
        body += [f'<th{" class=name" if h == "defense" else ""}>{e(h)}</th>' for h in t.headers]
        body.append("</tr>\n</thead>\n<tbody>")
        for row in t.rows:
            cells = [f'<td{" class=name" if h == "defense" else ""}>{e(c)}</td>' for h, c in zip(t.headers, row)]
            body.append("<tr>" + "".join(cells) + "</tr>")
        body.append("</tbody>\n</table>")
        if t.notes:
            body.append('<ul class="notes">' + "".join(f"<li>{e(n)}</li>" for n in t.notes) + "</ul>")
    body += [f'<p class="foot">{e(line)}</p>' for line in footer().splitlines()]
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>fedbench leaderboard</title>\n<style>\n{_CSS}\n</style>\n</head>\n<body>\n"
            "<h1>fedbench leaderboard</h1>\n" + "\n".join(body) + "\n</body>\n</html>\n")


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "<": r"\textless{}", ">": r"\textgreater{}"}


def _tex(text: str) -> str:
    out = "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)
    return out.replace("±", r"$\pm$").replace("–", "--").replace(CENSORED_SIGN, r"$\geq$")


def _latex(tables: list[_Table]) -> str:
    """Hand-written ``booktabs`` tables (pandas' Styler.to_latex would need jinja2)."""
    parts = ["% fedbench leaderboard; needs \\usepackage{booktabs}"]
    for t in tables:
        spec = "".join("l" if h == "defense" else "r" for h in t.headers)
        parts += ["\\begin{table}[ht]", "\\centering", "\\small", f"\\caption{{{_tex(t.caption)}}}",
                  f"\\begin{{tabular}}{{{spec}}}", "\\toprule"]
        groups, rules, col = [], [], 1
        for group, width in t.groups:
            groups.append(f"\\multicolumn{{{width}}}{{c}}{{{_tex(group)}}}" if group else " & ".join([""] * width))
            if group:
                rules.append(f"\\cmidrule(lr){{{col}-{col + width - 1}}}")
            col += width
        if len(t.groups) > 1:
            parts.append(" & ".join(groups) + " \\\\")
            parts.append(" ".join(rules))
        parts.append(" & ".join(_tex(h) for h in t.headers) + " \\\\")
        parts.append("\\midrule")
        parts += [" & ".join(_tex(c) for c in row) + " \\\\" for row in t.rows]
        parts += ["\\bottomrule", "\\end{tabular}"]
        if t.notes:
            parts.append("\\\\[2pt]\\footnotesize " + "; ".join(_tex(n) for n in t.notes))
        parts.append("\\end{table}")
    parts += [f"% {line}" for line in footer().splitlines()]
    return "\n".join(parts) + "\n"
