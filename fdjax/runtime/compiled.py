"""Compiled programs of the core: local training, distillation and evaluation, jitted once each.

A node builds one of these per model and settings; each jits its core function once with the
settings fixed by ``functools.partial`` and then only feeds it arrays, so nothing recompiles
between rounds (tests check this with ``chex.assert_max_traces``).

How an epoch (or a distillation chunk) is driven is a per-backend choice made by measurement
(``experiments/bench_local_training.py``):

* ``"loop"``: a Python loop dispatches one compiled step per batch. The data and the shuffled
  index plan stay on the device; each dispatch passes only the step number. On XLA CPU this is
  the fast way: a training step inside ``lax.scan`` ran 64x (cnn6) to 70x (cnn12) slower than the
  same step dispatched from Python (see the benchmark's recorded figures).
* ``"scan"``: the whole epoch or chunk is one ``lax.scan`` call, which saves per-step dispatch on
  GPU and TPU.

``driver="auto"`` picks ``"loop"`` on CPU and ``"scan"`` elsewhere.

On the CPU every program is compiled with ``CPU_COMPILER_OPTIONS``: XLA CPU then runs dot
products (and with them the CNN's convolutions) through YNNPACK instead of its default kernels,
which trained ``cnn6`` 1.65x faster per step at batch 32 (same process, alternating) and 2.3x
faster than a plain ``jax.jit`` loop of the same module at batch 64 on this project's 2-core CPU,
the same results to float rounding (``experiments/bench_local_training/``). Where the installed XLA does not know the
option, or with ``FDJAX_XLA_CPU_OPTIONS=0`` in the environment, programs compile without it.

``CohortTrainer`` trains many clients at once (``fdjax.core.cohort``): one compiled, ``vmap``-ed
step per batch for a whole cohort, with the same two drivers. Cohort shapes are bucketed (lanes
and steps in powers of two) so a run compiles a handful of programs, whatever clients it draws.
On a host with several devices its ``vmap``-ed lanes can be split over all of them, still one
compiled call per step (``fdjax.runtime.cohort_mesh``, ``devices=``).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fdjax.core import cohort, distillation, evaluation, training
from fdjax.core.augment import AUGMENTATIONS
from fdjax.core.models import Model
from fdjax.core.training import TrainState
from fdjax.runtime.cohort_mesh import LANE, WHOLE, CohortMesh

DRIVERS = ("auto", "loop", "scan")


#: XLA options fdjax compiles its programs with where the default backend is the CPU.
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}


@functools.lru_cache(maxsize=None)
def _options(backend: str, enabled: str) -> tuple[tuple[str, str], ...]:
    if backend != "cpu" or enabled == "0":
        return ()
    try:  # an XLA without the option refuses it at compile time: probe once
        jax.jit(lambda x: x @ x, compiler_options=CPU_COMPILER_OPTIONS).lower(
            jnp.ones((2, 2))).compile()
    except Exception:  # noqa: BLE001 - any refusal means: compile without it
        return ()
    return tuple(CPU_COMPILER_OPTIONS.items())


def compiler_options() -> dict[str, str]:
    """The XLA compiler options fdjax's programs are compiled with on this process's backend."""
    return dict(_options(jax.default_backend(), os.environ.get("FDJAX_XLA_CPU_OPTIONS", "1")))


def _compile(fn, **jit_kwargs):
    """``jax.jit`` with ``compiler_options()``; one seam so tests can count traces
    (``chex.assert_max_traces``)."""
    options = compiler_options()
    if options:
        jit_kwargs.setdefault("compiler_options", options)
    return jax.jit(fn, **jit_kwargs)


def resolve_driver(driver: str = "auto", backend: str | None = None) -> str:
    """The epoch driver to use: ``"loop"`` on CPU, ``"scan"`` on accelerators, unless forced."""
    if driver not in DRIVERS:
        raise ValueError(f"unknown epoch driver {driver!r}; choose one of {list(DRIVERS)}")
    if driver != "auto":
        return driver
    return "loop" if (backend or jax.default_backend()) == "cpu" else "scan"


def as_device_data(data: Mapping[str, Any]) -> dict[str, jax.Array]:
    """Puts a dataset's arrays (``images``, optional ``labels``) on the default device once."""
    return {k: jnp.asarray(v) for k, v in data.items() if v is not None}


