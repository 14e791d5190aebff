"""A report of a result store: one self-contained HTML page and its Markdown twin.

``DIR/report.html`` opens offline: the figures are embedded as base64 PNG, the style sheet is inline,
there is no script and no link to anything outside the file. ``DIR/report.md`` holds the same text,
its figures written next to it as PNG files. Per setting (one leaderboard each): the leaderboard
with 95% confidence intervals over seeds, every figure of :mod:`fedbench.plots`, the cells that
failed or diverged with their messages, and every cell's spec; then the versions of fedbench, torch,
Python and the plugins recorded with the cells. Every string is escaped: component names and
messages come from plugins, and the HTML is well-formed (it parses as XML too).
"""

from __future__ import annotations

import base64
import html
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedbench.errors import FedbenchError

#: The figures of each setting: (file stem, kind, metric, caption).
FIGURES = (
    ("rounds-success", "rounds", "success",
     "Attack success per round (mean over seeds, band ± 1 std; dashed: adversarial rounds; dotted: 0.5 threshold)."),
    ("rounds-accuracy", "rounds", "accuracy", "Benign accuracy per round (mean over seeds, band ± 1 std)."),
    ("tradeoff", "tradeoff", "mitigation_avg",
     "Clean benign accuracy vs attack-mitigation rounds, each run's mean over its attacks (hollow: censored "
     "mean, a lower bound)."),
    ("tradeoff-max", "tradeoff", "mitigation_max",
     "Clean benign accuracy vs each run's longest attack-mitigation (the paper's 'mitigates within k rounds'; "
     "hollow: censored, a lower bound)."),
    ("heatmap", "heatmap", "score", "Score term accuracy x (1 - success avg) per defense and attack, mean over seeds."),
)


@dataclass
class _Figure:
    name: str
    caption: str
    png: bytes | None = None
    error: str = ""


@dataclass
class _Setting:
    key: str
    label: str
    tables: list[Any]
    figures: list[_Figure] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    cells: list[list[str]] = field(default_factory=list)


CELL_HEADERS = ["cell", "attack", "defense", "seed", "status", "final acc", "seconds", "attack spec", "defense spec"]


def write_report(store_path: str | os.PathLike, out_dir: str | os.PathLike, *, vs: str | None = None) -> tuple[Path, Path]:
    """Write ``out_dir/report.html`` and ``out_dir/report.md`` (with its PNGs); returns both paths.

    ``vs``: a defense every other one is compared with, paired by seed (:func:`fedbench.leaderboard.compare`),
    a table after each leaderboard of a setting that has it; an error if no cell of the store has it."""
    from fedbench import leaderboard as lb
    from fedbench import plots
    from fedbench.store import Store

    with Store.read(store_path) as store:
        cells = lb.cell_frame(store)
        rounds = lb.rounds_frame(store)
        records = {r.key: r for r in store.cells()}
        provenance = {key: store.provenance(key) for key in records}
    if cells.empty:
        raise FedbenchError(f"the result store {store_path} holds no cells; nothing to report")
    if vs is not None and vs not in set(cells["defense"]):
        known = ", ".join(dict.fromkeys(cells["defense"]))
        raise FedbenchError(f"--vs {vs}: no cell of that defense in {store_path}; defenses: {known}")
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise FedbenchError(f"cannot create {out}: {error.strerror or error}") from None

    sections = []
    for number, (key, label) in enumerate(plots.settings(cells), start=1):
        sub = cells[cells["setting_key"] == key]
        board = lb.build(sub)
        comparison = lb.compare(sub, vs) if vs is not None and vs in set(sub["defense"]) else None
        section = _Setting(key, label, lb._tables(board, sub, "ci", comparison))
        sub_rounds = rounds[rounds["key"].isin(set(sub["key"]))]
        for stem, kind, metric, caption in FIGURES:
            fig = _Figure(f"setting{number}-{stem}.png", caption)
            try:
                figure = plots.figure_of(kind, sub, sub_rounds, metric=metric)
            except FedbenchError as error:
                fig.error = str(error)
            else:
                fig.png = plots.png_bytes(figure)
            section.figures.append(fig)
        for c in sub.itertuples(index=False):
            if c.status != "ok":
                section.problems.append(f"{c.status}: {c.attack} vs {c.defense}, seed {c.seed}"
                                        + (f" -- {c.message}" if c.message else ""))
            spec = records[c.key].spec
            section.cells.append([c.key, c.attack, c.defense, str(c.seed), c.status, _num(c.final_accuracy),
                                  _num(c.seconds, 2), _component(spec.get("attack", {})), _stack(spec.get("defense", {}))])
        sections.append(section)

    versions = _versions(provenance)
    html_path, md_path = out / "report.html", out / "report.md"
    try:
        for section in sections:
            for fig in section.figures:
                if fig.png is not None:
                    (out / fig.name).write_bytes(fig.png)
        html_path.write_text(_html(store_path, sections, versions), encoding="utf-8")
        md_path.write_text(_markdown(store_path, sections, versions), encoding="utf-8")
    except OSError as error:  # a full disk, a read-only folder, report.html being a folder
        raise FedbenchError(f"cannot write the report into {out}: {error.strerror or error}") from None
    return html_path, md_path


