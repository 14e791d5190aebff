"""Leaderboards: which defense holds against which attack, and at what cost -- read from a result store.

One leaderboard per *setting* (everything a cell specifies except attack, defense and seed:
dataset, partition, model, scenario, protocol, rounds, warm start); each states the protocol that
produced it. One row per defense stack; per attack, a group of columns. Every number is the mean
over seeds of a per-cell quantity, with its sample standard deviation and its 95% confidence
interval over seeds (Student t below 10 seeds, BCa bootstrap from 10) (``<col>_mean``, ``_std``, ``_ci_low``, ``_ci_high``; the interval is
NaN -- n/a -- with one seed, see :mod:`fedbench.stats`):

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

**Paired comparisons** (:func:`compare`, ``fedbench leaderboard --vs DEFENSE``): per defense, the
difference to DEFENSE in score, clean accuracy and, per attack, accuracy and success avg, paired
by seed (the same seed is the same schedule, data and malicious clients), with a 95% t interval
of the per-seed differences; formatted tables mark with ``*`` an interval that excludes 0.

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

from fedbench.stats import BOOTSTRAP_MIN, method_of
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
#: The statistics of every averaged quantity, in column order: mean, sample std and the 95% interval
#: over seeds (:func:`fedbench.stats.interval`: Student t below 10 seeds, BCa bootstrap from 10; NaN
#: with one seed).
STATS = ("mean", "std", "ci_low", "ci_high")


def _stat_columns(name: str) -> list[str]:
    return [f"{name}_{s}" for s in STATS]


ROW_COLUMNS = ("rank", "defense", *_stat_columns("score"), "seeds",
               *_stat_columns("clean_accuracy"), *_stat_columns("clean_cost"), "clean_status")


def attack_columns(attack: str) -> list[str]:
    """The leaderboard columns of one attack, in order."""
    cols = []
    for stem, _, _, censored in ATTACK_METRICS:
        cols += _stat_columns(f"{attack}/{stem}") + ([f"{attack}/{stem}_censored"] if censored else [])
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
        tables.append(_build_setting(group, {}))
    if not tables:
        return pd.DataFrame(columns=[*SETTING_COLUMNS, *ROW_COLUMNS])
    return pd.concat(tables, ignore_index=True)


def _build_setting(cells: pd.DataFrame, seed_values: dict[tuple[str, str], dict[int, float]]) -> pd.DataFrame:
    """One setting's leaderboard; fills ``seed_values[(defense, column)]`` with ``{seed: value}`` of
    every averaged column (for the paired comparisons of :func:`compare`)."""
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

        def _mean_std(name: str, values: Sequence[float]) -> dict[str, float]:
            seed_values[(defense, name)] = dict(zip(seeds, values))
            return _summary(name, values)

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


def bounds_of(name: str) -> tuple[float, float]:
    """The range a column's per-seed values (hence their mean) can take: fractions in [0, 1],
    differences of two fractions (cost, drop) in [-1, 1], mitigation rounds from 0 on."""
    stem = name.rsplit("/", 1)[-1]
    if stem in ("clean_cost", "drop"):
        return -1.0, 1.0
    if stem.startswith("mitigation"):
        return 0.0, math.inf
    if stem in ("score", "clean_accuracy", "accuracy") or stem.startswith("success"):
        return 0.0, 1.0
    return -math.inf, math.inf


def _summary(name: str, values: Sequence[float]) -> dict[str, float]:
    """Mean, sample std and 95% interval over seeds of ``values`` (NaNs left out; :func:`fedbench.stats.interval`,
    cut to :func:`bounds_of` the column)."""
    from fedbench.stats import interval

    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    mean = sum(vals) / len(vals) if vals else math.nan
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else math.nan
    low, high = interval(vals, bounds=bounds_of(name))
    return {f"{name}_mean": mean, f"{name}_std": std, f"{name}_ci_low": low, f"{name}_ci_high": high}


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
    """One setting's leaderboard (or comparison), formatted: caption, column groups, string cells,
    notes (failed and diverged cells) and the footer lines that explain the numbers."""

    caption: str
    groups: list[tuple[str, int]]  # (attack label or "", number of columns)
    headers: list[str]
    rows: list[list[str]]
    notes: list[str]
    foot: str = ""


#: The sign of a censored value in the formatted tables, and the note under every table.
CENSORED_SIGN = "≥"
CENSORED_NOTE = ("≥: at least one attack was still active when the next attack or the end of the run came; "
                 "the mean (or max) of mitigation rounds is a lower bound")
#: How the spread of a mean is shown: ``std`` (mean ± sample std) or ``ci`` (mean [95% t interval]).
SPREADS = ("std", "ci")
CI_NOTE = ("[a, b]: 95% confidence interval of the mean over seeds (n/a with one seed): Student t below "
           "10 seeds, with 3 seeds wide (t = 4.30) -- that is the honest uncertainty; BCa bootstrap from 10 seeds on")


def _nan(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _fmt(mean: float, std: float, digits: int, censored: bool = False,
         ci: tuple[float, float] | None = None) -> str:
    """``mean ± std`` (or, given ``ci``, ``mean [low, high]``); ``–`` when there is no mean."""
    if _nan(mean):
        return "–"
    spread = not _nan(std)
    if not spread and float(mean).is_integer() and digits == 1:
        digits = 0  # a single count of rounds
    text = f"{CENSORED_SIGN if censored else ''}{mean:.{digits}f}"
    if ci is not None:
        return text + (" [n/a]" if _nan(ci[0]) else f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]")
    return text + (f" ± {std:.{digits}f}" if spread else "")


def _tables(board: pd.DataFrame, cells: pd.DataFrame | None, spread: str = "std",
            comparison: pd.DataFrame | None = None) -> list[_Table]:
    if spread not in SPREADS:
        raise ValueError(f"unknown spread {spread!r}; use one of {', '.join(SPREADS)}")
    tables = []
    for setting, frame in board.groupby("setting", sort=False):
        attacks = [c[: -len("/status")] for c in frame.columns if c.endswith("/status")
                   and not frame[c].isna().all()]
        headers = ["#", "defense", "score", "clean acc", "cost"]
        groups = [("", len(headers))]
        for attack in attacks:
            groups.append((attack, len(ATTACK_METRICS)))
            headers += [h for _, h, _, _ in ATTACK_METRICS]

        def cell(r, name, digits, flag=False):
            ci = (r.get(f"{name}_ci_low", math.nan), r.get(f"{name}_ci_high", math.nan)) if spread == "ci" else None
            return _fmt(r[f"{name}_mean"], r[f"{name}_std"], digits, flag, ci)

        rows = []
        for r in frame.to_dict("records"):
            line = [str(r["rank"]), str(r["defense"]), cell(r, "score", 3), cell(r, "clean_accuracy", 3),
                    cell(r, "clean_cost", 3)]
            for attack in attacks:
                for stem, _, digits, censored in ATTACK_METRICS:
                    flag = bool(r.get(f"{attack}/{stem}_censored")) if censored else False
                    line.append(cell(r, f"{attack}/{stem}", digits, flag))
            rows.append(line)
        notes = []
        if cells is not None:
            bad = cells[(cells["setting"] == setting) & (cells["status"] != "ok")]
            for c in bad.itertuples(index=False):
                notes.append(f"{c.status}: {c.attack} vs {c.defense}, seed {c.seed}" + (f" -- {c.message}" if c.message else ""))
        tables.append(_Table(f"Setting: {setting}", groups, headers, rows, notes, footer(spread)))
        if comparison is not None:
            diff = comparison[comparison["setting"] == setting]
            if not diff.empty:
                tables.append(_comparison_table(setting, diff, attacks))
    return tables


def footer(spread: str = "std") -> str:
    """The notes under every formatted leaderboard: how the score is made, and what ``≥`` means."""
    shown = "mean ± std over seeds" if spread == "std" else "mean [95% CI] over seeds"
    text = (f"score = mean over attacks of accuracy x (1 - success avg), {shown}; "
            f"drop and cost vs clean fedavg.\n{CENSORED_NOTE}")
    return text + (f"\n{CI_NOTE}" if spread == "ci" else "")


# --------------------------------------------------------------------------------------------------
# Paired comparisons
# --------------------------------------------------------------------------------------------------
#: The columns a paired comparison covers: the score and clean accuracy, and per attack these stems.
COMPARED = ("accuracy", "success_avg")
SIGNIFICANT = "*"


def compare(cells: pd.DataFrame, vs: str) -> pd.DataFrame:
    """Every defense against ``vs``, paired by seed (:func:`fedbench.stats.paired_difference`).

    One row per setting and defense (in leaderboard order); per compared column ``c`` (``score``,
    ``clean_accuracy``, ``<attack>/accuracy``, ``<attack>/success_avg``): ``c_diff`` (mean over seeds
    of defense minus ``vs``), ``c_diff_ci_low``, ``c_diff_ci_high`` (95% t interval, NaN with one
    seed) and ``c_diff_n`` (seeds where both have a number). Settings without ``vs`` are left out."""
    from fedbench.stats import paired_difference

    frames = []
    for _, group in cells.groupby("setting_key", sort=False):
        if vs not in set(group["defense"]):
            continue
        seed_values: dict[tuple[str, str], dict[int, float]] = {}
        board = _build_setting(group, seed_values)
        attacks = list(dict.fromkeys(group.loc[~group["clean"], "attack"]))
        columns = ["score", "clean_accuracy"] + [f"{a}/{stem}" for a in attacks for stem in COMPARED]
        rows = []
        for defense in board["defense"]:
            row: dict[str, Any] = {"setting": group.iloc[0]["setting"], "defense": defense, "vs": vs}
            for col in columns:
                lo, hi = bounds_of(col)  # a difference of two values in [lo, hi] lies in [lo - hi, hi - lo]
                d = paired_difference(seed_values.get((defense, col), {}), seed_values.get((vs, col), {}),
                                      bounds=(lo - hi, hi - lo))
                row.update({f"{col}_diff": d.mean, f"{col}_diff_ci_low": d.low, f"{col}_diff_ci_high": d.high,
                            f"{col}_diff_n": d.n})
            rows.append(row)
        frames.append(pd.DataFrame(rows))
    if not frames:
        return pd.DataFrame(columns=["setting", "defense", "vs"])
    return pd.concat(frames, ignore_index=True)


def with_comparison(board: pd.DataFrame, comparison: pd.DataFrame) -> pd.DataFrame:
    """The leaderboard with the comparison's columns appended (for CSV and JSON)."""
    return board.merge(comparison, on=["setting", "defense"], how="left")