def _sum_metrics(parts: list[dict[str, jax.Array]]) -> dict[str, jax.Array]:
    """Sums per-step metrics (scalars, or ``[clients]`` vectors of a cohort) over the steps."""
    return jax.tree_util.tree_map(lambda *xs: jnp.sum(jnp.stack(xs), axis=0), *parts)


class LocalTrainer:
    """One local epoch of supervised training, compiled once.

    Args:
        model: the model being trained (its ``train_fn`` is fixed at construction).
        optimizer: an optax optimizer (see ``fdjax.core.make_optimizer``).
        batch_size: examples per step; the last batch of an epoch is padded and masked.
        driver: "auto", "loop" or "scan" (see the module docstring).
    """

    def __init__(self, model: Model, optimizer: optax.GradientTransformation, batch_size: int,
                 driver: str = "auto"):
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.optimizer, self.batch_size = model, optimizer, int(batch_size)
        self.driver = resolve_driver(driver)
        step = functools.partial(training.train_step, train_fn=model.train_fn,
                                 optimizer=optimizer)
        self.step = _compile(functools.partial(training.planned_step, step))
        self.plan = _compile(training.epoch_plan, static_argnums=(1, 2))
        self.scan_epoch = _compile(functools.partial(
            training.scan_epoch, train_fn=model.train_fn, optimizer=optimizer,
            batch_size=self.batch_size))
        # compiled: built op by op, a fresh optimizer state cost ~7 ms per client on XLA CPU
        self.start = _compile(functools.partial(training.init_train_state, optimizer=optimizer))

    def init(self, params: Any) -> TrainState:
        """A training state around ``params`` with a fresh optimizer state."""
        return self.start(params)

    def epoch(self, state: TrainState, data: Mapping[str, jax.Array], key: jax.Array
              ) -> tuple[TrainState, dict[str, jax.Array]]:
        """Trains one epoch over ``data`` (``images``, ``labels``); returns summed metrics."""
        if self.driver == "scan":
            return self.scan_epoch(state, data, key)
        plan_key, step_key = jax.random.split(key)
        plan = self.plan(plan_key, int(data["labels"].shape[0]), self.batch_size)
        parts = []
        for step in range(plan[0].shape[0]):
            state, stats = self.step(state, data, plan, np.int32(step), step_key)
            parts.append(stats)
        return state, _sum_metrics(parts)


