"""The Ray backend: each node's computation in a Ray actor, the runtime's own nodes on the real
clock coordinating them.

**Shape, and why.** Every client, the averaging server and the distillation server get one Ray
actor (``NodeWorker``), placed by the resources its role asks for. The actor holds what is heavy
to move and slow to build: the node's compiled programs (built once in the actor, on the
actor's own device) and its data (a client's examples, the server's proxy set), sent once when
the actor starts. The coordination stays in the driver, as the runtime's own asyncio nodes
(``Client``, ``AveragingServer``, ``DistillationServer``, ``Observer``, ``supervise``) on the real
clock: a node's computation submits an actor call and awaits its ``ObjectRef`` on the event loop
(``RayClock``), so nodes overlap for real on the cluster while the protocol (rounds, update
validation, timeouts and quorum, late updates, sampling, forward mixing) is the very code an
in-process run executes, not a second copy of it.

Actors are stateless between calls: node state (models, optimizer states, keys, counters) lives
in the driver's nodes and crosses to and from the actors as numpy host arrays through Ray's
object store. That costs a transfer per call (a few MB for the models fdjax trains, shared
memory on one machine), and buys three things: checkpoints and ``--resume`` work unchanged (the
driver holds everything a snapshot needs); a lost actor loses only a compiled program; and a
killed client actor looks to the runtime exactly like a crashed client (the awaited call raises,
``supervise`` logs it, asynchronous runs go on and a synchronous round closes after
``aggregation.round_timeout`` with ``aggregation.quorum``). The driver also runs the observer's
evaluations, which charge no node. The alternative, each node's whole loop inside its actor,
would need the channels rebuilt on Ray (the mailbox and register are asyncio objects) and a
second copy of the protocol wiring; this shape keeps one.

**Actors reused across runs.** A run without a pool starts its actors and kills them when it
ends. Within ``reuse_actors`` (``fdjax compare`` opens one for its runs) a run takes each
node's actor from an ``ActorPool`` and gives it back alive: actors are stateless between calls,
so a later run only loads its own programs and data into it (``NodeWorker.load``), and skips
the new process, its imports (JAX, Flax, fdjax) and Ray's placement.

**JAX in actors.** Each actor sets its JAX environment through ``runtime_env["env_vars"]``
before JAX starts: CPU-only actors ``JAX_PLATFORMS=cpu`` (no probing for accelerators); GPU
actors ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` (allocate as needed instead of 75% of the GPU at
start) and ``XLA_PYTHON_CLIENT_MEM_FRACTION`` (and its newer name ``XLA_CLIENT_MEM_FRACTION``)
capped at ``ray.gpu_memory_fraction``, by default 90% of the actor's GPU share, so actors
sharing a GPU (``server_gpus = 0.5`` puts both servers on one) fit beside each other.

**Clusters with a token.** A cluster started with ``RAY_AUTH_MODE=token`` (as the README's
steps start one: otherwise anyone who reaches the head's ports can run code on it) refuses a
driver without its token; ``session`` turns Ray's refusal, a traceback of its retries, into a
one-line error that says the cluster requires a token and how to give it.

This is the only module of fdjax that imports ``ray`` (an optional extra: ``pip install
"fdjax[ray]"``).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import math
import os
import socket
import time
import uuid
from typing import Any, Callable, Iterator, Mapping, NamedTuple

import jax
import numpy as np
import ray
import ray.exceptions

from fdjax.runtime.clock import Clock
from fdjax.runtime.compiled import as_device_data
from fdjax.runtime.executors import Program, local_epochs

#: The fraction of an actor's GPU share its JAX may fill, leaving room for CUDA contexts.
GPU_SHARE_HEADROOM = 0.9

_logger = logging.getLogger("fdjax")


def host(tree: Any) -> Any:
    """A pytree's arrays as numpy host arrays: what crosses Ray's object store."""
    return jax.device_get(tree)


def key_data(key: jax.Array) -> np.ndarray:
    """A typed PRNG key as the plain integers it is made of (typed keys do not pickle)."""
    return np.asarray(jax.random.key_data(key))


class ActorLost(RuntimeError):
    """A node's Ray actor died (killed, or its process or machine was lost)."""