def _fmt_diff(mean: float, low: float, high: float, digits: int = 3) -> str:
    if _nan(mean):
        return "–"
    ci = "[n/a]" if _nan(low) else f"[{low:+.{digits}f}, {high:+.{digits}f}]"
    star = SIGNIFICANT if not _nan(low) and (low > 0 or high < 0) else ""
    return f"{mean:+.{digits}f} {ci}{star}"


def _comparison_table(setting: str, diff: pd.DataFrame, attacks: list[str]) -> _Table:
    vs = diff.iloc[0]["vs"]
    headers = ["defense", "score Δ", "clean acc Δ"]
    groups = [("", len(headers))]
    columns = ["score", "clean_accuracy"]
    for attack in attacks:
        if f"{attack}/accuracy_diff" in diff:
            groups.append((attack, len(COMPARED)))
            headers += ["acc Δ", "success avg Δ"]
            columns += [f"{attack}/{stem}" for stem in COMPARED]
    rows = [[str(r["defense"])] + [_fmt_diff(r[f"{c}_diff"], r[f"{c}_diff_ci_low"], r[f"{c}_diff_ci_high"])
                                   for c in columns]
            for r in diff.to_dict("records")]
    n = int(diff[[c for c in diff.columns if c.endswith("_diff_n")]].max().max() or 0)
    foot = (f"Δ = defense minus {vs}, paired by seed (same seed: same attack schedule, data and malicious "
            f"clients), mean over {n} seed(s) [95% {method_of(n)} interval of the paired differences; n/a with one "
            f"seed]; {SIGNIFICANT}: the interval excludes 0."
            + (" With 3 seeds the interval is wide (t = 4.30): that is the honest uncertainty, which a bootstrap "
               "of 3 values would understate." if n < BOOTSTRAP_MIN else ""))
    return _Table(f"Paired difference to {vs} -- Setting: {setting}", groups, headers, rows, [], foot)


