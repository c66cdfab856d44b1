"""The ``fdjax`` command.

``fdjax info`` prints the version, JAX's backend and devices and the compiled-epoch driver in use;
``fdjax methods`` the registered methods (``fdjax.methods``), each with its loop in one line.
``fdjax train`` trains one model of the CNN family on one dataset (the embedded offline digits by
default): a quick check that the compiled core learns on this machine, with a progress bar.
``fdjax run --resume DIR`` continues a killed run from its newest usable checkpoint, and
``fdjax compare --resume DIR`` a killed comparison (keeping its finished runs). A directory that
another fdjax process is writing, or that already holds a run or comparison (without
``--overwrite``), is refused with nothing touched.
``fdjax run`` and ``fdjax compare`` take ``--backend ray [--address ADDR]``: every node's
computation in a Ray actor, on a local Ray instance fdjax starts or on the cluster at ADDR.
Bad input is reported as one line on stderr with exit status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

USAGE_ERROR = 2


def _info(args: argparse.Namespace) -> int:
    import os

    import jax

    import fdjax
    from fdjax.runtime import resolve_driver

    print(f"fdjax {fdjax.__version__}")
    print(f"jax {jax.__version__}, backend {jax.default_backend()}")
    for device in jax.devices():
        print(f"  device {device.id}: {device.device_kind} ({device.platform})")
    print(f"epoch driver (auto): {resolve_driver('auto')}")
    print(f"XLA_FLAGS: {os.environ.get('XLA_FLAGS', '') or '(none)'}")
    return 0


def _methods(args: argparse.Namespace) -> int:
    from fdjax.methods import METHODS

    width = max(len(name) for name in METHODS)
    for name, method in METHODS.items():
        print(f"{name:<{width}}  {method.summary}{'  [paper]' if method.paper else ''}")
    return 0


def _train(args: argparse.Namespace) -> int:
    import jax
    from tqdm import tqdm

    from fdjax.core import OptimizerSettings, count_params, make_model, make_optimizer
    from fdjax.data import load_splits
    from fdjax.runtime import Evaluator, LocalTrainer
    from fdjax.runtime.compiled import as_device_data

    splits = load_splits(args.source, name=args.dataset, data_dir=args.data_dir,
                         root=args.root, limit=args.limit, test_limit=args.test_limit,
                         seed=args.seed)
    model = make_model(args.model, input_shape=splits.train.image_shape,
                       num_classes=splits.train.num_classes, width=args.width)
    trainer = LocalTrainer(model, make_optimizer(OptimizerSettings(
        args.optimizer, args.learning_rate)), args.batch_size, args.driver)
    evaluator = Evaluator(model)
    train, test = as_device_data(splits.train.arrays()), as_device_data(splits.test.arrays())
    key = jax.random.key(args.seed)
    state = trainer.init(model.init(jax.random.fold_in(key, 0)))
    print(f"{model.name} x{args.width} ({count_params(state.params):,} parameters) on "
          f"{splits.train.name}: {len(splits.train)} train / {len(splits.test)} test, "
          f"driver {trainer.driver}")
    bar = tqdm(range(1, args.epochs + 1), desc="train", unit="epoch", file=sys.stderr,
               disable=None)
    start = time.perf_counter()
    for epoch in bar:
        state, stats = trainer.epoch(state, train, jax.random.fold_in(key, epoch))
        result = evaluator(state.params, test)
        bar.set_postfix(loss=f"{float(stats['loss_sum'] / stats['count']):.3f}",
                        test_acc=f"{result['accuracy']:.3f}")
        bar.write(f"epoch {epoch}: train loss {float(stats['loss_sum'] / stats['count']):.4f}, "
                  f"test accuracy {result['accuracy']:.4f}, "
                  f"{time.perf_counter() - start:.1f} s", file=sys.stdout)
    return 0


def _load(args: argparse.Namespace):
    from fdjax.config import load_config

    overrides = list(args.set or [])
    if getattr(args, "method", None):
        overrides.insert(0, f"method={args.method}")
    if args.backend is not None:  # Ray runs on the real clock
        overrides[:0] = [f"backend={args.backend}"] + (
            ["clock=real"] if args.backend == "ray" else [])
    if args.address is not None:
        overrides.append(f"ray.address={_toml_string(args.address)}")
    config = load_config(args.config, overrides)
    if args.address is not None and config.backend != "ray":
        raise ValueError("--address joins a Ray cluster; it needs --backend ray")
    return config


def _toml_string(text: str) -> str:
    import json

    return json.dumps(text)


class _Progress:
    """A progress bar over the run's clock: time, round and accuracy."""

    def __init__(self, total: float | None, label: str):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=label, unit="s", file=sys.stderr, disable=None,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s "
                                   "[{elapsed}{postfix}]" if total else None)

    def __call__(self, row: dict) -> None:
        self.bar.set_postfix(round=row["round"], acc=f"{row['global_accuracy']:.3f}")
        self.bar.update(max(0.0, row["time"] - self.bar.n))

    def close(self) -> None:
        self.bar.close()


