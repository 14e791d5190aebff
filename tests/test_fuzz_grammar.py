"""Fuzzed grammar (issue 14): whatever a user types as a spec, a seed list or a grid file, fedbench
either understands it or says, in one :class:`~fedbench.SpecError` / ``Error:`` line, what is wrong
with which part -- never a traceback.

The properties:

* a spec the parser returns writes itself back (``canonical()``, ``str()``) as text that parses to an
  equal spec with the same hash; anything else is a :class:`SpecError` naming the component or the text;
* specs built from the registry's own names and parameter types always parse;
* ``split_list`` gives back the specs a list was joined from, and never loses or invents text;
* ``parse_seeds`` returns seeds or a :class:`SpecError`, and refuses what it cannot sensibly expand;
* ``fedbench matrix --config F --dry-run`` exits 0, or 2 with one ``Error:`` line, for any file.

Hypothesis runs derandomized, so the suite is deterministic; ``max_examples`` keeps it to seconds.
"""

from __future__ import annotations

import functools
import json
import math
import re
import subprocess
import sys
import textwrap

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import fedbench
from fedbench import SpecError, parse_component, parse_defense
from fedbench.cli import main
from fedbench.components import STACK_KINDS
from fedbench.matrix import parse_seeds, split_list
from fedbench.plugins import registry


def fuzz(max_examples: int):
    return settings(
        derandomize=True,
        deadline=None,
        max_examples=max_examples,
        database=None,
        # the autouse fixture that rebuilds the plugin manager is harmless to share between examples
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


# --------------------------------------------------------------------------------------------------
# Strategies from the real registry
# --------------------------------------------------------------------------------------------------
@functools.cache
def catalog() -> dict[str, dict[str, tuple]]:
    """kind -> name -> param_info() of every registered attack and defense-stack component."""
    reg = registry()
    return {kind: {name: reg.get(kind, name).param_info() for name in reg.names(kind)}
            for kind in ("attack", *STACK_KINDS)}


def stack_names() -> list[str]:
    return sorted(n for kind in STACK_KINDS for n in catalog()[kind])


def kind_of(name: str) -> str:
    return next(kind for kind in catalog() if name in catalog()[kind])


SPACE = st.sampled_from(["", "", "", " ", "\t", "\u00a0"])


def _number_text(value: float) -> str:
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value).replace("e+", "e")  # a '+' would split a defense stack


def valid_value(info) -> st.SearchStrategy[str]:
    """Text the parameter accepts, in the spellings a user might write."""
    words = getattr(info, "words", ())  # a strength parameter (alie's z): a number or a word
    options = []
    if info.optional:
        options.append(st.sampled_from(["auto", "AUTO", "Auto"]))
    if words:
        options.append(st.sampled_from(list(words)))
    check = info.check
    lo = None if check is None else check.lo
    hi = None if check is None else check.hi
    if info.choices:
        options.append(st.sampled_from([str(c) for c in info.choices]))
    elif info.type is bool:
        options.append(st.sampled_from(["true", "false", "1", "0", "yes", "no", "True", "NO"]))
    elif info.type is int:
        low = None if lo is None else (math.floor(lo) + 1 if check.lo_open else math.ceil(lo))
        high = None if hi is None else (math.ceil(hi) - 1 if check.hi_open else math.floor(hi))
        base = 0 if low is None else low
        options.append(st.integers(low, high if high is not None else base + 10**6).map(str))
        if high is None:
            options.append(st.integers(base, 10**40).map(str))  # huge, but valid
    elif info.type is float or words:
        options.append(
            st.floats(min_value=lo, max_value=hi, exclude_min=bool(check and check.lo_open and lo is not None),
                      exclude_max=bool(check and check.hi_open and hi is not None), allow_nan=False,
                      allow_infinity=hi is None and lo is not None).map(_number_text)
        )
    else:
        options.append(st.text(st.characters(whitelist_categories=("Ll", "Lu", "Nd")), min_size=1, max_size=8))
    return st.one_of(options)


@st.composite
def valid_component(draw, names: list[str]) -> str:
    """``name`` or ``name:k=v,...`` with valid values for a random subset of the parameters, in any
    order, with stray whitespace."""
    name = draw(st.sampled_from(names))
    infos = catalog()[kind_of(name)][name]
    chosen = draw(st.permutations(infos))[: draw(st.integers(0, len(infos)))] if infos else []
    text = draw(SPACE) + name + draw(SPACE)
    if chosen:
        text += ":" + ",".join(
            draw(SPACE) + info.name + draw(SPACE) + "=" + draw(SPACE) + draw(valid_value(info)) + draw(SPACE)
            for info in chosen
        )
    return text


