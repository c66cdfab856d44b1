"""Running an experiment: config -> data, models, nodes -> metrics, run directory.

``run(config)`` executes one method on one seed and returns a ``Run``; ``compare(config, methods,
seeds)`` runs several on the same data split and returns a ``Comparison`` that draws the paper's
Figure 2 and a table. The CLI only parses arguments into a config and calls these.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import logging
import time
import tomllib
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import numpy as np

from fdjax import programs, report
from fdjax.checkpoint import CheckpointError
from fdjax.config import Config, config_to_toml, parse_resources
from fdjax.core import AggregationRule
from fdjax.core.models import CALLER as CALLER_MODEL, ModelError, ModelSpec, import_path
from fdjax.data import DataError, load_splits, split_federated
from fdjax.data.sources import CALLER
from fdjax.methods import Method, get_method
from fdjax.runtime.channels import Mailbox, Network, Register
from fdjax.runtime.clock import Clock, Cost, Device
from fdjax.runtime.cohorts import ClientCohort
from fdjax.runtime.compiled import ClientPool, LocalTrainer, as_device_data
from fdjax.runtime.faults import FaultyClient
from fdjax.runtime.nodes import (Client, Context, DistillationServer, LeadGate, Observer,
                                 supervise)
from fdjax.runtime.sampling import ClientSampler
from fdjax.rundir import ComparisonDirectory, RunDirectory, write_atomic
from fdjax.runstate import RunState

_logger = logging.getLogger("fdjax")


@dataclasses.dataclass
class Run:
    """The outcome of one run.

    Attributes:
        config: the resolved config.
        rows: one metrics dict per evaluation (``method``, ``seed``, ``time``, ``wall_time``,
            ``global_accuracy``, ``small_accuracy``, ``round``, ...).
        nodes: per node: role, busy and idle seconds, messages and bytes sent.
        staleness: for each reverse-distillation chunk, how many averaging rounds the average
            it used was behind.
        global_params: final parameters of the global (large) model (None when read back by
            ``load_run``: they are in ``global_params.npz``).
        small_params: final parameters of the small model (None for ``fedavg-large``, and when
            read back by ``load_run``).
        events: the node event log (start and end of training, rounds, distillation chunks).
        devices: per device, the (start, end, node) interval of every computation it ran.
        timing: wall seconds of the whole run (``wall_seconds``), of the compiled compute it
            executed, evaluation included (``compute_seconds``), of the calls that compiled
            or calibrated programs (``compile_seconds``: on the virtual clock extra first calls,
            never charged; on the real clock each new program's first call, time inside the
            nodes' compute and the round times that was compilation), with a calibrated
            cost the seconds charged per call (``calibrated_seconds_per_call``), and the number
            of checkpoints saved and the seconds the saves took (``checkpoints``,
            ``checkpoint_seconds``).
        out_dir: where the run was written, if anywhere.
        rejected: every update the averaging server rejected: time, round, client, reason.
        resumes: for each time this run was resumed: the checkpoint used, its round and time,
            and the problems with newer checkpoints that were skipped.
        placement: with the Ray backend, where each node's actor ran (host, process, Ray node,
            JAX devices); None in-process.
    """

    config: Config
    rows: list[dict]
    nodes: dict[str, dict]
    staleness: list[int]
    global_params: Any
    small_params: Any
    events: list[dict]
    devices: dict[str, list[tuple[float, float, str]]]
    timing: dict[str, float]
    out_dir: Path | None = None
    rejected: list[dict] = dataclasses.field(default_factory=list)
    resumes: list[dict] = dataclasses.field(default_factory=list)
    placement: dict[str, dict] | None = None

    def summary(self, target: float | None = None) -> dict:
        """Time to ``target`` (default: the config's, else 0.6), final accuracy, idle fractions."""
        return report.summarize_run(self.rows, self.nodes, report_target(self.config, target))


def report_target(config: Config, target: float | None = None) -> float:
    """The accuracy whose time reports give: ``target``, else the config's, else 0.6 (the
    paper's)."""
    return target or config.stop.target_accuracy or 0.6


def aggregation_rule(config: Config) -> AggregationRule:
    """The averaging server's rule and its settings, from ``[aggregation]``."""
    a = config.aggregation
    return AggregationRule(a.rule, a.trim_fraction, a.num_byzantine, a.multi_krum_keep,
                           a.clip_norm)


class PreparedData(NamedTuple):
    """What ``prepare_data`` returns: the splits and the federated partition of a config's
    data. A run handed anything else as ``data`` records that its data came from the caller."""

    splits: Any
    fed: Any


def from_caller(config: Config) -> Config:
    """``config`` as a run records it when its data was handed in from Python: the data
    settings cannot reproduce that data, so ``data.source`` says ``"caller"``."""
    return config.replace(data=dataclasses.replace(config.data, source=CALLER))


def prepare_data(config: Config) -> PreparedData:
    """Loads the dataset and splits it into clients and the proxy set (same for every method).

    With ``distill.forward_gate = "lead"`` and ``distill.gate_holdout_from = "test"`` the gate's
    labeled holdout is cut from the end of the test split here, for every method alike, so that
    all methods of one comparison are evaluated on the same test images.
    """
    d, dc = config.data, config.distill
    if d.source == CALLER:
        raise DataError('data.source = "caller": this run\'s data was handed in from Python '
                        '(fdjax.run(..., data=...)) and cannot be loaded again; resume it from '
                        'Python with the same data')
    holdout = (dc.gate_holdout if dc.forward_gate == "lead" and dc.gate_holdout_from == "test"
               else 0)
    splits = load_splits(d.source, name=d.name, data_dir=d.data_dir, download=d.download,
                         root=d.root, test_split=d.test_split, limit=d.limit,
                         test_limit=d.test_limit, holdout=holdout, seed=config.seed)
    if splits.holdout is not None and splits.holdout.labels is None:
        raise DataError(f"distill.gate_holdout_from: the test split of {splits.test.name} has "
                        f"no labels, and the gate needs labeled images")
    fed = split_federated(splits.train, config.clients.count, scheme=d.partition,
                          proxy_size=d.proxy_size, keep_proxy_labels=d.keep_proxy_labels,
                          seed=config.seed, alpha=d.alpha,
                          shards_per_client=d.shards_per_client)
    return PreparedData(splits, fed)


def run(config: Config, out_dir: str | Path | None = None, *, data=None,
        models: Mapping[str, Any] | None = None, on_row: Callable[[dict], None] | None = None,
        resume: bool = False, overwrite: bool = False) -> Run:
    """Runs ``config.method`` once and returns its ``Run`` (and writes it to ``out_dir``).

    While it writes ``out_dir`` the run holds that directory's lock (see
    ``fdjax.rundir.DirectoryLock``), taken before anything there is cleared or written, so a
    second run or resume on the same directory is refused with it untouched.

    Args:
        config: a validated config (see ``fdjax.config``).
        out_dir: if given, receives ``config.toml``, ``metrics.jsonl``, checkpoints (see
            ``config.checkpoint``), ``nodes.json`` and the final parameters
            (``global_params.npz``, ``small_params.npz``).
        data: the result of ``prepare_data(config)``, to share one split across runs; or a
            ``(splits, fed)`` pair of the caller's own making (``fdjax.data.Splits`` and
            ``split_federated``'s result), which the run records as ``data.source =
            "caller"`` in its ``config.toml``: such a run cannot be resumed from the command
            line (a one-line error), only from Python with the same data.
        models: ``{"global": ..., "small": ...}`` (either or both): the distillation server's
            and the averaged model, each a ``flax.linen.Module``, a factory
            ``factory(num_classes=..., input_shape=...)`` returning one, or an import path
            ``"package.module:factory"`` (see ``fdjax.core.models.ModelSpec``); instead of
            ``models.global_model``/``small_model`` or the presets. ``config.toml`` records a
            factory by its import path where it has one, anything else as ``"caller"`` (such a
            run resumes only from Python, with the same models).
        on_row: called with each metrics row as it is produced (progress bars).
        resume: continue the killed run in ``out_dir`` from its newest usable checkpoint
            (``config`` must be the one in ``out_dir/config.toml``).
        overwrite: replace the run that ``out_dir`` already holds. Off by default, so that a
            finished run's results (hours of compute, perhaps) are never lost to a rerun by
            accident; a directory that holds a run (``config.toml`` or ``metrics.jsonl``) is
            then refused.

    With ``config.backend = "ray"`` each node's computation runs in a Ray actor (see
    ``fdjax.runtime.ray_backend``); the outputs are the same.

    Raises:
        ValueError: for a bad output directory, one that another process is writing, one that
            holds a run without ``overwrite``, a missing or unreadable dataset, or (with
            ``resume``) no usable checkpoint; nothing is written to ``out_dir`` before the data
            has loaded. With the Ray backend also when Ray is not installed, cannot be
            reached or cannot place the actors. ``ModelError`` (a ``ValueError``) for a model
            that cannot be built, before anything is written.
    """
    config = _as_recorded(config, data, models)
    method = get_method(config.method)
    rundir = _open_run_dir(out_dir, config, resume, overwrite)
    try:
        deployment = _deployment(config)
        splits, fed = data if data is not None else prepare_data(config)
        specs = _specs(config, method, splits, models)
        if deployment is None:
            return _run(config, method, rundir, splits, fed, on_row, resume, None, specs)
        try:
            deployment.open()
            return _run(config, method, rundir, splits, fed, on_row, resume, deployment, specs)
        finally:
            deployment.close()
    finally:
        if rundir is not None:
            rundir.close()


def _as_recorded(config: Config, data, models: Mapping[str, Any] | None) -> Config:
    """``config`` as a run or comparison records it, given what the caller handed in.

    Data or models that came from Python are marked so (``data.source``, ``models.*_model``);
    a config whose data or model only the caller can give, given without it, is the one-line
    error here, before anything is opened or written.
    """
    if data is not None and not isinstance(data, PreparedData):
        config = from_caller(config)
    elif data is None and config.data.source == CALLER:
        prepare_data(config)  # raises the one-line error
    config = with_models(config, models)
    for role in MODEL_ROLES:
        _model_source(config, role, models)  # raises for a "caller" model not handed in
    return config


#: What ``models=`` may name, and the setting each records to.
MODEL_ROLES = {"global": "models.global_model", "small": "models.small_model"}


def with_models(config: Config, models: Mapping[str, Any] | None) -> Config:
    """``config`` as a run records it when ``models`` (``{"global": ..., "small": ...}``, each
    an import path, a factory or a ``flax.linen.Module``) were handed in from Python.

    A factory that a module-level name imports back to is recorded by that import path (so the
    run resumes from its ``config.toml`` alone); any other object as ``"caller"``.

    Raises:
        ModelError: for a role other than ``"global"`` and ``"small"``.
    """
    if not models:
        return config
    unknown = sorted(set(models) - set(MODEL_ROLES))
    if unknown:
        raise ModelError(f"models: unknown role {unknown[0]!r}; the roles are 'global' (the "
                         f"distillation server's model) and 'small' (the averaged model)")
    changes = {}
    for role, given in models.items():
        if given is not None:
            changes[f"{role}_model"] = (given if isinstance(given, str)
                                        else import_path(given) or CALLER_MODEL)
    return config.replace(models=dataclasses.replace(config.models, **changes))


def _model_source(config: Config, role: str, models: Mapping[str, Any] | None) -> Any:
    """What builds the ``role`` model: the object handed in, else the import path, else the
    preset."""
    given = (models or {}).get(role)
    if given is not None:
        return given
    path = getattr(config.models, f"{role}_model")
    if path == CALLER_MODEL:
        raise ModelError(f'{MODEL_ROLES[role]} = "caller": this run\'s {role} model was handed '
                         f'in from Python (fdjax.run(..., models=...)) and cannot be built '
                         f'again; resume it from Python with the same models')
    return path or getattr(config.models, f"{role}_preset")


def model_specs(config: Config, splits, models: Mapping[str, Any] | None = None
                ) -> tuple[ModelSpec, ModelSpec]:
    """The global and small models' specs for ``config`` on data shaped like ``splits``."""
    m = config.models
    shape, classes = splits.train.image_shape, splits.train.num_classes
    return tuple(ModelSpec(_model_source(config, role, models), shape, classes, width, m.norm,
                           m.grads, key=MODEL_ROLES[role])
                 for role, width in (("global", m.global_width), ("small", m.small_width)))


@dataclasses.dataclass
class _Specs:
    """The run's models (``ModelSpec``s, keys of ``fdjax.programs``) and its three costs."""

    large: ModelSpec
    small: ModelSpec
    client: ModelSpec
    client_cost: Cost
    server_cost: Cost
    forward_cost: Cost
    #: fixed seconds per distilled example of each ensemble-teacher member beyond the first
    member_rate: float = 0.0


def _specs(config: Config, method: Method, splits, models: Mapping[str, Any] | None = None
           ) -> _Specs:
    """The run's specs, each model the method uses built and checked (a ``ModelError`` here
    comes before anything of the run is written)."""
    c = config.cost
    large, small = model_specs(config, splits, models)
    large_clients = method.clients_train == "large"
    client = large if large_clients else small
    for spec in {large, small} if method.distill_mode is not None else {client}:
        programs.model(spec)
    client_rate = (c.large_client_seconds_per_example
                   if large_clients and c.large_client_seconds_per_example is not None
                   else c.client_seconds_per_example)
    forward_rate = (c.server_seconds_per_example if c.forward_seconds_per_example is None
                    else c.forward_seconds_per_example)
    member_rate = (c.client_seconds_per_example / 3 if c.teacher_seconds_per_example is None
                   else c.teacher_seconds_per_example)
    return _Specs(large, small, client, Cost(c.mode, client_rate),
                  Cost(c.mode, c.server_seconds_per_example), Cost(c.mode, forward_rate),
                  member_rate)


@dataclasses.dataclass
class _Components:
    """A run turned into its parts, before any of them runs (``_build``)."""

    config: Config
    ctx: Context
    clock: Clock
    devices: list[Device]
    clients: list[Client]
    client_nodes: list
    averaging: Any
    distiller: DistillationServer | None
    published: Register
    observer_programs: tuple[Any, Any]
    test: dict

    def global_params(self) -> Any:
        return self.distiller.params if self.distiller else self.averaging.params

    def small_params(self) -> Any:
        return self.averaging.params if self.distiller else None


def _build(config: Config, method: Method, splits, fed, deployment, specs: _Specs
           ) -> _Components:
    """Turns a config into its nodes (clients, both servers), clock and channels.

    The nodes are built before the event loop exists, so a resumed run can restore their state
    and start the loop's clock at the checkpoint's time.
    """
    key = jax.random.key(config.seed)
    clock = deployment.clock() if deployment else Clock(virtual=config.clock == "virtual")
    network = Network(config.cost.latency, config.cost.bandwidth)
    trainer = programs.trainer(specs.client, config.clients.optimizer,
                               config.clients.learning_rate, config.clients.batch_size)
    ctx = Context(clock, asyncio.Event())
    server_device = Device("server", config.server.device_speed, config.server.device_slots)
    distill_device = (Device("distiller", config.server.device_speed, 1)
                      if config.server.separate_devices else server_device)
    published, to_server = Register(network), Mailbox(network)
    clients, client_nodes = _client_nodes(config, ctx, fed, trainer, specs.client,
                                          specs.client_cost, key, to_server, deployment)
    averaging = _averaging(config, method, ctx, server_device, clients, to_server, published,
                           specs, key, deployment)
    distiller = (_distiller(config, method, ctx, distill_device, averaging, published, splits,
                            fed, specs, key, deployment)
                 if method.distill_mode is not None else None)
    observed = ((programs.evaluator(specs.large), programs.evaluator(specs.small))
                if distiller else (programs.evaluator(specs.client), None))
    devices = [server_device, distill_device] + [c.device for c in clients]
    return _Components(config, ctx, clock, devices, clients, client_nodes, averaging,
                       distiller, published, observed, as_device_data(splits.test.arrays()))


def _averaging(config: Config, method: Method, ctx: Context, device: Device,
               clients: list[Client], inbox: Mailbox, published: Register, specs: _Specs,
               key: jax.Array, deployment) -> Any:
    """The averaging server: the method's node class with the config's settings."""
    a, dc, cc = config.aggregation, config.distill, config.clients
    start = programs.model(specs.client).init(jax.random.fold_in(key, 2))
    return method.averaging(
        ctx, device, start, clients, inbox, specs.server_cost, published,
        wait_for_distiller=method.waits_for_distiller, mix_distilled=method.mixes_distilled,
        mix_alpha=dc.mix_alpha, staleness=dc.staleness, staleness_a=dc.staleness_a,
        staleness_b=dc.staleness_b, rule=aggregation_rule(config),
        max_delta_norm=a.max_delta_norm, round_timeout=a.round_timeout, quorum=a.quorum,
        accept_late=not method.waits_for_distiller,
        sample=(ClientSampler(cc.count, cc.per_round, config.seed)
                if cc.per_round < cc.count else None),
        executor=deployment.averaging() if deployment else None,
        hand_over=dc.teacher if method.distill_mode is not None else "average",
        **method.options(config))


def _gate(config: Config, splits, fed, specs: _Specs, proxy: dict) -> tuple[dict, Any]:
    """The forward gate's labeled holdout and ``LeadGate``, and the distillation set without
    the holdout where it was cut from it."""
    dc = config.distill
    if dc.gate_holdout_from == "test":  # cut by prepare_data, apart from all training data
        if splits.holdout is None or len(splits.holdout) != dc.gate_holdout:
            raise ValueError("run(data=...): the data was prepared without the gate's "
                             "test holdout; build it with prepare_data(config)")
        held = splits.holdout.arrays()
    else:  # cut from the distillation set, which shrinks by it
        kept = fed.proxy_indices[:-dc.gate_holdout]
        proxy = splits.train.subset(kept, keep_labels=config.data.keep_proxy_labels).arrays()
        held = splits.train.subset(fed.proxy_indices[-dc.gate_holdout:]).arrays()
    gate = LeadGate(programs.evaluator(specs.large), programs.evaluator(specs.small),
                    as_device_data(held), specs.forward_cost)
    return proxy, gate


def _distiller(config: Config, method: Method, ctx: Context, device: Device, averaging: Any,
               published: Register, splits, fed, specs: _Specs, key: jax.Array,
               deployment) -> DistillationServer:
    """The distillation server, its distillers built (or, on Ray, built in its actor)."""
    dc = config.distill
    settings = programs.DistillSettings(dc.optimizer, dc.learning_rate, dc.batch_size,
                                        dc.steps_per_chunk, dc.temperature, dc.label_weight,
                                        dc.augment)
    builders = {"reverse": functools.partial(programs.distiller, specs.large, specs.small,
                                             dataclasses.replace(settings, teacher=dc.teacher))}
    if method.forward:
        builders["forward"] = functools.partial(programs.distiller, specs.small, specs.large,
                                                settings)
    reverse = builders["reverse"]()
    forward = builders["forward"]() if method.forward else None
    large_state = reverse.init(programs.model(specs.large).init(jax.random.fold_in(key, 1)))
    proxy, gate = fed.proxy.arrays(), None
    if method.mixes_distilled and dc.forward_gate == "lead":
        proxy, gate = _gate(config, splits, fed, specs, proxy)
    executor = None
    if deployment is not None:  # the programs are built again inside the actor
        examples = {"reverse": (large_state, averaging.params)}
        if forward is not None:
            examples["forward"] = (forward.init(averaging.params), large_state.params)
        executor = deployment.distillation(builders, proxy, examples)
    return DistillationServer(
        ctx, device, large_state, reverse, forward,
        proxy if deployment else as_device_data(proxy), specs.server_cost,
        jax.random.fold_in(key, 200), published, averaging, method.distill_mode,
        reverse_chunks=dc.chunks_per_round, forward_chunks=dc.forward_chunks,
        forward_every=dc.forward_every, forward_cost=specs.forward_cost, gate=gate,
        executor=executor, member_seconds_per_example=specs.member_rate)


class _Recorder:
    """Completes each evaluation into a metrics row, keeps it, writes and reports it, and stops
    the run at its target accuracy."""

    def __init__(self, parts: _Components, state: RunState, rundir: RunDirectory | None,
                 on_row: Callable[[dict], None] | None):
        self.parts, self.state, self.rundir, self.on_row = parts, state, rundir, on_row
        self.rows: list[dict] = state.rows

    def __call__(self, row: dict) -> None:
        parts, config, distiller = self.parts, self.parts.config, self.parts.distiller
        row.update(method=config.method, seed=config.seed, round=parts.averaging.round,
                   distill_chunks=distiller.chunks if distiller else 0,
                   last_staleness=(distiller.staleness[-1]
                                   if distiller and distiller.staleness else None),
                   **self.state.fault_counters())
        if distiller is not None and distiller.gate is not None:
            row.update(gate_checks=distiller.gate_checks, gate_opens=distiller.gate_opens,
                       forwards=distiller.forwards)
        self.rows.append(row)
        if self.rundir is not None:
            self.rundir.append(row)
        if self.on_row is not None:
            self.on_row(row)
        target = config.stop.target_accuracy
        if target is not None and row["global_accuracy"] >= target:
            parts.ctx.stop.set()


async def _simulate(parts: _Components, observer: Observer, record: _Recorder,
                    start_time: float) -> None:
    """Runs the nodes until the run stops (its budget, its target, ``max_rounds``), then
    records the final state."""
    ctx, config = parts.ctx, parts.config
    client_tasks = [asyncio.ensure_future(supervise(ctx, c) if isinstance(c, Client)
                                          else c.run()) for c in parts.client_nodes]
    tasks = [asyncio.ensure_future(parts.averaging.run())]
    if parts.distiller is not None:
        tasks.append(asyncio.ensure_future(parts.distiller.run(parts.averaging.params)))
    tasks.append(asyncio.ensure_future(observer.run()))
    all_gone = asyncio.ensure_future(asyncio.gather(*client_tasks))
    waiters = [asyncio.ensure_future(ctx.stop.wait()), all_gone]
    if config.stop.time_budget is not None:
        waiters.append(asyncio.ensure_future(
            parts.clock.sleep(config.stop.time_budget - start_time)))
    try:
        done, _ = await asyncio.wait(waiters + tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task in tasks and task.exception() is not None:
                raise task.exception()
        if all_gone in done:
            raise RuntimeError("every client crashed and none comes back; see the "
                               "'crashed' events for why")
    finally:
        for task in tasks + waiters + client_tasks:
            task.cancel()
        await asyncio.gather(*tasks, *waiters, *client_tasks, return_exceptions=True)
    if not record.rows or record.rows[-1]["time"] < parts.clock.now():
        record(observer.evaluate())  # the final state, at the moment the run stopped


def _run(config: Config, method: Method, rundir: RunDirectory | None, splits, fed,
         on_row: Callable[[dict], None] | None, resume: bool, deployment, specs: _Specs
         ) -> Run:
    """``run`` with the run directory checked, the data loaded and the backend connected:
    builds the run's parts, restores them if resuming, simulates, and collects the result."""
    if rundir is not None and not resume:
        rundir.start_fresh(config_to_toml(config))
    parts = _build(config, method, splits, fed, deployment, specs)
    state = RunState(config, parts.clock, parts.averaging, parts.distiller, parts.clients, [],
                     rundir)
    start = state.resume(parts.published) if resume else state.fresh_start()

    def round_done(r: int) -> None:
        state.round_done(r)
        if config.stop.max_rounds is not None and r >= config.stop.max_rounds:
            parts.ctx.stop.set()

    parts.averaging.on_round = round_done
    record = _Recorder(parts, state, rundir, on_row)
    placement = deployment.wait_started() if deployment else None
    observer = Observer(parts.ctx, config.stop.eval_interval, parts.global_params,
                        parts.small_params if parts.distiller else None,
                        *parts.observer_programs, parts.test, record,
                        first_delay=start.first_delay, wall_offset=start.wall)
    state.observer = observer
    loop = parts.clock.new_loop(start.time)
    wall = time.perf_counter()
    try:
        _run_to_completion(loop, _simulate(parts, observer, record, start.time))
    finally:
        loop.close()
        if rundir is not None:
            rundir.checkpoints.close()
    result = _result(parts, state, rundir, time.perf_counter() - wall, deployment, placement)
    if rundir is not None:
        _write_outputs(result, rundir, parts.clock.now(), state.fault_counters())
    return result


def _result(parts: _Components, state: RunState, rundir: RunDirectory | None, wall: float,
            deployment, placement: dict | None) -> Run:
    clock, averaging, distiller = parts.clock, parts.averaging, parts.distiller
    devices = {d.name: d.intervals for d in parts.devices}
    nodes = {c.name: c.stats.as_dict() for c in parts.clients}
    nodes[averaging.name] = averaging.stats.as_dict()
    if distiller:
        nodes[distiller.name] = distiller.stats.as_dict()
    saves = rundir.checkpoints.save_seconds if rundir is not None else []
    timing = {"wall_seconds": wall, "compute_seconds": clock.compute_seconds,
              "compile_seconds": clock.compile_seconds, "checkpoints": len(saves),
              "checkpoint_seconds": sum(saves)}
    if deployment is not None:  # placing the actors and compiling in them, before the clock
        timing["ray_start_seconds"] = deployment.start_seconds
        timing["ray_actors_reused"] = len(deployment.reused)  # taken from a pool (compare)
    if clock.calibrated:
        timing["calibrated_seconds_per_call"] = dict(sorted(clock.calibrated.items()))
    return Run(parts.config, state.rows, nodes, list(distiller.staleness) if distiller else [],
               parts.global_params(), parts.small_params(), parts.ctx.events, devices, timing,
               rundir.path if rundir is not None else None, rejected=list(averaging.rejected),
               resumes=list(state.resumes), placement=placement)


def _run_to_completion(loop: asyncio.AbstractEventLoop, coroutine) -> None:
    """Runs ``coroutine`` on ``loop``, on a worker thread if this thread already runs a loop.

    Jupyter kernels run an event loop in the main thread, and asyncio allows one running loop
    per thread; a run's own (possibly virtual-time) loop then gets a thread of its own.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        loop.run_until_complete(coroutine)
        return
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fdjax-run") as pool:
        pool.submit(loop.run_until_complete, coroutine).result()


def _client_nodes(config: Config, ctx: Context, fed, trainer: LocalTrainer,
                  client_spec: ModelSpec, cost: Cost, key: jax.Array, to_server: Mailbox,
                  deployment=None) -> tuple[list[Client], list]:
    """The clients, and the nodes that run them: each client, or a cohort per shared device.

    Clients named by ``faults.clients`` are ``FaultyClient``s (not allowed in cohorts: a cohort
    trains its members in one call, so one member cannot misbehave on its own). With a Ray
    ``deployment`` each client trains in an actor of its own that holds its examples.
    """
    cc = config.clients
    prefix = "client" if cc.devices is None else "clients"
    devices = [Device(f"{prefix}{d}", speed) for d, speed in enumerate(config.device_speeds)]
    faults = list(enumerate(config.faults.parsed))
    clients = []
    example = programs.model(client_spec).init(jax.random.key(0)) if deployment else None
    build = functools.partial(programs.trainer, client_spec, cc.optimizer, cc.learning_rate,
                              cc.batch_size)
    for i, part in enumerate(fed.clients):
        arrays = part.arrays()
        args = (ctx, i, devices[i % len(devices)],
                arrays if cc.cohort or deployment else as_device_data(arrays), trainer,
                cc.local_epochs, cost, jax.random.fold_in(jax.random.fold_in(key, 100), i),
                to_server)
        mine = [(n, f) for n, f in faults if f.client == i]
        executor = deployment.client(i, build, arrays, example) if deployment else None
        clients.append(FaultyClient(*args, faults=mine, executor=executor) if mine
                       else Client(*args, executor=executor))
    if not cc.cohort:
        return clients, clients
    cohort = programs.cohort(client_spec, cc.optimizer, cc.learning_rate, cc.batch_size,
                             cc.cohort_size, cc.cohort_lanes, cc.cohort_devices)
    cohorts = []
    for d, device in enumerate(devices):
        members = clients[d::len(devices)]
        pool = ClientPool.from_datasets([m.data for m in members])
        cohorts.append(ClientCohort(ctx, device, members, cohort, pool, cc.local_epochs, cost))
    return clients, cohorts


def _ray_backend():
    """``fdjax.runtime.ray_backend``, the one module that imports Ray (an optional extra)."""
    try:
        from fdjax.runtime import ray_backend
    except ModuleNotFoundError as err:
        if err.name is None or err.name.split(".")[0] != "ray":
            raise
        raise ValueError('backend = "ray" needs Ray, an optional extra: '
                         'pip install "fdjax[ray]"') from None
    return ray_backend


def _deployment(config: Config):
    """The Ray actors of a run with ``backend = "ray"`` (not started yet); None in-process."""
    if config.backend != "ray":
        return None
    rb, r = _ray_backend(), config.ray
    roles = [rb.Role(cpus, gpus, parse_resources(resources), r.gpu_memory_fraction)
             for cpus, gpus, resources in ((r.server_cpus, r.server_gpus, r.server_resources),
                                           (r.client_cpus, r.client_gpus, r.client_resources))]
    num_cpus = r.num_cpus
    if r.address is None and num_cpus is None:
        num_cpus = rb.local_cpus(r.server_cpus, r.client_cpus, config.clients.count)
    return rb.Deployment(r.address, num_cpus, r.num_gpus, *roles, r.start_timeout,
                         pool=rb.current_pool())


@contextlib.contextmanager
def _ray_session(config: Config):
    """One Ray connection for several runs (a comparison), and one pool of actors that they
    reuse (``ray_backend.reuse_actors``: each node's actor starts once, not once per run), or
    nothing in-process."""
    if config.backend != "ray":
        yield
        return
    rb, deployment = _ray_backend(), _deployment(config)
    with rb.session(deployment.address, deployment.num_cpus, deployment.num_gpus), \
            rb.reuse_actors():
        yield


def _open_run_dir(out_dir: str | Path | None, config: Config, resume: bool,
                  overwrite: bool = False) -> RunDirectory | None:
    """The run directory, locked for this process and checked, but not yet written to (see
    ``RunDirectory.open``); the caller closes it."""
    if out_dir is None:
        if resume:
            raise ValueError("resume needs the run directory of the run to continue")
        return None
    rundir = RunDirectory(out_dir, config.checkpoint.keep)
    rundir.open(resume=resume, overwrite=overwrite)
    return rundir


def _save_params(path: Path, params: Any) -> None:
    flat = {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    np.savez(tmp, **flat)
    tmp.replace(path)


def _write_outputs(result: Run, rundir: RunDirectory, duration: float, faults: dict) -> None:
    """Writes the final parameters, then ``nodes.json``, which marks the run finished."""
    _save_params(rundir.path / "global_params.npz", result.global_params)
    if result.small_params is not None:
        _save_params(rundir.path / "small_params.npz", result.small_params)
    record = {"duration": duration, "nodes": result.nodes, "staleness": result.staleness,
              "timing": result.timing, "faults": faults, "rejected": result.rejected,
              "resumes": result.resumes}
    if result.placement is not None:
        record["placement"] = result.placement
    rundir.write_nodes(record)


def load_run(path: str | Path, config: Config | None = None) -> Run:
    """A finished run read back from its directory: its rows, nodes and what ``nodes.json``
    records, without the event log, device intervals and parameters (which stay in
    ``global_params.npz`` and ``small_params.npz``).

    A resumed comparison keeps its finished runs this way instead of running them again.

    Args:
        path: a run directory with ``nodes.json`` (a finished run).
        config: the run's config (default: read from ``path/config.toml``).
    """
    path = Path(path)
    record = json.loads((path / "nodes.json").read_text())
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    if config is None:
        from fdjax.config import load_config

        config = load_config(path / "config.toml")
    return Run(config, rows, record["nodes"], record.get("staleness", []), None, None, [], {},
               record.get("timing", {}), path, rejected=record.get("rejected", []),
               resumes=record.get("resumes", []), placement=record.get("placement"))


@dataclasses.dataclass
class Comparison:
    """Several methods (and seeds) run on one config and one data split.

    Attributes:
        origins: per method, for each seed, how its run came about: ``"run"``; after a resume,
            ``"kept"`` (it had finished, read back with ``load_run``), ``"resumed"`` (continued
            from its checkpoint) or ``"restarted"`` (interrupted before a usable checkpoint, so
            run again from the start).
    """

    config: Config
    runs: dict[str, list[Run]]
    target: float
    reference: str | None = None
    origins: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def results(self) -> dict:
        per_method = {m: [r.summary(self.target) for r in runs] for m, runs in self.runs.items()}
        return report.results_json(per_method, self.target, self.reference)

    def table(self) -> str:
        return report.table_markdown(self.results())

    def figure(self, path: str | Path) -> Path:
        return report.plot_accuracy({m: [r.rows for r in runs] for m, runs in self.runs.items()},
                                    path, target=self.target)


def recorded_comparison(out_dir: str | Path) -> dict:
    """What the comparison in ``out_dir`` was asked for, as ``compare``'s keyword arguments:
    ``config``, ``methods``, ``seeds`` and ``target``; ``compare(**recorded_comparison(d),
    out_dir=d, resume=True)`` resumes it.

    Raises:
        ValueError: ``out_dir`` holds no comparison record, or its config is invalid.
    """
    record = ComparisonDirectory(out_dir).read_record()
    try:
        config = Config.from_dict(tomllib.loads(record["config"]))
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{str(Path(out_dir) / 'compare.json')!r}: invalid config: {err}"
                         ) from None
    return {"config": config, "methods": record["methods"], "seeds": record["seeds"],
            "target": record["target"]}


def compare(config: Config, methods: Sequence[str], seeds: int = 1,
            out_dir: str | Path | None = None, target: float | None = None,
            on_row: Callable[[dict], None] | None = None, *, overwrite: bool = False,
            resume: bool = False, data=None, models: Mapping[str, Any] | None = None
            ) -> Comparison:
    """Runs every method for ``seeds`` seeds (config.seed, config.seed + 1, ...).

    All methods of one seed share one data split. ``target`` is the accuracy whose time the
    table reports (default ``config.stop.target_accuracy``, else 0.6). With ``out_dir``, the
    comparison holds that directory's lock, records what it was asked for in
    ``compare.json``, runs each method into ``out_dir/<method>/seed<k>/`` and writes
    ``figure.png``, ``table.md`` and ``results.json`` (last).

    Args:
        overwrite: replace the comparison ``out_dir`` holds (off by default, as for ``run``).
        data: a ``(splits, fed)`` pair of the caller's own, used by every method and seed (a
            seed then changes the models' initialisation and the runs' keys, not the split);
            recorded as ``data.source = "caller"``, as for ``run``.
        models: the models of every run, recorded as for ``run``; a model that cannot be
            built is an error before anything is written.
        resume: continue the killed comparison in ``out_dir`` (the other arguments must be
            those it recorded: see ``recorded_comparison``). Its finished runs are kept, the
            interrupted one resumes from its newest usable checkpoint (or starts again without
            one), and the rest run.

    Raises:
        ValueError: for an unknown method, ``seeds`` < 1, and the ``run`` errors; with
            ``out_dir``, also when another process writes it, it holds a comparison and
            neither ``overwrite`` nor ``resume`` is given, or (``resume``) it holds no
            comparison, a finished one, or one with other settings.
    """
    for name in methods:
        get_method(name)
    config = _as_recorded(config, data, models)
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    if out_dir is None and resume:
        raise ValueError("resume needs the directory of the comparison to continue")
    record = ComparisonDirectory.record(config_to_toml(config), list(methods), seeds, target)
    cdir = ComparisonDirectory(out_dir) if out_dir is not None else None
    if cdir is not None:
        cdir.open(record, resume=resume, overwrite=overwrite)
    try:
        with _ray_session(config):  # one Ray instance and one set of actors for every run
            runs, origins = _compare_runs(config, methods, seeds, cdir, record, on_row, resume,
                                          data, models)
        comparison = Comparison(config, runs, report_target(config, target),
                                "sync-fwd" if "sync-fwd" in methods else None, origins)
        if cdir is not None:
            _write_comparison(comparison, cdir)
        return comparison
    finally:
        if cdir is not None:
            cdir.close()


def _compare_runs(config: Config, methods: Sequence[str], seeds: int,
                  cdir: ComparisonDirectory | None, record: dict,
                  on_row: Callable[[dict], None] | None, resume: bool, given=None,
                  models: Mapping[str, Any] | None = None
                  ) -> tuple[dict[str, list[Run]], dict[str, list[str]]]:
    """Every run of a comparison, and how each came about (``Comparison.origins``).

    A seed's data split is loaded only when one of its runs has to run. A fresh comparison
    loads the first one and builds its models before it writes anything, so bad data or a bad
    model leaves ``out_dir`` untouched.
    """
    runs: dict[str, list[Run]] = {m: [] for m in methods}
    origins: dict[str, list[str]] = {m: [] for m in methods}
    for k in range(seeds):
        seeded = config.replace(seed=config.seed + k)
        data = (functools.cache(functools.partial(prepare_data, seeded)) if given is None
                else lambda: given)
        if k == 0 and cdir is not None and not resume:
            for spec in model_specs(config, data()[0], models):
                programs.model(spec)
            cdir.start(record)
        for name in methods:
            cfg = seeded.replace(method=name)
            if cdir is None:
                result, origin = run(cfg, data=data(), models=models, on_row=on_row), "run"
            else:
                result, origin = _compare_one(cfg, cdir.run_dir(name, cfg.seed), data, on_row,
                                              resume, models)
            runs[name].append(result)
            origins[name].append(origin)
    return runs, origins


def _compare_one(config: Config, run_dir: Path, data: Callable[[], Any],
                 on_row: Callable[[dict], None] | None, resume: bool,
                 models: Mapping[str, Any] | None = None) -> tuple[Run, str]:
    """One run of a comparison written to ``run_dir``, and how it came about.

    The comparison already decided (and holds the lock on) what may be replaced, so a run that
    is not kept or resumed overwrites whatever its directory holds.
    """
    if resume and (run_dir / "nodes.json").exists():
        return load_run(run_dir, config), "kept"
    if resume and (run_dir / "config.toml").is_file():
        try:
            return run(config, run_dir, data=data(), models=models, on_row=on_row,
                       resume=True), "resumed"
        except CheckpointError as err:
            _logger.warning("compare: %s/seed%d starts again: %s", config.method, config.seed,
                            err)
        return run(config, run_dir, data=data(), models=models, on_row=on_row,
                   overwrite=True), "restarted"
    return run(config, run_dir, data=data(), models=models, on_row=on_row, overwrite=True), "run"


def _write_comparison(comparison: Comparison, cdir: ComparisonDirectory) -> None:
    """Writes the figure, the table, then ``results.json``, which marks the comparison
    finished; each through a temporary file and a rename."""
    tmp = cdir.path / ".figure.tmp.png"
    comparison.figure(tmp)
    tmp.replace(cdir.path / "figure.png")
    write_atomic(cdir.path / "table.md", comparison.table())
    write_atomic(cdir.path / "results.json", json.dumps(comparison.results(), indent=1))