def warm_up_waves(warm_ups: Mapping[str, list], where: Mapping[str, dict]) -> list[list[str]]:
    """The nodes to warm up, in two waves: clients that share a Ray node and a persistent JAX
    compilation cache compile the same programs, so one of them compiles first and the others
    then load the programs from the cache instead of compiling them all at once (three client
    actors on two cores compiled the same programs three times over). Everything else warms up
    in the first wave; without a cache every client compiles for itself, all at once."""
    first, later, seen = [], [], set()
    for node, calls in warm_ups.items():
        if not calls:
            continue
        cache = where[node].get("compilation_cache")
        group = (where[node]["node_id"], cache)
        if node.startswith("client") and cache and group in seen:
            later.append(node)
        else:
            first.append(node)
            if node.startswith("client"):
                seen.add(group)
    return [wave for wave in (first, later) if wave]


class NodeWorker:
    """A Ray actor holding one node's compiled programs and data; stateless between calls.

    Args:
        programs: name -> a function that builds the program (called once, in the actor, so
            the program compiles for the actor's own device; functions of importable modules
            pickle by name).
        data: the node's examples or proxy set (numpy arrays), put on the actor's device once.
    """

    def __init__(self, programs: Mapping[str, Callable[[], Any]] | None = None,
                 data: Mapping[str, np.ndarray] | None = None):
        self.load(programs or {}, data)

    def load(self, programs: Mapping[str, Callable[[], Any]],
             data: Mapping[str, np.ndarray] | None) -> None:
        """Replaces the node's programs and data: a reused actor (``ActorPool``) takes a new
        run's. The previous run's are dropped first, so both are never held at once."""
        self.programs, self.data = {}, None
        self.programs = {name: build() for name, build in programs.items()}
        self.data = as_device_data(data) if data is not None else None

    def holds(self) -> list[str]:
        """The names of the programs the actor holds (a reused actor: its latest run's)."""
        return sorted(self.programs)

    def warm_up(self, calls: list[tuple[str, tuple]]) -> None:
        """Runs each ``(method, args)`` once and drops the result: compiles the node's programs
        for the run's shapes before the run's clock starts."""
        for method, args in calls:
            jax.block_until_ready(getattr(self, method)(*args))

    def where(self) -> dict:
        """Where the actor runs: host, process, Ray node and JAX devices (the run records it)."""
        return {"host": socket.gethostname(), "pid": os.getpid(),
                "node_id": ray.get_runtime_context().get_node_id(),
                "jax_devices": [str(d) for d in jax.devices()],
                "compilation_cache": jax.config.jax_compilation_cache_dir or None}

    def train(self, params: Any, key: np.ndarray, version: int, epochs: int) -> Any:
        return host(local_epochs(self.programs["trainer"], self.data, params,
                                 jax.random.wrap_key_data(key), version, epochs))

    def chunk(self, name: str, state: Any, teacher: Any, key: np.ndarray) -> Any:
        return host(self.programs[name].chunk(state, teacher, self.data,
                                              jax.random.wrap_key_data(key)))

    def call(self, program: Program, *args: Any, **static: Any) -> Any:
        return host(program(*args, **static))


class Role(NamedTuple):
    """What each actor of a role (server or client) asks Ray for."""

    cpus: float
    gpus: float
    resources: dict[str, float]
    gpu_memory_fraction: float | None = None

    def env_vars(self) -> dict[str, str]:
        """JAX settings of the role's actors (see the module docstring)."""
        if self.gpus <= 0:
            return {"JAX_PLATFORMS": "cpu"}
        fraction = self.gpu_memory_fraction or GPU_SHARE_HEADROOM * min(1.0, self.gpus)
        return {"XLA_PYTHON_CLIENT_PREALLOCATE": "false",
                "XLA_PYTHON_CLIENT_MEM_FRACTION": f"{fraction:.3f}",
                "XLA_CLIENT_MEM_FRACTION": f"{fraction:.3f}"}

    def options(self, name: str) -> dict:
        return {"num_cpus": self.cpus, "num_gpus": self.gpus, "resources": dict(self.resources),
                "name": name, "max_restarts": 0,
                "runtime_env": {"env_vars": self.env_vars()}}