@st.composite
def valid_stack(draw) -> str:
    """Client defenses and pre-aggregators in any order, with at most one aggregator anywhere."""
    others = [n for n in stack_names() if kind_of(n) != "aggregator"]
    parts = draw(st.lists(valid_component(others), max_size=3))
    if draw(st.booleans()) or not parts:
        parts.insert(draw(st.integers(0, len(parts))), draw(valid_component(sorted(catalog()["aggregator"]))))
    return "+".join(parts)


BAD_VALUES = st.one_of(
    st.sampled_from([
        "auto", "nan", "NaN", "inf", "-inf", "infinity", "-1", "-0", "0", "1e400", "-1e400", "9" * 30, "9" * 5000,
        "1" + "0" * 4400, "0x10", "1.5", "2.5e-3", "1_000", "\u0663", "\uff11", "true", "None", "[]", "1,2",
        "a=b", "1:2", "1+2", "+1", "1e+20", " ", "\x00", "\u2003", "é", "\U0001f600",
    ]),
    st.integers(-(10**30), 10**30).map(str),
    st.floats().map(repr),
    st.text(max_size=8),
)

STRAY = list(":,=+ \t\n\x00\u00a0\u2003é\u0663\U0001f600") + ["auto", "=auto", ":x=1", ",,", "++", "::"]


@st.composite
def mutated(draw, base: st.SearchStrategy[str]) -> str:
    """A valid spec with one to three edits: stray separators, unicode, deleted or duplicated text,
    a value replaced by a bad one, a duplicated parameter, a trailing separator."""
    text = draw(base)
    for _ in range(draw(st.integers(1, 3))):
        edit = draw(st.sampled_from(["insert", "delete", "duplicate", "bad value", "repeat param", "append", "case"]))
        i = draw(st.integers(0, len(text)))
        if edit == "insert":
            text = text[:i] + draw(st.sampled_from(STRAY)) + text[i:]
        elif edit == "delete" and text:
            j = draw(st.integers(i, min(len(text), i + 4)))
            text = text[:i] + text[j:]
        elif edit == "duplicate":
            j = draw(st.integers(i, min(len(text), i + 8)))
            text = text[:j] + text[i:j] + text[j:]
        elif edit == "bad value":
            values = list(re.finditer(r"=([^,+]*)", text))
            if values:
                m = draw(st.sampled_from(values))
                text = text[: m.start(1)] + draw(BAD_VALUES) + text[m.end(1):]
        elif edit == "repeat param":
            params = re.findall(r"[:,]([^,+:]*=[^,+]*)", text)
            if params:
                text += ("," if ":" in text.split("+")[-1] else ":") + draw(st.sampled_from(params))
        elif edit == "append":
            text += draw(st.sampled_from([":", ",", "=", "+", ": ", ":,", "+ "]))
        elif edit == "case":
            text = text.upper()
    return text


def garbage(names: list[str]) -> st.SearchStrategy[str]:
    grammar = st.sampled_from([*names, ":", ",", "=", "+", " ", "auto", "1", "-2", "0.5", "nan", "x", "f", "s"])
    return st.one_of(
        st.lists(grammar, max_size=8).map("".join),
        st.text(max_size=30),
        st.text(st.sampled_from(list(":,=+ \t1.ae\u00a0")), max_size=12),
    )


ATTACK_TEXT = st.deferred(lambda: st.one_of(
    valid_component(sorted(catalog()["attack"])),
    mutated(valid_component(sorted(catalog()["attack"]))),
    garbage(sorted(catalog()["attack"])),
))
STACK_TEXT = st.deferred(lambda: st.one_of(valid_stack(), mutated(valid_stack()), garbage(stack_names())))


# --------------------------------------------------------------------------------------------------
# The round-trip property
# --------------------------------------------------------------------------------------------------
def fingerprint(spec) -> str:
    """What a cell hash is made of (``CellSpec.to_json`` embeds exactly this dict)."""
    return json.dumps(spec.to_dict(), sort_keys=True, separators=(",", ":"))


def stack_canonical(stack) -> str:
    return "+".join(part.canonical() for part in stack.parts())


def assert_names_the_offender(error: SpecError, text: str, *, stack: bool) -> None:
    message = str(error)
    parts = text.split("+") if stack else [text]
    names = [p.strip().partition(":")[0].strip() for p in parts]
    assert any(name and name in message for name in names) or any(repr(t) in message for t in (text, *parts)), (
        f"{message!r} names neither a component of {text!r} nor its text"
    )


