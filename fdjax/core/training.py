"""Local training: optimizer from settings, one supervised step, and an epoch as one ``lax.scan``.

Everything here is a pure function over pytrees; nothing is jitted. The runtime jits a step or an
epoch once per node with its settings fixed by ``functools.partial`` (see
``fdjax.runtime.compiled``), and chooses per backend whether an epoch is one scanned call or a Python
loop over one compiled step.

Batches are dicts ``{"images": uint8[B, H, W, C], "labels": int32[B], "mask": float32[B]}``. Every
batch has the same static size; the last batch of an epoch is padded and its padding masked out, so
a client with fewer examples than the batch size still trains and nothing recompiles.
Metrics come back as sums (``loss_sum``, ``correct``, ``count``) so they add up exactly across
steps, epochs and clients; ``summarize`` turns them into a mean loss and an accuracy.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

#: ``(variables, images) -> logits``, evaluation mode (``fdjax.core.models.Model.apply_fn``).
ApplyFn = Callable[[Any, jax.Array], jax.Array]
#: ``(variables, images, key) -> (logits, state)``, training mode (``Model.train_fn``): ``key``
#: feeds dropout, ``state`` holds the updated state collections (BatchNorm's ``batch_stats``).
TrainFn = Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, Any]]
Metrics = dict[str, jax.Array]

OPTIMIZERS = ("adam", "adamw", "sgd", "momentum")


class TrainState(NamedTuple):
    """Parameters and optimizer state of one model being trained."""

    params: Any
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    """Settings an optimizer is built from.

    Attributes:
        name: "adam", "adamw", "sgd" or "momentum" (SGD with Nesterov-free momentum).
        learning_rate: step size, > 0.
        momentum: momentum coefficient for "momentum", in [0, 1).
        weight_decay: decoupled weight decay for "adamw", >= 0.
    """

    name: str = "adam"
    learning_rate: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 1e-4


def make_optimizer(settings: OptimizerSettings | None = None) -> optax.GradientTransformation:
    """Builds the optax optimizer named by ``settings``.

    Raises:
        ValueError: for an unknown name or a value out of range, naming the setting.
    """
    s = settings or OptimizerSettings()
    if s.name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {s.name!r}; choose one of {list(OPTIMIZERS)}")
    if not s.learning_rate > 0:
        raise ValueError(f"optimizer learning_rate must be > 0, got {s.learning_rate}")
    if not 0 <= s.momentum < 1:
        raise ValueError(f"optimizer momentum must be in [0, 1), got {s.momentum}")
    if not s.weight_decay >= 0:
        raise ValueError(f"optimizer weight_decay must be >= 0, got {s.weight_decay}")
    if s.name == "adam":
        return optax.adam(s.learning_rate)
    if s.name == "adamw":
        return optax.adamw(s.learning_rate, weight_decay=s.weight_decay)
    if s.name == "momentum":
        return optax.sgd(s.learning_rate, momentum=s.momentum)
    return optax.sgd(s.learning_rate)


def init_train_state(params: Any, optimizer: optax.GradientTransformation) -> TrainState:
    """A fresh optimizer state around ``params``."""
    return TrainState(params, optimizer.init(params))


def classification_metrics(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> Metrics:
    """Masked sums of cross-entropy and correct predictions, and the number of real examples."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return {"loss_sum": jnp.sum(losses * mask), "correct": jnp.sum(correct * mask),
            "count": jnp.sum(mask)}


def summarize(metrics: Metrics) -> dict[str, float]:
    """Mean loss and accuracy from summed metrics (both NaN when nothing was counted)."""
    count = float(metrics["count"])
    if count == 0:
        return {"loss": math.nan, "accuracy": math.nan, "count": 0.0}
    return {"loss": float(metrics["loss_sum"]) / count,
            "accuracy": float(metrics["correct"]) / count, "count": count}


def add_metrics(a: Metrics, b: Metrics) -> Metrics:
    return jax.tree_util.tree_map(jnp.add, a, b)


