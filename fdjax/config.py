"""One validated, immutable configuration for a federated run.

A run is described by a TOML file (sections are tables) plus ``--set key=value`` overrides, so
experiments are reproducible from a single written file (``config_to_toml``). Everything is checked
up front, before any JAX work starts, and every error names the offending key in dotted form.
Only the standard library is imported, so the CLI can validate a config without loading JAX.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

# Each closed list of names has one source: where it is implemented.
from fdjax.core.aggregation import AGGREGATION_RULES, STALENESS_KINDS
from fdjax.core.augment import AUGMENTATIONS
from fdjax.core.distillation import TEACHERS
from fdjax.core.layers import GRADS
from fdjax.core.models import CALLER as MODEL_CALLER, NORMS, PRESETS
from fdjax.core.training import OPTIMIZERS
from fdjax.data.partition import SCHEMES
from fdjax.data.sources import CALLER, SOURCES
from fdjax.runtime.clock import COST_MODES
from fdjax.runtime.cohort_mesh import COHORT_DEVICES
from fdjax.runtime.compiled import LANES
from typing import Any, Callable, ClassVar, NamedTuple, Sequence

_NONE_WORDS = ("none", "null")


class ConfigError(ValueError):
    """A configuration problem; the one-line message names the offending dotted key."""


# Value checks: each returns an error message or None. They run after the type check.
def _gt(lo: float) -> Callable[[Any], str | None]:
    return lambda v: None if v > lo else f"must be > {lo}, got {v!r}"


def _ge(lo: float) -> Callable[[Any], str | None]:
    return lambda v: None if v >= lo else f"must be >= {lo}, got {v!r}"


def _within(lo: float, hi: float, open_lo: bool = False) -> Callable[[Any], str | None]:
    ok = (lambda v: lo < v <= hi) if open_lo else (lambda v: lo <= v <= hi)
    text = f"{'(' if open_lo else '['}{lo}, {hi}]"
    return lambda v: None if ok(v) else f"must be in {text}, got {v!r}"


def _one_of(*options: str) -> Callable[[Any], str | None]:
    names = ", ".join(repr(o) for o in options)
    return lambda v: None if v in options else f"must be one of {names}, got {v!r}"


def _model_path(value: Any) -> str | None:
    """A model setting: None, "caller", or the syntax of an import path (whether it imports
    is checked when the run builds its models, which needs the data's shape)."""
    if value is None or value == MODEL_CALLER:
        return None
    if not isinstance(value, str) or not re.fullmatch(_IMPORT_PATH, value):
        return f"must be an import path 'package.module:factory', got {value!r}"
    return None


_IMPORT_PATH = r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*"


def _f(default: Any = None, check: Callable[[Any], str | None] | None = None, *,
       factory: Callable[[], Any] | None = None, infinite: bool = False) -> Any:
    """A dataclass field whose value check lives in its metadata.

    Numbers must be finite unless ``infinite`` (then ``inf``, never ``nan``, is a meaningful
    value of the field, such as an unlimited bandwidth).
    """
    metadata = {"check": check, "infinite": infinite}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _method_names() -> tuple[str, ...]:
    from fdjax.methods import names  # imported on first use: the methods import the runtime

    return names()


_OPTIMIZERS = OPTIMIZERS
_PRESETS = tuple(PRESETS)
_GRADS = ("auto", *GRADS)  # "auto": the fastest way on the backend (fdjax.core.layers)


class _Section:
    """Shared validation: type-check, coerce and range-check every field on construction."""

    _section: ClassVar[str] = ""

    def _key(self, name: str) -> str:
        return f"{self._section}.{name}" if self._section else name

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            key, value = self._key(f.name), getattr(self, f.name)
            value = _coerce(key, value, hints[f.name], f.metadata.get("infinite", False))
            object.__setattr__(self, f.name, value)
            check = f.metadata.get("check")
            if check is None or value is None or isinstance(value, _Section):
                continue
            for item in value if isinstance(value, list) else [value]:
                if (problem := check(item)) is not None:
                    raise ConfigError(f"{key}: {problem}")
        self._check()

    def _check(self) -> None:
        """Cross-field checks; sections override this."""


def _coerce(key: str, value: Any, hint: Any, infinite: bool = False) -> Any:
    """Check ``value`` against a field's type; ints become floats where floats are expected.

    A bool is rejected as a number because TOML ``true`` in a count is always a mistake, and
    ``nan`` or ``inf`` (which TOML and ``--set`` both read as floats) where a finite number is
    meant: ``learning_rate = inf`` would run, and train to chance.
    """
    args = typing.get_args(hint)
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args
    if optional:
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    if isinstance(hint, type) and issubclass(hint, _Section):
        if not isinstance(value, hint):
            raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r}")
        return value
    if typing.get_origin(hint) is list:
        item = typing.get_args(hint)[0]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected list of {item.__name__}, got {value!r}")
        return [_coerce(key, v, item, infinite) for v in value]
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if math.isnan(value) or (math.isinf(value) and not (infinite and value > 0)):
            raise ConfigError(f"{key}: must be a finite number, got {value!r}")
        return float(value)
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint in (str, bool) and isinstance(value, hint):
        return value
    raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r}")


