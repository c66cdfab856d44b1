"""Turn the metric rows and summaries of runs into results: numbers, a Markdown table and figures.

A run records metric rows (``method``, ``seed``, ``time`` on the run's clock, ``global_accuracy``,
``small_accuracy``, ``round``) and a summary with per-node timing (``nodes``: name -> ``role``,
``busy``, ``idle``, ``messages``, ``bytes``; ``duration``). Methods are compared on the time the
global model first reaches a target accuracy, so this module reduces each run to a few numbers,
aggregates them across seeds (mean, population std, how many seeds reached the target) and renders
them. It needs only numpy, matplotlib and the standard library, never JAX, so reports can be made
on any machine from saved results. Figures use matplotlib's object-oriented API with an explicit
Agg canvas: headless, and no global pyplot or backend state is touched (safe inside notebooks).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: Roles whose nodes are servers; clients have the role ``"client"``.
SERVER_ROLES: tuple[str, ...] = ("averaging", "distillation")

#: The per-run numbers that :func:`summarize_method` aggregates across seeds, in table order.
SUMMARY_KEYS: tuple[str, ...] = (
    "time_to_target", "final_accuracy", "best_accuracy", "plateau_accuracy", "plateaued",
    "client_idle_fraction", "server_idle_fraction", "rounds",
)

#: A run has plateaued when its last quarter gained at most this much accuracy (0.5 points).
PLATEAU_GAIN = 0.005

#: Fixed colours (tab10) so a method looks the same in every figure.
METHOD_COLORS: dict[str, str] = {
    "sync-fwd": "#1f77b4",          # blue
    "sync": "#ff7f0e",              # orange
    "async-round": "#2ca02c",       # green
    "async-continuous": "#d62728",  # red
    "async-fwd": "#9467bd",         # purple
    "fedavg-large": "#7f7f7f",      # grey: the baseline
}

_TAB10 = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
          "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")

_MISSING = "—"


# --------------------------------------------------------------------------------------------
# Per-run numbers
# --------------------------------------------------------------------------------------------

def _by_time(rows: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    # Stable, so rows logged at the same instant keep their order.
    return sorted(rows, key=lambda row: float(row["time"]))


def time_to_target(rows: Iterable[Mapping[str, Any]], target: float) -> float | None:
    """Run-clock time at which the global model first reaches ``target`` accuracy.

    This is the headline comparison between methods, so rows are sorted by time first: callers
    may pass rows merged from several nodes or files in any order.

    Returns:
        The ``time`` of the earliest row with ``global_accuracy >= target``, or None if no row
        reaches it.
    """
    for row in _by_time(rows):
        accuracy = row.get("global_accuracy")
        if accuracy is not None and accuracy >= target:
            return float(row["time"])
    return None


def plateau(rows: Iterable[Mapping[str, Any]], gain: float = PLATEAU_GAIN
            ) -> tuple[float | None, bool | None]:
    """A run's plateau: the best global accuracy over the last quarter of its time, and whether
    that quarter gained at most ``gain`` over the best before it.

    "Final accuracy" at a budget is a point mid-climb for a run still rising; the plateau
    says what the run levels off at, and ``plateaued`` whether it had levelled off. Comparing
    the last quarter with the best *before* it is what tells a level from a climb: a rising
    run's best is always in its last quarter, so "the last quarter's best is within 0.5 points
    of the whole run's" would hold for every rising run. A run that falls back late reports
    its lower, later level. (None, None) for a run with evaluations in only one quarter.
    """
    ordered = [(float(r["time"]), float(r["global_accuracy"])) for r in _by_time(rows)
               if r.get("global_accuracy") is not None]
    if not ordered:
        return None, None
    cut = ordered[0][0] + 0.75 * (ordered[-1][0] - ordered[0][0])
    before = [a for t, a in ordered if t < cut]
    last = [a for t, a in ordered if t >= cut]
    if not before:
        return None, None
    level = max(last)
    return level, bool(level - max(before) <= gain + 1e-9)  # 1e-9: float rounding of the gap


def idle_fraction(nodes: Mapping[str, Mapping[str, Any]],
                  role: str | tuple[str, ...]) -> float | None:
    """Share of wall time that nodes of ``role`` spent waiting, pooled over those nodes.

    Pooling (sum of idle over sum of busy + idle) weights nodes by their time, which is what
    shows whether a synchronisation scheme leaves clients or servers starved. Pass
    ``"client"`` for clients and :data:`SERVER_ROLES` for servers.

    Returns:
        A fraction in [0, 1], or None if there is no node of that role or their total time is 0.
    """
    roles = (role,) if isinstance(role, str) else tuple(role)
    busy = idle = 0.0
    found = False
    for node in nodes.values():
        if node.get("role") in roles:
            found = True
            busy += float(node.get("busy", 0.0) or 0.0)
            idle += float(node.get("idle", 0.0) or 0.0)
    total = busy + idle
    if not found or total <= 0.0:
        return None
    return idle / total


def summarize_run(rows: Sequence[Mapping[str, Any]], nodes: Mapping[str, Mapping[str, Any]],
                  target: float) -> dict[str, Any]:
    """Reduce one run (one method, one seed) to the numbers that are compared across methods.

    Returns:
        ``time_to_target``, ``final_accuracy`` (of the last row in time), ``best_accuracy``,
        ``plateau_accuracy`` and ``plateaued`` (:func:`plateau`), ``client_idle_fraction``,
        ``server_idle_fraction`` and ``rounds`` (the largest round); each is None where the
        run has nothing to say.
    """
    ordered = _by_time(rows)
    accuracies = [float(r["global_accuracy"]) for r in ordered
                  if r.get("global_accuracy") is not None]
    rounds = [int(r["round"]) for r in ordered if r.get("round") is not None]
    final = ordered[-1].get("global_accuracy") if ordered else None
    level, levelled = plateau(ordered)
    return {
        "time_to_target": time_to_target(ordered, target),
        "final_accuracy": None if final is None else float(final),
        "best_accuracy": max(accuracies) if accuracies else None,
        "plateau_accuracy": level,
        "plateaued": levelled,
        "client_idle_fraction": idle_fraction(nodes, "client"),
        "server_idle_fraction": idle_fraction(nodes, SERVER_ROLES),
        "rounds": max(rounds) if rounds else None,
    }


# --------------------------------------------------------------------------------------------
# Across seeds and methods
# --------------------------------------------------------------------------------------------

def common_level(runs: Iterable[Iterable[Mapping[str, Any]]], step: float = 0.05
                 ) -> float | None:
    """The highest multiple of ``step`` that the global model of every run reaches.

    Where no run reaches the paper's target, a time to target needs another level; taking the
    highest one that *every* run of the methods compared reaches makes that choice by a stated
    rule, and no method's time is then only a bound. None if some run has no evaluation, or
    reaches less than one step.
    """
    bests = [max((float(r["global_accuracy"]) for r in rows
                  if r.get("global_accuracy") is not None), default=None) for rows in runs]
    if not bests or any(b is None for b in bests):
        return None
    # 1e-9: an accuracy of exactly 0.45 stored as 0.44999999... still counts as 45%
    level = math.floor(min(bests) / step + 1e-9) * step
    return round(level, 10) if level > 0 else None


def ratios_to_reference(times: Mapping[str, Mapping[int, float | None]], reference: str
                        ) -> dict[str, dict[str, Any]]:
    """Each method's time over the reference's, seed by seed, with their mean and spread.

    The paper's table divides each method's time to target by ``sync-fwd``'s. Dividing per
    seed (the same clients, data and initial models) and then averaging keeps the seed-to-seed
    spread, which a ratio of the means hides.

    Args:
        times: method -> seed -> time to the level (None where not reached).
        reference: the method every other is divided by.

    Returns:
        method -> ``{"per_seed": {seed: ratio or None}, "mean", "std", "seeds"}``, where
        ``seeds`` counts the seeds with both times; the reference itself is left out.
    """
    ref = times.get(reference, {})
    out: dict[str, dict[str, Any]] = {}
    for method, by_seed in times.items():
        if method == reference:
            continue
        per_seed = {seed: (None if t is None or ref.get(seed) in (None, 0) else t / ref[seed])
                    for seed, t in sorted(by_seed.items()) if seed in ref}
        stats = _mean_std(list(per_seed.values()))
        out[method] = {"per_seed": per_seed, **stats,
                       "seeds": sum(v is not None for v in per_seed.values())}
    return out


def _mean_std(values: Sequence[float | None]) -> dict[str, float | None]:
    present = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if present.size == 0:
        return {"mean": None, "std": None}
    # Population std (ddof=0): a spread across the seeds run, 0 for a single seed.
    return {"mean": float(present.mean()), "std": float(present.std())}


def summarize_method(run_summaries: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Aggregate one method's per-seed summaries (from :func:`summarize_run`).

    Means and population stds are taken over the seeds where a number exists, so a seed that
    never reached the target does not drag the mean time to infinity; ``reached`` out of
    ``seeds`` says how many did, and must be read beside the mean.

    Returns:
        ``{key: {"mean", "std"}}`` for every key of :data:`SUMMARY_KEYS`, with ``reached`` and
        ``seeds`` added under ``time_to_target``. Keys with no value in any seed get None.
    """
    out: dict[str, dict[str, Any]] = {}
    for key in SUMMARY_KEYS:
        out[key] = _mean_std([summary.get(key) for summary in run_summaries])
    out["time_to_target"]["reached"] = sum(
        1 for summary in run_summaries if summary.get("time_to_target") is not None)
    out["time_to_target"]["seeds"] = len(run_summaries)
    out["plateaued"]["count"] = sum(1 for summary in run_summaries if summary.get("plateaued"))
    return out


