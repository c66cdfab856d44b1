"""The ``fdjax`` command.

``fdjax info`` prints the version, JAX's backend and devices and the compiled-epoch driver in use.
``fdjax train`` trains one model of the CNN family on one dataset (the embedded offline digits by
default): a quick check that the compiled core learns on this machine, with a progress bar.
Bad input is reported as one line on stderr with exit status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fdjax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="version, JAX backend and devices").set_defaults(fn=_info)
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "epochs", 1) < 1:
        print("fdjax: error: --epochs must be >= 1", file=sys.stderr)
        return USAGE_ERROR
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"fdjax: error: {err}", file=sys.stderr)
        return USAGE_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