@dataclass(frozen=True)
class DataConfig(_Section):
    """Where examples come from and how they are split among clients."""

    _section: ClassVar[str] = "data"
    # "caller" is recorded, never chosen: the run's data was handed in from Python
    source: str = _f("embedded", _one_of(*SOURCES, CALLER))
    name: str = _f("cifar10")
    data_dir: str | None = _f(None)
    download: bool = _f(False)
    root: str | None = _f(None)
    limit: int | None = _f(None, _ge(1))
    test_limit: int | None = _f(None, _ge(1))
    # The split accuracy is reported on. A slice of the training split (for instance
    # "train[45000:47000]" with data.limit = 45000) is a validation set for tuning settings
    # without looking at the test split.
    test_split: str = _f("test")
    # "dirichlet": each class split over the clients by Dirichlet(alpha) shares (Yurochkin et
    # al. 2019, flwr-datasets' recipe); "dirichlet_client": each client's label mix drawn from
    # Dirichlet(alpha * overall mix), equal sizes (Hsu et al. 2019; more skewed for one alpha).
    partition: str = _f("iid", _one_of(*SCHEMES))
    alpha: float = _f(0.5, _gt(0))
    shards_per_client: int = _f(2, _ge(1))
    proxy_size: int = _f(300, _ge(1))
    keep_proxy_labels: bool = _f(False)

    def _check(self) -> None:
        if self.source == "folder" and self.root is None:
            raise ConfigError("data.root: required when data.source is 'folder'")
        if self.limit is not None and self.proxy_size >= self.limit:
            raise ConfigError(f"data.proxy_size: must be smaller than data.limit "
                              f"({self.limit}), got {self.proxy_size}")


@dataclass(frozen=True)
class ClientsConfig(_Section):
    """How many clients there are, how fast each is, and how they train locally."""

    _section: ClassVar[str] = "clients"
    count: int = _f(3, _ge(1))
    # Clients are weaker devices than the server machine (the paper's premise): a speed of 0.25
    # charges each client computation 4x its measured time on the virtual clock.
    speeds: list[float] = _f(check=_gt(0), factory=lambda: [0.25])
    local_epochs: int = _f(1, _ge(1))
    batch_size: int = _f(32, _ge(1))
    optimizer: str = _f("adam", _one_of(*_OPTIMIZERS))
    learning_rate: float = _f(1e-3, _gt(0))
    # Client machines: unset, every client has a device of its own; a number D places client i
    # on device i mod D, shared with the other clients there (one computation at a time), and
    # clients.speeds then gives the devices' speeds.
    devices: int | None = _f(None, _ge(1))
    # Train the clients a round selects on one shared device together, as one cohort; needs
    # clients.devices. cohort_size caps clients per compiled call (memory). cohort_lanes: "vmap"
    # maps one step over the whole cohort, "sequential" steps its clients in turn, "auto" picks
    # sequential on CPU (vmapped convolutions measured slower there) and vmap elsewhere.
    cohort: bool = _f(False)
    cohort_size: int = _f(64, _ge(1))
    cohort_lanes: str = _f("auto", _one_of(*LANES))
    # Split a vmapped cohort's clients over the host's local devices (multi-GPU, TPU host), one
    # compiled call over all of them per step: "auto" when there are several and the lanes are
    # vmap, "single" never, "all" always (forces vmap lanes; an error with one device).
    cohort_devices: str = _f("auto", _one_of(*COHORT_DEVICES))
    # Clients per round, as in FedAvg: a fraction of clients.count, or a count that overrides
    # it; drawn afresh each round from the seed and the round number.
    sample_fraction: float = _f(1.0, _within(0, 1, open_lo=True))
    sample_count: int | None = _f(None, _ge(1))

    def _check(self) -> None:
        if self.devices is not None and self.devices > self.count:
            raise ConfigError(f"clients.devices: must be at most clients.count ({self.count}), "
                              f"got {self.devices}")
        machines = ("clients.count", self.count) if self.devices is None else (
            "clients.devices", self.devices)
        if len(self.speeds) not in (1, machines[1]):
            raise ConfigError(f"clients.speeds: must have 1 or {machines[0]} ({machines[1]}) "
                              f"entries, got {len(self.speeds)}")
        if self.cohort_devices == "all" and self.cohort_lanes == "sequential":
            raise ConfigError('clients.cohort_devices: "all" shards vmapped lanes, which '
                              'clients.cohort_lanes = "sequential" rules out; set cohort_lanes '
                              'to "vmap" or "auto"')
        if self.cohort and self.devices is None:
            raise ConfigError("clients.cohort: needs clients that share devices; set "
                              "clients.devices (for instance 1: every client on one machine)")
        if self.sample_count is not None and self.sample_count > self.count:
            raise ConfigError(f"clients.sample_count: must be at most clients.count "
                              f"({self.count}), got {self.sample_count}")

    @property
    def per_round(self) -> int:
        """Clients sampled per round."""
        if self.sample_count is not None:
            return self.sample_count
        return max(1, int(round(self.sample_fraction * self.count)))