def render(board: pd.DataFrame, fmt: str, cells: pd.DataFrame | None = None, *, spread: str = "std",
           comparison: pd.DataFrame | None = None) -> str:
    """The leaderboard as text in ``fmt`` (``md``, ``csv``, ``json``, ``html``, ``latex``).

    ``spread``: ``std`` shows mean ± std, ``ci`` mean [95% CI] (formatted tables only; CSV and JSON
    hold every column). ``comparison`` (from :func:`compare`) adds the paired differences: a table
    after each setting's leaderboard, or columns appended in CSV and JSON."""
    if fmt in ("csv", "json") and comparison is not None:
        board = with_comparison(board, comparison)
    if fmt == "csv":
        return board.to_csv(index=False)
    if fmt == "json":
        return json.dumps(json.loads(board.to_json(orient="records")), indent=2) + "\n"
    tables = _tables(board, cells, spread, comparison)
    if fmt == "md":
        return _markdown(tables)
    if fmt == "html":
        return _html(tables)
    if fmt == "latex":
        return _latex(tables)
    raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS[1:])}")


def rich_tables(board: pd.DataFrame, cells: pd.DataFrame | None = None, *, spread: str = "std",
                comparison: pd.DataFrame | None = None) -> list[Any]:
    """The leaderboard as rich renderables (one table per setting, with notes)."""
    from rich.table import Table
    from rich.text import Text

    out: list[Any] = []
    for t in _tables(board, cells, spread, comparison):
        table = Table(title=Text(t.caption), title_justify="left", caption=Text(t.foot), caption_justify="left")
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


