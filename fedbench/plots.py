"""Figures of a result store (or of one run): per-round curves, the accuracy/mitigation trade-off and
an attack x defense heatmap.

Every function returns a :class:`matplotlib.figure.Figure` (no pyplot: no display, no global state),
so tests and notebooks can inspect it; :func:`save` writes PNG, SVG or PDF by the file's extension.
matplotlib is imported only here, and only when a figure is drawn, so ``import fedbench`` and
``fedbench list`` stay fast. Sizes are for a paper: 6.4 x 4 in per panel, text 8-10 pt.

* :func:`rounds_figure` -- a metric per round (default ``success``), one line per defense stack, one
  panel per attack. The line is the mean over seeds; the band is mean ± one sample std over seeds
  (``band="std"``) or the min-max range (``band="minmax"``). Adversarial rounds are vertical dashed
  lines; when seeds have different schedules, each round is drawn with an opacity proportional to
  the share of seeds for which it is adversarial. For ``success``, the 0.5 mitigation threshold is
  a dotted horizontal line. A band of a bounded metric (a fraction or a probability) is clipped to
  [0, 1]: mean ± std can leave the range the metric lives in, its seeds never do. Seeds of the
  paper's protocol have different attack schedules, so their mean smears one seed's spike over
  rounds where others are benign; ``seed=`` draws one seed alone, as the paper's figures do.
* :func:`tradeoff_figure` -- clean benign accuracy (x) against attack-mitigation rounds (y: each
  run's mean or longest, then the mean over attacks and seeds), one labelled point per defense
  stack; a hollow marker is a censored mean, i.e. a lower bound.
* :func:`heatmap_figure` -- defense stacks x attacks, each cell the attack's term of the robustness
  score, accuracy x (1 - success avg), averaged over seeds (``value="score"``), or the mean
  ``success_avg`` or ``accuracy``; values written in the cells.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import pandas as pd

from fedbench.errors import FedbenchError

KINDS = ("rounds", "tradeoff", "heatmap")
BANDS = ("std", "minmax")
HEATMAP_VALUES = ("score", "success_avg", "accuracy")
TRADEOFF_VALUES = ("mitigation_avg", "mitigation_max")
FORMATS = (".png", ".svg", ".pdf")
THRESHOLD = 0.5
#: One panel's size in inches, and the font size in points.
PANEL = (6.4, 4.0)
#: Up to this many points a trade-off plot labels each with its defense stack; past it, or when points
#: coincide, it numbers them and lists the stacks beside the axes.
DIRECT_LABELS = 8
FONT = 9

#: Per-round metrics that live in [0, 1]; their bands are clipped to it.
BOUNDED = frozenset({"success", "accuracy", "confidence", "misclassification"})
_UNITS = {
    "success": "attack success (fraction)",
    "accuracy": "benign accuracy (fraction of test set)",
    "loss": "benign loss (cross-entropy)",
    "confidence": "target misclassification confidence (probability)",
    "misclassification": "misclassification accuracy (fraction)",
}


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _style(ax) -> None:
    ax.tick_params(labelsize=FONT - 1)
    ax.grid(True, alpha=0.3, linewidth=0.5)


def metric_label(metric: str) -> str:
    """The axis label of a per-round metric, with its unit."""
    return _UNITS.get(metric, metric)


# --------------------------------------------------------------------------------------------------
# Choosing what to draw
# --------------------------------------------------------------------------------------------------
def settings(cells: pd.DataFrame) -> list[tuple[str, str]]:
    """``(setting key, setting label)`` of every setting, in store order."""
    return list(dict.fromkeys(zip(cells["setting_key"], cells["setting"])))


def pick_setting(cells: pd.DataFrame, key: str | None) -> tuple[str, str]:
    """The setting ``key`` (a setting hash or a unique prefix of one); the first one when ``None``."""
    found = settings(cells)
    if not found:
        raise FedbenchError("the result store holds no cells; fill it with fedbench matrix or fedbench run --store")
    if key is None:
        return found[0]
    hits = [s for s in found if s[0].startswith(key)]
    if len(hits) != 1:
        listing = "; ".join(f"{k} ({label})" for k, label in found)
        raise FedbenchError(f"{'no' if not hits else 'more than one'} setting matches '{key}'; the store holds: {listing}")
    return hits[0]


def run_rounds(result) -> pd.DataFrame:
    """The per-round rows of one :class:`~fedbench.engine.RunResult` in the shape of
    :func:`fedbench.leaderboard.rounds_frame` (for ``fedbench run --plot``)."""
    from fedbench.matrix import MatrixCell

    info = MatrixCell(result.cell).info()
    labels = {"key": result.cell.hash(), "setting": info["setting_label"], "attack": info["attack"],
              "defense": info["defense"], "seed": result.cell.seed, "status": result.status}
    return pd.DataFrame([{**labels, **row} for row in result.rounds])


# --------------------------------------------------------------------------------------------------
# Per-round curves
# --------------------------------------------------------------------------------------------------
def rounds_figure(rounds: pd.DataFrame, *, metric: str = "success", attack: str | None = None,
                  band: str = "std", seed: int | None = None, title: str | None = None):
    """Per-round ``metric`` (see the module docstring); ``rounds`` as from
    :func:`fedbench.leaderboard.rounds_frame` (one setting) or :func:`run_rounds`; ``seed`` keeps
    that seed's cells only."""
    if band not in BANDS:
        raise FedbenchError(f"unknown band '{band}'; use one of {', '.join(BANDS)}")
    if seed is not None:
        present = sorted(set(rounds["seed"]))
        if seed not in present:
            raise FedbenchError(f"no cell of seed {seed} in this setting; its seeds: {', '.join(map(str, present))}")
        rounds = rounds[rounds["seed"] == seed]
    if metric not in rounds.columns or rounds[metric].isna().all():
        known = sorted(c for c in rounds.columns if c not in ("key", "setting", "dataset", "partition", "attack", "defense",
                                                              "seed", "warmup_rounds", "status", "round", "adversarial"))
        raise FedbenchError(f"no cell reports the metric '{metric}'; the cells report: {', '.join(known) or 'nothing'}")
    data = rounds[rounds[metric].notna()]
    attacks = list(dict.fromkeys(data["attack"]))
    if attack is not None:
        if attack not in attacks:
            raise FedbenchError(f"no cell of attack '{attack}' reports {metric}; attacks: {', '.join(attacks)}")
        attacks = [attack]
    ncols = min(len(attacks), 2)
    nrows = math.ceil(len(attacks) / ncols)
    fig = _figure(PANEL[0] * ncols, PANEL[1] * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    defenses = list(dict.fromkeys(rounds["defense"]))
    defenses.sort(key=lambda d: d != "fedavg")  # the undefended reference first (stable otherwise)
    colors = {d: f"C{i % 10}" for i, d in enumerate(defenses)}
    for ax in axes[len(attacks):]:
        ax.set_visible(False)
    for ax, name in zip(axes, attacks):
        panel = data[data["attack"] == name]
        seeds = sorted(set(panel["seed"]))
        _mark_attacks(ax, rounds[rounds["attack"] == name])
        for defense in [d for d in defenses if d in set(panel["defense"])]:
            per_round = panel[panel["defense"] == defense].groupby("round")[metric]
            mean = per_round.mean()
            ax.plot(mean.index, mean.values, color=colors[defense], label=defense, linewidth=1.5, gid="defense")
            if len(seeds) > 1:
                if band == "std":
                    std = per_round.std().fillna(0.0)
                    low, high = mean - std, mean + std
                else:
                    low, high = per_round.min(), per_round.max()
                if metric in BOUNDED:
                    low, high = low.clip(0.0, 1.0), high.clip(0.0, 1.0)
                ax.fill_between(mean.index, low.values, high.values, color=colors[defense], alpha=0.2, linewidth=0)
        if metric == "success":
            ax.axhline(THRESHOLD, color="0.3", linestyle=":", linewidth=1, label="0.5 threshold", gid="threshold")
        spread = ((f"mean ± std over {len(seeds)} seeds" if band == "std" else
                   f"mean, band min–max over {len(seeds)} seeds") if len(seeds) > 1 else f"seed {seeds[0]}")
        ax.set_title(f"{name}: {metric} per round ({spread})", fontsize=FONT + 1)
        ax.set_xlabel("communication round", fontsize=FONT)
        ax.set_ylabel(metric_label(metric), fontsize=FONT)
        ax.xaxis.get_major_locator().set_params(integer=True)
        _style(ax)
        # beside the axes: with half a dozen defenses a legend inside hides the curves it names
        ax.legend(fontsize=FONT - 1, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    if title:
        fig.suptitle(title, fontsize=FONT)
    return fig


def _mark_attacks(ax, cells_rounds: pd.DataFrame) -> None:
    """Vertical dashed lines at the adversarial rounds; opacity = share of seeds adversarial there."""
    if "adversarial" not in cells_rounds or cells_rounds.empty:
        return
    adv = cells_rounds[cells_rounds["adversarial"].astype(bool)]
    seeds = max(len(set(cells_rounds["seed"])), 1)
    share = adv.groupby("round")["seed"].nunique() / seeds
    uniform = bool((share == 1).all())
    label = "adversarial round" if uniform else "adversarial round (opacity: share of seeds)"
    for rnd, frac in share.items():
        ax.axvline(rnd, color="firebrick", linestyle="--", linewidth=1, alpha=0.25 + 0.55 * frac, label=label,
                   gid="adversarial")
        label = "_nolegend_"


# --------------------------------------------------------------------------------------------------
# Trade-off
# --------------------------------------------------------------------------------------------------
def _attacks_of(board: pd.DataFrame) -> list[str]:
    return [c[: -len("/status")] for c in board.columns if c.endswith("/status") and not board[c].isna().all()]


def _label_clusters(points: list[tuple[float, float, str]], near: float = 0.03) -> list[tuple[float, float, list[str]]]:
    """Points whose labels would print over each other, as one label: within ``near`` of the plot's
    span of each other on both axes (a sweep's weak settings often all sit on the undefended run's
    point). Returns ``(x, y, names)`` per label, at the cluster's leftmost point, names by accuracy."""
    if not points:
        return []
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    dx, dy = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    clusters: list[list[tuple[float, float, str]]] = []
    for p in sorted(points, key=lambda p: (p[1], p[0])):
        for cluster in clusters:
            if any(abs(p[0] - q[0]) <= near * dx and abs(p[1] - q[1]) <= near * dy for q in cluster):
                cluster.append(p)
                break
        else:
            clusters.append([p])
    out = []
    for cluster in clusters:
        x, y, _ = min(cluster, key=lambda p: p[0])
        out.append((x, y, [p[2] for p in sorted(cluster, key=lambda p: -p[0])]))
    return out


def tradeoff_figure(board: pd.DataFrame, *, value: str = "mitigation_avg", title: str | None = None):
    """Clean benign accuracy against attack-mitigation rounds, one point per defense stack; ``board``
    is one setting of :func:`fedbench.leaderboard.build`. ``value``: ``mitigation_avg`` (each run's
    mean over its attacks) or ``mitigation_max`` (each run's longest attack: "mitigates within k
    rounds", the paper's wording, is a statement about the maximum); either is then averaged over
    attacks and seeds."""
    if value not in TRADEOFF_VALUES:
        raise FedbenchError(f"unknown tradeoff value '{value}'; use one of {', '.join(TRADEOFF_VALUES)}")
    attacks = _attacks_of(board)
    cols = [f"{a}/{value}_mean" for a in attacks]
    if not cols or board[cols].isna().all().all():
        raise FedbenchError("no attack-mitigation rounds to plot: the setting has no attack that reports a success metric")
    fig = _figure(*PANEL)
    ax = fig.subplots()
    exact = censored = 0
    points = []
    for r in board.to_dict("records"):
        values = [r[c] for c in cols if not _nan(r[c])]
        if not values or _nan(r["clean_accuracy_mean"]):
            continue
        y = sum(values) / len(values)
        lower = any(bool(r.get(f"{a}/{value}_censored")) for a in attacks if not _nan(r[f"{a}/{value}_mean"]))
        ax.plot([r["clean_accuracy_mean"]], [y], marker="o", markersize=7, linestyle="none", color="C0",
                markerfacecolor="none" if lower else "C0", gid="censored" if lower else "exact",
                label=("lower bound (censored)" if not censored else "_nolegend_") if lower
                else ("mean (exact)" if not exact else "_nolegend_"))
        exact, censored = exact + (not lower), censored + lower
        points.append((r["clean_accuracy_mean"], y, str(r["defense"])))
    clusters = _label_clusters(points)
    if len(clusters) <= DIRECT_LABELS and all(len(names) == 1 for _, _, names in clusters):
        for x, y, names in clusters:
            ax.annotate(names[0], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=FONT - 1)
    else:  # a sweep: numbers at the points, the stacks they stand for beside the axes
        from matplotlib.lines import Line2D

        handles, texts = [], []
        for i, (x, y, names) in enumerate(clusters, 1):
            ax.annotate(str(i), (x, y), textcoords="offset points", xytext=(5, 4), fontsize=FONT - 1, gid="key")
            handles.append(Line2D([], [], marker=f"${i}$", linestyle="none", color="0.2", markersize=7))
            texts.append(textwrap.fill(", ".join(names), 34))
        fig.legend(handles, texts, loc="outside right upper", fontsize=FONT - 2, title="defense stacks",
                   title_fontsize=FONT - 1, handletextpad=0.4, labelspacing=0.6)
    ax.set_xlabel("clean benign accuracy (fraction of test set; mean over seeds)", fontsize=FONT)
    per_run = "each run's mean over its attacks" if value == "mitigation_avg" else "each run's longest attack"
    ax.set_ylabel(f"attack-mitigation rounds ({per_run};\nmean over seeds)", fontsize=FONT)
    ax.set_title("accuracy vs. attack mitigation (right and low is better)", fontsize=FONT + 1)
    ax.margins(0.15)
    _style(ax)
    ax.legend(fontsize=FONT - 1, loc="best")
    if title:
        fig.suptitle(title, fontsize=FONT)
    return fig


# --------------------------------------------------------------------------------------------------
# Heatmap
# --------------------------------------------------------------------------------------------------
def heatmap_values(cells: pd.DataFrame, board: pd.DataFrame, value: str = "score") -> pd.DataFrame:
    """Defense stacks (leaderboard order) x attacks: the mean over seeds of each attack's score term
    (``score``) or of ``success_avg`` / ``accuracy``."""
    from fedbench.leaderboard import _score_term

    if value not in HEATMAP_VALUES:
        raise FedbenchError(f"unknown heatmap value '{value}'; use one of {', '.join(HEATMAP_VALUES)}")
    attacks = _attacks_of(board)
    table = pd.DataFrame(index=list(board["defense"]), columns=attacks, dtype=float)
    for defense in table.index:
        for attack in attacks:
            runs = cells[(cells["defense"] == defense) & (cells["attack"] == attack)]
            if value == "score":
                terms = [_score_term(r) for r in runs.itertuples(index=False)]
                vals = [t for t in terms if t is not None and not math.isnan(t)]
                table.loc[defense, attack] = sum(vals) / len(vals) if vals else math.nan
            else:
                table.loc[defense, attack] = board.loc[board["defense"] == defense, f"{attack}/{value}_mean"].iloc[0]
    return table


def heatmap_figure(values: pd.DataFrame, *, value: str = "score", title: str | None = None):
    """Annotated heatmap of :func:`heatmap_values`."""
    import numpy as np

    if values.empty or values.shape[1] == 0:
        raise FedbenchError("no attack to plot: the setting holds clean runs only")
    fig = _figure(max(PANEL[0], 1.6 + 1.1 * values.shape[1]), max(2.5, 1.2 + 0.45 * values.shape[0]))
    ax = fig.subplots()
    data = np.ma.masked_invalid(values.to_numpy(dtype=float))
    higher_better = value != "success_avg"
    cmap = "viridis" if higher_better else "viridis_r"
    image = ax.imshow(data, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_facecolor("0.85")
    ax.set_xticks(range(values.shape[1]), labels=list(values.columns), fontsize=FONT)
    ax.set_yticks(range(values.shape[0]), labels=list(values.index), fontsize=FONT)
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            v = values.iat[i, j]
            dark = not _nan(v) and ((v < 0.5) if higher_better else (v > 0.5))
            ax.text(j, i, "n/a" if _nan(v) else f"{v:.2f}", ha="center", va="center", fontsize=FONT,
                    color="white" if dark else "black")
    what = {"score": "score term: accuracy x (1 - success avg)", "success_avg": "success avg (lower is better)",
            "accuracy": "benign accuracy under attack"}[value]
    bar = fig.colorbar(image, ax=ax)
    bar.set_label({"score": "score term", "success_avg": "success avg", "accuracy": "accuracy"}[value]
                  + " (fraction, 0-1)", fontsize=FONT)
    bar.ax.tick_params(labelsize=FONT - 1)
    ax.set_xlabel("attack", fontsize=FONT)
    ax.set_ylabel("defense stack", fontsize=FONT)
    ax.set_title(f"{what}, mean over seeds", fontsize=FONT + 1)
    if title:
        fig.suptitle(title, fontsize=FONT)
    return fig


# --------------------------------------------------------------------------------------------------
# From a store, and saving
# --------------------------------------------------------------------------------------------------
def store_figure(store_path, kind: str, *, metric: str | None = None, attack: str | None = None,
                 setting: str | None = None, band: str = "std", seed: int | None = None):
    """``(figure, (setting key, setting label), every setting)`` of one kind for one setting of a store."""
    from fedbench import leaderboard as lb
    from fedbench.store import Store

    if kind not in KINDS:
        raise FedbenchError(f"unknown plot kind '{kind}'; use one of {', '.join(KINDS)}")
    with Store.read(store_path) as store:
        cells = lb.cell_frame(store)
        key, label = pick_setting(cells, setting)
        keys = list(cells.loc[cells["setting_key"] == key, "key"])
        rounds = lb.rounds_frame(store, keys) if kind == "rounds" else None
    return figure_of(kind, cells[cells["setting_key"] == key], rounds, metric=metric, attack=attack, band=band,
                     seed=seed), (key, label), settings(cells)


def figure_of(kind: str, cells: pd.DataFrame, rounds: pd.DataFrame | None, *, metric: str | None = None,
              attack: str | None = None, band: str = "std", seed: int | None = None):
    """A figure of one setting's cells (and, for ``rounds``, their per-round metrics)."""
    from fedbench import leaderboard as lb

    if kind == "rounds":
        return rounds_figure(rounds, metric=metric or "success", attack=attack, band=band, seed=seed)
    if seed is not None:
        raise FedbenchError(f"--seed is for the rounds plot; the {kind} plot summarises every seed")
    board = lb.build(cells)
    if attack is not None:
        raise FedbenchError(f"--attack is for the rounds plot; the {kind} plot shows every attack")
    if kind == "tradeoff":
        return tradeoff_figure(board, value=metric or "mitigation_avg")
    return heatmap_figure(heatmap_values(cells, board, metric or "score"), value=metric or "score")


def check_image_path(path: str | Path) -> Path:
    """``path`` as a Path, if its extension names a format :func:`save` writes."""
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise FedbenchError(f"cannot tell the image format of {path}; use a name ending in {', '.join(FORMATS)}")
    return path


def save(fig, path: str | Path) -> Path:
    """Write ``fig`` as PNG (200 dpi), SVG or PDF, chosen by the extension."""
    path = check_image_path(path)
    try:
        fig.savefig(path, dpi=200)
    except OSError as error:
        raise FedbenchError(f"cannot write {path}: {error.strerror or error}") from None
    return path


def png_bytes(fig) -> bytes:
    """The figure as PNG bytes (for embedding)."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=150)
    return buf.getvalue()


def _nan(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))