@dataclass(frozen=True)
class ServerConfig(_Section):
    """The machine(s) the global and small servers share."""

    _section: ClassVar[str] = "server"
    device_speed: float = _f(1.0, _gt(0))
    device_slots: int = _f(2, _ge(1))
    separate_devices: bool = _f(False)


@dataclass(frozen=True)
class ModelsConfig(_Section):
    """Architectures of the global (server) model and the small (client) model."""

    _section: ClassVar[str] = "models"
    global_preset: str = _f("cnn12", _one_of(*_PRESETS))
    small_preset: str = _f("cnn6", _one_of(*_PRESETS))
    # Any Flax module instead of a preset: "package.module:factory", where factory(num_classes=,
    # input_shape=) returns a flax.linen.Module whose __call__(images, *, train) gives logits
    # (fdjax.core.models.ModelSpec). It replaces the preset; the presets' own settings (width,
    # norm, grads) do not apply to it. "caller" records a module handed in from Python
    # (fdjax.run(..., models=...)) that no import path names.
    global_model: str | None = _f(None, _model_path)
    small_model: str | None = _f(None, _model_path)
    global_width: float = _f(0.5, _gt(0))
    small_width: float = _f(0.5, _gt(0))
    norm: str = _f("none", _one_of(*NORMS))
    # How gradients are computed (fdjax.core.layers): "auto" writes out the max-pool's and the
    # convolutions' bias gradients where JAX's default backend is the CPU (faster there) and
    # leaves them to XLA elsewhere;
    # "matmul" writes out the convolutions' weight gradients too; "xla" writes out nothing.
    grads: str = _f("auto", _one_of(*_GRADS))