@dataclasses.dataclass(frozen=True)
class ClientPool:
    """The examples of many clients in one set of device arrays, for cohort training.

    Attributes:
        data: ``images`` (and ``labels``) of every client, concatenated in client order.
        offsets: int32 ``[clients]``, where each client's examples start in ``data``.
        sizes: int32 ``[clients]``, how many examples each client has.
    """

    data: dict[str, jax.Array]
    offsets: np.ndarray
    sizes: np.ndarray

    @classmethod
    def from_datasets(cls, datasets: Sequence[Mapping[str, Any]]) -> "ClientPool":
        """Concatenates each client's ``images`` and ``labels`` (host arrays) onto the device."""
        if not datasets:
            raise ValueError("a client pool needs at least one client")
        sizes = np.asarray([len(d["labels"]) for d in datasets], np.int32)
        if np.any(sizes < 1):
            raise ValueError(f"every client of a pool needs an example; client "
                             f"{int(np.argmin(sizes))} has none")
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int32)
        data = {k: jnp.asarray(np.concatenate([np.asarray(d[k]) for d in datasets]))
                for k in ("images", "labels")}
        return cls(data, offsets, sizes)


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def cohort_chunks(steps: Sequence[int], max_lanes: int, multiple: int = 1
                  ) -> list[np.ndarray]:
    """Splits clients into compiled calls: positions into ``steps`` for each call.

    Clients whose epochs take a similar number of steps go together (the same power-of-two
    bucket), so no client pads more than twice its own steps; each bucket is cut into calls of
    ``max_lanes`` clients and then of ``multiple`` times a power of two, so a run compiles at
    most ``log2(max_lanes) + 2`` lane counts per bucket. With ``multiple = 1`` no call pads a
    lane; a sharded cohort passes its device count, and the fewer than ``multiple`` clients
    left over go in one call that pads up to ``multiple`` lanes (one call rather than a call
    per power of two, each padded).
    """
    steps = np.asarray(steps)
    buckets = np.asarray([_next_power_of_two(s) for s in steps], np.int64)
    chunks = []
    for bucket in sorted(set(buckets.tolist())):
        members = np.flatnonzero(buckets == bucket)
        start = 0
        while len(members) - start >= max_lanes:
            chunks.append(members[start:start + max_lanes])
            start += max_lanes
        whole, rest = divmod(len(members) - start, multiple)
        for bit in reversed(range(whole.bit_length())):
            if whole & (1 << bit):
                chunks.append(members[start:start + (multiple << bit)])
                start += multiple << bit
        if rest:
            chunks.append(members[start:])
    return chunks


LANES = ("auto", "vmap", "sequential")


def resolve_lanes(lanes: str = "auto", backend: str | None = None) -> str:
    """How a cohort's clients run: all in one ``vmap``-ed step, or one after another.

    ``"auto"`` picks ``"sequential"`` on CPU and ``"vmap"`` elsewhere. On XLA CPU a ``vmap``-ed
    convolution with per-client kernels (a grouped convolution) ran 2-10x slower than the same
    convolutions one client at a time (``experiments/bench_cohort``), so there a cohort keeps the
    one pool and the shape-bucketed programs (no program per client size) but steps its clients
    in turn; on GPUs, where a single small client leaves the device idle, it maps them together.
    """
    if lanes not in LANES:
        raise ValueError(f"unknown cohort lanes {lanes!r}; choose one of {list(LANES)}")
    if lanes != "auto":
        return lanes
    return "sequential" if (backend or jax.default_backend()) == "cpu" else "vmap"