def train_step(state: TrainState, batch: dict[str, jax.Array], key: jax.Array, *,
               train_fn: TrainFn, optimizer: optax.GradientTransformation
               ) -> tuple[TrainState, Metrics]:
    """One optimizer step of masked mean cross-entropy on ``batch``.

    ``key`` is the step's dropout key (unused by the deterministic CNNs). The optimizer steps
    the whole variable tree, whose state collections get no gradient (training-mode BatchNorm
    normalises with the batch's statistics, not the running ones); those collections then take
    the values the forward pass computed (``with_state``).
    """

    def loss_fn(params):
        logits, model_state = train_fn(params, batch["images"], key)
        stats = classification_metrics(logits, batch["labels"], batch["mask"])
        return stats["loss_sum"] / jnp.maximum(stats["count"], 1.0), (stats, model_state)

    grads, (stats, model_state) = jax.grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = with_state(optax.apply_updates(state.params, updates), model_state)
    return TrainState(params, opt_state), stats


def with_state(variables: Any, model_state: Any) -> Any:
    """``variables`` with the state collections of ``model_state`` replaced (same tree)."""
    return {**variables, **model_state} if model_state else variables


def num_steps(num_examples: int, batch_size: int) -> int:
    """Steps in one epoch: every example once, the last batch padded."""
    return max(1, -(-int(num_examples) // int(batch_size)))


def _shuffle_rounds(num_examples: int) -> int:
    """Sorting rounds ``jax.random.permutation`` spends on ``num_examples`` items (JAX's rule)."""
    umax = float(np.iinfo(np.uint32).max)
    return int(np.ceil(3 * np.log(max(1, num_examples)) / np.log(umax)))


def _round_thresholds(length: int) -> list[int]:
    """The smallest item counts that take 1, 2, ... sorting rounds, up to ``length`` items."""
    thresholds = []
    for rounds in range(1, _shuffle_rounds(length) + 1):
        low, high = 1, length  # smallest n <= length with _shuffle_rounds(n) >= rounds
        while low < high:
            mid = (low + high) // 2
            low, high = (mid + 1, high) if _shuffle_rounds(mid) < rounds else (low, mid)
        thresholds.append(low)
    return thresholds


def shuffled_order(key: jax.Array, num_examples: jax.Array | int, length: int) -> jax.Array:
    """``jax.random.permutation(key, num_examples)`` in the first ``num_examples`` of ``length``.

    ``jax.random.permutation`` sorts the items by fresh random bits for a few rounds, and (with
    JAX's default partitionable threefry) the bits of item ``i`` do not depend on how many items
    there are. So the same rounds over ``length`` slots, with the slots from ``num_examples`` on
    sorting last, give exactly the permutation of ``num_examples`` items while ``length`` stays
    static and ``num_examples`` may be traced (clients of different sizes in one cohort). The
    slots from ``num_examples`` on hold the remaining indices, in no particular order.
    """
    slot = jnp.arange(length, dtype=jnp.int32)
    padding = (slot >= num_examples).astype(jnp.int32)
    order = slot
    for threshold in _round_thresholds(length):
        key, subkey = jax.random.split(key)
        bits = jax.random.bits(subkey, (length,), jnp.uint32)
        _, _, sorted_order = jax.lax.sort((padding, bits, order), num_keys=2, is_stable=True)
        order = jnp.where(num_examples >= threshold, sorted_order, order)
    return order


def padded_epoch(key: jax.Array, num_examples: jax.Array | int, batch_size: int, steps: int
                 ) -> tuple[jax.Array, jax.Array]:
    """``epoch_plan`` padded to ``steps`` rows: rows past the epoch's own are wholly masked.

    The first ``num_steps(num_examples, batch_size)`` rows equal ``epoch_plan``'s whatever
    ``steps`` is, and ``num_examples`` may be traced; this is what cohorts of clients with
    different sizes share (see ``fdjax.core.cohort``).
    """
    total = steps * batch_size
    real = jnp.arange(total) < num_examples
    index = jnp.where(real, shuffled_order(key, num_examples, total), 0)
    return index.reshape(steps, batch_size), real.astype(jnp.float32).reshape(steps, batch_size)


def epoch_plan(key: jax.Array, num_examples: int, batch_size: int) -> tuple[jax.Array, jax.Array]:
    """A shuffled epoch as an index matrix ``[steps, batch]`` and its mask.

    Every example appears exactly once with mask 1; the padding of the last batch points at
    example 0 with mask 0. ``num_examples`` and ``batch_size`` must be static. ``padded_epoch``
    reproduces it, so a client trained in a cohort sees exactly the batches it sees alone.
    """
    steps = num_steps(num_examples, batch_size)
    order = jax.random.permutation(key, num_examples)
    pad = steps * batch_size - num_examples
    index = jnp.concatenate([order, jnp.zeros((pad,), order.dtype)]).reshape(steps, batch_size)
    mask = (jnp.arange(steps * batch_size) < num_examples).astype(jnp.float32)
    return index, mask.reshape(steps, batch_size)


def sample_plan(key: jax.Array, num_examples: int, batch_size: int, steps: int
                ) -> tuple[jax.Array, jax.Array]:
    """``steps`` batches drawn by walking through fresh permutations of the examples.

    Used for distillation chunks: a chunk need not align with passes over the distillation set,
    yet every example is seen once before any is seen twice. All masks are 1.
    """
    total = steps * batch_size
    passes = -(-total // num_examples)
    keys = jax.random.split(key, passes)
    order = jax.vmap(lambda k: jax.random.permutation(k, num_examples))(keys).reshape(-1)
    return order[:total].reshape(steps, batch_size), jnp.ones((steps, batch_size), jnp.float32)


def gather_batch(data: dict[str, jax.Array], index: jax.Array, mask: jax.Array
                 ) -> dict[str, jax.Array]:
    """The batch of ``data`` (arrays with a leading example axis) at ``index``, with ``mask``."""
    batch = {name: jnp.take(value, index, axis=0) for name, value in data.items()}
    batch["mask"] = mask
    return batch


def planned_step(step_fn: Callable, state: Any, data: dict[str, jax.Array],
                 plan: tuple[jax.Array, jax.Array], step: jax.Array, key: jax.Array, *args):
    """Runs ``step_fn`` on row ``step`` of ``plan`` with a key folded from ``step``.

    This is what a Python-loop driver compiles once: the data and the plan stay on the device and
    the loop passes only the step number, so each step is a single dispatch.
    """
    index, mask = plan
    batch = gather_batch(data, index[step], mask[step])
    return step_fn(state, *args, batch, jax.random.fold_in(key, step))


def scan_steps(step_fn: Callable, state: Any, data: dict[str, jax.Array],
               plan: tuple[jax.Array, jax.Array], key: jax.Array, *args):
    """Runs ``step_fn`` over every row of ``plan`` in one ``lax.scan``; returns summed metrics."""
    steps = plan[0].shape[0]

    def body(carry, step):
        carry_state, total = carry
        new_state, stats = planned_step(step_fn, carry_state, data, plan, step, key, *args)
        return (new_state, add_metrics(total, stats)), None

    first_state, first = planned_step(step_fn, state, data, plan, jnp.int32(0), key, *args)
    (state, total), _ = jax.lax.scan(body, (first_state, first), jnp.arange(1, steps))
    return state, total


def scan_epoch(state: TrainState, data: dict[str, jax.Array], key: jax.Array, *,
               train_fn: TrainFn, optimizer: optax.GradientTransformation, batch_size: int
               ) -> tuple[TrainState, Metrics]:
    """One local epoch as a single ``lax.scan`` over shuffled, padded batches."""
    plan_key, step_key = jax.random.split(key)
    plan = epoch_plan(plan_key, data["labels"].shape[0], batch_size)
    step = lambda s, b, k: train_step(s, b, k, train_fn=train_fn, optimizer=optimizer)
    return scan_steps(step, state, data, plan, step_key)