@contextlib.contextmanager
def session(address: str | None, num_cpus: int | None = None, num_gpus: int | None = None
            ) -> Iterator[None]:
    """Connects to Ray for the duration of the block, unless this process already is.

    With no ``address`` it starts a local Ray instance (a laptop needs nothing else) and stops
    it afterwards; with one (``"auto"``, ``"HOST:6379"``, ``"ray://HOST:10001"``) it joins that
    cluster and leaves it running. Re-entrant: a comparison opens one session for all its runs,
    and tests may hold their own.

    Raises:
        ValueError: when the cluster cannot be reached, or refuses this driver for want of
            its token (token authentication, see ``_connect_error``), in one line.
    """
    if ray.is_initialized():
        yield
        return
    _check_reachable(address)
    try:
        if address is None:
            ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
                     logging_level=logging.WARNING)
        else:
            ray.init(address=address, logging_level=logging.WARNING)
    # AuthenticationError (Ray >= 2.52) is a RayError; older Rays have no such class
    except (ConnectionError, RuntimeError, ValueError, ray.exceptions.RayError) as err:
        raise ValueError(_connect_error(address, err)) from None
    try:
        yield
    finally:
        ray.shutdown()


#: What Ray's refusal of a driver without the cluster's token says: ``ray.init`` raises
#: ``AuthenticationError`` itself (token mode here, no token found) or a ``ConnectionError``
#: wrapping the GCS's ``Unauthenticated: ... InvalidAuthToken`` (no token or a wrong one sent).
TOKEN_REFUSAL_MARKS = ("AuthenticationError", "InvalidAuthToken", "Unauthenticated")


def _connect_error(address: str | None, err: BaseException) -> str:
    """The one-line reason ``ray.init`` failed; a refusal for want of the cluster's token says
    so and how to give the token (Ray's own text is a traceback of its retries)."""
    where = f"ray.address {address!r}" if address is not None else "a local Ray instance"
    if not _refused_for_token(err):
        return f"cannot start or reach {where}: {' '.join(str(err).split())}"
    if "no authentication token was found" in str(err):  # ray.init stopped before asking
        why = "RAY_AUTH_MODE=token here, but no token was found"
    elif (os.environ.get("RAY_AUTH_MODE") or "").lower() == "token":
        why = "it refused this driver's token (RAY_AUTH_MODE=token here): not the cluster's"
    else:
        why = "it refused this driver, which sent none (RAY_AUTH_MODE is not token here)"
    return (f"{where}: the Ray cluster requires a token; {why}. Set RAY_AUTH_MODE=token and "
            f"give the cluster's token (`ray get-auth-token` on its head prints it) as "
            f"RAY_AUTH_TOKEN, in the file RAY_AUTH_TOKEN_PATH names, or in ~/.ray/auth_token")


def _refused_for_token(err: BaseException | None) -> bool:
    """Whether ``err``, or an error it was raised from, is Ray's token refusal."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if any(mark in f"{type(err).__name__}: {err}" for mark in TOKEN_REFUSAL_MARKS):
            return True
        err = err.__cause__ or err.__context__
    return False


def _check_reachable(address: str | None, seconds: float = 10.0) -> None:
    """Fails fast, in one line, on a ``HOST:PORT`` address nothing listens at (``ray.init``
    would retry for minutes); ``auto`` and ``ray://`` addresses Ray checks itself."""
    if address is None or address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"ray.address {address!r}: expected auto, HOST:PORT or "
                         f"ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=seconds).close()
    except OSError as err:
        raise ValueError(f"ray.address {address!r}: no Ray cluster answers there ({err}); "
                         f"start one with `ray start --head` or check the address") from None