class CohortTrainer:
    """Local epochs of many clients at once, compiled once per cohort shape.

    Every client starts from the same parameters with a fresh optimizer state and trains on its
    own examples of a ``ClientPool``; a client ends where ``LocalTrainer`` would leave it with the
    same key (see ``fdjax.core.cohort``), up to float rounding.

    Args:
        model: the model the clients train.
        optimizer: an optax optimizer.
        batch_size: examples per step.
        driver: "auto", "loop" or "scan" for the steps of a ``vmap``-ed cohort (see the module
            docstring); sequential lanes always loop.
        lanes: "auto", "vmap" (one ``vmap``-ed step per batch for the whole cohort) or
            "sequential" (each client's own steps in turn); see ``resolve_lanes``.
        max_lanes: most clients in one compiled call (bounds memory: activations scale with it).
        devices: "auto", "single" or "all": whether a ``vmap``-ed cohort's lanes are split over
            the host's local devices, one compiled call over all of them per step (see
            ``fdjax.runtime.cohort_mesh``; "all" forces "vmap" lanes when ``lanes="auto"``).
    """

    def __init__(self, model: Model, optimizer: optax.GradientTransformation, batch_size: int,
                 driver: str = "auto", lanes: str = "auto", max_lanes: int = 64,
                 devices: str = "auto"):
        if int(batch_size) < 1 or int(max_lanes) < 1:
            raise ValueError(f"batch_size and max_lanes must be >= 1, got {batch_size} and "
                             f"{max_lanes}")
        self.model, self.optimizer, self.batch_size = model, optimizer, int(batch_size)
        self.max_lanes = int(max_lanes)
        self.mesh = CohortMesh.choose(devices, lanes, resolve_lanes(lanes))
        self.lanes = "vmap" if self.mesh is not None else resolve_lanes(lanes)
        self.driver = resolve_driver(driver) if self.lanes == "vmap" else "loop"
        settings = dict(train_fn=model.train_fn, optimizer=optimizer)
        self.fold = _compile(jax.vmap(jax.random.fold_in, in_axes=(0, None)))
        if self.mesh is None:
            self._compile_vmapped(settings)
        else:
            self._compile_sharded(settings)
        # sequential: one client's step, its row of the cohort's plan picked inside
        self.lane_step = _compile(functools.partial(
            _lane_step, functools.partial(training.train_step, **settings)))
        self.lane_start = _compile(functools.partial(training.init_train_state,
                                                     optimizer=optimizer))
        self._shapes: set[tuple[int, int]] = set()
        self._pools: dict[int, tuple[ClientPool, dict[str, jax.Array]]] = {}

    def _compile_vmapped(self, settings: dict) -> None:
        """The whole cohort's programs on one device."""
        self.plan = _compile(cohort.cohort_epoch_plan, static_argnames=("batch_size", "steps"))
        self.step = _compile(functools.partial(
            cohort.cohort_planned_step, functools.partial(cohort.masked_train_step, **settings)))
        self.scan_epoch = _compile(functools.partial(
            cohort.scan_cohort_epoch, batch_size=self.batch_size, **settings),
            static_argnames=("steps",))
        self.start = _compile(functools.partial(cohort.cohort_init, optimizer=self.optimizer),
                              static_argnums=(1,))
        self.unstack = _compile(_unstack, static_argnums=(1,))

    def _compile_sharded(self, settings: dict) -> None:
        """The same programs with the lanes split over ``self.mesh``: one call per step.

        Lanes (states, plans, keys, sizes, offsets) are split, the pool and the step number
        copied whole; the trained parameters come back to the mesh's first device.
        """
        mesh, lane, whole = self.mesh, LANE, WHOLE
        self.plan = _compile(mesh.over_lanes(cohort.cohort_epoch_plan, (lane, lane, lane),
                                             (lane, lane)),
                             static_argnames=("batch_size", "steps"))
        step = functools.partial(cohort.cohort_planned_step,
                                 functools.partial(cohort.masked_train_step, **settings))
        self.step = _compile(mesh.over_lanes(step, (lane, whole, lane, whole, lane),
                                             (lane, lane)))
        epoch = functools.partial(cohort.scan_cohort_epoch, batch_size=self.batch_size,
                                  **settings)
        self.scan_epoch = _compile(mesh.over_lanes(epoch, (lane, whole, lane, lane, lane),
                                                   (lane, lane)), static_argnames=("steps",))
        self.start = _compile(functools.partial(cohort.cohort_init, optimizer=self.optimizer),
                              static_argnums=(1,), out_shardings=mesh.lanes)
        unstack = _compile(_unstack, static_argnums=(1,))
        # gathered onto the first device, then cut there: a jitted call cannot take its
        # inputs from every device and leave its outputs on one
        self.unstack = lambda tree, lanes: unstack(jax.device_put(tree, mesh.home), lanes)

    def chunks(self, pool: ClientPool, members: Sequence[int]) -> list[np.ndarray]:
        """How ``train`` splits ``members`` into compiled calls (positions into ``members``)."""
        sizes = pool.sizes[np.asarray(members, np.int64)]
        return cohort_chunks([training.num_steps(n, self.batch_size) for n in sizes],
                             self.max_lanes, 1 if self.mesh is None else self.mesh.size)

    def _shape(self, pool: ClientPool, members: np.ndarray) -> tuple[int, int, int]:
        """A call's lanes (padded to a multiple of the devices), steps and bucketed steps."""
        steps = max(training.num_steps(n, self.batch_size) for n in pool.sizes[members])
        lanes = len(members) if self.mesh is None else self.mesh.padded(len(members))
        return lanes, steps, _next_power_of_two(steps)

    def _inputs(self, pool: ClientPool, rows: np.ndarray, keys: jax.Array, version: int):
        """A call's pool data and its lanes' keys, sizes and offsets, padded and placed.

        Padding lanes (up to a multiple of the devices) reuse the call's first keys and have
        no examples, so they only take wholly masked steps, which change nothing.
        """
        padded = np.resize(rows, self._shape(pool, rows)[0])
        sizes = np.where(np.arange(len(padded)) < len(rows), pool.sizes[padded], 0)
        return self._place(pool, self.fold(keys[padded], np.int32(version)),
                           sizes.astype(np.int32), pool.offsets[padded])

    def _place(self, pool: ClientPool, keys: jax.Array, sizes: np.ndarray,
               offsets: np.ndarray):
        """On a mesh, the pool copied to every device (once per pool) and the lanes split."""
        if self.mesh is None:
            return pool.data, keys, sizes, offsets
        if id(pool) not in self._pools:  # the pool is kept, so its id is never reused
            self._pools[id(pool)] = (pool, self.mesh.copy(pool.data))
        return (self._pools[id(pool)][1], self.mesh.split(keys),
                *self.mesh.split((sizes, offsets)))

    def _begin(self, params: Any, lanes: int) -> TrainState:
        """Every lane's fresh state from ``params`` (copied to every device on a mesh)."""
        return self.start(params if self.mesh is None else self.mesh.copy(params), lanes)

    def warm(self, params: Any, pool: ClientPool, members: Sequence[int]) -> bool:
        """Compiles the programs ``train`` will need for ``members``; True if any was new.

        Runs one step of each new cohort shape on lanes with no examples, so that a timed
        ``train`` never includes compilation.
        """
        members = np.asarray(members, np.int64)
        new = False
        for chunk in self.chunks(pool, members):
            lanes, _, bucket = self._shape(pool, members[chunk])
            if (lanes, bucket) in self._shapes:
                continue
            empty = np.zeros(lanes, np.int32)  # lanes with no examples
            data, keys, sizes, offsets = self._place(pool, self.fold(
                jax.random.split(jax.random.key(0), lanes), np.int32(0)), empty, empty)
            plan, step_keys = self.plan(keys, sizes, offsets, batch_size=self.batch_size,
                                        steps=bucket)
            if self.lanes == "sequential":
                out = self.lane_step(self.lane_start(params), data, plan, np.int32(0),
                                     step_keys, np.int32(0))
            elif self.driver == "scan":
                state, _ = self.scan_epoch(self._begin(params, lanes), data, keys, sizes,
                                           offsets, steps=bucket)
                out = self.unstack(state.params, lanes)
            else:
                state, _ = self.step(self._begin(params, lanes), data, plan, np.int32(0),
                                     step_keys)
                out = self.unstack(state.params, lanes)
            jax.block_until_ready(out)
            self._shapes.add((lanes, bucket))
            new = True
        return new

    def train(self, params: Any, pool: ClientPool, members: Sequence[int], keys: jax.Array,
              version: int = 0, epochs: int = 1, keep_state: bool = False
              ) -> tuple[list[Any], list[dict[str, np.ndarray]]]:
        """Trains clients ``members`` of ``pool`` for ``epochs`` epochs, all from ``params``.

        Args:
            params: the starting parameters of every client.
            pool: the clients' examples.
            members: pool rows of the clients to train.
            keys: one key per pool row, each client's own. Client ``c``'s epoch ``e`` uses
                ``fold_in(fold_in(keys[c], version), e)``, the keys
                ``fdjax.runtime.nodes.Client`` gives ``LocalTrainer.epoch``.
            version: the model version being trained (folded into the keys).
            epochs: local epochs.
            keep_state: return each member's whole ``TrainState`` (optimizer state included)
                instead of its parameters, to compare or resume a client's training.

        Returns:
            Each member's trained parameters (or state) and summed metrics, in the order of
            ``members``.
        """
        members = np.asarray(members, np.int64)
        trained: list[Any] = [None] * len(members)
        metrics: list[Any] = [None] * len(members)
        totals = []
        run = self._vmapped if self.lanes == "vmap" else self._sequential
        for chunk in self.chunks(pool, members):
            rows = members[chunk]
            lanes, steps, bucket = self._shape(pool, rows)
            inputs = self._inputs(pool, rows, keys, version)
            out, total = run(params, len(rows), *inputs, steps, bucket, epochs, keep_state)
            self._shapes.add((lanes, bucket))
            for position, tree in zip(chunk, out):
                trained[position] = tree
            totals.append((chunk, total))
        for chunk, total in jax.device_get(totals):
            for lane, position in enumerate(chunk):
                metrics[position] = {k: v[lane] for k, v in total.items()}
        return trained, metrics

    def _vmapped(self, params, count, data, keys, sizes, offsets, steps, bucket, epochs,
                 keep_state):
        state = self._begin(params, len(sizes))
        parts = []
        for epoch in range(epochs):
            epoch_keys = self.fold(keys, np.int32(epoch))
            if self.driver == "scan":
                state, stats = self.scan_epoch(state, data, epoch_keys, sizes, offsets,
                                               steps=bucket)
                parts.append(stats)
                continue
            plan, step_keys = self.plan(epoch_keys, sizes, offsets, batch_size=self.batch_size,
                                        steps=bucket)
            for step in range(steps):
                state, stats = self.step(state, data, plan, np.int32(step), step_keys)
                parts.append(stats)
        return self.unstack(state if keep_state else state.params, count), _sum_metrics(parts)

    def _sequential(self, params, count, data, keys, sizes, offsets, steps, bucket, epochs,
                    keep_state):
        states = [self.lane_start(params) for _ in sizes]
        parts: list[list] = [[] for _ in sizes]
        for epoch in range(epochs):
            plan, step_keys = self.plan(self.fold(keys, np.int32(epoch)), sizes, offsets,
                                        batch_size=self.batch_size, steps=bucket)
            for lane, size in enumerate(sizes):
                for step in range(training.num_steps(size, self.batch_size)):
                    states[lane], stats = self.lane_step(states[lane], data, plan,
                                                         np.int32(step), step_keys,
                                                         np.int32(lane))
                    parts[lane].append(stats)
        per_lane = [_sum_metrics(p) for p in parts]
        out = states if keep_state else [s.params for s in states]
        return out, jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *per_lane)


