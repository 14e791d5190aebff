"""Figures: per-round curves, the accuracy/mitigation trade-off and the heatmap, from a small real
store (a 4-round matrix on digits, 3 seeds) and from hand-filled ones; ``fedbench plot`` and
``fedbench run --plot``. The figures are inspected as matplotlib objects before they are saved."""

from __future__ import annotations

import pandas as pd
import pytest
from click.testing import CliRunner

from fedbench import leaderboard as lb
from fedbench import plots
from fedbench.cli import main
from fedbench.errors import FedbenchError
from fedbench.store import Store
from result_stores import fill_two_seeds, put

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def real_store(tmp_path_factory):
    """poison vs fedavg and wbc on digits: 4 rounds, an attack in round 2, seeds 0-2 (12 cells)."""
    path = tmp_path_factory.mktemp("plots") / "runs.db"
    result = CliRunner().invoke(main, ["matrix", "--attacks", "poison", "--defenses", "fedavg,wbc", "--rounds", "4",
                                       "--attack-rounds", "2", "--seeds", "0,1,2", "--jobs", "1", "--quiet",
                                       "--store", str(path)])
    assert result.exit_code == 0, result.output
    return path


@pytest.fixture
def censored_store(tmp_path):
    return fill_two_seeds(tmp_path / "runs.db")


def lines(ax, gid):
    return [line for line in ax.get_lines() if line.get_gid() == gid]


def test_rounds_plot_has_a_line_and_band_per_defense_the_attack_round_and_the_threshold(real_store):
    fig, (key, label), every = plots.store_figure(real_store, "rounds")
    assert len(every) == 1 and key == every[0][0]
    (ax,) = [a for a in fig.axes if a.get_visible()]
    assert ax.get_title() == "poison: success per round (mean ± std over 3 seeds)"
    assert ax.get_xlabel() == "communication round" and ax.get_ylabel() == "attack success (fraction)"
    assert sorted(line.get_label() for line in lines(ax, "defense")) == ["fedavg", "wbc"]
    assert len(ax.collections) == 2  # one band per defense
    (attack,) = lines(ax, "adversarial")
    assert list(attack.get_xdata()) == [2, 2]
    (threshold,) = lines(ax, "threshold")
    assert list(threshold.get_ydata()) == [0.5, 0.5]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert {"fedavg", "wbc", "adversarial round", "0.5 threshold"} == set(legend)
    # the plotted line is the mean over seeds of the stored values
    with Store.read(real_store) as store:
        frame = lb.rounds_frame(store)
    mean = frame[(frame["attack"] == "poison") & (frame["defense"] == "wbc")].groupby("round")["success"].mean()
    wbc = next(line for line in lines(ax, "defense") if line.get_label() == "wbc")
    assert list(wbc.get_ydata()) == pytest.approx(list(mean))


def test_rounds_plot_of_accuracy_has_a_panel_per_attack_and_no_threshold(real_store):
    fig, _, _ = plots.store_figure(real_store, "rounds", metric="accuracy", band="minmax")
    axes = [a for a in fig.axes if a.get_visible()]
    assert sorted(a.get_title().split(":")[0] for a in axes) == ["none", "poison"]
    assert all(a.get_ylabel() == "benign accuracy (fraction of test set)" for a in axes)
    assert all("min–max" in a.get_title() and not lines(a, "threshold") for a in axes)
    assert all(len(lines(a, "defense")) == 2 for a in axes)
    one, _, _ = plots.store_figure(real_store, "rounds", metric="accuracy", attack="poison")
    assert len([a for a in one.axes if a.get_visible()]) == 1


def test_adversarial_rounds_that_differ_across_seeds_are_drawn_by_their_share():
    rows = [{"key": f"k{seed}", "setting": "s", "attack": "poison", "defense": "fedavg", "seed": seed, "round": r,
             "adversarial": r == adv, "success": 0.1 * r} for seed, adv in ((0, 2), (1, 2), (2, 3)) for r in (1, 2, 3, 4)]
    fig = plots.rounds_figure(pd.DataFrame(rows))
    ax = fig.axes[0]
    marks = {int(line.get_xdata()[0]): line.get_alpha() for line in lines(ax, "adversarial")}
    assert set(marks) == {2, 3} and marks[2] > marks[3]
    assert "adversarial round (opacity: share of seeds)" in [t.get_text() for t in ax.get_legend().get_texts()]


