"""A third-party plugin, installed as a user would install it, and name clashes between plugins.

The example package (``examples/fedbench-example-plugin``) is installed into a throw-away virtual
environment that sees the system's packages (fedbench itself, torch, pip, setuptools) through
``--system-site-packages``; nothing is downloaded and the system environment is never changed. The
package is built from a copy, so the build leaves no ``build/`` or ``*.egg-info`` in the checkout.
The whole module takes about 15 s on 2 cores (venv, install, ``list``, a 3-round matrix, the
package's own tests).
"""

from __future__ import annotations

import csv
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
from click.testing import CliRunner

import fedbench
from fedbench import FedbenchError
from fedbench.cli import main
from fedbench.plugins import registry

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "fedbench-example-plugin"
STACK = "example-arc+example-meamed"


FIND_EXAMPLE = ("import importlib.metadata as m\n"
                "try: print(m.version('fedbench-example-plugin'))\n"
                "except m.PackageNotFoundError: print('not installed')")


def system_sees_example() -> str:
    return subprocess.run([sys.executable, "-c", FIND_EXAMPLE], capture_output=True, text=True, check=True,
                          timeout=120).stdout


def example_version() -> str:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]["version"]


@dataclass(frozen=True)
class ExampleEnv:
    """A virtual environment with the example plugin installed."""

    root: Path
    python: Path
    source: Path  # the copy the package was built from (it holds the package's tests)
    env: dict[str, str]
    system_before: str  # what the system's interpreter said about the example package before the install

    def run(self, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.python), *args], cwd=cwd or self.root, env=self.env,
                              capture_output=True, text=True, timeout=300)

    def fedbench(self, *args: str) -> subprocess.CompletedProcess:
        """The ``fedbench`` command of this environment (its console script lives with the system's
        install of fedbench-suite, whose interpreter would not see the venv's packages)."""
        return self.run("-m", "fedbench.cli", *args)