def results_json(per_method: Mapping[str, Sequence[Mapping[str, Any]]], target: float,
                 reference: str | None = None) -> dict[str, Any]:
    """Build the JSON-ready results of an experiment: every method aggregated across seeds.

    With ``reference`` (e.g. the synchronous baseline) each method also gets
    ``ratio_to_reference``, its mean time to target over the reference's, so speed-ups read
    directly (below 1 is faster). The ratio is only added when the reference itself reached
    the target; the reference's name is then recorded under ``"reference"``.

    Args:
        per_method: method name -> its per-seed run summaries (from :func:`summarize_run`).
        target: the target accuracy that ``time_to_target`` was measured against.
        reference: the method to compare the others with, or None.

    Returns:
        ``{"target_accuracy": target, "methods": {method: summarize_method(...)}}``, plus
        ``"reference"`` and per-method ``"ratio_to_reference"`` (None where missing).
    """
    methods = {name: summarize_method(runs) for name, runs in per_method.items()}
    results: dict[str, Any] = {"target_accuracy": float(target), "methods": methods}
    ref_time = methods[reference]["time_to_target"]["mean"] if reference in methods else None
    if ref_time is not None and ref_time > 0:
        results["reference"] = reference
        for summary in methods.values():
            mean = summary["time_to_target"]["mean"]
            summary["ratio_to_reference"] = None if mean is None else mean / ref_time
    return results


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------