def parses_back_or_is_a_spec_error(kind: str, text: str):
    """The property: an equal spec with the same hash from each written form, or a SpecError."""
    stack = kind == "defense stack"
    parse = parse_defense if stack else functools.partial(parse_component, kind)
    try:
        spec = parse(text)
    except SpecError as error:
        assert_names_the_offender(error, text, stack=stack)
        return None
    for written in (str(spec), stack_canonical(spec) if stack else spec.canonical()):
        again = parse(written)
        assert again == spec, (text, written)
        assert fingerprint(again) == fingerprint(spec), (text, written)
    return spec


@fuzz(300)
@given(text=ATTACK_TEXT)
def test_attack_specs_parse_back_from_what_they_write_or_are_spec_errors(text):
    parses_back_or_is_a_spec_error("attack", text)


@fuzz(300)
@given(text=STACK_TEXT)
def test_defense_stacks_parse_back_from_what_they_write_or_are_spec_errors(text):
    parses_back_or_is_a_spec_error("defense stack", text)


@fuzz(150)
@given(text=st.deferred(lambda: valid_component(sorted(catalog()["attack"]))))
def test_attack_specs_built_from_the_registry_always_parse(text):
    assert parses_back_or_is_a_spec_error("attack", text) is not None, text


@fuzz(150)
@given(text=valid_stack())
def test_defense_stacks_built_from_the_registry_always_parse(text):
    assert parses_back_or_is_a_spec_error("defense stack", text) is not None, text


@fuzz(150)
@given(data=st.data())
def test_a_bad_value_error_names_the_component_the_parameter_and_the_value(data):
    name = data.draw(st.sampled_from([n for n, infos in catalog()["attack"].items() if infos]))
    info = data.draw(st.sampled_from(catalog()["attack"][name]))
    value = data.draw(BAD_VALUES.map(str.strip).filter(lambda v: v and not re.search(r"[,+:]", v)))
    try:
        parse_component("attack", f"{name}:{info.name}={value}")
    except SpecError as error:
        message = str(error)
        assert message.startswith(f"{name}: parameter '{info.name}' got ") and repr(value) in message, message
        assert "allowed: " in message


@fuzz(100)
@given(data=st.data())
def test_an_unknown_name_or_parameter_error_names_it(data):
    key = data.draw(st.text(st.characters(blacklist_characters=":,=+", blacklist_categories=("Zs", "Zl", "Zp", "Cc", "Cs")),
                            min_size=1, max_size=6))
    name = data.draw(st.sampled_from(sorted(catalog()["attack"])))
    assume(key not in {i.name for i in catalog()["attack"][name]})
    with pytest.raises(SpecError, match=re.escape(f"{name}: unknown parameter '{key}'")):
        parse_component("attack", f"{name}:{key}=1")
    assume(key not in catalog()["attack"] and key not in stack_names())
    with pytest.raises(SpecError, match=re.escape(f"unknown attack '{key}'")):
        parse_component("attack", key)
    with pytest.raises(SpecError, match=re.escape(f"unknown defense '{key}'")):
        parse_defense(f"cma+{key}")


@pytest.mark.parametrize("text", ["poison:", "poison: ", " poison :\t", "wbc:"])
def test_a_colon_with_no_parameters_after_it_is_an_error(text):
    """Decision (spec.py's docstring): like a trailing comma, a trailing ':' is a truncated spec."""
    name = text.strip().rstrip(":").strip()
    kind = "attack" if name == "poison" else "defense"
    with pytest.raises(SpecError, match=re.escape(f"{name}: nothing after ':'")):
        parse_component(kind, text)


@pytest.mark.parametrize("text", ["wbc:+cma", "cma+wbc:", "nnm:+krum:f=1"])
def test_a_colon_with_no_parameters_is_an_error_inside_a_stack_too(text):
    with pytest.raises(SpecError, match="nothing after ':'"):
        parse_defense(text)


@pytest.mark.parametrize("text", ["cc:tau=1e20", "cma+wbc:s=1e300", "ldp:clip=1e16,sigma=1e-300+krum"])
def test_a_float_with_a_large_exponent_round_trips_in_a_defense_stack(text):
    """Regression: ``repr(1e20)`` is ``1e+20``, and the '+' split the stack on the way back."""
    stack = parses_back_or_is_a_spec_error("defense stack", text)
    assert stack is not None and stack_canonical(stack).count("+") == len(stack.parts()) - 1