@dataclass(frozen=True)
class DistillConfig(_Section):
    """Knowledge distillation between the small and global models on the proxy set."""

    _section: ClassVar[str] = "distill"
    temperature: float = _f(2.0, _gt(0))
    steps_per_chunk: int = _f(10, _ge(1))
    chunks_per_round: int = _f(1, _ge(1))
    forward_chunks: int = _f(1, _ge(1))
    forward_every: int = _f(5, _ge(1))  # async-fwd: forward-distil after every N reverse chunks
    # async-fwd: "always" forward-distils every forward_every chunks; "lead" first checks, on
    # gate_holdout labeled images, that the global model is more accurate than the averaged
    # small model, and skips the forward chunk otherwise (forward distillation from a weaker
    # teacher pulls the small model down). gate_holdout_from says where those images come from:
    # "proxy" cuts them from the distillation set (which shrinks by them); "test" takes the
    # tail of the test split, which evaluation then never uses (a server-side validation set
    # that leaves the clients' and the distillation data as every other method has them).
    forward_gate: str = _f("always", _one_of("always", "lead"))
    gate_holdout: int = _f(1000, _ge(1))
    gate_holdout_from: str = _f("proxy", _one_of("proxy", "test"))
    batch_size: int = _f(64, _ge(1))
    # The teacher of reverse distillation: "average", the round's averaged small model (the
    # paper); "ensemble", the round's accepted client models, their logits averaged (FedDF, Lin
    # et al. 2020): the averaging server hands the distillation server every member, and each
    # chunk pays a forward pass per member (cost.teacher_seconds_per_example with fixed costs).
    teacher: str = _f("average", _one_of(*TEACHERS))
    label_weight: float = _f(0.0, _within(0, 1))
    # Label-free augmentation of distillation batches; "flip_crop" is the CIFAR recipe (digits
    # are not mirror-symmetric, so the embedded default keeps "none").
    augment: str = _f("none", _one_of(*AUGMENTATIONS))
    optimizer: str = _f("adam", _one_of(*_OPTIMIZERS))
    learning_rate: float = _f(1e-3, _gt(0))
    mix_alpha: float = _f(0.5, _within(0, 1))
    staleness: str = _f("polynomial", _one_of(*STALENESS_KINDS))
    # The staleness function's parameters (Xie et al. 2019): polynomial (1 + s)^-a; hinge 1 up
    # to staleness b, then 1 / (a (s - b) + 1).
    staleness_a: float = _f(0.5, _gt(0))
    staleness_b: float = _f(4.0, _ge(0))


@dataclass(frozen=True)
class CostConfig(_Section):
    """How compute and communication time is charged on the run's clock."""

    _section: ClassVar[str] = "cost"
    # "measured": each call's wall time; "calibrated": each program's fastest of a few timed calls,
    # then that cost for every call (the same cost for every method of a comparison, and little
    # affected by other load on the machine); "fixed": the per-example costs below. The default
    # is "fixed" so that the default comparison's table is the same on every machine, whatever
    # its speed or load (measured, the digits' tiny models cost a few milliseconds a call, and
    # the four methods cross 60% within 1 to 4 virtual seconds in an order set by the machine).
    mode: str = _f("fixed", _one_of(*COST_MODES))
    client_seconds_per_example: float = _f(0.002, _ge(0))
    server_seconds_per_example: float = _f(0.001, _ge(0))
    # Fixed costs of the other programs, for a cost table measured per program (see
    # experiments/paper_cifar10/calibrate.py); unset, they cost the same as the two above.
    large_client_seconds_per_example: float | None = _f(None, _ge(0))  # fedavg-large clients
    forward_seconds_per_example: float | None = _f(None, _ge(0))  # forward distillation
    # distill.teacher = "ensemble": each member beyond the first adds a forward pass of the small
    # model per distilled example; unset, a third of client_seconds_per_example (a training
    # step is a forward pass, a backward pass of about twice its cost, and the update).
    teacher_seconds_per_example: float | None = _f(None, _ge(0))
    latency: float = _f(0.01, _ge(0))
    bandwidth: float = _f(1.0e8, _gt(0), infinite=True)  # inf: messages cost only latency


@dataclass(frozen=True)
class StopConfig(_Section):
    """When the run ends: whichever of the set limits is reached first."""

    _section: ClassVar[str] = "stop"
    # `fdjax compare` with no arguments (four methods on the embedded digits, fixed costs) runs
    # in about a minute on 2 CPU cores; in 60 virtual seconds every method passes 60% at a
    # distinct time and the three faster ones reach about 96%. Evaluations every 0.5 s
    # resolve the crossings within a round (the asynchronous methods' rounds last about 3 s,
    # and async-continuous's global model changes with every distillation chunk between them).
    time_budget: float | None = _f(60.0, _gt(0))
    target_accuracy: float | None = _f(None, _within(0, 1, open_lo=True))
    max_rounds: int | None = _f(None, _ge(1))
    eval_interval: float = _f(0.5, _gt(0))

    def _check(self) -> None:
        if self.time_budget is None and self.target_accuracy is None and self.max_rounds is None:
            raise ConfigError("stop: set at least one of stop.time_budget, "
                              "stop.target_accuracy, stop.max_rounds, or the run never ends")