def _pct(value: float | None) -> str:
    return _MISSING if value is None else f"{100.0 * value:.1f}%"


def _pct_pm(stats: Mapping[str, Any]) -> str:
    if stats.get("mean") is None:
        return _MISSING
    return f"{_pct(stats['mean'])} ± {_pct(stats.get('std') or 0.0)}"


def _time_cell(stats: Mapping[str, Any]) -> str:
    counts = f"({stats.get('reached', 0)}/{stats.get('seeds', 0)})"
    if stats.get("mean") is None:
        return f"{_MISSING} {counts}"
    return f"{stats['mean']:.1f} ± {(stats.get('std') or 0.0):.1f} {counts}"


def _plateau_cell(summary: Mapping[str, Any], seeds: int) -> str:
    level = summary.get("plateau_accuracy", {}).get("mean")
    count = summary.get("plateaued", {}).get("count", 0)
    return f"{_pct(level)} ({count}/{seeds})"


def table_markdown(results: Mapping[str, Any]) -> str:
    """Render :func:`results_json` output as a Markdown table for READMEs and reports.

    Accuracies and idle fractions are percentages with one decimal, times are run-clock
    seconds with one decimal, the time column ends with ``(reached/seeds)``; missing values
    are shown as "—". The ratio column appears only when the results have a reference.
    """
    methods: Mapping[str, Mapping[str, Any]] = results.get("methods", {})
    with_ratio = any("ratio_to_reference" in summary for summary in methods.values())
    header = ["method", "time to target (s) mean ± std (reached/seeds)",
              "final accuracy mean ± std", "best accuracy",
              "plateau accuracy (plateaued/seeds)", "client idle", "server idle"]
    if with_ratio:
        reference = results.get("reference")
        header.append(f"ratio to {reference}" if reference else "ratio to reference")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for name, summary in methods.items():
        empty: dict[str, Any] = {}
        cells = [
            str(name).replace("|", "\\|"),
            _time_cell(summary.get("time_to_target", empty)),
            _pct_pm(summary.get("final_accuracy", empty)),
            _pct(summary.get("best_accuracy", empty).get("mean")),
            _plateau_cell(summary, summary.get("time_to_target", empty).get("seeds", 0)),
            _pct(summary.get("client_idle_fraction", empty).get("mean")),
            _pct(summary.get("server_idle_fraction", empty).get("mean")),
        ]
        if with_ratio:
            ratio = summary.get("ratio_to_reference")
            cells.append(_MISSING if ratio is None else f"{ratio:.2f}×")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------