class RayClock(Clock):
    """The real clock, where a computation is an actor call: its ``ObjectRef`` is awaited on
    the event loop (no thread per waiting node), so any number of nodes wait at once."""

    def __init__(self, lost: set[str] | None = None) -> None:
        super().__init__(virtual=False)
        #: the nodes whose actor was found gone (their deployment gives them to no later run)
        self.lost = lost if lost is not None else set()

    async def run_real(self, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        result = fn()
        if isinstance(result, _ActorCall):
            try:
                result = await result.ref
            except ray.exceptions.RayActorError as err:
                self.lost.add(result.node)
                raise ActorLost(f"the Ray actor of {result.node} is gone ({type(err).__name__}: "
                                f"killed, or its process or machine was lost)") from None
        else:  # a computation the driver runs itself
            result = await asyncio.to_thread(jax.block_until_ready, result)
        # submission, transfers and the actor's compute: what the node waited for
        self.compute_seconds += time.perf_counter() - start
        return result


class _ActorCall(NamedTuple):
    """A computation submitted to a node's actor: what ``RayClock`` awaits."""

    ref: Any
    node: str


class RayExecutor:
    """A node's executor (``fdjax.runtime.executors``) whose computations run in its actor.

    Each call ships its arguments as host arrays (typed keys as their integers) and returns at
    once with the call in flight; the run's ``RayClock`` awaits it on the event loop. The actor
    holds the node's programs and data, so a client's ``train`` or the distillation server's
    ``chunk`` sends only models and keys.
    """

    def __init__(self, worker: Any, node: str):
        self.worker, self.node = worker, node

    def call(self, program: Program, *args: Any, **static: Any) -> _ActorCall:
        return _ActorCall(self.worker.call.remote(program, *host(args), **static), self.node)

    def train(self, params: Any, key: jax.Array, version: int, epochs: int) -> _ActorCall:
        return _ActorCall(self.worker.train.remote(host(params), key_data(key), version, epochs),
                          self.node)

    def chunk(self, name: str, state: Any, teacher: Any, key: jax.Array) -> _ActorCall:
        return _ActorCall(self.worker.chunk.remote(name, host(state), host(teacher),
                                                   key_data(key)), self.node)


class ActorPool:
    """Node actors kept alive from one run to the next, within one Ray session.

    Why: a new actor is a new Python process that imports JAX, Flax and fdjax (4 to 5 s of CPU
    each on a 2-core machine) and waits for Ray to place it, and a small run may compute for
    less time than its five actors take to start. A comparison runs several methods with the
    same nodes and roles, so ``fdjax compare`` holds one pool for all its runs (see
    ``reuse_actors``): a run takes each node's actor from the pool, where one of the same role
    waits, loads its own programs and data into it (``NodeWorker.load``; actors are stateless
    between calls, so nothing else carries over) and gives it back when it ends. The pool kills
    every actor when it closes and waits until Ray holds them dead, as a run without a pool does.

    An actor that was lost during a run (killed, its process or machine gone) is not given back:
    the next run starts a new one for that node. Idle actors a run does not take (a run with
    fewer clients, or a node whose role asks for other resources) are killed when that run
    starts, so they hold nothing it needs.
    """

    def __init__(self) -> None:
        #: node -> (its role, the idle actor, the actor's name)
        self.idle: dict[str, tuple[Role, Any, str]] = {}
        #: actors started for the pool's runs, and actors a run took from the pool
        self.started = 0
        self.reused = 0

    def take(self, node: str, role: Role) -> tuple[Any, str] | None:
        """The idle actor of ``node`` if it has ``role``; None (and the actor retired) if not."""
        held = self.idle.pop(node, None)
        if held is None:
            return None
        if held[0] != role:
            _kill([held[1]], [held[2]])
            return None
        self.reused += 1
        return held[1], held[2]

    def give_back(self, node: str, role: Role, actor: Any, name: str) -> None:
        self.idle[node] = (role, actor, name)

    def retire_idle(self) -> None:
        """Kills every idle actor (waiting until Ray holds them dead)."""
        held, self.idle = list(self.idle.values()), {}
        if held:
            _kill([actor for _, actor, _ in held], [name for _, _, name in held])

    def close(self) -> None:
        if ray.is_initialized():
            self.retire_idle()
        self.idle.clear()


_POOL: contextvars.ContextVar[ActorPool | None] = contextvars.ContextVar("fdjax_actor_pool",
                                                                           default=None)


@contextlib.contextmanager
def reuse_actors() -> Iterator[ActorPool]:
    """Within the block, runs on Ray reuse one another's actors (``ActorPool``).

    The runs must share one Ray session that outlives them (``fdjax compare`` opens both; from
    Python, ``ray.init()`` or ``session`` first): a run that starts and stops its own Ray
    instance takes its actors down with it, so it kills them as it would without a pool.
    Re-entrant: an inner block uses the outer block's pool. Every actor is killed when the
    outermost block ends.
    """
    pool = _POOL.get()
    if pool is not None:
        yield pool
        return
    pool = ActorPool()
    token = _POOL.set(pool)
    try:
        yield pool
    finally:
        _POOL.reset(token)
        pool.close()


def current_pool() -> ActorPool | None:
    """The pool of the innermost ``reuse_actors`` block, or None."""
    return _POOL.get()


def _kill(actors: list[Any], names: list[str]) -> None:
    """Kills ``actors`` and waits until Ray no longer lists ``names`` (``_wait_dead``)."""
    for actor in actors:
        with contextlib.suppress(Exception):
            ray.kill(actor)
    if names:
        _wait_dead(names)


class Deployment:
    """The actors of one run: starts them (or takes them from a pool), waits until every one is
    placed, and kills them after (or gives them back to the pool).

    Actors are named ``fdjax/<tag>/<node>`` (``ray list actors`` shows which is which), with the
    tag of the run that started them; a pooled actor keeps its name in later runs.

    Args:
        address, num_cpus, num_gpus: as for ``session``; the session is opened by ``open`` and
            closed by ``close`` (a no-op where Ray was already connected).
        server, client: what each actor of the role asks for.
        start_timeout: seconds to wait for every actor to be placed and started.
        pool: an ``ActorPool`` to take actors from and give them back to; it is used only when
            Ray was already connected at ``open`` (the session outlives the run).
    """

    def __init__(self, address: str | None, num_cpus: int | None, num_gpus: int | None,
                 server: Role, client: Role, start_timeout: float,
                 pool: ActorPool | None = None):
        self.address, self.num_cpus, self.num_gpus = address, num_cpus, num_gpus
        self.roles = {"server": server, "client": client}
        self.start_timeout = start_timeout
        self.pool = pool
        self.tag = uuid.uuid4().hex[:8]
        self.actors: dict[str, Any] = {}
        #: node -> its actor's name
        self.names: dict[str, str] = {}
        #: node -> its ``load`` call (programs built, data on the device)
        self.loads: dict[str, Any] = {}
        #: nodes whose actor was found gone during the run (``RayClock.lost``)
        self.lost: set[str] = set()
        #: nodes whose actor came from the pool
        self.reused: set[str] = set()
        #: node -> its role's name, programs and data (``start``'s arguments)
        self._args: dict[str, tuple[str, Mapping[str, Callable[[], Any]], Any]] = {}
        #: node -> the warm-up calls its actor makes once placed (see ``wait_started``)
        self.warm_ups: dict[str, list[tuple[str, tuple]]] = {}
        #: wall seconds from the first actor's start until every actor was placed and warm
        self.start_seconds = 0.0
        self._started_at: float | None = None
        self._stack = contextlib.ExitStack()

    def open(self) -> None:
        if not ray.is_initialized():
            self.pool = None  # this run's session ends with it, and so would pooled actors
        self._stack.enter_context(session(self.address, self.num_cpus, self.num_gpus))

    def clock(self) -> RayClock:
        return RayClock(self.lost)

    def start(self, node: str, role: str, programs: Mapping[str, Callable[[], Any]],
              data: Mapping[str, np.ndarray] | None, warm_up: list[tuple[str, tuple]] = ()
              ) -> Any:
        """Starts node ``node``'s actor (placement and ``warm_up`` are awaited by
        ``wait_started``)."""
        if self._started_at is None:
            self._started_at = time.perf_counter()
        self._args[node] = (role, programs, data)
        self.warm_ups[node] = list(warm_up)
        taken = self.pool.take(node, self.roles[role]) if self.pool is not None else None
        if taken is None:
            return self._new_actor(node)
        self.reused.add(node)
        self.actors[node], self.names[node] = taken
        self.loads[node] = taken[0].load.remote(programs, data)
        return taken[0]

    def _new_actor(self, node: str) -> Any:
        """Starts a new actor for ``node`` (its ``start`` arguments) and loads it."""
        role, programs, data = self._args[node]
        name = f"fdjax/{self.tag}/{node}"
        actor = ray.remote(NodeWorker).options(**self.roles[role].options(name)).remote()
        if self.pool is not None:
            self.pool.started += 1
        self.actors[node], self.names[node] = actor, name
        self.loads[node] = actor.load.remote(programs, data)
        return actor

    def client(self, index: int, trainer: Callable[[], Any], data: Mapping[str, np.ndarray],
               example_params: Any) -> RayExecutor:
        """The executor of client ``index``: an actor of its own that builds its trainer and
        holds its ``data``; ``example_params`` (any model of the client's shape) warm it up."""
        warm = [("train", (host(example_params), key_data(jax.random.key(0)), 0, 1))]
        node = f"client{index}"
        return RayExecutor(self.start(node, "client", {"trainer": trainer}, data, warm), node)

    def averaging(self) -> RayExecutor:
        """The averaging server's executor: an actor that runs whatever ``Program`` it is sent
        (an aggregation, a mix, a method's own server step), compiled there once."""
        return RayExecutor(self.start("averaging", "server", {}, None), "averaging")

    def distillation(self, builders: Mapping[str, Callable[[], Any]],
                     proxy: Mapping[str, np.ndarray], examples: Mapping[str, tuple[Any, Any]]
                     ) -> RayExecutor:
        """The distillation server's executor: an actor holding its distillers and proxy set.

        Args:
            builders: ``"reverse"`` and, if used, ``"forward"`` -> a function building it.
            examples: the same names -> a (student state, teacher parameters) pair of the
                run's shapes, to warm the programs up.
        """
        warm = [("chunk", (name, host(state), host(teacher), key_data(jax.random.key(0))))
                for name, (state, teacher) in examples.items()]
        return RayExecutor(self.start("distillation", "server", builders, proxy, warm),
                           "distillation")

    def wait_started(self) -> dict[str, dict]:
        """Waits until every actor runs and has compiled its programs; returns where each runs.

        The run's clock starts after this, so neither Ray's start-up nor XLA's compilation in
        the actors counts as any node's time (the virtual clock excludes compilation too);
        ``start_seconds`` records how long it took.

        Raises:
            ValueError: naming the actors Ray could not place within ``start_timeout`` (the
                cluster lacks what their role asks for) or that failed to start.
        """
        if self.pool is not None:  # what this run did not take would hold resources it needs
            self.pool.retire_idle()
        self._replace_dead_reused()
        refs = {node: actor.where.remote() for node, actor in self.actors.items()}
        _, pending = ray.wait(list(refs.values()), num_returns=len(refs),
                              timeout=self.start_timeout)
        if pending:
            missing = [node for node, ref in refs.items() if ref in pending]
            asks = {name: role.options("")["resources"] | {"CPU": role.cpus, "GPU": role.gpus}
                    for name, role in self.roles.items()}
            raise ValueError(f"Ray could not start the actors of {', '.join(missing)} within "
                             f"ray.start_timeout ({self.start_timeout:g} s): the cluster "
                             f"({ray.cluster_resources()}) lacks what their role asks for "
                             f"(per actor: {asks}); see the [ray] settings")
        try:
            ray.get(list(self.loads.values()))
            where = {node: ray.get(ref) for node, ref in refs.items()}
            for wave in warm_up_waves(self.warm_ups, where):
                ray.get([self.actors[node].warm_up.remote(self.warm_ups[node]) for node in wave])
            self.start_seconds = time.perf_counter() - (self._started_at or time.perf_counter())
            return where
        except ray.exceptions.RayError as err:
            raise ValueError(f"a Ray actor failed to start: {' '.join(str(err).split())[:500]}"
                             ) from None

    def _replace_dead_reused(self) -> None:
        """Starts a new actor for each node whose pooled actor died after its last run ended
        (a kill Ray's head had not recorded yet when that run gave it back)."""
        refs = {node: self.actors[node].where.remote() for node in sorted(self.reused)}
        if not refs:
            return
        _, pending = ray.wait(list(refs.values()), num_returns=len(refs),
                              timeout=self.start_timeout)  # one wait for all, not one each
        for node, ref in refs.items():
            if ref not in pending:
                try:
                    ray.get(ref)
                    continue
                except ray.exceptions.RayActorError:
                    pass
            _kill([self.actors[node]], [self.names[node]])
            self.reused.discard(node)
            self._new_actor(node)

    def close(self) -> None:
        """Kills every actor of the run, waits until Ray has them dead, and leaves the session
        (stopping a Ray fdjax started); so a run returns only once its actors are gone.

        With a pool, the actors that are still alive (listed by Ray, and none of the run's
        calls found them gone) go back to it instead; the others are killed as above."""
        try:
            keep: set[str] = set()
            if self.pool is not None and self.actors:
                listed = set(ray.util.list_named_actors())
                keep = {node for node in self.actors
                        if node not in self.lost and self.names[node] in listed}
                for node in keep:
                    self.pool.give_back(node, self.roles[self._args[node][0]],
                                        self.actors[node], self.names[node])
            doomed = [node for node in self.actors if node not in keep]
            _kill([self.actors[node] for node in doomed], [self.names[node] for node in doomed])
            self.actors.clear()
        finally:
            self._stack.close()


def _wait_dead(names: list[str], seconds: float = 30.0) -> None:
    """Waits until none of the actors ``names`` is registered with Ray any more.

    The cause this cures: ``ray.kill`` only sends the request. The driver's core worker
    hands it to the GCS (Ray's head) without waiting for the reply (``CoreWorker::
    KillActor`` calls ``AsyncKillActor`` with no callback), so the actor is still ALIVE,
    and listed, until the GCS gets to it; a query sent right after may be served first.
    A run that returned straight after ``ray.kill`` could leave live actors on the
    cluster for a while (the flake: ``['fdjax/<tag>/client0']`` still listed by the
    test's ``list_named_actors`` after a run, on a loaded machine). The GCS marks a
    killed actor DEAD and releases its name in one step (``GcsActorManager::
    DestroyActor``, before it replies), so once ``ray.util.list_named_actors`` (a query
    to the GCS, public API) no longer lists an actor's name, Ray holds that actor dead.
    Logs the ones still listed after ``seconds`` (a lost head, say) rather than hanging.
    """
    deadline, pause = time.monotonic() + seconds, 0.01
    left = set(names)
    while True:
        try:
            left &= set(ray.util.list_named_actors())
        except Exception as err:  # the cluster is gone: so are its actors
            _logger.warning("cannot check that the run's actors ended: %s", err)
            return
        if not left or time.monotonic() > deadline:
            break
        time.sleep(pause)  # poll the GCS, not a fixed wait: the loop ends on the state
        pause = min(2 * pause, 0.2)
    if left:
        _logger.warning(
            "Ray still lists these actors %g s after ray.kill: %s", seconds,
            ", ".join(sorted(left)))


def local_cpus(server_cpus: float, client_cpus: float, clients: int) -> int:
    """Logical CPUs a local instance needs so every actor is placed, at least the machine's.

    Logical CPUs only schedule actors; on a laptop with fewer cores they share the cores.
    """
    return max(os.cpu_count() or 1, math.ceil(2 * server_cpus + clients * client_cpus))