def _refuse_with_resume(args: argparse.Namespace, flags: tuple[str, ...], where: str) -> None:
    """A resumed run or comparison takes every setting from its directory; no flag may add one.
    """
    given = [flag for flag in flags
             if getattr(args, flag[2:].replace("-", "_"), None) not in (None, False, [])]
    if given:
        raise ValueError(f"--resume continues with the settings in {where}; drop "
                         f"{', '.join(given)}")


_CONFIG_FLAGS = ("--config", "--set", "--out", "--backend", "--address", "--overwrite")


def _run(args: argparse.Namespace) -> int:
    from fdjax.experiment import run

    if args.resume is not None:
        _refuse_with_resume(args, _CONFIG_FLAGS + ("--method",), "DIR/config.toml")
        from pathlib import Path

        from fdjax.config import load_config

        out = args.resume
        if not (Path(out) / "config.toml").is_file():
            raise ValueError(f"{out!r} is not a run directory (no config.toml)")
        config = load_config(Path(out) / "config.toml")
    else:
        out = args.out or "runs/run"
        config = _load(args)
    progress = _Progress(config.stop.time_budget, config.method)
    try:
        result = run(config, out, on_row=progress, resume=args.resume is not None,
                     overwrite=args.overwrite)
    finally:
        progress.close()
    for resume in result.resumes[-1:] if args.resume is not None else []:
        skipped = f"; skipped: {'; '.join(resume['problems'])}" if resume["problems"] else ""
        print(f"resumed from checkpoint {resume['checkpoint']} (round {resume['round']}, "
              f"{resume['time']:.1f} s, {resume['rows_kept']} metrics rows kept){skipped}")
    last = result.rows[-1]
    print(f"{config.method}: {len(result.rows)} evaluations, {last['round']} rounds, "
          f"global accuracy {last['global_accuracy']:.4f} at {last['time']:.1f} s "
          f"({config.clock} clock); written to {out}")
    return 0


def _compare_settings(args: argparse.Namespace) -> tuple[dict, str]:
    """``compare``'s arguments and the output directory: from the flags, or with ``--resume``
    from what the comparison recorded in ``DIR/compare.json``."""
    from fdjax.experiment import recorded_comparison
    from fdjax.methods import PAPER_METHODS

    if args.resume is not None:
        _refuse_with_resume(args, _CONFIG_FLAGS + ("--methods", "--seeds", "--target"),
                            "DIR/compare.json")
        return recorded_comparison(args.resume), args.resume
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else list(
        PAPER_METHODS)
    return {"config": _load(args), "methods": methods,
            "seeds": 1 if args.seeds is None else args.seeds, "target": args.target}, (
        args.out or "runs/compare")


def _compare(args: argparse.Namespace) -> int:
    from fdjax.experiment import compare

    settings, out = _compare_settings(args)
    progress = _Progress(None, "compare")
    try:
        comparison = compare(**settings, out_dir=out, overwrite=args.overwrite,
                             resume=args.resume is not None,
                             on_row=lambda row: progress.bar.set_postfix(
                                 method=row["method"], seed=row["seed"], t=f"{row['time']:.0f}",
                                 acc=f"{row['global_accuracy']:.3f}", refresh=True))
    finally:
        progress.close()
    if args.resume is not None:
        print("resumed comparison: " + ", ".join(
            f"{method}/seed{settings['config'].seed + k} {origin}"
            for method, origins in comparison.origins.items()
            for k, origin in enumerate(origins)))
    print(comparison.table())
    print(f"written to {out}: figure.png, table.md, results.json")
    return 0


def _add_config_args(parser: argparse.ArgumentParser, default_out: str) -> None:
    parser.add_argument("--config", default=None, help="TOML config file (default: built-in)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override a config key, e.g. --set clients.count=5 (repeatable)")
    parser.add_argument("--out", default=None,
                        help=f"output directory (default {default_out})")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace what the output directory already holds (without it, "
                             "a directory holding a previous one is refused)")
    parser.add_argument("--backend", default=None, choices=("inprocess", "ray"),
                        help="where nodes run: inprocess (default) or ray (each node's "
                             "computation in a Ray actor, on the real clock; pip install "
                             "\"fdjax[ray]\")")
    parser.add_argument("--address", default=None, metavar="ADDR",
                        help="with --backend ray: join the Ray cluster at ADDR (auto, HOST:6379 "
                             "or ray://HOST:10001) instead of starting a local Ray instance")