@pytest.fixture(scope="module")
def example_env(tmp_path_factory) -> ExampleEnv:
    root = tmp_path_factory.mktemp("example-plugin")
    source = root / "fedbench-example-plugin"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", ".pytest_cache"))
    venv = root / "venv"
    # --without-pip: a venv's own bundled pip brings an old setuptools (65.x with Python 3.11) that
    # would shadow the system's and cannot build a wheel without the 'wheel' package; the system's
    # pip and setuptools, visible through --system-site-packages, install into the venv all the same.
    made = subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
                          capture_output=True, text=True, timeout=300)
    if made.returncode != 0:
        pytest.skip(f"cannot create a virtual environment with {sys.executable}: {made.stderr.strip()}")
    python = venv / ("Scripts" if os.name == "nt" else "bin") / "python"
    env = {k: v for k, v in os.environ.items() if k != "FEDBENCH_PLUGINS"}
    env.update(COLUMNS="250", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    example = ExampleEnv(root, python, source, env, system_before=system_sees_example())
    installed = example.run("-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", str(source))
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return example


def test_the_example_package_is_installed_only_in_the_throwaway_environment(example_env):
    assert example_env.run("-c", FIND_EXAMPLE).stdout.strip() == example_version()
    assert system_sees_example() == example_env.system_before


def test_both_example_components_register_with_the_distribution_as_origin(example_env):
    script = ("import fedbench; r = fedbench.registry(); "
              "print(r.entries('preaggregator')['example-arc'].origin); "
              "print(r.entries('aggregator')['example-meamed'].origin)")
    shown = example_env.run("-c", script)
    assert shown.returncode == 0, shown.stderr
    origin = f"example (fedbench-example-plugin {example_version()})"
    assert shown.stdout.splitlines() == [origin, origin]


def _listed_row(listing: str, name: str) -> str | None:
    return next((line for line in listing.splitlines() if f" {name} " in line), None)


def test_fedbench_list_defenses_shows_the_example_aggregator_and_its_distribution(example_env):
    listed = example_env.fedbench("list", "defenses")
    assert listed.returncode == 0, listed.stderr
    row = _listed_row(listed.stdout, "example-meamed")
    assert row is not None, listed.stdout
    assert f"example (fedbench-example-plugin {example_version()})" in row
    assert "f=auto (an integer >= 0, or auto)" in row


def test_fedbench_list_defenses_shows_the_example_preaggregator_and_its_distribution(example_env):
    listed = example_env.fedbench("list", "defenses")
    assert listed.returncode == 0, listed.stderr
    row = _listed_row(listed.stdout, "example-arc")
    assert row is not None, listed.stdout
    assert f"example (fedbench-example-plugin {example_version()})" in row


def test_the_example_stack_runs_in_a_matrix_from_the_command_line(example_env):
    store, board = example_env.root / "r.db", example_env.root / "b.csv"
    done = example_env.fedbench("matrix", "--attacks", "poison", "--defenses", f"{STACK},cma", "--rounds", "3",
                                "--attack-rounds", "2", "--store", str(store), "--jobs", "1", "--csv", str(board),
                                "--quiet")
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {row["defense"]: row for row in csv.DictReader(board.open())}
    assert {STACK, "cma", "fedavg"} <= set(rows)
    ours = rows[STACK]
    assert ours["clean_status"] == "ok" and ours["poison/status"] == "ok"
    for column in ("clean_accuracy_mean", "poison/accuracy_mean"):
        assert math.isfinite(float(ours[column])) and 0.0 <= float(ours[column]) <= 1.0


def test_the_example_package_passes_its_own_tests(example_env):
    tested = example_env.run("-m", "pytest", "-q", "-p", "no:cacheprovider", cwd=example_env.source)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "skipped" not in tested.stdout.splitlines()[-1], "the entry-point test should run when installed"


# --------------------------------------------------------------------------------------------------
# Name clashes between plugins
# --------------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class FirstMean(fedbench.Aggregator):
    """Test aggregator: the unweighted mean."""

    name: ClassVar[str] = "clash-mean"

    def aggregate(self, updates, weights, ctx):
        return updates.mean(0)


@dataclass(kw_only=True)
class SecondMean(FirstMean):
    """Test aggregator: another unweighted mean under the same name."""


@dataclass(kw_only=True)
class MedianImpostor(fedbench.PreAggregator):
    """Test pre-aggregator: passes updates through, under the name of the built-in aggregator cma."""

    name: ClassVar[str] = "cma"

    def preaggregate(self, updates, weights, ctx):
        return updates, weights


class RegistersFirstMean:
    @fedbench.hookimpl
    def register_aggregators(self, register):
        register(FirstMean)


class RegistersSecondMean:
    @fedbench.hookimpl
    def register_aggregators(self, register):
        register(SecondMean)


class RegistersCmaPreaggregator:
    @fedbench.hookimpl
    def register_preaggregators(self, register):
        register(MedianImpostor)


def test_two_plugins_registering_one_aggregator_name_is_an_error_naming_both(use_plugin):
    use_plugin(RegistersFirstMean(), "first")
    use_plugin(RegistersSecondMean(), "second")
    with pytest.raises(FedbenchError) as err:
        registry()
    message = str(err.value)
    assert "aggregator 'clash-mean' is registered twice" in message
    assert "first (registered directly)" in message and "second (registered directly)" in message


def test_a_preaggregator_named_like_an_aggregator_is_an_error_naming_both_plugins(use_plugin):
    assert "cma" in registry().names("aggregator")
    use_plugin(RegistersCmaPreaggregator(), "impostor")
    with pytest.raises(FedbenchError) as err:
        registry()
    message = str(err.value)
    assert "'cma' is registered twice in defense stacks" in message
    assert "as preaggregator by impostor (registered directly)" in message
    assert f"as aggregator by robust (fedbench-suite {fedbench.__version__})" in message


def test_the_cli_reports_a_name_clash_as_one_error_line(use_plugin):
    use_plugin(RegistersFirstMean(), "first")
    use_plugin(RegistersSecondMean(), "second")
    result = CliRunner(env={"COLUMNS": "300"}).invoke(main, ["list", "defenses"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.stderr.startswith("Error: aggregator 'clash-mean' is registered twice: by ")