@dataclass(frozen=True)
class AggregationConfig(_Section):
    """How the averaging server combines client updates and how long a round waits for them.

    A round closes when every client it served has answered, or, once ``round_timeout`` seconds
    (on the run's clock) have passed since it began, as soon as ``quorum`` valid updates are in.
    """

    _section: ClassVar[str] = "aggregation"
    rule: str = _f("fedavg", _one_of(*AGGREGATION_RULES))
    trim_fraction: float = _f(0.1, lambda v: None if 0 <= v < 0.5
                              else f"must be in [0, 0.5), got {v!r}")
    # Krum and Multi-Krum (Blanchard et al. 2017): the Byzantine clients f they withstand (their
    # guarantee needs more than 2f + 2 clients per round), and the m best-scored clients
    # Multi-Krum averages by examples (unset: the clients of the round minus f).
    num_byzantine: int = _f(1, _ge(0))
    multi_krum_keep: int | None = _f(None, _ge(1))
    max_delta_norm: float | None = _f(None, _gt(0))
    # Scale each update's change from the server's model down to this L2 norm (instead of
    # rejecting it, as max_delta_norm does); applied before the rule.
    clip_norm: float | None = _f(None, _gt(0))
    round_timeout: float | None = _f(None, _gt(0))
    quorum: int = _f(1, _ge(1))
    # fedbuff only (Nguyen et al. 2022): publish a model after every buffer_size updates, each
    # weighted by the staleness function of how many versions it is behind (constant,
    # polynomial (1 + s)^-a, hinge: 1 up to b, then 1 / (a (s - b) + 1)); drop updates more
    # than max_staleness versions behind (unset: keep all); server_learning_rate scales the step.
    buffer_size: int = _f(2, _ge(1))
    max_staleness: int | None = _f(None, _ge(0))
    staleness: str = _f("polynomial", _one_of(*STALENESS_KINDS))
    staleness_a: float = _f(0.5, _gt(0))
    staleness_b: float = _f(4.0, _ge(0))
    server_learning_rate: float = _f(1.0, _gt(0))


@dataclass(frozen=True)
class CheckpointConfig(_Section):
    """When a run with an output directory saves a checkpoint it can be resumed from.

    Checkpoints are taken at the end of an averaging round, after ``every_rounds`` rounds or once
    ``every_seconds`` wall-clock seconds have passed since the last one, whichever comes first;
    both none turns checkpointing off. ``keep`` (>= 2) are kept, so a corrupted newest one can
    fall back to the one before.
    """

    _section: ClassVar[str] = "checkpoint"
    every_rounds: int | None = _f(None, _ge(1))
    every_seconds: float | None = _f(60.0, _gt(0))
    keep: int = _f(2, _ge(2))


_RESOURCE = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_.:-]*)=(?P<amount>\d+(?:\.\d*)?)$")


def _resource_check(text: str) -> str | None:
    m = _RESOURCE.match(text.strip())
    if m is None or float(m["amount"]) <= 0:
        return f"expected NAME=AMOUNT with AMOUNT > 0 (a Ray custom resource), got {text!r}"
    if m["name"] in ("CPU", "GPU", "memory"):
        return f"{m['name']} is set by the role's cpus/gpus keys, not as a custom resource"
    return None


def parse_resources(entries: Sequence[str]) -> dict[str, float]:
    """``["NAME=AMOUNT", ...]`` (already checked) as the dict Ray's ``resources=`` takes."""
    return {name.strip(): float(amount) for name, amount in
            (entry.split("=", 1) for entry in entries)}