def test_one_seed_is_drawn_alone_with_its_own_attack_rounds_and_no_band():
    rows = [{"key": f"k{seed}", "setting": "s", "attack": "poison", "defense": d, "seed": seed, "round": r,
             "adversarial": r == adv, "success": 0.1 * r + seed} for seed, adv in ((0, 2), (1, 3))
            for d in ("wbc", "fedavg") for r in (1, 2, 3, 4)]
    ax = plots.rounds_figure(pd.DataFrame(rows), seed=1).axes[0]
    assert ax.get_title() == "poison: success per round (seed 1)"
    assert [int(line.get_xdata()[0]) for line in lines(ax, "adversarial")] == [3]
    assert not ax.collections
    # fedavg, the undefended reference, comes first whatever the store's order
    assert [line.get_label() for line in lines(ax, "defense")] == ["fedavg", "wbc"]
    assert list(lines(ax, "defense")[0].get_ydata()) == pytest.approx([1.1, 1.2, 1.3, 1.4])
    with pytest.raises(FedbenchError, match="no cell of seed 7 in this setting; its seeds: 0, 1"):
        plots.rounds_figure(pd.DataFrame(rows), seed=7)


def test_the_band_of_a_fraction_stays_inside_zero_and_one():
    # seeds at 0 and 1: mean ± std is 0.5 ± 0.71, which a fraction can never reach
    rows = [{"key": f"k{seed}", "setting": "s", "attack": "poison", "defense": "fedavg", "seed": seed, "round": r,
             "adversarial": r == 2, "success": float(seed)} for seed in (0, 1) for r in (1, 2, 3)]
    ax = plots.rounds_figure(pd.DataFrame(rows)).axes[0]
    (band,) = ax.collections
    ys = band.get_paths()[0].vertices[:, 1]
    assert ys.min() == pytest.approx(0.0) and ys.max() == pytest.approx(1.0)
    loss = pd.DataFrame(rows).rename(columns={"success": "loss"})
    (unbounded,) = plots.rounds_figure(loss, metric="loss").axes[0].collections
    assert unbounded.get_paths()[0].vertices[:, 1].min() < -0.2


def test_tradeoff_plot_draws_a_labelled_point_per_defense_hollow_when_censored(censored_store):
    fig, _, _ = plots.store_figure(censored_store, "tradeoff")
    (ax,) = fig.axes
    assert ax.get_xlabel().startswith("clean benign accuracy") and ax.get_ylabel().startswith("attack-mitigation rounds")
    assert sorted(t.get_text() for t in ax.texts) == ["fedavg", "wbc"]
    (hollow,), (filled,) = lines(ax, "censored"), lines(ax, "exact")
    assert hollow.get_markerfacecolor() == "none" and filled.get_markerfacecolor() != "none"
    assert list(hollow.get_xdata()) == pytest.approx([0.85]) and list(hollow.get_ydata()) == [2.0]  # fedavg: >=2 rounds
    assert list(filled.get_xdata()) == pytest.approx([0.83]) and list(filled.get_ydata()) == [1.0]
    assert {"lower bound (censored)", "mean (exact)"} == {t.get_text() for t in ax.get_legend().get_texts()}


def test_tradeoff_of_the_longest_attack_reads_each_runs_maximum(tmp_path):
    # one run, two attacks: gone after 1 round and after 3 (both exact); avg 2, max 3
    with Store.open(tmp_path / "runs.db") as store:
        put(store, "none", "fedavg", 0, 0.9)
        put(store, "poison", "fedavg", 0, 0.8, success=[0.1, 0.9, 0.2, 0.1], mitigation=[(1, False), (3, False)])
    ys = {}
    for value in ("mitigation_avg", "mitigation_max"):
        ax = plots.store_figure(tmp_path / "runs.db", "tradeoff", metric=value)[0].axes[0]
        (point,) = lines(ax, "exact")
        ys[value] = list(point.get_ydata())
        assert ("longest attack" in ax.get_ylabel()) == (value == "mitigation_max")
    assert ys == {"mitigation_avg": [2.0], "mitigation_max": [3.0]}
    with pytest.raises(FedbenchError, match="unknown tradeoff value 'peak'; use one of mitigation_avg, mitigation_max"):
        plots.store_figure(tmp_path / "runs.db", "tradeoff", metric="peak")


def test_a_sweeps_tradeoff_plot_numbers_its_points_and_coinciding_ones_share_a_number(tmp_path):
    """Ten stacks, three of them on the same point (weak settings that change nothing): the points
    get numbers, the stacks are listed beside the axes, and the three share one number."""
    sweep = [f"wbc:s={s}" for s in (0.1, 0.2, 0.3, 0.7, 1.0)] + [f"ldp:sigma={s}" for s in (0.1, 0.3, 3.0, 10.0)]
    with Store.open(tmp_path / "runs.db") as store:
        for i, defense in enumerate(["fedavg", *sweep]):
            weak = defense in ("fedavg", "ldp:sigma=0.1", "ldp:sigma=0.3")
            acc = 0.9 if weak else 0.85 - 0.02 * i
            put(store, "none", defense, 0, acc)
            put(store, "poison", defense, 0, acc, success=[0.1, 0.9, 0.8, 0.7] if weak else [0.1, 0.9, 0.2, 0.2],
                mitigation=[(2, True)] if weak else [(1, False)])
    fig = plots.store_figure(tmp_path / "runs.db", "tradeoff")[0]
    ax = fig.axes[0]
    numbers = [t.get_text() for t in ax.texts if t.get_gid() == "key"]
    assert numbers == [str(i) for i in range(1, 9)]  # 10 stacks, 3 on one point
    (key,) = fig.legends
    listed = [t.get_text().replace("\n", " ") for t in key.get_texts()]
    assert len(listed) == 8 and sorted(", ".join(listed).split(", ")) == sorted(["fedavg", *sweep])
    assert any(set(entry.split(", ")) == {"fedavg", "ldp:sigma=0.1", "ldp:sigma=0.3"} for entry in listed)