def method_colors(methods: Iterable[str]) -> dict[str, str]:
    """Colour for each method: fixed for the known methods, the rest take unused tab10 colours.

    Unknown methods get colours in order of appearance, skipping those the known methods use,
    so they stay distinct from them and from each other (up to four, then the cycle repeats).
    """
    spare = [c for c in _TAB10 if c not in METHOD_COLORS.values()] or list(_TAB10)
    colors: dict[str, str] = {}
    extra = 0
    for name in methods:
        if name in colors:
            continue
        if name in METHOD_COLORS:
            colors[name] = METHOD_COLORS[name]
        else:
            colors[name] = spare[extra % len(spare)]
            extra += 1
    return colors


def _new_figure(width: float, height: float):
    # An explicit Agg canvas: headless PNG output without pyplot and without switching the
    # process-wide backend (matplotlib.use would break inline display in a notebook).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=120)
    return path


def _curve(rows: Iterable[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    points = [(float(r["time"]), float(r[key])) for r in _by_time(rows) if r.get(key) is not None]
    if not points:
        return np.empty(0), np.empty(0)
    times, values = np.asarray(points, dtype=np.float64).T
    return times, values


def _on_grid(times: np.ndarray, values: np.ndarray, grid: np.ndarray, step: bool) -> np.ndarray:
    if not step:
        return np.interp(grid, times, values)
    # Step: the accuracy known at time t is that of the latest evaluation at or before t.
    index = np.searchsorted(times, grid, side="right") - 1
    return values[np.clip(index, 0, len(values) - 1)]


def plot_accuracy(curves: Mapping[str, Sequence[Sequence[Mapping[str, Any]]]], path: str | Path,
                  target: float | None = None, title: str = "Global model accuracy against time",
                  key: str = "global_accuracy", *, interpolation: str = "step") -> Path:
    """Plot accuracy against run-clock time, one line per method, and save it as a PNG.

    Methods are compared on time, not rounds, because asynchronous methods do different
    amounts of work per round. With several seeds each seed's curve is put on a common time
    grid (the union of evaluation times, from the latest first evaluation to the end of the
    shortest run, so every seed has a value everywhere) and the mean is drawn with a shaded
    min–max band; a single seed is drawn as recorded. Rows whose ``key`` is None are skipped.

    Args:
        curves: method -> runs (one per seed), each a list of metric rows.
        path: where to write the PNG; parent folders are created.
        target: draws a dashed horizontal line at this accuracy.
        title: the figure title.
        key: the row field to plot (e.g. ``"small_accuracy"``).
        interpolation: ``"step"`` (hold the last evaluation) or ``"linear"``.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    if interpolation not in ("step", "linear"):
        raise ValueError(f"interpolation must be 'step' or 'linear', not {interpolation!r}")
    step = interpolation == "step"
    fig = _new_figure(7.0, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    colors = method_colors(curves)
    # where another method shows a mean of several seeds, a method's single run names its seed,
    # so that one seed's curve is not read as a mean
    mixed = any(len(runs) > 1 for runs in curves.values())
    for name, runs in curves.items():
        color = colors[name]
        seeds = [c for c in (_curve(run, key) for run in runs) if c[0].size]
        if not seeds:
            continue
        drawstyle = "steps-post" if step else "default"
        if len(seeds) == 1:
            times, values = seeds[0]
            known = {r.get("seed") for run in runs for r in run} - {None}
            label = f"{name} (seed {known.pop()} only)" if mixed and len(known) == 1 else name
            ax.plot(times, values, color=color, label=label, drawstyle=drawstyle, marker=".",
                    markersize=3)
            continue
        start = max(times[0] for times, _ in seeds)
        end = min(times[-1] for times, _ in seeds)
        if end < start:  # The runs do not overlap in time: fall back to the longest start.
            end = start
        grid = np.unique(np.concatenate([times for times, _ in seeds] + [np.asarray([start, end])]))
        grid = grid[(grid >= start) & (grid <= end)]
        stacked = np.stack([_on_grid(times, values, grid, step) for times, values in seeds])
        ax.plot(grid, stacked.mean(axis=0), color=color, drawstyle=drawstyle,
                label=f"{name} (mean of {len(seeds)} seeds)")
        ax.fill_between(grid, stacked.min(axis=0), stacked.max(axis=0), color=color, alpha=0.2,
                        linewidth=0, step="post" if step else None)
    if target is not None:
        ax.axhline(target, color="black", linestyle="--", linewidth=1,
                   label=f"target {100.0 * target:.1f}%")
    ax.set_title(title)
    ax.set_xlabel("time (s, run clock)")
    ax.set_ylabel("accuracy")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    return _save(fig, path)


def plot_idle(per_method_summaries: Mapping[str, Mapping[str, Any]], path: str | Path,
              title: str = "Idle fraction of clients and servers") -> Path:
    """Grouped bar chart of mean client and server idle fraction per method, saved as a PNG.

    Shows at a glance where each synchronisation scheme makes nodes wait. Takes
    :func:`summarize_method` outputs (e.g. ``results_json(...)["methods"]``); a missing value
    draws no bar and is labelled "—".

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    from matplotlib.ticker import PercentFormatter

    names = list(per_method_summaries)
    fig = _new_figure(max(5.0, 1.1 * len(names) + 2.0), 4.5)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(names), dtype=np.float64)
    width = 0.38
    series = (("client_idle_fraction", "clients", "#1f77b4", -width / 2),
              ("server_idle_fraction", "servers", "#ff7f0e", width / 2))
    for key, label, color, offset in series:
        means = [per_method_summaries[n].get(key, {}).get("mean") for n in names]
        heights = [math.nan if m is None else m for m in means]
        bars = ax.bar(x + offset, heights, width, label=label, color=color)
        ax.bar_label(bars, labels=["" if m is None else _pct(m) for m in means],
                     fontsize="x-small", padding=2)
        for xi, mean in zip(x, means):
            if mean is None:
                ax.annotate(_MISSING, (xi + offset, 0.0), xytext=(0, 2),
                            textcoords="offset points", ha="center", va="bottom",
                            fontsize="x-small")
    ax.set_xticks(x, names, rotation=20, ha="right")
    ax.set_xlim(-0.6, len(names) - 0.4)  # Missing (NaN) bars must not shrink the axis.
    ax.set_ylim(0.0, 1.05)
    ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    ax.set_ylabel("idle fraction")
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return _save(fig, path)
