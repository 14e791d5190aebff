"""The fedbench command: a thin layer of click commands over the public API.

Docstrings of commands are their --help text, so they are plain text (no reST markup). Whatever
fedbench prints through rich that it did not write itself -- component names, parameter values,
messages from plugins and files, cell labels, paths -- is escaped, never read as markup."""

from __future__ import annotations

import json
import shlex
import sys
from typing import Any

import click

from fedbench.errors import FedbenchError

KIND_ALIASES = {
    "attacks": "attack", "attack": "attack",
    "defenses": "defense", "defense": "defense",
    "preaggregators": "preaggregator", "preaggregator": "preaggregator",
    "pre-aggregators": "preaggregator", "pre-aggregator": "preaggregator",
    "aggregators": "aggregator", "aggregator": "aggregator",
    "datasets": "dataset", "dataset": "dataset",
    "models": "model", "model": "model",
    "partitions": "partition", "partition": "partition",
}
TITLES = {
    "attack": "Attacks", "defense": "Client defenses", "preaggregator": "Pre-aggregators", "aggregator": "Aggregators",
    "dataset": "Datasets", "model": "Models", "partition": "Partitions",
}
#: Where each part of a defense stack runs, shown under its table by ``fedbench list``.
STAGES = {
    "defense": "stage: inside every benign client's local training, in the order written",
    "preaggregator": "stage: server, before the aggregator, in the order written (e.g. nnm+bucketing:s=2+krum)",
    "aggregator": "stage: server, one per stack (fedavg when none is named); f=auto is the scenario's malicious clients per round",
}


