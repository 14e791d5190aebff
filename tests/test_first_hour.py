"""What a newcomer meets in the first hour: the README's install and test instructions, the licence,
and the example grid that ships with the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

from fedbench.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def section(title: str) -> str:
    """The text of the README section headed ``title`` (up to the next heading of any level)."""
    match = re.search(rf"^#+ {re.escape(title)}\n(.*?)(?=^#+ |\Z)", README, flags=re.S | re.M)
    assert match, f"README has no section '{title}'"
    return match.group(1)


def test_readme_tells_cpu_only_users_how_to_get_the_cpu_build_of_torch():
    setup = section("Set up and run")
    cpu = "pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu"
    assert cpu in setup
    assert setup.index(cpu) < setup.index("pip install -e '.[test,ray]'\n")  # before fedbench pulls torch in


def test_readme_says_how_long_the_tests_take_and_how_to_run_the_fast_ones():
    setup = section("Set up and run")
    assert re.search(r'pytest +# everything: about \d+ s', setup)
    assert re.search(r'pytest -m "not slow" +# .*about \d+ s', setup)


def test_the_slow_marker_the_readme_names_is_declared_and_used():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    markers = pyproject["tool"]["pytest"]["ini_options"]["markers"]
    assert any(m.startswith("slow:") for m in markers)
    marked = [p.name for p in (ROOT / "tests").glob("test_*.py") if "mark.slow" in p.read_text()]
    assert "test_paper_protocol.py" in marked  # the real Fashion-MNIST training


def test_readme_documents_run_store_and_export():
    tour = section("One run")
    assert "fedbench run --attack poison --defense wbc --store runs.db" in tour
    assert "fedbench export --store runs.db --rounds rounds.csv" in tour and "--cells cells.csv" in tour


def test_readme_explains_censored_means_and_environment_failures():
    assert "is therefore a lower bound, shown as `≥k`" in README
    assert "`<attack>/mitigation_avg_censored`" in README
    assert "recorded `interrupted` and re-run by the next run" in README


def test_the_licence_is_the_mit_licence_pyproject_declares():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["license"] == {"text": "MIT"}
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n\nCopyright (c) 2026 the fedbench authors\n")
    assert "THE SOFTWARE IS PROVIDED \"AS IS\", WITHOUT WARRANTY OF ANY KIND" in text


GRID = ROOT / "examples" / "grid.toml"


def test_the_example_grid_documents_every_key():
    lines = GRID.read_text().splitlines()
    keys = [i for i, line in enumerate(lines) if re.match(r"^[a-z-]+ *=", line)]
    assert keys
    for i in keys:
        assert lines[i - 1].startswith("#"), f"key on line {i + 1} has no comment above it"


def test_the_example_grid_lists_its_cells(tmp_path):
    store = tmp_path / "runs.db"
    result = CliRunner().invoke(main, ["matrix", "--config", str(GRID), "--dry-run", "--store", str(store)])
    assert result.exit_code == 0, result.output
    lines = [line.split(None, 2) for line in result.stdout.splitlines()]
    assert all(status == "new" for _, status, _ in lines)
    labels = {label for _, _, label in lines}
    attacks, defenses = ["none", "poison", "backdoor"], ["fedavg", "wbc", "cma", "cma+wbc:s=0.2"]
    assert labels == {f"digits {a} vs {d} seed={s}" for a in attacks for d in defenses for s in (0, 1)}
    assert "24 cells" in result.stderr
    assert not store.exists()
    config = tomllib.loads(GRID.read_text())
    assert config["dataset"] == "digits" and config["rounds"] <= 30
