"""The README's plugin section and catalogue are code and facts, so they are checked like code."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import fedbench

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def section(title: str) -> str:
    start = README.index(f"## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end >= 0 else None]


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def test_the_readme_plugin_example_registers_and_runs(use_plugin):
    plugin_code, cell_code = code_blocks(section("Writing a plugin"), "python")
    module = types.ModuleType("my_attack")
    sys.modules["my_attack"] = module  # dataclasses look the defining module up while the class is made
    try:
        exec(compile(plugin_code, "README:my_attack.py", "exec"), module.__dict__)
        use_plugin(module, "my_attack")
        cell = fedbench.make_cell(dataset="digits", attack="my-halfflip", rounds=3, attack_rounds=(2,))
        result = fedbench.run_cell(cell)
        assert result.status == "ok"
        assert result.rounds[1]["success"] == 1 - result.rounds[1]["accuracy"]  # untargeted: success = error
        assert "fedbench.make_cell(" in cell_code and "fedbench.load_results(" in cell_code
    finally:
        del sys.modules["my_attack"]


def test_the_readme_pyproject_example_declares_the_entry_point_group():
    (toml,) = code_blocks(section("Writing a plugin"), "toml")
    import tomllib

    data = tomllib.loads(toml)
    assert data["project"]["entry-points"]["fedbench"] == {"my_attack": "my_attack"}
    assert "fedbench-suite" in data["project"]["dependencies"]


def test_the_catalogue_lists_every_registered_attack_and_defense_part():
    text = section("The catalogue")
    listed = set(re.findall(r"`([a-z][a-z0-9-]*)`", text))
    reg = fedbench.registry()
    for kind in ("attack", "defense", "preaggregator", "aggregator"):
        missing = set(reg.names(kind)) - listed - {"none"}
        assert not missing, f"{kind}s missing from the README catalogue: {sorted(missing)}"