def test_minus_zero_and_zero_are_one_spec_with_one_hash():
    """Regression: equal specs hashed apart because JSON writes -0.0 and 0.0 differently."""
    zero, minus_zero = parse_component("attack", "poison:lam=0"), parse_component("attack", "poison:lam=-0")
    assert zero == minus_zero and fingerprint(zero) == fingerprint(minus_zero)
    assert fedbench.make_cell(attack="poison:lam=-0.0").hash() == fedbench.make_cell(attack="poison:lam=0").hash()


def test_minus_zero_in_the_scenario_hashes_like_zero():
    assert fedbench.make_cell(momentum=-0.0).hash() == fedbench.make_cell(momentum=0.0).hash()


@pytest.mark.parametrize("lr", [math.inf, 1e400, math.nan])
def test_a_learning_rate_that_is_not_a_finite_number_is_refused(lr):
    """Found by the grid fuzzing: ``lr = inf`` in a grid file passed, and every cell would train to NaN."""
    with pytest.raises(SpecError, match="scenario: lr="):
        fedbench.make_cell(lr=lr)


# --------------------------------------------------------------------------------------------------
# split_list
# --------------------------------------------------------------------------------------------------
@st.composite
def written_specs(draw) -> list[str]:
    """Specs as fedbench writes them (labels and canonical forms), which a list must give back."""
    out = []
    for _ in range(draw(st.integers(1, 4))):
        if draw(st.booleans()):
            spec = parse_component("attack", draw(valid_component(sorted(catalog()["attack"]))))
            out.append(draw(st.sampled_from([str(spec), spec.canonical()])))
        else:
            stack = parse_defense(draw(valid_stack()))
            out.append(draw(st.sampled_from([str(stack), stack_canonical(stack)])))
    return out


@fuzz(150)
@given(specs=written_specs())
def test_split_list_gives_back_the_specs_a_list_was_joined_from(specs):
    assert split_list(",".join(specs)) == specs
    assert split_list(specs) == specs


@fuzz(200)
@given(text=st.one_of(st.text(max_size=40), st.text(st.sampled_from(list(":,=+ ab1")), max_size=20)))
def test_split_list_never_fails_and_neither_loses_nor_invents_text(text):
    items = split_list(text)
    assert all(item and item == item.strip() for item in items)
    assert ",".join(items) == ",".join(p.strip() for p in text.split(",") if p.strip())


# --------------------------------------------------------------------------------------------------
# parse_seeds
# --------------------------------------------------------------------------------------------------
@fuzz(150)
@given(parts=st.lists(st.one_of(st.integers(0, 10**9),
                                st.tuples(st.integers(0, 10**6), st.integers(0, 50))), min_size=1, max_size=6))
def test_seed_lists_and_ranges_expand_in_order_without_repeats(parts):
    text = ",".join(str(p) if isinstance(p, int) else f"{p[0]}-{p[0] + p[1]}" for p in parts)
    expected = []
    for p in parts:
        expected.extend([p] if isinstance(p, int) else range(p[0], p[0] + p[1] + 1))
    assert parse_seeds(text) == list(dict.fromkeys(expected))


@fuzz(200)
@given(text=st.one_of(st.text(st.sampled_from(list("0123456789-, _x.+\u0663")), max_size=16), st.text(max_size=12)))
def test_any_seed_text_gives_seeds_or_a_spec_error(text):
    try:
        seeds = parse_seeds(text)
    except SpecError as error:
        message = str(error)
        assert message.startswith("seeds: ")
        assert "need at least one seed" in message or any(p.strip() and repr(p.strip()) in message
                                                          for p in text.split(","))
        return
    assert seeds and all(type(s) is int for s in seeds) and len(set(seeds)) == len(seeds)


@pytest.mark.parametrize("text", ["5-2", "5-2,1"])
def test_a_reversed_seed_range_is_an_error_naming_it(text):
    with pytest.raises(SpecError, match=re.escape("'5-2'")):
        parse_seeds(text)