def build_parser() -> argparse.ArgumentParser:
    from fdjax.methods import names, paper_methods

    method_names, paper = names(), paper_methods()
    parser = argparse.ArgumentParser(prog="fdjax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="version, JAX backend and devices").set_defaults(fn=_info)
    sub.add_parser("methods", help="the registered methods, each with its loop in one line"
                   ).set_defaults(fn=_methods)
    run = sub.add_parser("run", help="run one method")
    _add_config_args(run, "runs/run")
    run.add_argument("--method", default=None, choices=method_names,
                     help="method name (overrides the config); `fdjax methods` lists them")
    run.add_argument("--resume", default=None, metavar="DIR",
                     help="continue the killed run in DIR from its newest usable checkpoint")
    run.set_defaults(fn=_run)
    compare = sub.add_parser("compare", help="run several methods and compare them")
    _add_config_args(compare, "runs/compare")
    compare.add_argument("--methods", default=None,
                         help="comma-separated methods (default: the paper's four: "
                              f"{','.join(paper)}; `fdjax methods` lists them all)")
    compare.add_argument("--seeds", type=int, default=None, help="seeds per method (default 1)")
    compare.add_argument("--target", type=float, default=None,
                         help="accuracy the table times (default: stop.target_accuracy, else "
                              "0.6); unlike stop.target_accuracy it does not stop the runs")
    compare.add_argument("--resume", default=None, metavar="DIR",
                         help="continue the killed comparison in DIR with the settings it "
                              "recorded: finished runs kept, the interrupted one resumed from "
                              "its checkpoint, the rest run")
    compare.set_defaults(fn=_compare)
    train = sub.add_parser("train", help="train one model on one dataset (a quick check)")
    train.add_argument("--source", default="embedded",
                       help="embedded (default, offline), tfds, folder or synthetic")
    train.add_argument("--dataset", default="cifar10", help="tfds dataset name")
    train.add_argument("--data-dir", default=None, help="TFDS data directory")
    train.add_argument("--root", default=None, help="image-folder root")
    train.add_argument("--limit", type=int, default=None, help="training examples to keep")
    train.add_argument("--test-limit", type=int, default=None, help="test examples to keep")
    train.add_argument("--model", default="cnn6", help="cnn6 or cnn12")
    train.add_argument("--width", type=float, default=1.0, help="width multiplier")
    train.add_argument("--epochs", type=int, default=3)
    train.add_argument("--batch-size", type=int, default=32)
    train.add_argument("--optimizer", default="adam")
    train.add_argument("--learning-rate", type=float, default=1e-3)
    train.add_argument("--driver", default="auto", help="auto, loop or scan")
    train.add_argument("--seed", type=int, default=0)
    train.set_defaults(fn=_train)
    return parser


#: Number flags and the range each must lie in (argparse reads "inf" and "nan" as floats).
_NUMBER_FLAGS = {"target": ("--target", 0.0, 1.0), "width": ("--width", 0.0, None),
                 "learning_rate": ("--learning-rate", 0.0, None)}


def _check_numbers(args: argparse.Namespace) -> None:
    """One-line errors for a number flag that is not finite or not in its range."""
    import math

    for name, (flag, low, high) in _NUMBER_FLAGS.items():
        value = getattr(args, name, None)
        if value is None:
            continue
        if not math.isfinite(value):
            raise ValueError(f"{flag}: must be a finite number, got {value}")
        if not value > low or (high is not None and value > high):
            where = f"in ({low:g}, {high:g}]" if high is not None else f"> {low:g}"
            raise ValueError(f"{flag}: must be {where}, got {value}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # A model named by import path ("mylab.nets:resnet") in the directory fdjax runs in imports
    # as it would under ``python -m``; last on the path, so it never shadows an installed package.
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    if getattr(args, "epochs", 1) < 1:
        print("fdjax: error: --epochs must be >= 1", file=sys.stderr)
        return USAGE_ERROR
    try:
        _check_numbers(args)
        return args.fn(args)
    except (ValueError, OSError) as err:  # bad input, missing or unreadable files
        message = " ".join(str(err).split())  # always one line
        print(f"fdjax: error: {message}", file=sys.stderr)
        return USAGE_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