@dataclass(frozen=True)
class RayConfig(_Section):
    """Where the Ray backend (``backend = "ray"``) runs and how it places each node's actor.

    Every client, the averaging server and the distillation server become one Ray actor each;
    a role's ``*_cpus``, ``*_gpus`` and ``*_resources`` are what each of its actors asks Ray for,
    so placement follows the cluster: for instance ``client_resources = ["client_machine=1"]``
    with each client machine started by ``ray start --resources='{"client_machine": 1}'`` puts
    one client on each machine, and ``server_resources = ["server_machine=1"]`` with the head
    offering ``server_machine: 2`` puts both servers on it. Fractions share a CPU or GPU.
    """

    _section: ClassVar[str] = "ray"
    # None: fdjax starts a local Ray instance (and stops it afterwards); "auto" joins the
    # cluster this machine is part of (`ray start`), "ray://HOST:10001" joins one remotely.
    address: str | None = _f(None)
    # Logical CPUs and GPUs of a local instance fdjax starts (unset: enough CPUs for every
    # actor however many cores the machine has, and the GPUs Ray detects).
    num_cpus: int | None = _f(None, _ge(1))
    num_gpus: int | None = _f(None, _ge(0))
    server_cpus: float = _f(1.0, _ge(0))
    server_gpus: float = _f(0.0, _ge(0))
    server_resources: list[str] = _f(check=_resource_check, factory=list)
    client_cpus: float = _f(1.0, _ge(0))
    client_gpus: float = _f(0.0, _ge(0))
    client_resources: list[str] = _f(check=_resource_check, factory=list)
    # GPU memory each GPU actor's JAX may use (XLA_PYTHON_CLIENT_MEM_FRACTION); unset: 90% of
    # the actor's GPU share, so actors sharing a GPU fit beside each other.
    gpu_memory_fraction: float | None = _f(None, _within(0, 1, open_lo=True))
    # Seconds to wait for every actor to be placed and started before giving up with an error
    # (a cluster without the resources asked for would otherwise wait forever).
    start_timeout: float = _f(300.0, _gt(0))

    def _check(self) -> None:
        if self.address is not None and not self.address.strip():
            raise ConfigError("ray.address: must not be empty (unset it to start a local Ray)")
        for name in ("num_cpus", "num_gpus"):
            if self.address is not None and getattr(self, name) is not None:
                raise ConfigError(f"ray.{name}: only for a Ray instance fdjax starts itself; "
                                  f"the cluster at ray.address has its own")


FAULT_KINDS = ("crash", "hang", "nan", "inf", "shape", "dtype", "norm", "tree", "version",
               "examples")
_FAULT = re.compile(r"^(?P<kind>[a-z]+):(?P<client>\d+)@(?P<round>\d+)"
                    r"(?:\+(?P<comeback>\d+(?:\.\d*)?(?:[eE][+-]?\d+)?))?$")


class Fault(NamedTuple):
    """An injected fault: ``client`` misbehaves the first time it is served round ``round`` or a
    later one. ``comeback``: seconds after a crash or hang until the client returns (None:
    never)."""

    kind: str
    client: int
    round: int
    comeback: float | None = None


def parse_fault(text: str) -> Fault:
    """Parses ``KIND:CLIENT@ROUND[+SECONDS]``, e.g. ``crash:1@2+5`` or ``nan:0@3``.

    Raises:
        ValueError: naming what is wrong with ``text``.
    """
    m = _FAULT.match(text.strip())
    if m is None:
        raise ValueError(f"fault {text!r}: expected KIND:CLIENT@ROUND[+SECONDS], e.g. 'crash:1@2'")
    if m["kind"] not in FAULT_KINDS:
        raise ValueError(f"fault {text!r}: unknown kind {m['kind']!r}; choose one of "
                         f"{', '.join(FAULT_KINDS)}")
    if m["comeback"] is not None and m["kind"] not in ("crash", "hang"):
        raise ValueError(f"fault {text!r}: only crash and hang take +SECONDS (a comeback)")
    comeback = float(m["comeback"]) if m["comeback"] is not None else None
    return Fault(m["kind"], int(m["client"]), int(m["round"]), comeback)


def _fault_check(text: str) -> str | None:
    try:
        parse_fault(text)
    except ValueError as err:
        return str(err)
    return None


@dataclass(frozen=True)
class FaultsConfig(_Section):
    """Injected faults, a testing aid: each entry makes one client crash, hang or send garbage.

    Kinds: ``crash`` (the client raises), ``hang`` (it never answers), with ``+SECONDS`` it comes
    back after that long; garbage updates ``nan``, ``inf``, ``shape``, ``dtype``, ``norm`` (a huge
    change), ``tree`` (a missing leaf), ``version`` (built on a model version never served) and
    ``examples`` (a negative example count).
    """

    _section: ClassVar[str] = "faults"
    clients: list[str] = _f(check=_fault_check, factory=list)

    @property
    def parsed(self) -> list[Fault]:
        return [parse_fault(text) for text in self.clients]


_SECTIONS: dict[str, type[_Section]] = {
    "data": DataConfig, "clients": ClientsConfig, "server": ServerConfig, "models": ModelsConfig,
    "distill": DistillConfig, "cost": CostConfig, "stop": StopConfig,
    "aggregation": AggregationConfig, "checkpoint": CheckpointConfig, "faults": FaultsConfig,
    "ray": RayConfig}


