"""Local-training throughput: fdjax's compiled epoch against a bare hand-written JAX loop.

For each preset (``cnn6``, ``cnn12``) this trains on CIFAR-shaped random data (32x32x3, 10 classes;
throughput does not depend on pixel values) with Adam and prints images/s of:

* ``fdjax``: ``fdjax.runtime.LocalTrainer.epoch`` with the backend's default driver;
* ``bare``: a hand-written loop over the same Flax module and optax optimizer: one ``jax.jit``-ed
  step, batches sliced from a device array by a host-side permutation;
* ``xla-grads``: fdjax with XLA's own gradients (``make_model(..., grads="xla")``), to show what
  the written-out convolution and pool gradients of ``fdjax.core.layers`` give on this backend;
* ``torch``: the same CNN in PyTorch (same layers, He-normal convolutions, Adam lr 1e-3, the same
  uint8 scaling, channels-last, ``torch.set_num_threads(os.cpu_count())``), when ``torch`` is
  importable (it is not a dependency of fdjax);
* ``fdjax-loop`` / ``fdjax-scan``: both drivers forced, to show why the default is what it is
  (on CPU the scan driver is so slow that it runs only ``--scan-steps`` steps).

The sides alternate epoch by epoch in rotating order (``--repeats`` of each) so drift on a shared
machine hits all of them; medians are reported, and each ratio is the median of the paired ratios
fdjax / side (target against bare >= 0.95).

    python experiments/bench_local_training/bench_local_training.py --out results_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import numpy as np
import optax

from fdjax.core import make_model, make_optimizer
from fdjax.runtime import LocalTrainer
from fdjax.runtime.compiled import as_device_data


def random_data(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"images": rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
            "labels": rng.integers(0, 10, n).astype(np.int32)}


def time_fdjax(model, data, batch_size, driver, epochs=1):
    trainer = LocalTrainer(model, make_optimizer(), batch_size, driver)
    state = trainer.init(model.init(jax.random.key(0)))
    state, _ = trainer.epoch(state, data, jax.random.key(0))  # compile
    jax.block_until_ready(state)

    def run():
        nonlocal state
        start = time.perf_counter()
        for e in range(epochs):
            state, stats = trainer.epoch(state, data, jax.random.key(e + 1))
        jax.block_until_ready((state, stats))
        return epochs * data["labels"].shape[0] / (time.perf_counter() - start)

    return run


def time_bare(model, data, batch_size, epochs=1):
    """What a user would write by hand: jit one step, loop over shuffled full batches."""
    apply, tx = model.module.apply, optax.adam(1e-3)

    @jax.jit
    def step(params, opt_state, images, labels):
        def loss_fn(p):
            logits = apply(p, images)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    params = model.init(jax.random.key(0))
    opt_state = tx.init(params)
    images, labels = data["images"], data["labels"]
    n = labels.shape[0]
    rng = np.random.default_rng(0)

    def epoch():
        nonlocal params, opt_state
        order = rng.permutation(n)
        for i in range(n // batch_size):
            idx = order[i * batch_size:(i + 1) * batch_size]
            params, opt_state, loss = step(params, opt_state, images[idx], labels[idx])
        return loss

    jax.block_until_ready(epoch())  # compile

    def run():
        start = time.perf_counter()
        for _ in range(epochs):
            loss = epoch()
        jax.block_until_ready((params, loss))
        return epochs * (n // batch_size) * batch_size / (time.perf_counter() - start)

    return run


def time_torch(preset, width, host, batch_size, epochs=1):
    """The same CNN, optimizer and batches in PyTorch (channels-last, all cores); None without torch."""
    try:
        import torch
    except ImportError:
        return None
    from fdjax.core.models import PRESETS, _scaled
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    layers, c_in, size = [], host["images"].shape[-1], host["images"].shape[1]
    for stage in PRESETS[preset]["stages"]:
        for channels in stage:
            conv = torch.nn.Conv2d(c_in, _scaled(channels, width), 3, padding=1)
            torch.nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            layers += [conv, torch.nn.ReLU()]
            c_in = _scaled(channels, width)
        layers.append(torch.nn.MaxPool2d(2))
        size //= 2
    hidden = _scaled(PRESETS[preset]["hidden"][0], width)
    layers += [torch.nn.Flatten(), torch.nn.Linear(c_in * size * size, hidden), torch.nn.ReLU(),
               torch.nn.Linear(hidden, 10)]
    net = torch.nn.Sequential(*layers).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    images = torch.from_numpy(host["images"]).permute(0, 3, 1, 2)  # NCHW view of NHWC memory
    labels = torch.from_numpy(host["labels"]).long()
    n = labels.shape[0]

    def epoch():
        for idx in torch.randperm(n).split(batch_size):
            if idx.shape[0] < batch_size:
                break
            x = (images[idx].float() / 255.0 - 0.5) / 0.25
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(net(x.contiguous(memory_format=torch.channels_last)),
                                              labels[idx]).backward()
            opt.step()

    epoch()  # warm-up

    def run():
        start = time.perf_counter()
        for _ in range(epochs):
            epoch()
        return epochs * (n // batch_size) * batch_size / (time.perf_counter() - start)

    return run


def bench_preset(preset, args):
    model = make_model(preset, width=args.width)
    host = random_data(args.images)
    data = as_device_data(host)
    result = {"preset": preset, "width": args.width, "images": args.images,
              "batch_size": args.batch_size, "grads_auto": model.module.grads}
    runs = {"fdjax": time_fdjax(model, data, args.batch_size, "auto"),
            "bare": time_bare(model, data, args.batch_size)}
    if model.module.grads != "xla":
        xla_model = make_model(preset, width=args.width, grads="xla")
        runs["xla-grads"] = time_fdjax(xla_model, data, args.batch_size, "auto")
    if not getattr(args, "no_torch", False):
        torch_run = time_torch(preset, args.width, host, args.batch_size)
        if torch_run is not None:
            runs["torch"] = torch_run
    samples = {name: [] for name in runs}
    names = list(runs)
    for repeat in range(args.repeats):
        # Rotating order: slow drift of a shared machine hits every side alike.
        for name in names[repeat % len(names):] + names[:repeat % len(names)]:
            samples[name].append(runs[name]())
    for name, values in samples.items():
        result[name] = statistics.median(values)
        result[name + "_samples"] = [round(v, 1) for v in values]
    for name in names[1:]:
        key = "ratio" if name == "bare" else "ratio_" + name.replace("-", "_")
        result[key] = statistics.median(f / b for f, b in zip(samples["fdjax"], samples[name]))
    result["driver_auto"] = LocalTrainer(model, make_optimizer(), args.batch_size).driver
    for driver in ("loop", "scan"):
        if driver == result["driver_auto"]:
            result["fdjax-" + driver] = result["fdjax"]
            continue
        n = args.images
        if driver == "scan" and jax.default_backend() == "cpu":
            n = args.scan_steps * args.batch_size
        sub = {k: v[:n] for k, v in data.items()}
        result["fdjax-" + driver] = time_fdjax(model, sub, args.batch_size, driver)()
        result["fdjax-" + driver + "_images"] = n
    return result


def cpu_model() -> str:
    """The CPU's model name (figures differ between hosts: record which one ran them)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="cnn6,cnn12")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--images", type=int, default=512, help="images per timed epoch")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--scan-steps", type=int, default=4,
                        help="steps of the scan driver on CPU, where it is very slow")
    parser.add_argument("--no-torch", action="store_true",
                        help="skip the PyTorch reference even where torch is importable")
    parser.add_argument("--out", default=None, help="write results as JSON here")
    args = parser.parse_args()
    device = jax.devices()[0]
    report = {"backend": jax.default_backend(), "device": device.device_kind,
              "cpu_count": os.cpu_count(), "machine": platform.machine(),
              "cpu_model": cpu_model(), "load_average_before": os.getloadavg(),
              "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
              "results": []}
    for preset in args.presets.split(","):
        result = bench_preset(preset, args)
        report["results"].append(result)
        print(f"{preset} x{args.width} on {report['backend']} ({report['device']}), "
                  f"batch {args.batch_size}: fdjax {result['fdjax']:.1f} img/s "
              f"[{result['driver_auto']}], bare loop {result['bare']:.1f} img/s, "
              f"ratio {result['ratio']:.3f}; drivers: loop {result['fdjax-loop']:.1f}, "
              f"scan {result['fdjax-scan']:.1f} img/s", flush=True)
        for name in ("xla-grads", "torch"):
            if name in result:
                print(f"    {name} {result[name]:.1f} img/s, fdjax / {name} "
                      f"{result['ratio_' + name.replace('-', '_')]:.3f}", flush=True)
    report["load_average_after"] = os.getloadavg()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
