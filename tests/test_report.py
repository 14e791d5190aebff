"""``fedbench report``: one self-contained, well-formed HTML page and its Markdown twin, with the
leaderboard and its confidence intervals, every figure, the cells' specs and versions, failed cells,
and every plugin-provided string escaped."""

from __future__ import annotations

import base64
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import pytest
from click.testing import CliRunner

import fedbench
from fedbench.cli import main
from fedbench.report import FIGURES
from fedbench.store import Store
from result_stores import Sneaky, SneakyPlugin, put

PNG = b"\x89PNG\r\n\x1a\n"
VOID = {"meta", "img", "br", "hr", "link", "input", "col", "wbr"}


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    """The report of a 4-round matrix on digits (poison vs fedavg and wbc, seeds 0-2)."""
    root = tmp_path_factory.mktemp("report")
    store = root / "runs.db"
    ran = CliRunner().invoke(main, ["matrix", "--attacks", "poison", "--defenses", "fedavg,wbc", "--rounds", "4",
                                    "--attack-rounds", "2", "--seeds", "0,1,2", "--jobs", "1", "--quiet",
                                    "--store", str(store)])
    assert ran.exit_code == 0, ran.output
    result = CliRunner().invoke(main, ["report", "--store", str(store), "--out", str(root / "out")])
    assert result.exit_code == 0, result.output
    return root / "out"


class TagBalance(HTMLParser):
    """Checks that every element is closed in order, and collects images and links."""

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.images, self.urls = [], [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        self.urls += [v for k, v in attrs.items() if k in ("src", "href") and v is not None]
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in VOID:
            self.stack.pop()

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)


def parse(page: str) -> TagBalance:
    checker = TagBalance()
    checker.feed(page)
    checker.close()
    assert checker.errors == [] and checker.stack == []
    ET.fromstring(page)  # well-formed as XML too (the doctype is allowed)
    return checker


def test_report_html_is_self_contained_well_formed_and_holds_the_leaderboard_and_figures(report_dir):
    page = (report_dir / "report.html").read_text(encoding="utf-8")
    checker = parse(page)
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page and "<link" not in page
    assert all(url.startswith("data:image/png;base64,") for url in checker.urls)  # nothing outside the file
    assert len(checker.images) == len(FIGURES)
    for src in checker.images:
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG)
    root = ET.fromstring(page)
    rows = [["".join(td.itertext()) for td in tr.findall("td")] for tr in root.iter("tr")]
    board = [r for r in rows if len(r) > 5 and r[0] in ("1", "2")]
    assert sorted(r[1] for r in board) == ["fedavg", "wbc"]
    assert all(re.fullmatch(r"\d\.\d{3} \[-?\d\.\d{3}, \d\.\d{3}\]", r[2]) for r in board)  # score [95% CI]
    assert "95% confidence interval of the mean over seeds (n/a with one seed): Student t" in page and "Paired" not in page
    cells = [r for r in rows if len(r) == 9]
    assert len(cells) == 12 and {r[4] for r in cells} == {"ok"}
    assert any(r[7].startswith("poison:") and r[8] == "wbc:proxy=grad,s=0.4+fedavg" for r in cells)
    assert f"12 cells: fedbench {fedbench.__version__}, torch" in page
    assert "Failed and diverged cells</h3>\n<p>none</p>" in page


def test_report_markdown_has_the_same_sections_and_its_images_beside_it(report_dir):
    md = (report_dir / "report.md").read_text(encoding="utf-8")
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert images == [f"setting1-{stem}.png" for stem, *_ in FIGURES]
    for name in images:
        assert (report_dir / name).read_bytes().startswith(PNG)
    assert "| 1 | " in md and "| 2 | " in md and "### Cells" in md and "## Versions" in md


def test_report_escapes_plugin_names_and_lists_diverged_cells_with_their_messages(tmp_path, use_plugin):
    use_plugin(SneakyPlugin(), "sneaky")
    path = tmp_path / "runs.db"
    with Store.open(path) as store:
        put(store, "none", "fedavg", 0, 0.9)
        put(store, "none", Sneaky.name, 0, 0.8)
        put(store, "poison", "fedavg", 0, 0.7, success=[0, 0.9, 0.8, 0.7], mitigation=[(2, True)])
        put(store, "poison", Sneaky.name, 0, 0.6, success=[0, 0.5, 0.5, 0.5], status="diverged",
            message="<img src=x onerror=alert(1)>")
    result = CliRunner().invoke(main, ["report", "--store", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    parse(page)
    assert "<script" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert ("<li>diverged: poison vs &lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;, seed 0 -- "
            "&lt;img src=x onerror=alert(1)&gt;</li>") in page
    md = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert "<script" not in md and "<img" not in md and "&lt;script>" in md


def test_report_of_a_missing_store_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(main, ["report", "--store", str(tmp_path / "none.db"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "no result store" in result.output
    assert not (tmp_path / "out").exists()


def test_a_report_that_cannot_be_written_is_one_clean_error(tmp_path):
    from result_stores import fill_two_seeds

    store = fill_two_seeds(tmp_path / "runs.db")
    out = tmp_path / "report"
    (out / "report.html").mkdir(parents=True)  # the file's place is taken by a folder
    result = CliRunner().invoke(main, ["report", "--store", str(store), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "cannot write the report into" in result.output and "Traceback" not in result.output


def test_report_vs_adds_the_paired_comparison_after_each_leaderboard(report_dir, tmp_path):
    store = report_dir.parent / "runs.db"
    result = CliRunner().invoke(main, ["report", "--store", str(store), "--out", str(tmp_path), "--vs", "fedavg"])
    assert result.exit_code == 0, result.output
    md = (tmp_path / "report.md").read_text()
    html = (tmp_path / "report.html").read_text()
    assert "Paired difference to fedavg" in md and "Paired difference to fedavg" in html
    ET.fromstring(html.split("\n", 1)[1])  # still well-formed
    # fedavg against itself is exactly zero: its row in the comparison table
    table = md.split("Paired difference to fedavg", 1)[1]
    fedavg_row = next(line for line in table.splitlines() if line.startswith("| fedavg |"))
    assert "+0.000 [+0.000, +0.000]" in fedavg_row
    bad = CliRunner().invoke(main, ["report", "--store", str(store), "--out", str(tmp_path / "x"), "--vs", "krum"])
    assert bad.exit_code == 2 and "--vs krum: no cell of that defense" in bad.output and "fedavg" in bad.output
