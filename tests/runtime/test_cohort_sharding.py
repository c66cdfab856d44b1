"""Cohorts sharded over several devices: the same training and schedule, really sharded.

The checks that need several devices run in a subprocess with four virtual CPU devices
(``tests/runtime/sharded_cohort_check.py``: JAX's device count is fixed once it starts, and
this process has one); the tests here assert on what it reports. The settings' rules run here.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from fdjax.config import ClientsConfig, ConfigError
from fdjax.runtime.cohort_mesh import COHORT_DEVICES, CohortMesh
from fdjax.runtime.compiled import cohort_chunks

ROOT = Path(__file__).resolve().parents[2]


@functools.lru_cache(maxsize=None)
def four_devices(checks: str = "trainer,run") -> dict:
    """``sharded_cohort_check``'s report for ``checks``, from a process with four devices: one
    process for all of them, so JAX starts, and the programs they share compile, once."""
    # XLA's optimisations are off here (QUICK_COMPILE in tests/conftest.py puts them off in the
    # environment this process inherits): these checks compare a sharded cohort with an
    # unsharded one compiled the same way, on models of a few thousand parameters, so their
    # time is XLA compiling about 60 programs.
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(
        [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=4"]).strip())
    done = subprocess.run([sys.executable, "-m", "tests.runtime.sharded_cohort_check", checks],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["devices"] == 4
    return report


@pytest.mark.parametrize("case", ["equal", "unequal"])
def test_a_sharded_cohort_trains_as_the_unsharded_one(case):
    report = four_devices()["trainer"][case]
    assert report["mesh"] == 4
    # cohort sizes 6 and 3 are no multiple of 4: calls of 6, 3 and 1 lanes are padded
    assert report["chunks"] == ([6] if case == "equal" else [3, 1, 3])
    assert report["params_gap"] < 1e-5 and report["opt_state_gap"] < 1e-5
    assert report["counts"][0] == report["counts"][1]  # padding lanes add no example
    assert report["order_gap"] == 0.0  # another order, other padding: the same clients' results


@pytest.mark.parametrize("case", ["equal", "unequal"])
def test_a_sharded_cohort_step_is_one_call_over_four_devices_compiled_once(case):
    report = four_devices()["trainer"][case]
    assert report["calls"] == report["expected_calls"]  # one call per step (per epoch: scan)
    lanes = 2 if case == "equal" else 1  # 8 lanes over 4 devices; 4 over 4
    for call in report["placements"]:
        for part in ("state_in", "state_out", "metrics_out"):
            assert call[part] == {"devices": [4], "replicated": [False], "shard_lanes": [lanes]}
        assert call["data_in"]["devices"] == [4] and call["data_in"]["replicated"] == [True]
    # each cohort shape compiles once, and training again (another order) compiles nothing
    assert report["program_traces"] == report["shapes"] and not report["retraced"]


def test_a_sharded_cohort_run_keeps_the_virtual_clock_schedule():
    report = four_devices()["run"]
    single, sharded = report["single"], report["all"]
    assert not single["splits"] and sharded["splits"]
    assert all(devices == [4] for devices in sharded["splits"])
    assert sharded["events"] == single["events"] and len(single["events"]) > 10
    assert sharded["busy"] == single["busy"]
    assert len(sharded["rows"]) == len(single["rows"]) >= 3
    for a, b in zip(sharded["rows"], single["rows"]):
        assert a["time"] == b["time"] and a["round"] == b["round"]
        assert a["global_accuracy"] == pytest.approx(b["global_accuracy"], abs=0.02)
        assert a["small_accuracy"] == pytest.approx(b["small_accuracy"], abs=0.02)


def test_the_device_setting_chooses_a_mesh_or_refuses_in_one_line():
    one = jax.local_devices()[:1]
    assert CohortMesh.choose("single", "vmap", "vmap") is None
    assert CohortMesh.choose("auto", "vmap", "vmap", local=one) is None  # one device: as before
    assert CohortMesh.choose("auto", "auto", "sequential", local=one * 2) is None  # CPU lanes
    with pytest.raises(ValueError, match=r'^clients.cohort_devices = "all" needs several'):
        CohortMesh.choose("all", "vmap", "vmap", local=one)
    with pytest.raises(ValueError, match=r'clients.cohort_lanes = "sequential" cannot'):
        CohortMesh.choose("all", "sequential", "sequential", local=one * 2)
    with pytest.raises(ValueError, match="clients.cohort_devices: unknown value"):
        CohortMesh.choose("some", "vmap", "vmap")
    assert ClientsConfig().cohort_devices == "auto"
    for devices in COHORT_DEVICES:  # the config accepts exactly the runtime's choices
        assert ClientsConfig(cohort_devices=devices).cohort_devices == devices
    with pytest.raises(ConfigError, match="clients.cohort_devices"):
        ClientsConfig(cohort_devices="two")
    with pytest.raises(ConfigError, match='clients.cohort_devices: "all" shards vmapped'):
        ClientsConfig(cohort_devices="all", cohort_lanes="sequential")


def test_sharded_chunks_fill_multiples_of_the_device_count():
    steps = [1] * 11 + [3] * 3
    chunks = cohort_chunks(steps, max_lanes=64, multiple=4)
    assert sorted(np.concatenate(chunks).tolist()) == list(range(len(steps)))
    # eleven one-step clients: 8, then the three left over in one call (padded to 4)
    assert [len(c) for c in chunks] == [8, 3, 3]
    assert [len(c) for c in cohort_chunks([1] * 11, 64)] == [8, 2, 1]  # unsharded: unchanged
    assert [len(c) for c in cohort_chunks([1] * 30, 64, multiple=3)] == [24, 6]