def _md_escape(text: str) -> str:
    """Table-safe and HTML-inert: ``<`` could open a tag in a Markdown renderer, ``>`` (as in the
    censored ">k") cannot inside a table cell, so it stays readable as plain text."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;")


def _markdown(tables: list[_Table]) -> str:
    esc = _md_escape
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
        parts.append("\n" + "\n\n".join(f"_{esc(line)}_" for line in t.foot.splitlines()) + "\n")
    return "\n".join(parts)


CSS = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}
th,td{padding:4px 10px;border-bottom:1px solid #ddd;text-align:right;white-space:nowrap}
th{background:#f4f4f4}td.name,th.name{text-align:left}caption{text-align:left;font-weight:600;padding:6px 0}
.notes{color:#a00}.foot{color:#666;font-size:13px}"""


def html_tables(tables: list[_Table]) -> str:
    """The tables as HTML elements (every string escaped; well-formed, so also valid XHTML)."""
    e = html.escape
    body = []
    for t in tables:
        body.append(f"<table>\n<caption>{e(t.caption)}</caption>\n<thead>\n<tr>")
        body += [f'<th colspan="{w}">{e(g)}</th>' for g, w in t.groups]
        body.append("</tr>\n<tr>")
        body += [f'<th{_NAME if h == "defense" else ""}>{e(h)}</th>' for h in t.headers]
        body.append("</tr>\n</thead>\n<tbody>")
        for row in t.rows:
            cells = [f'<td{_NAME if h == "defense" else ""}>{e(c)}</td>' for h, c in zip(t.headers, row)]
            body.append("<tr>" + "".join(cells) + "</tr>")
        body.append("</tbody>\n</table>")
        if t.notes:
            body.append('<ul class="notes">' + "".join(f"<li>{e(n)}</li>" for n in t.notes) + "</ul>")
        body += [f'<p class="foot">{e(line)}</p>' for line in t.foot.splitlines()]
    return "\n".join(body)


_NAME = ' class="name"'


def _html(tables: list[_Table]) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\"/>\n"
            f"<title>fedbench leaderboard</title>\n<style>\n{CSS}\n</style>\n</head>\n<body>\n"
            "<h1>fedbench leaderboard</h1>\n" + html_tables(tables) + "\n</body>\n</html>\n")


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
        parts += [f"% {line}" for line in t.foot.splitlines()]
    return "\n".join(parts) + "\n"