def test_heatmap_annotates_each_defense_and_attack_with_its_score_term(censored_store):
    fig, _, _ = plots.store_figure(censored_store, "heatmap")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["wbc", "fedavg"]  # leaderboard order
    assert [t.get_text() for t in ax.get_xticklabels()] == ["poison"]
    # wbc: 0.8 x 0.6 and 0.7 x 0.6 -> 0.45; fedavg: 0.7 x 0.2 and 0.6 x 0.2 -> 0.13
    assert [t.get_text() for t in ax.texts] == ["0.45", "0.13"]
    assert ax.get_xlabel() == "attack" and ax.get_ylabel() == "defense stack" and "score term" in ax.get_title()
    success, _, _ = plots.store_figure(censored_store, "heatmap", metric="success_avg")
    assert [t.get_text() for t in success.axes[0].texts] == ["0.40", "0.80"]


def test_plot_command_writes_png_or_svg_by_the_extension(real_store, tmp_path):
    for kind in plots.KINDS:
        png, svg = tmp_path / f"{kind}.png", tmp_path / f"{kind}.svg"
        for out in (png, svg):
            result = CliRunner().invoke(main, ["plot", "--store", str(real_store), "--kind", kind, "--out", str(out)])
            assert result.exit_code == 0, result.output
        assert png.read_bytes().startswith(PNG) and png.stat().st_size > 5000
        assert "<svg" in svg.read_text()[:1000]
    bad = CliRunner().invoke(main, ["plot", "--store", str(real_store), "--out", str(tmp_path / "x.gif")])
    assert bad.exit_code == 2 and "cannot tell the image format" in bad.output
    missing = CliRunner().invoke(main, ["plot", "--store", str(real_store), "--metric", "nope", "--out",
                                        str(tmp_path / "x.png")])
    assert missing.exit_code == 2 and "no cell reports the metric 'nope'" in missing.output
    one = CliRunner().invoke(main, ["plot", "--store", str(real_store), "--seed", "2", "--out", str(tmp_path / "s.png")])
    assert one.exit_code == 0 and (tmp_path / "s.png").read_bytes().startswith(PNG)
    wrong = CliRunner().invoke(main, ["plot", "--store", str(real_store), "--kind", "heatmap", "--seed", "2", "--out",
                                      str(tmp_path / "h.png")])
    assert wrong.exit_code == 2 and "--seed is for the rounds plot" in wrong.output


def test_a_store_with_several_settings_plots_the_first_and_names_the_others(tmp_path):
    path = tmp_path / "runs.db"
    with Store.open(path) as store:
        put(store, "none", "fedavg", 0, 0.9)
        put(store, "none", "fedavg", 0, 0.8, warmup=2)
        cells = lb.cell_frame(store)
    (first, _), (second, _) = plots.settings(cells)
    out = tmp_path / "acc.png"
    result = CliRunner().invoke(main, ["plot", "--store", str(path), "--metric", "accuracy", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"setting {first}" in result.stderr and "holds 2 settings; plotted the first" in result.stderr
    assert second in result.stderr
    chosen = CliRunner().invoke(main, ["plot", "--store", str(path), "--metric", "accuracy", "--out", str(out),
                                       "--setting", second[:6]])
    assert chosen.exit_code == 0 and f"setting {second}" in chosen.stderr and "plotted the first" not in chosen.stderr
    wrong = CliRunner().invoke(main, ["plot", "--store", str(path), "--out", str(out), "--setting", "zzz"])
    assert wrong.exit_code == 2 and "no setting matches 'zzz'" in wrong.output


def test_run_plot_writes_the_rounds_plot_of_that_run(tmp_path):
    out = tmp_path / "run.png"
    result = CliRunner().invoke(main, ["run", "--rounds", "3", "--attack", "poison", "--attack-rounds", "2",
                                       "--quiet", "--plot", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes().startswith(PNG)
    assert f"success per round plotted to {out}" in result.stderr


def test_run_plot_with_an_unknown_image_format_fails_before_the_run(tmp_path):
    result = CliRunner().invoke(main, ["run", "--rounds", "50", "--plot", str(tmp_path / "run.gif")])
    assert result.exit_code == 2 and "cannot tell the image format" in result.output and "round" not in result.stdout