def test_a_huge_seed_range_is_refused_quickly():
    """``0-10000000`` is a typo, not ten million runs; it must not hang or eat the machine's memory.

    Run in a child process capped at 2 GiB of address space and 60 s, so today's behaviour (it
    tries to build the list) fails this test instead of the machine."""
    script = textwrap.dedent("""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
        from fedbench import SpecError
        from fedbench.matrix import parse_seeds
        for text in ("0-10000000", "0-99999999999999"):
            try:
                parse_seeds(text)
                print("accepted", text)
            except SpecError as error:
                assert text in str(error), str(error)
            except MemoryError:
                print("MemoryError", text)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and not done.stdout, done.stdout + done.stderr


# --------------------------------------------------------------------------------------------------
# fedbench matrix --config grid.toml --dry-run
# --------------------------------------------------------------------------------------------------
KEYS = ["attacks", "defenses", "seeds", "dataset", "partition", "model", "protocol", "rounds", "attack-rounds",
        "attack_prob", "clients", "malicious", "per-round", "epochs", "batch_size", "lr", "momentum", "data-frac",
        "eval", "warmup-rounds", "jobs", "executor", "dry-run", "force", "quiet", "trainer", "device"]
SCALAR = st.one_of(
    st.sampled_from(["poison", "wbc", "cma+wbc:s=0.4", "krum:f=2", "poison:images=2,lam=0.5", "0,1", "0-2", "digits",
                     "iid", "paper", "auto", "ray", "", "nope", "poison:", "1e20"]),
    st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=8),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
)


def toml_value(value) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return repr(value)


@st.composite
def grid_files(draw) -> str:
    grid = {}
    if draw(st.booleans()):
        grid.update(attacks=draw(st.sampled_from(["poison", ["poison", "backdoor:target=1"], "alie"])),
                    defenses=draw(st.sampled_from(["wbc", ["cma", "ctma:beta=0.2"], "nnm+cma+wbc:s=0.5"])))
    for _ in range(draw(st.integers(0, 3))):
        known = st.sampled_from(KEYS)
        key = draw(st.one_of(known, known, known, st.from_regex(r"[a-z_-]{1,8}", fullmatch=True)))
        grid[key] = draw(st.one_of(SCALAR, st.lists(SCALAR, max_size=3)))
    body = "".join(f"{json.dumps(k)} = {toml_value(v)}\n" for k, v in grid.items())
    return ("[matrix]\n" if draw(st.booleans()) else "") + body


def run_grid(tmp_path, text: str):
    grid = tmp_path / "grid.toml"
    grid.write_text(text, encoding="utf-8")
    return CliRunner().invoke(main, ["matrix", "--config", str(grid), "--dry-run", "--store", str(tmp_path / "s.db")])


def assert_clean_exit(result) -> None:
    """Exit 0, or 2 with one ``Error:`` line; never an exception's traceback (exit 1)."""
    assert result.exit_code in (0, 2), f"exit {result.exit_code}: {result.exception!r}\n{result.output}"
    assert result.exception is None or isinstance(result.exception, SystemExit)
    if result.exit_code == 2:
        errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1, result.stderr


@fuzz(25)
@given(text=grid_files())
def test_any_valid_toml_grid_runs_dry_or_is_one_clean_error(tmp_path, text):
    assert_clean_exit(run_grid(tmp_path, text))


@fuzz(10)
@given(text=st.one_of(st.text(max_size=40), st.text(st.sampled_from(list("[]=\"'.,#\n abc123")), max_size=40)))
def test_any_text_as_a_grid_file_is_one_clean_error(tmp_path, text):
    assert_clean_exit(run_grid(tmp_path, text))


@pytest.mark.parametrize(
    "line, key",
    [
        ("rounds = 2020-01-01", "rounds"),  # TypeError from int(date)
        ("rounds = inf", "rounds"),  # OverflowError from int(inf)
        ("rounds = 2.7", "rounds"),  # silently truncated to 2
        ("attacks = {name = \"poison\"}", "attacks"),  # a table becomes the spec text "{'name': 'poison'}"
    ],
)
def test_a_toml_value_of_the_wrong_type_is_one_clean_error_naming_its_key(tmp_path, line, key):
    other = 'defenses = "wbc"\n' + ('' if line.startswith("attacks") else 'attacks = "poison"\n')
    result = run_grid(tmp_path, other + line + "\n")
    assert_clean_exit(result)
    assert result.exit_code == 2 and key in result.stderr


def test_a_matrix_key_that_is_not_a_table_is_one_clean_error(tmp_path):
    result = run_grid(tmp_path, "matrix = 1\n")
    assert_clean_exit(result)
    assert result.exit_code == 2 and "matrix" in result.stderr


@pytest.mark.parametrize("option", ["--dataset", "--partition"])
def test_an_empty_dataset_or_partition_list_is_one_clean_error(tmp_path, option):
    """``--dataset ""`` (or ``dataset = ""`` in a grid file) made a grid of 0 cells and exited 0."""
    result = CliRunner().invoke(main, ["matrix", "--attacks", "poison", "--defenses", "wbc", option, " , ",
                                       "--dry-run", "--store", str(tmp_path / "s.db")])
    assert_clean_exit(result)
    assert result.exit_code == 2 and option.lstrip("-") in result.stderr
