"""A cohort spread over a host's devices: its client (lane) axis sharded on a one-axis mesh.

On a host with several local devices (a multi-GPU machine, a TPU host) one ``vmap``-ed cohort
step can run on all of them at once: each device holds a slice of the lanes (their parameters,
optimizer states, plans and keys) and a copy of the client pool, and steps its lanes with no
communication, since clients never read each other's state. ``jax.shard_map`` states exactly
that, so the compiled step is one call over every device and never gathers a lane elsewhere.
Only the trained parameters travel back to the first device, where the rest of the run (the
averaging server) computes.

The lane axis is padded with zero-example lanes up to a multiple of the device count; such a
lane does only wholly masked steps, which change nothing (``fdjax.core.cohort``), and its
results are dropped. This module holds no learning math: ``CohortTrainer`` hands it the core's
functions to map.

Which setting shards what (``clients.cohort_devices``): ``"single"`` never shards (one device,
as before); ``"all"`` shards over every local device, forces ``vmap`` lanes when the lanes are
``"auto"``, and is refused with one device or with ``"sequential"`` lanes (stepping one client
at a time cannot be spread over devices); ``"auto"`` shards when there are several local
devices and the lanes resolve to ``"vmap"`` (so not on CPU by default), and otherwise runs as
``"single"``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

COHORT_DEVICES = ("auto", "single", "all")

AXIS = "clients"
LANE = PartitionSpec(AXIS)  #: split along the leading (client) axis
WHOLE = PartitionSpec()  #: a full copy on every device


class CohortMesh:
    """A one-axis mesh over some local devices, on which a cohort's lanes are split.

    Args:
        devices: the devices, the first of which receives the trained parameters.
    """

    def __init__(self, devices: Sequence[jax.Device]):
        self.devices = tuple(devices)
        self.mesh = Mesh(np.asarray(self.devices), (AXIS,))
        self.lanes = NamedSharding(self.mesh, LANE)
        self.whole = NamedSharding(self.mesh, WHOLE)
        self.home = SingleDeviceSharding(self.devices[0])

    @classmethod
    def choose(cls, devices: str, lanes: str, resolved: str,
               local: Sequence[jax.Device] | None = None) -> "CohortMesh | None":
        """The mesh a cohort trainer shards over, or None to run on one device.

        Args:
            devices: the setting, "auto", "single" or "all" (see the module docstring).
            lanes: the lanes setting ("auto", "vmap" or "sequential").
            resolved: what ``lanes`` resolves to on this backend without sharding.
            local: the candidate devices; by default ``jax.local_devices()``.
        """
        if devices not in COHORT_DEVICES:
            raise ValueError(f"clients.cohort_devices: unknown value {devices!r}; choose one "
                             f"of {list(COHORT_DEVICES)}")
        if devices == "single":
            return None
        local = list(jax.local_devices() if local is None else local)
        if devices == "all":
            if lanes == "sequential":
                raise ValueError('clients.cohort_devices = "all" shards vmapped lanes; '
                                 'clients.cohort_lanes = "sequential" cannot be sharded '
                                 '(set it to "vmap" or "auto")')
            if len(local) < 2:
                raise ValueError(f'clients.cohort_devices = "all" needs several local JAX '
                                 f'devices, found {len(local)} ({local[0].platform}); use '
                                 f'"auto" to shard only where there are several')
            return cls(local)
        return cls(local) if resolved == "vmap" and len(local) > 1 else None

    @property
    def size(self) -> int:
        """How many devices the lanes are split over."""
        return len(self.devices)

    def padded(self, lanes: int) -> int:
        """``lanes`` rounded up to a multiple of the device count (every device holds as many)."""
        return -(-int(lanes) // self.size) * self.size

    def over_lanes(self, fn: Callable, in_specs: tuple, out_specs: Any) -> Callable:
        """``fn`` run on each device's slice of the lanes; keyword arguments stay static.

        Every positional argument is split along its leading axis (``LANE``) or copied whole
        (``WHOLE``) as ``in_specs`` says; the caller jits the result once.
        """
        def mapped(*args, **static):
            return jax.shard_map(functools.partial(fn, **static), mesh=self.mesh,
                                 in_specs=in_specs, out_specs=out_specs)(*args)
        return mapped

    def split(self, tree: Any) -> Any:
        """``tree``'s leaves split along their leading (lane) axis over the devices."""
        return jax.device_put(tree, self.lanes)

    def copy(self, tree: Any) -> Any:
        """``tree`` copied whole onto every device (from wherever it lives)."""
        return jax.device_put(tree, self.whole)
