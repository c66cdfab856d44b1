"""Reproduce the paper's Figure 2 and table on CIFAR-10, and go beyond it.

Three studies, all on one config (``config.toml`` here: CPU scale; ``config_gpu.toml``: full
width), each run written to ``<out>/<partition>/<method>/seed<k>/``:

* ``iid``: the paper's four methods, ``async-fwd`` and ``async-fwd-gated`` (beyond the paper;
  the second is ``async-fwd`` with ``distill.forward_gate = "lead"``, see ``VARIANTS``) and
  ``fedavg-large`` (reference), seed 0, IID clients;
* ``seeds``: ``sync-fwd``, ``async-continuous`` and both beyond-paper methods on seeds 1 and 2,
  so the beyond-paper claim rests on three seeds;
* ``seed3``: ``async-continuous`` and ``async-fwd-gated`` on seed 3, for the speed half of that
  claim, whose crossing times move by whole evaluations from seed to seed;
* ``noniid``: the paper's four methods and both beyond-paper methods with Dirichlet(0.5) client
  data;
* ``to60``: the runs the paper's table as ratios at 60% still needs (``sync-fwd`` on seeds 0
  and 1, which had not crossed 60% by 750 s, ``sync`` and ``async-round`` on seeds 1 and 2),
  each run until it crosses 60% (at most 1,100 virtual s), into ``<out>/iid_to60/``; the
  report's last table combines them with the 750 s runs.

A run whose directory already holds a finished run (``nodes.json``), or one that another live
process is running (``running.pid``), is skipped, and an interrupted one resumes from its newest
usable checkpoint (taken every 60 wall seconds, at the end of a round), so a study that was
stopped continues where it left off, and several processes can share a study (``--methods``
picks and orders the methods).
``--report`` only rebuilds ``results.json``, ``results.md`` and the figures from the run
directories.

    python experiments/paper_cifar10/run.py --study iid [--data-dir DIR] [--set KEY=VALUE ...]
    python experiments/paper_cifar10/run.py --report

Costs are fixed per program (``cost.mode = "fixed"``, the table ``calibrate.py`` measured), so the
methods differ only in how they schedule the same work, a run is exactly reproducible, and the
machine's load changes only the wall time. Run the studies you want in one process
(``--study iid seeds``) or in several at once.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PAPER_SECONDS = {"sync-fwd": 436.0, "sync": 406.0, "async-round": 308.0, "async-continuous": 244.0}
STUDIES = {
    "iid": ("iid", ["sync-fwd", "sync", "async-round", "async-continuous", "async-fwd",
                    "async-fwd-gated", "fedavg-large"], [0]),
    "seeds": ("iid", ["sync-fwd", "async-continuous", "async-fwd", "async-fwd-gated"], [1, 2]),
    # the speed half is the noisy one (a crossing moves by whole evaluations): one more seed
    "seed3": ("iid", ["async-continuous", "async-fwd-gated"], [3]),
    "noniid": ("dirichlet", ["sync-fwd", "sync", "async-round", "async-continuous",
                             "async-fwd", "async-fwd-gated"], [0]),
    # the paper's table as ratios at 60%: the runs the 750 s studies left without a crossing
    # (sync-fwd on seeds 0, 1) or never made (sync, async-round on seeds 1, 2), each run until
    # it crosses 60% (at most 1,100 s), into "iid_to60" beside "iid"
    "to60": ("iid_to60", ["sync-fwd", "sync", "async-round"], [0, 1, 2]),
}
#: Studies whose runs differ from config.toml's: study -> (overrides, method -> its seeds).
STUDY_SETTINGS = {
    "to60": (["data.partition=iid", "stop.time_budget=1100", "stop.target_accuracy=0.6"],
             {"sync-fwd": [0, 1], "sync": [1, 2], "async-round": [1, 2]}),
}
#: Studied variants of a method: name -> config overrides.
#: The gated method's holdout is the test split's tail, which evaluation (its first 2,000 images)
#: never sees, so a closed gate leaves the run ``async-continuous``'s except for the checks.
VARIANTS = {"async-fwd-gated": ["method=async-fwd", "distill.forward_gate=lead",
                                "distill.gate_holdout_from=test"]}
#: The beyond-paper methods, each tested against the issue's goal in the report.
BEYOND = ("async-fwd", "async-fwd-gated")
TARGET = 0.6


def default_data_dir() -> str:
    """``$FDJAX_TFDS_DIR``, else ``../shared/data/tfds`` beside the checkout.

    Given relative to the working directory, so that the resolved ``config.toml`` each run
    records names no path of the machine it ran on (``../shared/data/tfds`` from the checkout).
    """
    from fdjax.data import default_tfds_dir

    return os.path.relpath(default_tfds_dir())


def run_studies(args) -> None:
    from tqdm import tqdm

    from fdjax.config import load_config
    from fdjax.experiment import prepare_data

    for study in args.study:
        partition, methods, seeds = STUDIES[study]
        overrides, only = STUDY_SETTINGS.get(study, ([f"data.partition={partition}"], {}))
        for seed in seeds:
            base = [f"data.data_dir={args.data_dir}", *args.set, *overrides, f"seed={seed}"]
            cfg = load_config(args.config, base)
            data = None
            for method in args.methods or methods:
                if method not in methods or seed not in only.get(method, seeds):
                    continue
                run_dir = args.out / partition / method / f"seed{seed}"
                if (run_dir / "nodes.json").exists() or running_elsewhere(run_dir):
                    print(f"skip {run_dir} (finished or running)", flush=True)
                    continue
                run_dir.mkdir(parents=True, exist_ok=True)
                (run_dir / "running.pid").write_text(str(os.getpid()))
                variant = load_config(args.config,
                                      base + VARIANTS.get(method, [f"method={method}"]))
                # a variant may hold out test images for itself (the gate's), so it gets its own
                data = prepare_data(variant) if method in VARIANTS else data or prepare_data(cfg)
                budget = cfg.stop.time_budget
                with tqdm(total=budget, desc=f"{partition} {method} seed{seed}",
                          unit="s", bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} virtual s "
                          "[{elapsed}<{remaining}] {postfix}") as bar:
                    def on_row(row, bar=bar):
                        bar.update(min(row["time"], budget) - bar.n)
                        bar.set_postfix_str(f"global {row['global_accuracy']:.3f} "
                                            f"small {row['small_accuracy'] or 0:.3f}")
                    result = run_or_resume(variant, run_dir, data, on_row)
                (run_dir / "running.pid").unlink()
                print(f"{partition} {method} seed{seed}: {result.timing['wall_seconds']:.0f} s "
                      f"wall, {result.summary(TARGET)}", flush=True)
        write_report(args.out)


def run_or_resume(config, run_dir: Path, data, on_row=None):
    """Continues an interrupted run in ``run_dir`` from its newest usable checkpoint, or runs
    it from the start where it has none (or none usable)."""
    from fdjax.checkpoint import CheckpointError
    from fdjax.experiment import run

    if any((run_dir / "checkpoints").glob("*")):  # interrupted: continue it
        try:
            result = run(config, run_dir, data=data, on_row=on_row, resume=True)
            print(f"resumed {run_dir}", flush=True)
            return result
        except CheckpointError as err:
            print(f"{run_dir}: {err}; starting it again", flush=True)
    return run(config, run_dir, data=data, on_row=on_row, overwrite=True)


def running_elsewhere(run_dir: Path) -> bool:
    """Whether a live process other than this one is running ``run_dir``."""
    try:
        pid = int((run_dir / "running.pid").read_text())
        os.kill(pid, 0)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return False
    return pid != os.getpid()


def load_runs(out: Path, partition: str) -> dict[str, list[dict]]:
    """method -> finished runs (rows, nodes, timing) of one partition, in seed order."""
    runs: dict[str, list[dict]] = {}
    for nodes_file in sorted((out / partition).glob("*/seed*/nodes.json")):
        run_dir = nodes_file.parent
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                if line.strip()]
        record = json.loads(nodes_file.read_text())
        runs.setdefault(run_dir.parent.name, []).append(
            {"rows": rows, "nodes": record["nodes"], "timing": record["timing"],
             "seed": int(run_dir.name.removeprefix("seed"))})
    return runs


def paired_ratios(runs: dict, summaries: dict, method: str) -> list[dict]:
    """``method``'s time to 60% over ``sync-fwd``'s on each seed both ran.

    Where ``sync-fwd`` missed 60% within its budget, the ratio to the budget is an upper bound
    (``bound``); where ``method`` missed it, the ratio is None.
    """
    if "sync-fwd" not in runs:
        return []
    reference = {r["seed"]: (r, s) for r, s in zip(runs["sync-fwd"], summaries["sync-fwd"])}
    ratios = []
    for run, summary in zip(runs[method], summaries[method]):
        if run["seed"] not in reference:
            continue
        ref_run, ref_summary = reference[run["seed"]]
        mine, theirs = summary["time_to_target"], ref_summary["time_to_target"]
        budget = max(row["time"] for row in ref_run["rows"])
        ratios.append({"seed": run["seed"], "bound": mine is not None and theirs is None,
                       "ratio": None if mine is None else mine / (theirs or budget)})
    return ratios


def write_report(out: Path) -> None:
    from fdjax import report

    everything, sections = {}, []
    order = list(STUDIES["iid"][1])
    for partition, title in (("iid", "IID clients"), ("dirichlet", "Dirichlet(0.5) clients")):
        runs = load_runs(out, partition)
        if not runs:
            continue
        runs = {m: sorted(runs[m], key=lambda r: r["seed"]) for m in order if m in runs}
        summaries = {m: [report.summarize_run(r["rows"], r["nodes"], TARGET) for r in rs]
                     for m, rs in runs.items()}
        # No pooled ratio: seeds on which sync-fwd missed 60% would drop out of its mean only.
        results = report.results_json(summaries, TARGET)
        for method, summary in results["methods"].items():
            summary["paper_ratio"] = (PAPER_SECONDS[method] / PAPER_SECONDS["sync-fwd"]
                                      if method in PAPER_SECONDS else None)
            summary["seeds_run"] = [r["seed"] for r in runs[method]]
            summary["budget"] = min(max(row["time"] for row in r["rows"]) for r in runs[method])
            summary["wall_seconds"] = [round(r["timing"]["wall_seconds"], 1)
                                       for r in runs[method]]
            summary["paired_ratios_to_sync_fwd"] = paired_ratios(runs, summaries, method)
        seed0 = {m: [r["rows"] for r in rs if r["seed"] == 0] for m, rs in runs.items()}
        report.plot_accuracy({m: c for m, c in seed0.items() if c}, out / f"figure_{partition}.png",
                             target=TARGET, title=f"CIFAR-10, {title}: global model (seed 0)")
        report.plot_accuracy({m: [r["rows"] for r in rs] for m, rs in runs.items()},
                             out / f"figure_{partition}_seeds.png", target=TARGET,
                             title=f"CIFAR-10, {title}: global model, all seeds")
        everything[partition] = results
        sections.append((title, partition, results, runs, summaries))
    if not everything:
        print("no finished runs to report", file=sys.stderr)
        return
    to60 = ratios_to_60(out)
    if to60:
        everything["ratios_at_60"] = to60
        lines_to60 = ratios_to_60_lines(to60)
    else:
        lines_to60 = []
    everything["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    (out / "results.json").write_text(json.dumps(everything, indent=1))
    lines = ["# CIFAR-10 results (generated by run.py --report)", ""]
    for title, partition, results, runs, summaries in sections:
        lines += [f"## {title}", "", report.table_markdown(results), "",
                  "Time to 60% over `sync-fwd`'s, seed by seed (`<`: `sync-fwd` had not reached "
                  "60% by the end of its budget, so the ratio is at most this):", "",
                  "| method | seed by seed (here) | paper |", "|---|---|---|"]
        for method, summary in results["methods"].items():
            paper = summary.get("paper_ratio")
            cells = [f"{'< ' if r['bound'] else ''}{r['ratio']:.2f} (seed {r['seed']})"
                     if r["ratio"] is not None else f"not reached (seed {r['seed']})"
                     for r in summary["paired_ratios_to_sync_fwd"]]
            lines.append(f"| {method} | {'; '.join(cells) or '—'} | "
                         f"{'—' if paper is None else f'{paper:.2f}'} |")
        lines.append("")
        for name in BEYOND:
            lines += beyond_paper_lines(runs, summaries, name)
        lines += [f"![{title}](figure_{partition}.png)", ""]
    lines += lines_to60
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'results.md'}")


def ratios_to_60(out: Path) -> dict:
    """The paper's table as ratios at 60%, seed by seed, from every IID run that crossed it.

    A (method, seed)'s time is its ``iid_to60`` run's (run until it crossed 60%) where there is
    one, else its 750 s ``iid`` run's where that crossed 60%; ``source`` says which. Dividing
    per seed (:func:`fdjax.report.ratios_to_reference`) keeps the seed-to-seed spread.
    """
    from fdjax import report

    times: dict[str, dict[int, float | None]] = {}
    source: dict[str, dict[int, str]] = {}
    for partition in ("iid", "iid_to60"):  # iid_to60 second: its runs take precedence
        for method, rs in load_runs(out, partition).items():
            if method not in PAPER_SECONDS:
                continue
            for r in rs:
                times.setdefault(method, {})[r["seed"]] = report.time_to_target(r["rows"],
                                                                                 TARGET)
                source.setdefault(method, {})[r["seed"]] = partition
    if "sync-fwd" not in times:
        return {}
    ratios = report.ratios_to_reference(times, "sync-fwd")
    return {"target": TARGET,
            "times": {m: {str(k): v for k, v in sorted(ts.items())} for m, ts in times.items()},
            "source": {m: {str(k): v for k, v in sorted(ss.items())} for m, ss in source.items()},
            "ratios": {m: {**r, "per_seed": {str(k): v for k, v in r["per_seed"].items()}}
                       for m, r in ratios.items()},
            "paper": {m: PAPER_SECONDS[m] / PAPER_SECONDS["sync-fwd"] for m in PAPER_SECONDS}}


def ratios_to_60_lines(to60: dict) -> list[str]:
    """results.md's table of :func:`ratios_to_60`."""
    lines = ["## The paper's table as ratios at 60% (IID)", "",
             "Time to 60% seed by seed (`*`: from the `iid_to60` run, run until it crossed 60%; "
             "otherwise the 750 s `iid` run), and its ratio to `sync-fwd`'s on the same seed:", "",
             "| method | time to 60%, per seed | ratio to `sync-fwd`, per seed | mean (sd) | "
             "paper |", "|---|---|---|---|---|"]
    for method in PAPER_SECONDS:
        if method not in to60["times"]:
            continue
        ts = to60["times"][method]
        cells = [f"{'not reached' if t is None else f'{t:.0f} s'}"
                 f"{'*' if to60['source'][method][k] == 'iid_to60' else ''} (seed {k})"
                 for k, t in ts.items()]
        r = to60["ratios"].get(method)
        per = ("1" if r is None else
               "; ".join(f"{'—' if v is None else f'{v:.2f}'} (seed {k})"
                         for k, v in r["per_seed"].items()))
        mean = ("1" if r is None else "—" if r["mean"] is None
                else f"{r['mean']:.2f} ({r['std']:.2f}, {r['seeds']} seeds)")
        lines.append(f"| {method} | {'; '.join(cells)} | {per} | {mean} | "
                     f"{to60['paper'][method]:.2f} |")
    return lines + [""]


