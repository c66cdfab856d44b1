"""How the distillation settings decide how fast the global model learns, on a validation split.

The settings of ``config.toml``'s ``[distill]`` table were chosen with this script, never on the
test split: a ``cnn6`` teacher (width 0.5) is trained centrally for 3 epochs on
``train[:35000]``, then reverse-distilled into a fresh ``cnn12`` (width 0.5) on unlabeled
images of ``train[35000:45000]`` (flips and crops), in chunks of 125 steps of 32, and both are
evaluated on ``train[45000:47500]``. Each variant changes one setting of the baseline.

    python experiments/paper_cifar10/tune_distillation.py [--data-dir DIR] [VARIANT ...]
"""

from __future__ import annotations

import argparse
import time

import jax

from fdjax.core import OptimizerSettings, make_model, make_optimizer
from fdjax.data import default_tfds_dir, load_tfds
from fdjax.runtime.compiled import Distiller, Evaluator, LocalTrainer, as_device_data

#: name -> (norm, learning rate, temperature, proxy images)
VARIANTS = {"A_proxy5k": ("none", 1e-3, 2.0, 5000), "B_baseline": ("none", 1e-3, 2.0, 10000),
            "C_groupnorm": ("group", 1e-3, 2.0, 10000), "D_lr3e-3": ("none", 3e-3, 2.0, 10000),
            "E_T4": ("none", 1e-3, 4.0, 10000)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=default_tfds_dir())
    parser.add_argument("variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    train = as_device_data(load_tfds("cifar10", "train[:35000]", args.data_dir).arrays())
    proxy = load_tfds("cifar10", "train[35000:45000]", args.data_dir).images
    val = as_device_data(load_tfds("cifar10", "train[45000:47500]", args.data_dir).arrays())
    key = jax.random.key(0)

    def model(preset, norm="none"):
        return make_model(preset, input_shape=(32, 32, 3), num_classes=10, width=0.5, norm=norm)

    small = model("cnn6")
    trainer = LocalTrainer(small, make_optimizer(OptimizerSettings("adam", 1e-3)), 32)
    state = trainer.init(small.init(key))
    for epoch in range(3):
        state, _ = trainer.epoch(state, train, jax.random.fold_in(key, epoch))
        print(f"teacher epoch {epoch + 1}: validation accuracy "
              f"{Evaluator(small)(state.params, val)['accuracy']:.3f}", flush=True)
    for name in args.variants:
        norm, lr, temperature, size = VARIANTS[name]
        large = model("cnn12", norm)
        distiller = Distiller(large, small, make_optimizer(OptimizerSettings("adam", lr)), 32, 125,
                              temperature, 0.0, "flip_crop")
        student = distiller.init(large.init(jax.random.fold_in(key, 1)))
        data = as_device_data({"images": proxy[:size]})
        evaluate, start, curve = Evaluator(large), time.perf_counter(), []
        for chunk in range(12):
            student, _ = distiller.chunk(student, state.params, data,
                                         jax.random.fold_in(key, 100 + chunk))
            if chunk % 2 == 1:
                curve.append(round(evaluate(student.params, val)["accuracy"], 3))
        print(f"{name}: validation accuracy after every 8,000 distilled examples {curve} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