@dataclass(frozen=True)
class Config(_Section):
    """The whole run: method, clock, seed and one instance of each section."""

    # One of the registered methods (fdjax.methods: one module each; a researcher's own
    # method is registered by its module before the config is built).
    method: str = _f("async-continuous", lambda v: _one_of(*_method_names())(v))
    clock: str = _f("virtual", _one_of("virtual", "real"))
    # Where the nodes run: "inprocess" (asyncio tasks and threads of this process) or "ray"
    # (each node's computation in a Ray actor; see [ray]).
    backend: str = _f("inprocess", _one_of("inprocess", "ray"))
    seed: int = _f(0, _ge(0))
    data: DataConfig = _f(factory=DataConfig)
    clients: ClientsConfig = _f(factory=ClientsConfig)
    server: ServerConfig = _f(factory=ServerConfig)
    models: ModelsConfig = _f(factory=ModelsConfig)
    distill: DistillConfig = _f(factory=DistillConfig)
    cost: CostConfig = _f(factory=CostConfig)
    stop: StopConfig = _f(factory=StopConfig)
    aggregation: AggregationConfig = _f(factory=AggregationConfig)
    checkpoint: CheckpointConfig = _f(factory=CheckpointConfig)
    faults: FaultsConfig = _f(factory=FaultsConfig)
    ray: RayConfig = _f(factory=RayConfig)

    def _check(self) -> None:
        from fdjax.methods import get_method

        problem = get_method(self.method).check(self)
        if problem is not None:
            raise ConfigError(problem)
        count = self.clients.count
        if self.backend == "ray" and self.clock != "real":
            raise ConfigError('clock: the Ray backend runs on the real clock; set clock = "real"')
        if self.backend == "ray" and self.clients.cohort:
            raise ConfigError("clients.cohort: not available with backend = \"ray\", where "
                              "every client is a Ray actor of its own")
        if self.aggregation.quorum > count:
            raise ConfigError(f"aggregation.quorum: must be <= clients.count ({count}), got "
                              f"{self.aggregation.quorum}")
        for fault in self.faults.parsed:
            if fault.client >= count:
                raise ConfigError(f"faults.clients: client {fault.client} does not exist "
                                  f"(clients.count is {count})")
        a, per_round = self.aggregation, self.clients.per_round
        if a.rule in ("krum", "multi_krum") and per_round <= 2 * a.num_byzantine + 2:
            raise ConfigError(f"aggregation.num_byzantine: Krum withstands f Byzantine clients "
                              f"only with more than 2f + 2 per round; {per_round} clients per "
                              f"round allow f <= {max(0, (per_round - 3) // 2)}, got "
                              f"{a.num_byzantine}")
        if a.multi_krum_keep is not None and a.multi_krum_keep > per_round:
            raise ConfigError(f"aggregation.multi_krum_keep: must be at most the clients "
                              f"sampled per round ({per_round}), got {a.multi_krum_keep}")
        if self.aggregation.quorum > self.clients.per_round:
            raise ConfigError(f"aggregation.quorum: must be <= the clients sampled per round "
                              f"({self.clients.per_round}), got {self.aggregation.quorum}")
        if self.distill.forward_gate == "lead":
            if (self.distill.gate_holdout_from == "proxy"
                    and self.distill.gate_holdout >= self.data.proxy_size):
                raise ConfigError(f"distill.gate_holdout: must be smaller than data.proxy_size "
                                  f"({self.data.proxy_size}), got {self.distill.gate_holdout}")
            if self.backend == "ray":
                raise ConfigError('distill.forward_gate: "lead" is not available with backend '
                                  '= "ray" yet (the gate evaluates in the driver process)')
        if self.distill.teacher == "ensemble" and self.backend == "ray":
            raise ConfigError('distill.teacher: "ensemble" is not available with backend = '
                              '"ray" yet (the distillation actor is built for one teacher model)')
        if self.faults.parsed and self.clients.cohort:
            raise ConfigError("faults.clients: cannot inject faults into clients trained as "
                              "cohorts (clients.cohort = true): a cohort trains its members in "
                              "one call, so one member cannot misbehave alone")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        """Build from a nested dict as ``tomllib`` returns; missing keys take defaults.

        Unknown sections and keys are errors, so a typo never silently runs the default.
        """
        top = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if key in _SECTIONS:
                kwargs[key] = _section_from_dict(key, value)
            elif key in top:
                kwargs[key] = value
            else:
                raise ConfigError(f"unknown key {key!r}")
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dict (sections as dicts); None values are omitted, as TOML has no null."""
        return _raw(self, keep_none=False)

    def replace(self, **changes: Any) -> Config:
        """A copy with top-level fields (or whole sections) changed, validated again."""
        return dataclasses.replace(self, **changes)

    @property
    def client_speeds(self) -> list[float]:
        """Relative speed of each client's device, ``clients.count`` entries."""
        c = self.clients
        return [self.device_speeds[i % len(self.device_speeds)] for i in range(c.count)]

    @property
    def device_speeds(self) -> list[float]:
        """Relative speed of each client device (one per client unless ``clients.devices``)."""
        c = self.clients
        machines = c.count if c.devices is None else c.devices
        return list(c.speeds) if len(c.speeds) > 1 else c.speeds * machines