# --------------------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------------------
def _num(value, digits: int = 3) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _component(data: dict[str, Any]) -> str:
    """``name:k=v,...`` of a component spec dict."""
    if not data:
        return ""
    params = ",".join(f"{k}={v}" for k, v in sorted(data.get("params", {}).items()))
    return data.get("name", "?") + (f":{params}" if params else "")


def _stack(data: dict[str, Any]) -> str:
    parts = [*data.get("client", []), *data.get("preaggregators", [])]
    if data.get("aggregator"):
        parts.append(data["aggregator"])
    return "+".join(_component(p) for p in parts)


def _versions(provenance: dict[str, dict[str, Any]]) -> list[tuple[str, int]]:
    """Distinct version records (fedbench, torch, Python, plugins) and how many cells have each."""
    counts: dict[str, int] = {}
    for p in provenance.values():
        plugins = ", ".join(f"{k} ({v})" if v else k for k, v in sorted(p["plugins"].items()))
        text = (f"fedbench {p['fedbench'] or '?'}, torch {p['torch'] or '?'}, Python {p['python'] or '?'}; "
                f"plugins: {plugins or 'none recorded'}")
        counts[text] = counts.get(text, 0) + 1
    return list(counts.items())


# --------------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------------
_CSS = """figure{margin:1em 0}figure img{max-width:100%;height:auto}figcaption{color:#444;font-size:13px}
.spec td{text-align:left;font-size:12px}.versions li{font-size:13px}"""


def _html(store_path, sections: list[_Setting], versions: list[tuple[str, int]]) -> str:
    from fedbench import leaderboard as lb

    e = html.escape
    body = [f"<h1>fedbench report: {e(str(store_path))}</h1>"]
    for i, s in enumerate(sections, start=1):
        body.append(f'<h2 id="setting{i}">Setting {i}: {e(s.label)}</h2>')
        body.append(f"<p>setting key <code>{e(s.key)}</code></p>")
        body.append("<h3>Leaderboard (mean [95% CI] over seeds)</h3>")
        body.append(lb.html_tables(s.tables))
        body.append("<h3>Figures</h3>")
        for fig in s.figures:
            if fig.png is None:
                body.append(f'<p class="notes">{e(fig.name)} not drawn: {e(fig.error)}</p>')
                continue
            data = base64.b64encode(fig.png).decode("ascii")
            body.append(f'<figure><img alt="{e(fig.caption)}" src="data:image/png;base64,{data}"/>'
                        f"<figcaption>{e(fig.caption)}</figcaption></figure>")
        body.append("<h3>Failed and diverged cells</h3>")
        if s.problems:
            body.append('<ul class="notes">' + "".join(f"<li>{e(p)}</li>" for p in s.problems) + "</ul>")
        else:
            body.append("<p>none</p>")
        body.append("<h3>Cells</h3>")
        body.append('<table class="spec">\n<thead><tr>' + "".join(f"<th>{e(h)}</th>" for h in CELL_HEADERS)
                    + "</tr></thead>\n<tbody>")
        body += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in s.cells]
        body.append("</tbody>\n</table>")
    body.append("<h2>Versions</h2>")
    body.append('<ul class="versions">' + "".join(f"<li>{n} cell{'s' * (n != 1)}: {e(v)}</li>" for v, n in versions)
                + "</ul>")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\"/>\n"
            f"<title>fedbench report</title>\n<style>\n{lb.CSS}\n{_CSS}\n</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")


# --------------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------------
def _markdown(store_path, sections: list[_Setting], versions: list[tuple[str, int]]) -> str:
    from fedbench import leaderboard as lb

    esc = lb._md_escape
    parts = [f"# fedbench report: {esc(str(store_path))}", ""]
    for i, s in enumerate(sections, start=1):
        parts += [f"## Setting {i}: {esc(s.label)}", "", f"setting key `{s.key}`", "",
                  "### Leaderboard (mean [95% CI] over seeds)", "", lb._markdown(s.tables), "### Figures", ""]
        for fig in s.figures:
            if fig.png is None:
                parts += [f"- {esc(fig.name)} not drawn: {esc(fig.error)}", ""]
            else:
                parts += [f"![{esc(fig.caption)}]({fig.name})", "", f"_{esc(fig.caption)}_", ""]
        parts += ["### Failed and diverged cells", ""]
        parts += [f"- {esc(p)}" for p in s.problems] or ["none"]
        parts += ["", "### Cells", "", "| " + " | ".join(CELL_HEADERS) + " |",
                  "|" + "|".join("---" for _ in CELL_HEADERS) + "|"]
        parts += ["| " + " | ".join(esc(c) for c in row) + " |" for row in s.cells]
        parts.append("")
    parts += ["## Versions", ""]
    parts += [f"- {n} cell{'s' * (n != 1)}: {esc(v)}" for v, n in versions]
    return "\n".join(parts) + "\n"
