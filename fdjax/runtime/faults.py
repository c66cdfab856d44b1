"""Fault injection, a testing aid: clients that crash, hang or send garbage on cue.

``FaultyClient`` is a ``Client`` whose ``work`` misbehaves as the run's ``faults.clients`` setting
says, so the node code itself carries no test hooks. A fault is anything with ``kind``, ``round``
and ``comeback`` attributes (``fdjax.config.Fault``, parsed from ``KIND:CLIENT@ROUND[+SECONDS]``;
the runtime does not import the config layer). Each fault fires
once, the first time its client is served its round or a later one:

* ``crash``: the client raises; ``supervise`` logs it, and with ``+SECONDS`` the client comes back
  that long after and asks for the current model.
* ``hang``: the client never answers; with ``+SECONDS`` it gives up on the model it holds after
  that long and asks for the current one.
* garbage: the client trains, then sends an update with a NaN (``nan``) or Inf (``inf``) value, a
  leaf of the wrong shape (``shape``) or dtype (``dtype``), a huge change (``norm``), a missing
  leaf (``tree``), a model version it was never served (``version``) or a negative example
  count (``examples``).
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from fdjax.runtime.nodes import Client, Update


class InjectedCrash(RuntimeError):
    """The exception a ``crash`` fault raises inside a client."""


class FaultyClient(Client):
    """A client that misbehaves as ``faults`` say.

    Args:
        faults: ``(number, fault)`` pairs for this client; the numbers index the run's fault list,
            so a checkpoint can record which have fired.
        *args, **kwargs: as for ``Client``.
    """

    def __init__(self, *args: Any, faults: Sequence[tuple[int, Any]], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.faults = list(faults)
        self.fired: set[int] = set()

    def snapshot(self) -> tuple[dict, dict]:
        arrays, meta = super().snapshot()
        return arrays, {**meta, "fired": sorted(self.fired)}

    def restore(self, arrays: dict, meta: dict) -> None:
        super().restore(arrays, meta)
        self.fired = set(meta.get("fired", []))

    def _due(self, version: int) -> Any:
        for number, fault in self.faults:
            if number not in self.fired and version >= fault.round:
                self.fired.add(number)
                return fault
        return None

    async def work(self, params: Any, version: int) -> Update | None:
        fault = self._due(version)
        if fault is None:
            return await super().work(params, version)
        self.ctx.log(self.name, "fault", kind=fault.kind, version=version)
        if fault.kind == "crash":
            self.restart_after = fault.comeback
            raise InjectedCrash(f"injected crash of {self.name} on model version {version}")
        if fault.kind == "hang":
            if fault.comeback is None:
                await asyncio.Event().wait()  # never set: the client is silent for good
            await self.ctx.clock.sleep(fault.comeback)
            self.rejoin()
            return None
        update = await super().work(params, version)
        return corrupt(update, fault.kind)


def corrupt(update: Update, kind: str) -> Update:
    """The garbage a faulty client sends instead of ``update``."""
    if kind == "version":
        return dataclasses.replace(update, version=update.version + 1000)
    if kind == "examples":
        return dataclasses.replace(update, examples=-update.examples)
    if kind == "norm":
        return dataclasses.replace(update, params=jax.tree_util.tree_map(
            lambda x: x + jnp.asarray(1e3, x.dtype), update.params))
    if kind == "tree":
        return dataclasses.replace(update, params=_drop_first_leaf(update.params))
    change = {
        "nan": lambda x: x.reshape(-1).at[0].set(jnp.nan).reshape(x.shape),
        "inf": lambda x: x.reshape(-1).at[0].set(jnp.inf).reshape(x.shape),
        "shape": lambda x: jnp.zeros(x.shape[:-1] + (x.shape[-1] + 1,), x.dtype),
        "dtype": lambda x: x.astype(jnp.float16),
    }[kind]
    leaves, treedef = jax.tree_util.tree_flatten(update.params)
    return dataclasses.replace(
        # as a JAX array: an update computed elsewhere (a Ray actor) holds numpy leaves
        update, params=jax.tree_util.tree_unflatten(
            treedef, [change(jnp.asarray(leaves[0]))] + leaves[1:]))


def _drop_first_leaf(tree: Any) -> Any:
    """A copy of a nested dict of arrays without its first leaf (Flax parameters are such)."""
    key = next(iter(tree))
    if isinstance(tree[key], dict) and len(tree[key]) > 0:
        return {**tree, key: _drop_first_leaf(tree[key])}
    return {k: v for k, v in tree.items() if k != key}
