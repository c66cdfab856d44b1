"""Reports from run results: time to target, idle fractions, seed aggregates, table and figures."""

from __future__ import annotations

import json
import math

import pytest

from fdjax.report import (
    METHOD_COLORS,
    common_level,
    idle_fraction,
    method_colors,
    plot_accuracy,
    plot_idle,
    plateau,
    ratios_to_reference,
    results_json,
    summarize_method,
    summarize_run,
    table_markdown,
    time_to_target,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def row(time, acc, rnd=0, method="sync", seed=0, small=None):
    return {"method": method, "seed": seed, "time": time, "global_accuracy": acc,
            "small_accuracy": small, "round": rnd}


ROWS = [row(1.0, 0.2, 1), row(2.0, 0.5, 2), row(3.0, 0.7, 3), row(4.0, 0.65, 4)]

NODES = {
    "c0": {"role": "client", "busy": 3.0, "idle": 1.0, "messages": 4, "bytes": 100},
    "c1": {"role": "client", "busy": 1.0, "idle": 3.0, "messages": 4, "bytes": 100},
    "avg": {"role": "averaging", "busy": 1.0, "idle": 9.0, "messages": 8, "bytes": 200},
    "kd": {"role": "distillation", "busy": 5.0, "idle": 5.0, "messages": 8, "bytes": 200},
}


# --- common level and ratios to the reference ----------------------------------------------------

def test_common_level_is_the_highest_step_every_run_reaches():
    runs = [[row(1.0, 0.30), row(2.0, 0.47)], [row(1.0, 0.52), row(2.0, 0.51)],
            [row(1.0, 0.45)]]  # exactly on a step counts
    assert common_level(runs) == pytest.approx(0.45)
    assert common_level(runs, step=0.1) == pytest.approx(0.4)


def test_common_level_none_without_evaluations_or_below_one_step():
    assert common_level([]) is None
    assert common_level([[row(1.0, 0.5)], [row(1.0, None)]]) is None
    assert common_level([[row(1.0, 0.04)]]) is None


def test_ratios_to_reference_per_seed_then_mean():
    times = {"sync-fwd": {0: 100.0, 1: 200.0, 2: None},
             "async": {0: 50.0, 1: 150.0, 2: 80.0}, "late": {0: None, 1: 100.0}}
    out = ratios_to_reference(times, "sync-fwd")
    assert set(out) == {"async", "late"}  # the reference is left out
    assert out["async"]["per_seed"] == {0: 0.5, 1: 0.75, 2: None}  # seed 2: no reference time
    assert out["async"]["mean"] == pytest.approx(0.625)
    assert out["async"]["std"] == pytest.approx(0.125)
    assert out["async"]["seeds"] == 2
    assert out["late"]["per_seed"] == {0: None, 1: 0.5} and out["late"]["seeds"] == 1


# --- time_to_target ---------------------------------------------------------------------------

def test_time_to_target_first_row_reaching_the_target():
    assert time_to_target(ROWS, 0.5) == 2.0  # >= counts
    assert time_to_target(ROWS, 0.6) == 3.0
    assert time_to_target(ROWS, 0.0) == 1.0


def test_time_to_target_not_reached():
    assert time_to_target(ROWS, 0.71) is None
    assert time_to_target([], 0.1) is None


def test_time_to_target_sorts_unsorted_rows():
    shuffled = [ROWS[3], ROWS[1], ROWS[2], ROWS[0]]
    assert time_to_target(shuffled, 0.6) == 3.0  # not 4.0, the first in list order


# --- idle_fraction ----------------------------------------------------------------------------

def test_idle_fraction_pools_over_nodes_of_a_role():
    assert idle_fraction(NODES, "client") == pytest.approx(4.0 / 8.0)
    assert idle_fraction(NODES, ("averaging", "distillation")) == pytest.approx(14.0 / 20.0)
    assert idle_fraction(NODES, "averaging") == pytest.approx(0.9)


def test_idle_fraction_none_without_nodes_or_time():
    assert idle_fraction(NODES, "nobody") is None
    assert idle_fraction({}, "client") is None
    zero = {"c": {"role": "client", "busy": 0.0, "idle": 0.0, "messages": 0, "bytes": 0}}
    assert idle_fraction(zero, "client") is None


# --- summarize_run / summarize_method ---------------------------------------------------------

def test_summarize_run():
    summary = summarize_run(list(reversed(ROWS)), NODES, target=0.6)
    assert summary == {
        "time_to_target": 3.0, "final_accuracy": 0.65, "best_accuracy": 0.7,
        "plateau_accuracy": 0.65, "plateaued": True,
        "client_idle_fraction": pytest.approx(0.5), "server_idle_fraction": pytest.approx(0.7),
        "rounds": 4,
    }


def curve(*accuracies):
    return [row(float(t), a) for t, a in enumerate(accuracies)]


def test_a_run_still_climbing_in_its_last_quarter_has_not_plateaued():
    # times 0..8: the last quarter is t >= 6
    assert plateau(curve(0.1, 0.3, 0.5, 0.6, 0.65, 0.68, 0.70, 0.71, 0.72)) == (0.72, False)


def test_a_run_that_levels_off_has_plateaued_at_its_last_quarters_best():
    assert plateau(curve(0.1, 0.5, 0.70, 0.72, 0.74, 0.75, 0.752, 0.754, 0.751)) == (0.754, True)
    # the last quarter gained exactly 0.5 points: still a plateau; a hair more is not
    assert plateau(curve(0.1, 0.5, 0.7, 0.7, 0.7, 0.7, 0.705, 0.7, 0.7))[1] is True
    assert plateau(curve(0.1, 0.5, 0.7, 0.7, 0.7, 0.7, 0.706, 0.7, 0.7))[1] is False


def test_a_run_that_falls_back_reports_its_later_lower_level():
    assert plateau(curve(0.1, 0.8, 0.9, 0.9, 0.9, 0.9, 0.8, 0.8, 0.8)) == (0.8, True)


def test_a_plateau_needs_evaluations_before_the_last_quarter():
    assert plateau([row(5.0, 0.5)]) == (None, None)
    assert plateau([]) == (None, None)


def test_summarize_run_without_rows():
    summary = summarize_run([], {}, target=0.6)
    assert all(value is None for value in summary.values())


def _run(ttt, final, best=None, client=0.5, server=0.25, rounds=10, plateaued=True):
    return {"time_to_target": ttt, "final_accuracy": final,
            "best_accuracy": final if best is None else best,
            "plateau_accuracy": final, "plateaued": plateaued,
            "client_idle_fraction": client, "server_idle_fraction": server, "rounds": rounds}


def test_summarize_method_mean_std_reached_with_a_seed_that_missed():
    runs = [_run(10.0, 0.70), _run(None, 0.50), _run(20.0, 0.60)]
    out = summarize_method(runs)
    ttt = out["time_to_target"]
    assert ttt["mean"] == pytest.approx(15.0)       # over the two seeds that reached it
    assert ttt["std"] == pytest.approx(5.0)         # population std
    assert (ttt["reached"], ttt["seeds"]) == (2, 3)
    assert out["final_accuracy"]["mean"] == pytest.approx(0.6)
    assert out["final_accuracy"]["std"] == pytest.approx(math.sqrt(0.02 / 3))
    assert out["rounds"] == {"mean": 10.0, "std": 0.0}
    assert out["plateaued"]["count"] == 3 and out["plateaued"]["mean"] == 1.0
    assert summarize_method([_run(1.0, 0.5, plateaued=False)])["plateaued"]["count"] == 0


def test_summarize_method_one_seed_and_all_none():
    out = summarize_method([_run(None, 0.4, client=None)])
    assert out["final_accuracy"] == {"mean": pytest.approx(0.4), "std": 0.0}
    assert out["time_to_target"] == {"mean": None, "std": None, "reached": 0, "seeds": 1}
    assert out["client_idle_fraction"] == {"mean": None, "std": None}


# --- results_json / table ---------------------------------------------------------------------

PER_METHOD = {
    "sync": [_run(20.0, 0.70), _run(30.0, 0.72)],
    "async-fwd": [_run(10.0, 0.71), _run(None, 0.60)],
    "fedavg-large": [_run(None, 0.40, client=None, server=None)],
}


def test_results_json_ratio_to_reference():
    results = results_json(PER_METHOD, target=0.65, reference="sync")
    json.dumps(results)  # plain JSON types only
    assert results["target_accuracy"] == 0.65
    assert results["reference"] == "sync"
    methods = results["methods"]
    assert methods["sync"]["ratio_to_reference"] == pytest.approx(1.0)
    assert methods["async-fwd"]["ratio_to_reference"] == pytest.approx(10.0 / 25.0)
    assert methods["fedavg-large"]["ratio_to_reference"] is None


def test_results_json_without_usable_reference_has_no_ratio():
    for reference in (None, "fedavg-large", "no-such-method"):
        results = results_json(PER_METHOD, target=0.65, reference=reference)
        assert "reference" not in results
        assert all("ratio_to_reference" not in m for m in results["methods"].values())


def test_table_markdown_lists_methods_and_marks_missing_values():
    table = table_markdown(results_json(PER_METHOD, target=0.65, reference="sync"))
    lines = table.strip().splitlines()
    assert len(lines) == 2 + len(PER_METHOD)
    assert "ratio to sync" in lines[0]
    for name in PER_METHOD:
        assert any(line.startswith(f"| {name} |") for line in lines)
    sync = next(line for line in lines if line.startswith("| sync |"))
    assert "25.0 ± 5.0 (2/2)" in sync and "71.0% ± 1.0%" in sync and "1.00×" in sync
    fedavg = next(line for line in lines if line.startswith("| fedavg-large |"))
    assert "— (0/1)" in fedavg and fedavg.count("—") >= 3
    assert all(line.count("|") == lines[0].count("|") for line in lines)


def test_table_markdown_without_reference_has_no_ratio_column():
    table = table_markdown(results_json(PER_METHOD, target=0.65))
    assert "ratio" not in table


# --- figures ----------------------------------------------------------------------------------

def _is_png(path):
    data = path.read_bytes()
    return len(data) > len(PNG_SIGNATURE) and data.startswith(PNG_SIGNATURE)


def _seed_rows(seed, shift, end):
    return [row(t, min(0.9, 0.1 + 0.05 * t + 0.01 * seed), rnd=i, seed=seed)
            for i, t in enumerate([0.5 + shift, 2.0 + shift, 5.0, 9.0, end])]


def test_plot_accuracy_one_seed(tmp_path):
    path = plot_accuracy({"sync": [ROWS]}, tmp_path / "one.png", target=0.6)
    assert path == tmp_path / "one.png" and _is_png(path)


def test_plot_accuracy_three_seeds_and_several_methods(tmp_path):
    curves = {
        "async-fwd": [_seed_rows(s, 0.1 * s, end) for s, end in enumerate([12.0, 10.0, 11.0])],
        "sync": [ROWS],
        "my-new-method": [_seed_rows(0, 0.0, 8.0), _seed_rows(1, 0.3, 9.0)],
    }
    path = plot_accuracy(curves, tmp_path / "sub" / "three.png", target=0.5)
    assert _is_png(path)
    linear = plot_accuracy(curves, tmp_path / "linear.png", interpolation="linear")
    assert _is_png(linear)


def test_a_single_run_beside_means_of_seeds_names_its_seed(tmp_path, monkeypatch):
    """In a figure of means over seeds a method with one run is labelled with its seed, so its
    curve is not read as a mean; alone in a figure, a run keeps the method's name."""
    import fdjax.report as report

    figures = []
    real = report._new_figure
    monkeypatch.setattr(report, "_new_figure", lambda *a: figures.append(real(*a)) or figures[-1])

    def labels(curves):
        plot_accuracy(curves, tmp_path / f"{len(figures)}.png")
        return [t.get_text() for t in figures[-1].axes[0].get_legend().get_texts()]

    mixed = labels({"sync-fwd": [_seed_rows(0, 0.0, 9.0), _seed_rows(1, 0.2, 9.0)],
                    "async-fwd-stronger": [_seed_rows(2, 0.0, 9.0)]})
    assert mixed == ["sync-fwd (mean of 2 seeds)", "async-fwd-stronger (seed 2 only)"]
    assert labels({"sync": [_seed_rows(2, 0.0, 9.0)]}) == ["sync"]


def test_plot_accuracy_other_key_skips_none(tmp_path):
    rows = [row(1.0, 0.2, small=None), row(2.0, 0.3, small=0.25), row(3.0, 0.4, small=0.35)]
    path = plot_accuracy({"sync-fwd": [rows, rows]}, tmp_path / "small.png", key="small_accuracy")
    assert _is_png(path)


def test_plot_idle(tmp_path):
    results = results_json(PER_METHOD, target=0.65)
    path = plot_idle(results["methods"], tmp_path / "idle.png")
    assert path == tmp_path / "idle.png" and _is_png(path)


def test_method_colors_fixed_and_distinct_fallbacks():
    colors = method_colors(["sync", "x", "y", "async-fwd"])
    assert colors["sync"] == METHOD_COLORS["sync"]
    assert colors["async-fwd"] == METHOD_COLORS["async-fwd"]
    assert colors["x"] != colors["y"]
    assert not {colors["x"], colors["y"]} & set(METHOD_COLORS.values())