def _section_from_dict(name: str, value: Any) -> _Section:
    if not isinstance(value, dict):
        raise ConfigError(f"{name}: expected a table, got {value!r}")
    cls = _SECTIONS[name]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, v in value.items():
        if key not in fields:
            raise ConfigError(f"unknown key '{name}.{key}'")
        # TOML has no null, so the string "none" disables an optional number (see config_to_toml).
        if (isinstance(v, str) and v.lower() in _NONE_WORDS and type(None) in
                typing.get_args(hints[key]) and str not in typing.get_args(hints[key])):
            v = None
        kwargs[key] = v
    return cls(**kwargs)


def _raw(obj: _Section, keep_none: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        value = getattr(obj, f.name)
        if isinstance(value, _Section):
            value = _raw(value, keep_none)
        elif isinstance(value, list):
            value = list(value)
        if value is not None or keep_none:
            out[f.name] = value
    return out


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def config_to_toml(cfg: Config) -> str:
    """Write ``cfg`` as TOML that loads back to an equal Config.

    An optional field that is None but defaults to a value is written as ``"none"``.
    """
    lines: list[str] = []
    for obj, header in [(cfg, None)] + [(getattr(cfg, n), n) for n in _SECTIONS]:
        if header is not None:
            lines += ["", f"[{header}]"]
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if isinstance(value, _Section) or (value is None and f.default is None):
                continue
            text = '"none"' if value is None else _toml_value(value)
            lines.append(f"{f.name} = {text}")
    return "\n".join(lines).lstrip("\n") + "\n"


def parse_override(text: str) -> tuple[str, object]:
    """Split ``key=value``; the value is read as a TOML value, else kept as a bare string.

    ``none`` or ``null`` gives None, so an optional limit can be switched off from the command line.
    """
    key, sep, raw = text.partition("=")
    key, raw = key.strip(), raw.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r}: expected key=value")
    if raw.lower() in _NONE_WORDS:
        return key, None
    try:
        parsed = tomllib.loads(f"v = {raw}")
    except tomllib.TOMLDecodeError:
        return key, raw
    return key, parsed["v"] if list(parsed) == ["v"] else raw


def _apply(d: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Set each override into a nested dict; validation happens once, after all of them."""
    for text in overrides:
        key, value = parse_override(text)
        parts = key.split(".")
        if len(parts) == 1 and parts[0] in _SECTIONS:
            raise ConfigError(f"{key}: is a section; set its keys as {key}.<key>")
        if len(parts) == 1:
            d[key] = value
        elif len(parts) == 2 and parts[0] in _SECTIONS:
            section = d.setdefault(parts[0], {})
            if not isinstance(section, dict):
                raise ConfigError(f"{parts[0]}: expected a table, got {section!r}")
            section[parts[1]] = value
        else:
            raise ConfigError(f"unknown key {key!r}")
    return d


def with_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """A copy of ``cfg`` with ``key=value`` overrides applied in order, then validated."""
    return Config.from_dict(_apply(_raw(cfg, keep_none=True), overrides))


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Read a TOML file (or start from defaults), apply overrides in order, and validate."""
    d: dict[str, Any] = {}
    if path is not None:
        try:
            d = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file '{path}' not found") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file '{path}': invalid TOML: {e}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file '{path}': cannot read: {e}") from None
    return Config.from_dict(_apply(d, overrides))