class FedbenchGroup(click.Group):
    """Turns a :class:`FedbenchError` into one clear message and exit code 2, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except FedbenchError as error:
            click.echo(f"Error: {error}", err=True)
            ctx.exit(2)


def _version() -> str:
    from fedbench import __version__

    return __version__


@click.group(cls=FedbenchGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(_version(), "--version", prog_name="fedbench")
def main() -> None:
    """Benchmark attacks and defenses in federated learning."""


# --------------------------------------------------------------------------------------------------
# list
# --------------------------------------------------------------------------------------------------
@main.command("list")
@click.argument("kind", required=False)
def list_cmd(kind: str | None) -> None:
    """List registered components (KIND: attacks, defenses, preaggregators, aggregators, datasets,
    models, partitions).

    'defenses' shows client defenses, pre-aggregators and aggregators, each with its stage, since all
    three go into a defense stack."""
    from rich.markup import escape
    from rich.table import Table

    from fedbench.plugins import broken_plugins, registry
    from fedbench.spec import format_value

    if kind is not None and kind.lower() not in KIND_ALIASES:
        raise FedbenchError(f"unknown kind '{kind}'; use one of: {', '.join(sorted(set(KIND_ALIASES) - set(TITLES)))}")
    kinds = list(TITLES) if kind is None else [KIND_ALIASES[kind.lower()]]
    if kinds == ["defense"]:
        kinds = ["defense", "preaggregator", "aggregator"]
    reg = registry()
    console = _console(min_width=120)
    for k in kinds:
        table = Table(title=TITLES[k], title_justify="left", show_lines=False,
                      caption=STAGES.get(k), caption_justify="left")
        table.add_column("name", style="bold")
        table.add_column("parameters")
        table.add_column("description")
        table.add_column("origin", style="dim")
        for name, entry in reg.entries(k).items():
            params = ", ".join(f"{i.name}={format_value(i.default)} ({i.allowed()})" for i in entry.cls.param_info()) or "-"
            desc = entry.cls.description()
            if k == "dataset":
                extra = f" [model: {entry.cls.default_model}"
                if entry.cls.scenario_defaults:
                    extra += "; scenario: " + ", ".join(f"{a}={b}" for a, b in entry.cls.scenario_defaults.items())
                desc += extra + "]"
            table.add_row(escape(name), escape(params), escape(desc), escape(entry.origin))
        console.print(table)
    broken = broken_plugins()
    if broken:
        table = Table(title="Broken plugins (not loaded; every other plugin works)", title_justify="left")
        table.add_column("plugin", style="bold red")
        table.add_column("error")
        table.add_column("origin", style="dim")
        for name, (origin, why) in broken.items():
            table.add_row(escape(name), escape(why), escape(origin))
        console.print(table)


# --------------------------------------------------------------------------------------------------
# run
# --------------------------------------------------------------------------------------------------
def _int_list(ctx, param, value):
    if value is None:
        return None
    try:
        rounds = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter("expected comma-separated round numbers, e.g. 31,45") from None
    if any(r < 1 for r in rounds):
        raise click.BadParameter("rounds count from 1")
    return rounds


def scenario_options(f):
    """Options shared by run and matrix: what the cell runs on and the federated scenario."""
    options = [
        click.option("--dataset", default="digits", show_default=True, help="Dataset name (see `fedbench list datasets`)."),
        click.option("--partition", default="iid", show_default=True, help="iid | shards[:per_client=2] | dirichlet[:alpha=0.5]"),
        click.option("--model", default=None, help="Model name; default: the dataset's own."),
        click.option("--protocol", type=click.Choice(["paper", "reference-code"]), default="paper", show_default=True,
                     help="paper: the paper's text (1 epoch, batch 32); reference-code: the authors' code "
                          "(10 epochs, batch 10, momentum 0.5, 80% of client data)."),
        click.option("--rounds", type=int, default=30, show_default=True),
        click.option("--attack-rounds", callback=_int_list, default=None, help="Explicit adversarial rounds, e.g. 31,45 (overrides --attack-prob)."),
        click.option("--attack-prob", type=float, default=None, help="Probability a round is adversarial [paper: 0.1]."),
        click.option("--clients", "num_clients", type=int, default=None, help="Number of clients N [paper: 100]."),
        click.option("--malicious", "num_malicious", type=int, default=None, help="Malicious clients M [paper: 5]."),
        click.option("--per-round", "clients_per_round", type=int, default=None, help="Clients per round K [paper: 10]."),
        click.option("--epochs", "local_epochs", type=int, default=None, help="Local epochs [paper: 1]."),
        click.option("--batch-size", type=int, default=None, help="Local batch size [paper: 32]."),
        click.option("--lr", type=float, default=None, help="Local SGD learning rate [paper: 0.01]."),
        click.option("--momentum", type=float, default=None, help="Local SGD momentum [paper: 0]."),
        click.option("--data-frac", "client_data_frac", type=float, default=None, help="Fraction of each client's data used [paper: 1]."),
        click.option("--eval", "eval_policy", type=click.Choice(["auto", "full"]), default=None,
                     help="auto: per round a fixed stratified subset of 1,000 test images (whole test set if smaller, "
                          "and always in the last round); full: the whole test set every round."),
        click.option("--data-dir", type=click.Path(file_okay=False), default=None,
                     help="Where datasets live (default: $FEDBENCH_DATA_DIR, else ~/.cache/fedbench)."),
        click.option("--device", default="cpu", show_default=True, help="cpu or cuda."),
        click.option("--trainer", type=click.Choice(["stacked", "loop"]), default="stacked", show_default=True,
                     help="stacked: the clients of a round trained together; loop: one after another (reference)."),
        click.option("--compile", "compile_noise", is_flag=True,
                     help=COMPILE_HELP),
    ]
    for option in reversed(options):
        f = option(f)
    return f


COMPILE_HELP = ("Fuse the integer hash of client-defense noise (wbc, ldp) into one kernel with torch.compile: "
                          "the same numbers bit for bit, the noise 3-4x faster, for seconds of compilation per "
                          "worker process (cached by torch across runs). Pays off for long cells of wbc.")


def _compile_if(asked: bool) -> None:
    if asked:
        from fedbench.rng import enable_compile

        enable_compile()


def grid_run_options(f):
    """Options shared by matrix and reproduce: how a grid runs and what it prints."""
    options = [
        click.option("--cell-timeout", type=float, default=None, metavar="SECONDS",
                     help="Stop a cell (or warm-up) still running after this many seconds and record it failed; the "
                          "other cells go on [default: no timeout]. Timed from when its data is loaded; a re-run "
                          "skips it unless --retry-failed."),
        click.option("--lockstep/--no-lockstep", default=None,
                     help="Advance cells that share dataset, model and local setup round by round together, their "
                          "clients trained in one batch [default: on with --device cuda, off on a CPU, where it "
                          "measured no faster reliably]."),
        click.option("--retry-failed", is_flag=True, help="Also re-run cells recorded as failed (the cell itself raised)."),
        click.option("--force", is_flag=True, help="Re-run every cell, finished or not."),
        click.option("--csv", "csv_path", type=click.Path(dir_okay=False), default=None,
                     help="Also write the leaderboard as CSV."),
        click.option("--dry-run", is_flag=True, help="List the cells and their stored status; run nothing."),
        click.option("--quiet", is_flag=True, help="No progress display (the leaderboard is still printed)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


SCENARIO_KEYS = ("attack_prob", "num_clients", "num_malicious", "clients_per_round", "local_epochs",
                 "batch_size", "lr", "momentum", "client_data_frac")


def cell_kwargs(opts: dict[str, Any]) -> dict[str, Any]:
    """The make_cell keywords from parsed scenario options."""
    kw = {k: opts[k] for k in SCENARIO_KEYS if opts.get(k) is not None}
    if opts.get("attack_rounds") is not None:
        kw["attack_rounds"] = opts["attack_rounds"]
    if opts.get("eval_policy") is not None:
        kw["eval"] = opts["eval_policy"]
    for key in ("dataset", "partition", "model", "protocol", "rounds"):
        kw[key] = opts[key]
    return kw


@main.command()
@click.option("--attack", default="none", show_default=True, help="Attack spec, e.g. poison:images=10,lam=0.5")
@click.option("--defense", default="fedavg", show_default=True, help="Defense stack, e.g. cma+wbc:s=0.4 (fedavg if no aggregator).")
@click.option("--seed", type=int, default=0, show_default=True)
@scenario_options
@click.option("--store", "store_path", type=click.Path(dir_okay=False), default=None,
              help="Also record the run in this SQLite result store (the one fedbench matrix writes; an earlier "
                   "record of the same cell is replaced), for fedbench leaderboard, fedbench export and "
                   "fedbench.load_results.")
@click.option("--json", "as_json", is_flag=True, help="Print the final metrics as JSON (and nothing else on stdout).")
@click.option("--metrics", "extra_metrics", default="", metavar="NAMES",
              help="Optional per-round measurements, comma-separated. aep: the attack's effect on the parameters "
                   "(norm in adversarial rounds; curvature of the benign loss along it and the fraction each later round "
                   "undoes; see fedbench/aep.py). Cost: one more training of the malicious clients and one more "
                   "aggregation per adversarial round, one Hessian-vector product on 256 samples per round.")
@click.option("--quiet", is_flag=True, help="No per-round lines or progress bar; the summary is still printed.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Also draw this run's per-round curve to this file (.png, .svg or .pdf): the attack's success "
                   "metric with the 0.5 threshold, or the benign accuracy when the attack reports no success; "
                   "adversarial rounds marked.")
def run(attack, defense, seed, store_path, as_json, quiet, plot_path, extra_metrics, **opts) -> None:
    """Run one federated training run (a cell) and print its metrics."""
    from rich.markup import escape

    from fedbench.aep import check_metrics
    from fedbench.matrix import split_list
    from fedbench.spec import make_cell

    cell = make_cell(attack=attack, defense=defense, seed=seed, **cell_kwargs(opts))
    extra = check_metrics(split_list(extra_metrics))
    if plot_path is not None:
        from fedbench.plots import check_image_path

        check_image_path(plot_path)  # before the run, not after it
    from fedbench.engine import run_cell  # after the spec: a typo is reported before the engine loads

    _compile_if(opts["compile_noise"])

    out = _console(stderr=as_json)
    show = not quiet and not as_json
    if show:
        out.print(f"[bold]{escape(cell.label())}[/] · protocol {escape(cell.protocol)} · {cell.rounds} rounds · cell {cell.hash()}")
    progress, task, on_round = _round_progress(cell, out, show, quiet)

    def run_it():
        with progress:
            return run_cell(cell, data_dir=opts["data_dir"], device=opts["device"], trainer=opts["trainer"],
                            on_round=on_round, metrics=extra)

    try:
        result = run_it() if store_path is None else _run_into_store(cell, store_path, opts["data_dir"], opts["device"], run_it)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except FedbenchError:
        raise
    except Exception as error:
        _plugin_crash(error)
        raise  # not a plugin's: fedbench's own bug, with its traceback
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        _summary(result, out)
        if store_path is not None:
            out.print(f"recorded as cell {cell.hash()} in {store_path}", markup=False, highlight=False)
    if plot_path is not None:  # after the results are out: a plot that fails must not hide a long run's numbers
        _plot_run(result, plot_path)
    if as_json:
        sys.exit(0 if result.status == "ok" else 1)
    if result.status != "ok":
        out.print(f"[red]{escape(result.status)}: {escape(result.message)}[/]")
        sys.exit(1)


def _plugin_crash(error: Exception) -> None:
    """If a plugin's code raised ``error``, print its traceback (for the plugin's author) and then one
    line naming the plugin, and exit 1 -- the exit code a crash always had; otherwise return."""
    import traceback

    from fedbench.errors import one_line
    from fedbench.executors import culprit

    who = culprit(error)
    if who is None:
        return
    click.echo("".join(traceback.format_exception(error)).rstrip(), err=True)
    click.echo(f"Error: {who} raised {one_line(error)}", err=True)
    sys.exit(1)


def _plot_run(result, path: str) -> None:
    """The rounds plot of one run (success, else accuracy), written to ``path``; a line on stderr."""
    from fedbench import plots

    rows = plots.run_rounds(result)
    metric = "success" if "success" in rows and rows["success"].notna().any() else "accuracy"
    plots.save(plots.rounds_figure(rows, metric=metric, title=result.cell.label()), path)
    click.echo(f"{metric} per round plotted to {path}", err=True)


def _run_into_store(cell, store_path: str, data_dir: str | None, device: str, run_it):
    """Run a cell and record it in a result store exactly as the matrix records its cells (same key,
    labels, outcome and lock), so the leaderboard, export and load_results read it. The data and the
    device are checked before the store is touched: missing ones are an error, not a recorded failure."""
    from fedbench import executors
    from fedbench import matrix as mx
    from fedbench import store as st

    mc = mx.MatrixCell(cell)
    mx.check_environment([mc], data_dir, device)
    with st.lock(store_path, "fedbench run"), st.Store.open(store_path) as store:
        store.mark_stale_running()
        store.start(mc.key, cell.to_dict(), 0, mc.info())
        try:
            result = run_it()
        except KeyboardInterrupt:
            store.interrupt([mc.key], "interrupted (Ctrl-C) while running; re-run to resume")
            raise
        except Exception as error:  # recorded, then reported as usual (exit 2 or a traceback)
            # A FedbenchError is the user's to fix (--device cuda without a GPU, say): the record must
            # not stick, so it is 'interrupted'; anything else is the cell's own failure.
            outcome = executors.failure_of(error, environment=isinstance(error, FedbenchError))
            store.finish(mc.key, {**outcome, "versions": executors.versions(), "worker": executors.worker_id()})
            raise
        store.finish(mc.key, {**executors.outcome_of(result), "versions": executors.versions(), "worker": executors.worker_id()})
    return result


def _round_progress(cell, console, show_lines: bool, quiet: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    progress = Progress(
        TextColumn("round"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=quiet, transient=True,
    )
    task = progress.add_task("rounds", total=cell.rounds, status="")

    def on_round(rnd: int, row: dict[str, Any]) -> None:
        extra = "  ".join(f"{k}={v:.3f}" for k, v in row.items() if k not in ("round", "adversarial", "accuracy", "loss", "eval_n"))
        line = f"round {rnd:4d}{' [attack]' if row['adversarial'] else '         '}  accuracy={row['accuracy']:.4f}  loss={row['loss']:.4f}  {extra}"
        if show_lines:  # literal text: '[attack]' is not markup
            progress.console.print(line.rstrip(), markup=False, highlight=False)
        progress.update(task, advance=1, status=f"acc {row['accuracy']:.3f}")

    return progress, task, on_round


def _summary(result, console) -> None:
    from rich.table import Table

    table = Table(title="Summary", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("final benign accuracy (full test set)", f"{result.final_accuracy:.4f}")
    table.add_row("adversarial rounds", ", ".join(map(str, result.adversarial_rounds)) or "none")
    if result.adversarial_rounds and not any("success" in row for row in result.rounds):
        table.add_row("attack success, mitigation rounds", "n/a (the attack reports no success metric)")
    table.add_row("wall time", f"{result.seconds:.1f} s")
    console.print(table)
    if result.mitigation:
        mt = Table(title="Attack-mitigation rounds ('>k': still active when the next attack or the end came)",
                   title_justify="left")
        mt.add_column("attack round", justify="right")
        mt.add_column("peak success", justify="right")
        mt.add_column("mitigation rounds", justify="right")
        for m in result.mitigation:
            mt.add_row(str(m.attack_round), f"{m.peak:.3f}", str(m))
        console.print(mt)


# --------------------------------------------------------------------------------------------------
# matrix
# --------------------------------------------------------------------------------------------------
def _load_config(ctx, param, value):
    """--config grid.toml: the file's keys become the command's defaults; options given on the
    command line still win. Keys are option names (attacks, seeds, attack-rounds, ...)."""
    if value is None:
        return None
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise click.BadParameter("reading TOML needs Python 3.11+ (or pip install tomli)") from None
    try:
        with open(value, "rb") as fh:
            data = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise click.BadParameter(f"cannot read {value}: {error}") from None
    data = data.get("matrix", data)
    if not isinstance(data, dict):
        raise click.BadParameter(f"[matrix] in {value} must be a table of option names and values")
    names: dict[str, str] = {}
    for p in ctx.command.params:
        names[p.name] = p.name
        for opt in p.opts:
            names[opt.lstrip("-").replace("-", "_")] = p.name
    names.pop("config", None)
    defaults = {}
    for key, val in data.items():
        name = names.get(key.replace("-", "_"))
        if name is None:
            known = sorted(k for k in names if k not in ("h", "help", "config"))
            raise click.BadParameter(f"unknown key '{key}' in {value}; known keys: {', '.join(known)}")
        defaults[name] = _config_text(key, val, value)
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


def _config_text(key: str, val: Any, path: str) -> str:
    """A TOML value as the text a user would type for the option, so click converts and checks it
    exactly like a command-line value (2.7 and inf are refused for integer options, not truncated)."""
    def scalar(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float, str)):
            return str(v)
        raise click.BadParameter(f"key '{key}' in {path} has a {type(v).__name__} value; "
                                 "give a string, a number, true/false or a list of those")

    return ",".join(scalar(v) for v in val) if isinstance(val, list) else scalar(val)


@main.command()
@click.option("--config", type=click.Path(exists=True, dir_okay=False), callback=_load_config, is_eager=True,
              expose_value=False, help="A TOML file with the grid: keys are this command's options "
                                       "(attacks = [\"poison\"], seeds = [0, 1], dataset = \"fmnist\", ...).")
@click.option("--attacks", required=True, help="Attack specs, comma-separated, e.g. poison,backdoor:target=1 "
                                               "(a k=v item continues the previous spec).")
@click.option("--defenses", required=True, help="Defense stacks, comma-separated, e.g. wbc,cma,ctma:beta=0.4,cma+wbc.")
@click.option("--seeds", default="0", show_default=True, help="Seeds, e.g. 0,1,2 or 0-4.")
@scenario_options
@click.option("--warmup-rounds", type=int, default=0, show_default=True,
              help="Opt-in warm start: W rounds of clean FedAvg shared by all cells of a seed, then attacks and "
                   "defenses from round W+1. 0 = the paper's protocol (attacks from round 1).")
@click.option("--store", "store_path", default="fedbench-runs.db", show_default=True, type=click.Path(dir_okay=False),
              help="The SQLite result store; finished cells in it are skipped, interrupted ones re-run.")
@click.option("--jobs", type=int, default=None, help="Cells run at once [default: number of cores]; 1 = in this process.")
@click.option("--executor", type=click.Choice(["process", "ray"]), default="process", show_default=True,
              help="process: local worker processes; ray: Ray tasks (pip install 'fedbench-suite[ray]').")
@click.option("--ray-address", default=None, help="Address of an existing Ray cluster (default: start a local one).")
@grid_run_options
def matrix(attacks, defenses, seeds, warmup_rounds, store_path, jobs, executor, ray_address, cell_timeout, lockstep,
           retry_failed, force, csv_path, dry_run, quiet, **opts) -> None:
    """Run a grid of cells (attacks x defense stacks x seeds, plus the clean and undefended reference
    cells) into a result store and print the leaderboard.

    --dataset and --partition also take comma-separated lists (one leaderboard each)."""
    import importlib.util

    from fedbench import matrix as mx

    kw = cell_kwargs(opts)
    datasets, partitions = mx.split_list(kw.pop("dataset")), mx.split_list(kw.pop("partition"))
    cells = mx.expand(attacks=mx.split_list(attacks), defenses=mx.split_list(defenses), seeds=mx.parse_seeds(seeds),
                      datasets=datasets, partitions=partitions, warmup_rounds=warmup_rounds, **kw)
    if executor == "ray" and importlib.util.find_spec("ray") is None:
        raise FedbenchError("--executor ray needs Ray, which is not installed; install it with "
                            "pip install 'fedbench-suite[ray]', or use --executor process")
    if warmup_rounds:
        mx.require_warm_start()
    if jobs is not None and jobs < 1:
        raise FedbenchError(f"--jobs {jobs} is not allowed; need at least 1")
    mx.check_cell_timeout(cell_timeout, "--cell-timeout")
    _compile_if(opts["compile_noise"])
    _run_grid(cells, store_path, jobs=jobs, executor=executor, ray_address=ray_address, retry_failed=retry_failed,
              force=force, csv_path=csv_path, dry_run=dry_run, quiet=quiet, data_dir=opts["data_dir"],
              device=opts["device"], trainer=opts["trainer"], cell_timeout=cell_timeout, lockstep=lockstep)


@main.command()
@click.argument("name", required=False)
@click.option("--list", "list_presets", is_flag=True, help="List the paper's experiments: grid, claim and cost estimate.")
@click.option("--describe", is_flag=True, help="Show one preset in full (claim, notes, grids, rounds, seeds, cost).")
@click.option("--quick", is_flag=True, help="The same stacks, shorter: a few-minute CPU version (see --describe).")
@click.option("--rounds", type=int, default=None, help="Rounds per cell [default: the preset's].")
@click.option("--seeds", default=None, help="Seeds, e.g. 0,1,2 or 0-4 [default: the preset's].")
@click.option("--dataset", default=None, help="One of the preset's datasets [default: its first, fmnist].")
@click.option("--protocol", "protocols", default=None,
              help="paper, reference-code or both comma-separated [default: the preset's; --quick: paper].")
@click.option("--store", "store_path", default="fedbench-runs.db", show_default=True, type=click.Path(dir_okay=False),
              help="The SQLite result store; finished cells in it are skipped (a preset resumes like any matrix).")
@click.option("--jobs", type=int, default=None, help="Cells run at once [default: number of cores]; 1 = in this process.")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="Where datasets live (default: $FEDBENCH_DATA_DIR, else ~/.cache/fedbench).")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--trainer", type=click.Choice(["stacked", "loop"]), default="stacked", show_default=True)
@click.option("--compile", "compile_noise", is_flag=True, help=COMPILE_HELP)
@grid_run_options
def reproduce(name, list_presets, describe, quick, rounds, seeds, dataset, protocols, store_path, jobs, data_dir, device,
              trainer, compile_noise, cell_timeout, lockstep, retry_failed, force, csv_path, dry_run, quiet) -> None:
    """Run one of the FL-WBC paper's experiments (a preset grid shipped with fedbench) under both
    protocols, into a result store, and print its leaderboards.

    Presets: fig2, fig3, fig4, fig5, fig6, table1 (fedbench reproduce --list). Each is a grid file of
    the package (fedbench/presets/NAME.toml); plots and reports come from the store
    (fedbench plot, fedbench report)."""
    from fedbench import presets

    if list_presets:
        for preset in presets.list_presets():
            click.echo(preset.summary())
        return
    if name is None:
        raise FedbenchError(f"name a preset ({', '.join(presets.names())}) or give --list")
    preset = presets.load(name)
    if describe:
        click.echo(preset.describe())
        return
    if jobs is not None and jobs < 1:
        raise FedbenchError(f"--jobs {jobs} is not allowed; need at least 1")
    from fedbench.matrix import check_cell_timeout

    check_cell_timeout(cell_timeout, "--cell-timeout")
    cells = preset.cells(quick=quick, rounds=rounds, seeds=seeds, dataset=dataset, protocols=protocols)
    _compile_if(compile_noise)
    if not quiet and not dry_run:
        click.echo(f"{preset.name}: {preset.estimate(device=device, cells=cells)}", err=True)
    _run_grid(cells, store_path, jobs=jobs, executor="process", ray_address=None, retry_failed=retry_failed,
              force=force, csv_path=csv_path, dry_run=dry_run, quiet=quiet, data_dir=data_dir, device=device,
              trainer=trainer, cell_timeout=cell_timeout, lockstep=lockstep)


def _run_grid(cells, store_path, *, jobs, executor, ray_address, retry_failed, force, csv_path, dry_run, quiet,
              data_dir, device, trainer, cell_timeout=None, lockstep=None) -> None:
    """Run (or list, with ``dry_run``) a grid of cells into a store and print its leaderboards: the
    part of ``matrix`` that ``reproduce`` shares. Exit 1 when a cell did not finish, 130/143 on Ctrl-C
    or SIGTERM."""
    from pathlib import Path

    from fedbench import leaderboard as lb
    from fedbench import matrix as mx
    from fedbench import store as st

    out, err = _console(min_width=120), _console(stderr=True)

    if dry_run:
        known = {}
        if Path(store_path).exists():
            with st.Store.read(store_path) as store:
                known = store.statuses(mc.key for mc in cells)
        for mc in cells:
            click.echo(f"{mc.key}  {known.get(mc.key, 'new'):<11}  {mc.label()}")
        click.echo(f"{len(cells)} cells", err=True)
        return

    # Every dataset the run needs is loaded once, here, before the store is created or locked:
    # missing data is one error (exit 2), not a failure recorded in every cell.
    todo = cells
    if not force and Path(store_path).is_file() and Path(store_path).stat().st_size:
        with st.Store.read(store_path) as store:
            todo = mx.plan(cells, store, retry_failed=retry_failed)
    mx.check_environment(todo, data_dir, device, on_cluster=executor == "ray" and bool(ray_address))

    if quiet:
        progress = mx.Progress()
    elif err.is_terminal:
        progress = mx.RichProgress(err)
    else:
        progress = mx.PlainProgress(lambda line: click.echo(line, err=True))
    with st.lock(store_path), st.Store.open(store_path) as store:
        try:
            report = mx.run_matrix(cells, store, jobs=jobs, executor=executor, ray_address=ray_address,
                                   data_dir=data_dir, device=device, trainer=trainer,
                                   retry_failed=retry_failed, force=force, cell_timeout=cell_timeout,
                                   lockstep=lockstep, progress=progress)
        except KeyboardInterrupt as interrupt:
            done = sum(1 for s in store.statuses(mc.key for mc in cells).values() if s in st.FINISHED)
            terminated = isinstance(interrupt, mx.Terminated)
            what = "terminated (SIGTERM)" if terminated else "interrupted"
            click.echo(f"{what}: {done} of {len(cells)} cells are finished and kept in {store_path}; "
                       "run the same command again to resume", err=True)
            sys.exit(143 if terminated else 130)
        frame = lb.cell_frame(store, report.keys)
    board = lb.build(frame)
    for renderable in lb.rich_tables(board, frame):
        out.print(renderable)
    if csv_path:
        _write(csv_path, lb.render(board, "csv"))
    if not quiet:
        err.print(f"{report.ran} cells run in {report.seconds:.1f} s, {report.skipped} taken from {store_path}",
                  markup=False, highlight=False)
        quoted = shlex.quote(str(store_path))
        if len(frame):
            err.print(f"next: fedbench report --store {quoted} --out report/ (every plot, intervals); "
                      f"fedbench plot --store {quoted} --kind rounds --seed {int(frame['seed'].min())} --out rounds.png",
                      markup=False, highlight=False)
    unfinished = report.count("failed") + report.count("interrupted")
    if unfinished:
        err.print(f"{unfinished} cell(s) did not finish (see the notes above); "
                  "re-run to resume (--retry-failed for failed ones)", style="red", markup=False, highlight=False)
        sys.exit(1)


def _console(stderr: bool = False, min_width: int = 0):
    """A rich console for fedbench's output. In a terminal: rich's own, at least ``min_width``
    columns (leaderboards are wide). Piped or redirected: one record per line -- nothing is wrapped
    at 80 columns (soft wrap) and tables take the width they need, so logs and grep see whole lines."""
    from rich.console import Console

    console = Console(stderr=stderr)
    if console.is_terminal:
        return console if console.width >= min_width else Console(stderr=stderr, width=min_width)
    return Console(stderr=stderr, soft_wrap=True, width=PIPE_WIDTH)


#: The width of a console that is not a terminal: tables never need to be squeezed to fit it.
PIPE_WIDTH = 10_000


# --------------------------------------------------------------------------------------------------
# leaderboard
# --------------------------------------------------------------------------------------------------
@main.command()
@click.option("--store", "store_path", default="fedbench-runs.db", show_default=True, type=click.Path(dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(["table", "md", "csv", "json", "html", "latex"]), default=None,
              help="table (terminal) | md | csv | json | html | latex [default: from --output's extension, else table].")
@click.option("--output", "-o", type=click.Path(dir_okay=False), default=None, help="Write to this file instead of stdout.")
@click.option("--ci", "show_ci", is_flag=True,
              help="Show mean [95% confidence interval over seeds] instead of mean ± std (CSV and JSON always "
                   "hold both, as <column>_ci_low and <column>_ci_high; n/a with one seed).")
@click.option("--vs", "vs", default=None, metavar="DEFENSE",
              help="Also compare every defense with DEFENSE, paired by seed (same schedule, data and malicious "
                   "clients): the difference in score, clean accuracy and, per attack, accuracy and success avg, "
                   "with its 95% interval; * marks an interval that excludes 0. In CSV and JSON: columns "
                   "<column>_diff, _diff_ci_low, _diff_ci_high, _diff_n.")
def leaderboard(store_path, fmt, output, show_ci, vs) -> None:
    """Re-render the leaderboard of a result store (nothing is re-run).

    Every number is a mean over seeds; the confidence intervals are Student t intervals below 10
    seeds (wide with 3 seeds: that is the honest uncertainty of 3 runs) and BCa bootstrap intervals
    from 10 seeds on, which do not assume normal per-seed values."""
    from pathlib import Path

    from fedbench import leaderboard as lb
    from fedbench.store import Store

    if fmt is None:
        suffixes = {".md": "md", ".csv": "csv", ".json": "json", ".html": "html", ".htm": "html", ".tex": "latex"}
        fmt = suffixes.get(Path(output).suffix.lower(), None) if output else "table"
        if fmt is None:
            raise FedbenchError(f"cannot tell the format of {output}; give --format md|csv|json|html|latex")
    if fmt == "table" and output:
        raise FedbenchError("--format table is for the terminal; give --format md|csv|json|html|latex with --output")
    with Store.read(store_path) as store:
        frame = lb.cell_frame(store)
    board = lb.build(frame)
    comparison = None
    if vs is not None:
        known = list(dict.fromkeys(frame["defense"]))
        if vs not in known:
            raise FedbenchError(f"--vs {vs}: no cell of that defense in {store_path}; "
                                f"defenses: {', '.join(known) or 'none'}")
        comparison = lb.compare(frame, vs)
    spread = "ci" if show_ci else "std"
    if fmt == "table":
        console = _console(min_width=120)
        if board.empty:
            console.print(f"no cells in {store_path}", markup=False, highlight=False)
        for renderable in lb.rich_tables(board, frame, spread=spread, comparison=comparison):
            console.print(renderable)
        return
    text = lb.render(board, fmt, frame, spread=spread, comparison=comparison)
    if output:
        _write(output, text)
    else:
        click.echo(text, nl=False)


# --------------------------------------------------------------------------------------------------
# plot and report
# --------------------------------------------------------------------------------------------------
@main.command()
@click.option("--store", "store_path", default="fedbench-runs.db", show_default=True, type=click.Path(dir_okay=False))
@click.option("--kind", type=click.Choice(["rounds", "tradeoff", "heatmap"]), default="rounds", show_default=True,
              help="rounds: a metric per round, one line per defense stack, one panel per attack; tradeoff: clean "
                   "accuracy vs attack-mitigation rounds, one point per defense stack; heatmap: defense stacks x "
                   "attacks.")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False),
              help="The image file; its extension chooses the format: .png, .svg or .pdf.")
@click.option("--metric", default=None,
              help="rounds: the per-round metric [default: success; e.g. accuracy, loss]. tradeoff: "
                   "mitigation_avg (each run's mean over its attacks) [default] or mitigation_max (its longest "
                   "attack). heatmap: score (the attack's score term, accuracy x (1 - success avg)) [default], "
                   "success_avg or accuracy.")
@click.option("--attack", default=None, help="rounds: only this attack's panel [default: one panel per attack].")
@click.option("--setting", default=None, metavar="KEY",
              help="The setting to plot, by its key or a unique prefix of it. A store can hold several settings "
                   "(one leaderboard each); without --setting the first one is plotted and the others are named "
                   "on stderr. fedbench report draws every setting.")
@click.option("--band", type=click.Choice(["std", "minmax"]), default="std", show_default=True,
              help="rounds: the band around the mean over seeds: mean ± one sample std, or min to max.")
@click.option("--seed", type=int, default=None,
              help="rounds: draw this seed's cells alone (its own attack rounds, no band), as the paper's "
                   "figures do; seeds with different attack schedules blur each other's spikes in a mean.")
def plot(store_path, kind, out_path, metric, attack, setting, band, seed) -> None:
    """Draw a figure of a result store (nothing is re-run).

    The rounds plot marks adversarial rounds with dashed lines (fainter when only some seeds attack
    in that round) and the 0.5 success threshold with a dotted line; the tradeoff plot draws a
    censored mean of mitigation rounds (a lower bound) as a hollow marker."""
    from fedbench import plots

    fig, (key, label), every = plots.store_figure(store_path, kind, metric=metric, attack=attack, setting=setting,
                                                  band=band, seed=seed)
    plots.save(fig, out_path)
    click.echo(f"{kind} plot of setting {key} ({label}) written to {out_path}", err=True)
    if setting is None and len(every) > 1:
        others = "; ".join(f"{k} ({lab})" for k, lab in every[1:])
        click.echo(f"the store holds {len(every)} settings; plotted the first. Others (--setting KEY): {others}", err=True)


@main.command()
@click.option("--store", "store_path", default="fedbench-runs.db", show_default=True, type=click.Path(dir_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="The folder to write report.html, report.md and the figures into (created if missing).")
@click.option("--vs", "vs", default=None, metavar="DEFENSE",
              help="Also compare every defense with DEFENSE, paired by seed, as fedbench leaderboard --vs does: a "
                   "table after each setting's leaderboard.")
def report(store_path, out_dir, vs) -> None:
    """Write a report of a result store: DIR/report.html (one self-contained file that opens offline,
    figures embedded) and DIR/report.md (its figures as PNG files beside it).

    Per setting: the leaderboard with 95% confidence intervals over seeds, every plot, the failed
    and diverged cells with their messages and each cell's spec; then the versions recorded with
    the cells."""
    from fedbench.report import write_report

    html_path, md_path = write_report(store_path, out_dir, vs=vs)
    click.echo(f"report written to {html_path} and {md_path}", err=True)


# --------------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------------
@main.command()
@click.option("--store", "store_path", default="fedbench-runs.db", show_default=True, type=click.Path(dir_okay=False))
@click.option("--rounds", "rounds_path", type=click.Path(dir_okay=False, allow_dash=True), default=None,
              help="Write the per-round metrics of every cell, with the cell's labels, to this CSV file (- for stdout).")
@click.option("--form", type=click.Choice(["wide", "long"]), default="wide", show_default=True,
              help="For --rounds. wide: one row per cell and round, a column per metric; "
                   "long: one row per cell, round and metric (columns metric, value).")
@click.option("--cells", "cells_path", type=click.Path(dir_okay=False, allow_dash=True), default=None,
              help="Write one row per cell (labels, status, final accuracy, success and mitigation rounds with "
                   "their censored flags) to this CSV file (- for stdout).")
def export(store_path, rounds_path, form, cells_path) -> None:
    """Export the per-round metrics and the per-cell results of a result store as CSV (nothing is re-run).

    The store can come from fedbench matrix or from fedbench run --store."""
    from fedbench import leaderboard as lb
    from fedbench.store import Store

    if rounds_path is None and cells_path is None:
        raise FedbenchError("nothing to export: give --rounds PATH (per-round metrics) and/or --cells PATH (one row per cell)")
    with Store.read(store_path) as store:
        frames = []
        if rounds_path is not None:
            rounds = lb.rounds_long(store) if form == "long" else lb.rounds_frame(store)
            frames.append((rounds_path, rounds, "rows of per-round metrics"))
        if cells_path is not None:
            frames.append((cells_path, lb.cell_frame(store), "cells"))
    for path, frame, what in frames:
        text = frame.to_csv(index=False)
        if path == "-":
            click.echo(text, nl=False)
            continue
        _write(path, text)
        click.echo(f"{len(frame)} {what} written to {path}", err=True)


def _write(path: str, text: str) -> None:
    from pathlib import Path

    try:
        Path(path).write_text(text, encoding="utf-8")
    except OSError as error:
        raise FedbenchError(f"cannot write {path}: {error.strerror or error}") from None


if __name__ == "__main__":  # pragma: no cover
    main()