def _lane_step(step_fn, state: TrainState, data: dict[str, jax.Array],
               plan: tuple[jax.Array, jax.Array], step: jax.Array, keys: jax.Array,
               lane: jax.Array):
    """Step ``step`` of client ``lane`` of a cohort's plan, the client's own state alone."""
    return training.planned_step(step_fn, state, data, (plan[0][lane], plan[1][lane]), step,
                                 keys[lane])


def _unstack(tree: Any, lanes: int) -> list[Any]:
    return [jax.tree_util.tree_map(lambda x: x[i], tree) for i in range(lanes)]


class Distiller:
    """A chunk of distillation steps (teacher -> student), compiled once.

    The same class runs forward distillation (large teacher, small student) and reverse
    distillation (small teacher, large student).

    Args:
        student: the model being trained.
        teacher: the model whose softened predictions are the targets.
        optimizer: optax optimizer of the student.
        batch_size: distillation batch size.
        steps: steps per chunk.
        temperature: softening temperature, > 0.
        label_weight: cross-entropy weight in [0, 1] when the distillation set has labels.
        augment: label-free augmentation of each batch, "none", "flip" or "flip_crop".
        driver: "auto", "loop" or "scan".
        ensemble: the teacher's parameters are a sequence of ``teacher`` models and the targets
            their averaged logits (``distillation.ensemble_apply``, FedDF); compiled once per
            number of members.
    """

    def __init__(self, student: Model, teacher: Model, optimizer: optax.GradientTransformation,
                 batch_size: int, steps: int, temperature: float = 2.0,
                 label_weight: float = 0.0, augment: str = "none", driver: str = "auto",
                 ensemble: bool = False):
        if int(batch_size) < 1 or int(steps) < 1:
            raise ValueError(f"distillation batch_size and steps must be >= 1, got "
                             f"{batch_size} and {steps}")
        if not temperature > 0:
            raise ValueError(f"distillation temperature must be > 0, got {temperature}")
        if not 0 <= label_weight <= 1:
            raise ValueError(f"distillation label_weight must be in [0, 1], got {label_weight}")
        if augment not in AUGMENTATIONS:
            raise ValueError(f"unknown distillation augmentation {augment!r}; choose one of "
                             f"{list(AUGMENTATIONS)}")
        self.optimizer, self.batch_size, self.steps = optimizer, int(batch_size), int(steps)
        self.label_weight = float(label_weight)
        self.driver = resolve_driver(driver)
        self.ensemble = bool(ensemble)
        teacher_apply = (distillation.ensemble_apply(teacher.apply_fn) if self.ensemble
                         else teacher.apply_fn)
        settings = dict(student_train=student.train_fn, teacher_apply=teacher_apply,
                        optimizer=optimizer, temperature=float(temperature),
                        label_weight=self.label_weight, augment=augment)
        step = functools.partial(distillation.distill_step, **settings)
        self.step = _compile(functools.partial(training.planned_step, step))
        self.plan = _compile(distillation.distill_plan, static_argnums=(1, 2, 3))
        self.scan_chunk = _compile(functools.partial(
            distillation.scan_distill_chunk, steps=self.steps, batch_size=self.batch_size,
            **settings))
        # compiled, as LocalTrainer's: forward distillation starts a fresh student state
        self.start = _compile(functools.partial(training.init_train_state, optimizer=optimizer))

    def init(self, params: Any) -> TrainState:
        """A student state around ``params`` with a fresh optimizer state."""
        return self.start(params)

    def chunk(self, state: TrainState, teacher_params: Any, data: Mapping[str, jax.Array],
              key: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
        """Runs ``steps`` distillation steps on batches drawn from ``data``."""
        if self.label_weight and "labels" not in data:
            raise ValueError("label_weight > 0 needs a distillation set that keeps its labels")
        if self.driver == "scan":
            return self.scan_chunk(state, teacher_params, data, key)
        plan_key, step_key = jax.random.split(key)
        plan = self.plan(plan_key, int(data["images"].shape[0]), self.batch_size, self.steps)
        parts = []
        for step in range(self.steps):
            state, stats = self.step(state, data, plan, np.int32(step), step_key,
                                     teacher_params)
            parts.append(stats)
        return state, _sum_metrics(parts)


class Evaluator:
    """Loss and accuracy of a model over a dataset, one compiled call per dataset size."""

    def __init__(self, model: Model, batch_size: int = 500):
        if int(batch_size) < 1:
            raise ValueError(f"evaluation batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.fn = _compile(functools.partial(evaluation.evaluate, apply_fn=model.apply_fn,
                                            batch_size=self.batch_size))

    def __call__(self, params: Any, data: Mapping[str, jax.Array]) -> dict[str, float]:
        """``{"loss", "accuracy", "count"}`` of ``params`` on ``data``."""
        return training.summarize(self.fn(params, {"images": data["images"],
                                                   "labels": data["labels"]}))