def beyond_paper_lines(runs: dict, summaries: dict, name: str) -> list[str]:
    """The issue's test of a beyond-paper method, each half on the seeds it shares.

    ``name`` must reach 60% within 10% of ``async-continuous``'s mean time, taken over the seeds
    both ran, and end, after the same budget, at a mean final accuracy at least ``sync-fwd``'s,
    taken over the seeds both ran. So no method is averaged over seeds its rival did not run.
    """
    if name not in runs:
        return []
    by_seed = {m: {r["seed"]: s for r, s in zip(runs.get(m, []), summaries.get(m, []))}
               for m in (name, "async-continuous", "sync-fwd")}

    def shared(rival: str) -> list[int]:
        return sorted(set(by_seed[name]) & set(by_seed[rival]))

    fast, final = shared("async-continuous"), shared("sync-fwd")
    lines = [f"Beyond the paper: `{name}` against `async-continuous` (seeds "
             f"{', '.join(map(str, fast)) or 'none'}) and `sync-fwd` (seeds "
             f"{', '.join(map(str, final)) or 'none'}):", ""]
    if not fast or not final:
        return lines + ["- undecided: a rival has no seed in common with it", ""]
    times = {m: [by_seed[m][k]["time_to_target"] for k in fast]
             for m in (name, "async-continuous")}
    if None in times[name]:
        lines.append(f"- speed: missed (`{name}` did not reach 60% on "
                     f"{times[name].count(None)} of {len(fast)} seeds)")
    elif None in times["async-continuous"]:
        lines.append("- speed: undecided (`async-continuous` did not reach 60% on every seed)")
    else:
        mine = sum(times[name]) / len(fast)
        ref = sum(times["async-continuous"]) / len(fast)
        met = round(mine / ref, 9) <= 1.1  # "within 10%" includes 10%, whatever the rounding
        spread = ", ".join(f"{a:.0f} vs {b:.0f}" for a, b in zip(times[name],
                                                                   times["async-continuous"]))
        lines.append(f"- speed: {'met' if met else 'missed'}: {mine:.0f} s mean "
                     f"to 60% against `async-continuous`'s {ref:.0f} s ({mine / ref:.2f}x; "
                     f"within 10% means at most {1.1 * ref:.0f} s); seed by seed {spread}")
    finals = {m: [by_seed[m][k]["final_accuracy"] for k in final] for m in (name, "sync-fwd")}
    mean = {m: sum(v) / len(v) for m, v in finals.items()}
    verdict = "met" if mean[name] >= mean["sync-fwd"] else "missed"
    lines.append(f"- final accuracy: {verdict}: {100 * mean[name]:.1f}% mean "
                 f"({100 * min(finals[name]):.1f} to {100 * max(finals[name]):.1f}) against "
                 f"`sync-fwd`'s {100 * mean['sync-fwd']:.1f}% "
                 f"({100 * min(finals['sync-fwd']):.1f} to {100 * max(finals['sync-fwd']):.1f})")
    paired = {m: [r for r in runs[m] if r["seed"] in fast] for m in (name, "async-continuous")}
    small_mean = {m: 100 * sum(row["small_accuracy"] for r in rs for row in r["rows"])
                  / sum(len(r["rows"]) for r in rs) for m, rs in paired.items()}
    lines.append(f"- the averaged small model (the teacher of reverse distillation), mean accuracy "
                 f"over every evaluation: {small_mean[name]:.1f}% here, "
                 f"{small_mean['async-continuous']:.1f}% in `async-continuous`")
    if "gate_checks" in paired[name][0]["rows"][-1]:
        opened = ", ".join(f"{r['rows'][-1]['gate_opens']} of {r['rows'][-1]['gate_checks']} "
                           f"(seed {r['seed']})" for r in paired[name])
        lines.append(f"- gate checks that found the global model leading: {opened}")
    if min(len(fast), len(final)) < 3:
        lines.append(f"- {min(len(fast), len(final))} seed(s) so far; the claim needs at least 3")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(HERE / "config.toml"))
    parser.add_argument("--data-dir", default=default_data_dir())
    parser.add_argument("--study", nargs="+", choices=list(STUDIES), default=["iid"])
    parser.add_argument("--methods", nargs="+", default=None,
                        help="run only these methods of the studies, in this order")
    parser.add_argument("--set", action="append", default=[], help="config override KEY=VALUE")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--report", action="store_true", help="only rebuild the report")
    args = parser.parse_args()
    if args.report:
        write_report(args.out)
    else:
        run_studies(args)


if __name__ == "__main__":
    main()
