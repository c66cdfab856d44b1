"""The method registry: a method is a ``Method`` registered by name, in a module of its own.

A method says which model the clients train, how the distillation server loops (or that there is
none), and which averaging-server node it runs (``AveragingServer`` or a subclass of it, which is
where a new aggregation protocol lives: see ``fdjax/methods/fedbuff.py``). ``fdjax.experiment``
builds the nodes it names and knows no method by name; the config's list of methods, the CLI's
choices and the contract test (``tests/runtime/test_method_contract.py``) all read this registry,
so a method added here (or by ``register`` in a researcher's own module, before the run) needs no
edit anywhere else.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from fdjax.runtime.nodes import AveragingServer

#: The distillation server's loops (``fdjax.runtime.nodes.DistillationServer``'s ``mode``).
DISTILL_MODES = ("sync", "round", "continuous")
#: Which model the clients train.
CLIENT_MODELS = ("small", "large")


@dataclasses.dataclass(frozen=True)
class Method:
    """How a method wires the nodes.

    Attributes:
        name: the method's name (config ``method``, ``fdjax run --method``).
        summary: its loop in one line (the package docstring's table, ``fdjax methods``).
        distill_mode: the distillation server's loop (one of ``DISTILL_MODES``), or None when
            there is no distillation server.
        forward: whether the distillation server also runs forward distillation.
        clients_train: which model clients train, "small" or "large".
        averaging: the averaging server's node class: ``AveragingServer`` or a subclass that
            overrides its loop; it is built with the same arguments, plus ``options(config)``.
        options: config -> the keyword arguments of ``averaging`` that only this method has.
        check: config -> a one-line problem with the config for this method, or None; the
            config's validation calls it, so a bad setting is refused before anything runs.
        paper: one of the paper's four methods (the default comparison, in registration order).
    """

    name: str
    summary: str
    distill_mode: str | None
    forward: bool = False
    clients_train: str = "small"
    averaging: type = AveragingServer
    options: Callable[[Any], dict] = lambda config: {}
    check: Callable[[Any], str | None] = lambda config: None
    paper: bool = False

    def __post_init__(self) -> None:
        if self.distill_mode not in DISTILL_MODES + (None,):
            raise ValueError(f"method {self.name!r}: distill_mode must be one of "
                             f"{DISTILL_MODES} or None, got {self.distill_mode!r}")
        if self.clients_train not in CLIENT_MODELS:
            raise ValueError(f"method {self.name!r}: clients_train must be one of "
                             f"{CLIENT_MODELS}, got {self.clients_train!r}")
        if not (isinstance(self.averaging, type) and issubclass(self.averaging, AveragingServer)):
            raise ValueError(f"method {self.name!r}: averaging must be AveragingServer or a "
                             f"subclass of it, got {self.averaging!r}")

    @property
    def waits_for_distiller(self) -> bool:
        """The averaging server takes each round's model from the distillation server."""
        return self.distill_mode == "sync"

    @property
    def mixes_distilled(self) -> bool:
        """The averaging server mixes asynchronously forward-distilled models in."""
        return self.distill_mode == "continuous" and self.forward


#: name -> method, in registration order.
METHODS: dict[str, Method] = {}


def register(method: Method, *, replace: bool = False) -> Method:
    """Adds ``method`` to the registry (a second method of one name is an error unless
    ``replace``); returns it, so a method module can write ``METHOD = register(Method(...))``."""
    if method.name in METHODS and not replace:
        raise ValueError(f"a method named {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def names() -> tuple[str, ...]:
    """Every registered method's name, in registration order."""
    return tuple(METHODS)


def paper_methods() -> tuple[str, ...]:
    """The paper's four methods, in the order of its table."""
    return tuple(name for name, m in METHODS.items() if m.paper)


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {list(METHODS)}")
    return METHODS[name]
