"""The methods on both clocks: determinism, who waits for whom, schedules, overlap."""

from __future__ import annotations

import functools

import pytest

from fdjax.config import load_config
from fdjax.experiment import run

#: The runtime tests' run: tiny data, fixed costs. The global model is a cnn6 like the small
#: one (the preset is cnn12): what these tests check (schedules, who waits for whom, files,
#: faults, resumes) does not depend on its depth, and cnn12's programs were about half of what
#: every module compiled. The rows recorded before the method registry were made with cnn12,
#: and ``record_rows`` keeps it (``RECORDED``).
TINY = [
    "data.source=synthetic", "data.limit=240", "data.test_limit=100", "data.proxy_size=48",
    "models.global_width=0.25", "models.small_width=0.25", "models.global_preset=cnn6",
    "clients.batch_size=32",
    "distill.batch_size=16", "distill.steps_per_chunk=2", "cost.mode=fixed",
    "cost.client_seconds_per_example=0.01", "cost.server_seconds_per_example=0.01",
    "cost.latency=0.05", "stop.time_budget=6", "stop.eval_interval=1.5", "clients.speeds=[1.0]",
]


def tiny(method: str, *extra: str):
    return load_config(None, TINY + [f"method={method}", *extra])


def intervals(result, node: str):
    return sorted((s, e) for device in result.devices.values() for s, e, n in device if n == node)


def overlaps(a, b) -> bool:
    return any(s1 < e2 - 1e-9 and s2 < e1 - 1e-9 for s1, e1 in a for s2, e2 in b)


def events(result, event: str, node: str | None = None):
    return [e for e in result.events if e["event"] == event and (node is None or e["node"] == node)]


@pytest.fixture(scope="module")
def plain():
    """``plain(method)``: ``run(tiny(method))``, run once in this module. Several tests check
    different properties of the same run, which a second run repeats exactly (the first test)."""
    return functools.cache(lambda method: run(tiny(method)))


def test_same_seed_and_config_give_identical_metrics(plain):
    a, b = plain("async-continuous"), run(tiny("async-continuous"))
    strip = lambda rows: [{k: v for k, v in r.items() if k != "wall_time"} for r in rows]
    assert strip(a.rows) == strip(b.rows) and len(a.rows) >= 4
    assert a.events == b.events


@pytest.mark.parametrize("method", ["sync", "sync-fwd"])
def test_in_sync_methods_clients_are_idle_while_a_server_distils(method, plain):
    result = plain(method)
    distilling = intervals(result, "distillation")
    assert distilling and result.nodes["client0"]["idle"] > 0
    for client in ("client0", "client1", "client2"):
        assert not overlaps(intervals(result, client), distilling)


@pytest.mark.parametrize("method", ["async-round", "async-continuous"])
def test_in_async_methods_distillation_causes_no_client_idle_time(method, plain):
    cheap = plain(method)  # TINY's 2 steps a chunk
    costly = run(tiny(method, "distill.steps_per_chunk=30"))
    assert sum(costly.nodes["distillation"]["busy"] for _ in [0]) > 0
    for client in ("client0", "client1", "client2"):
        assert cheap.nodes[client]["idle"] == pytest.approx(costly.nodes[client]["idle"])
        assert intervals(cheap, client) == intervals(costly, client)
    # clients overlap distillation in time: nobody waits for it
    assert overlaps(intervals(costly, "client0"), intervals(costly, "distillation"))


def test_async_continuous_never_waits_for_a_new_average_after_the_first(plain):
    result = plain("async-continuous")
    chunks = intervals(result, "distillation")
    assert len(chunks) > 5
    for (_, end), (start, _) in zip(chunks, chunks[1:]):
        assert start == pytest.approx(end)
    first_average = events(result, "round_end", "averaging")[0]["time"]
    # idle = waiting for the first average to arrive, and nothing after it
    assert result.nodes["distillation"]["idle"] == pytest.approx(
        chunks[0][0], abs=1e-9) and chunks[0][0] > first_average


def test_async_round_distils_each_average_at_most_once_and_always_the_newest():
    result = run(tiny("async-round", "distill.steps_per_chunk=12"))  # slow: averages pile up
    used = [e["version"] for e in events(result, "reverse")]
    assert len(used) >= 2 and used == sorted(set(used))
    assert all(e["version"] == e["newest"] for e in events(result, "reverse"))
    rounds = events(result, "round_end", "averaging")[-1]["round"]
    assert len(used) < rounds  # some averages were skipped, never queued


def test_sync_fwd_runs_forward_distillation_every_round(plain):
    result = plain("sync-fwd")
    order = [e["event"] for e in result.events
             if e["event"] in ("forward", "round_end", "reverse")]
    rounds = order.count("round_end")
    assert rounds >= 2
    assert order[:4] == ["forward", "round_end", "reverse", "forward"]
    assert order.count("forward") >= rounds
    assert not events(plain("sync"), "forward")


def test_two_client_sync_schedule_matches_a_hand_computed_one():
    latency, c_client, c_server = 0.5, 0.01, 0.002
    # TINY's 64 examples a client and 2 distillation steps a chunk: the shapes of the programs
    # that the other runs here compiled
    cfg = tiny("sync", "clients.count=2", "clients.speeds=[1.0, 0.5]", "data.limit=176",
               "data.proxy_size=48", f"cost.latency={latency}", "cost.bandwidth=1e15",
               f"cost.client_seconds_per_example={c_client}",
               f"cost.server_seconds_per_example={c_server}", "stop.time_budget=100",
               "stop.max_rounds=2")
    result = run(cfg)
    sizes = [64, 64]  # 176 - 48 proxy examples, split in two
    train = [c_client * n / s for n, s in zip(sizes, [1.0, 0.5])]  # 0.64 s and 1.28 s
    fedavg = c_server * 2
    reverse = c_server * 2 * 16
    starts = {(e["node"], e["version"]): e["time"] for e in events(result, "train_start")}
    ends = [e["time"] for e in events(result, "round_end", "averaging")]
    # t=0 the distillation server hands out the model; it reaches the averaging server at L,
    # the clients at 2L; updates arrive at 3L + slowest; FedAvg; publish -> distiller at 4L...
    assert starts[("client0", 0)] == pytest.approx(2 * latency)
    assert ends[0] == pytest.approx(3 * latency + max(train) + fedavg)
    round2 = ends[0] + latency + reverse + latency + latency  # publish, reverse, hand back, send
    assert starts[("client1", 1)] == pytest.approx(round2)
    assert ends[1] == pytest.approx(round2 + latency + max(train) + fedavg)


def test_the_observer_charges_no_time():
    often = run(tiny("async-continuous", "stop.eval_interval=0.25"))
    rarely = run(tiny("async-continuous", "stop.eval_interval=3"))
    order = lambda result: sorted(result.events, key=lambda e: (e["time"], e["node"], e["event"]))
    assert order(often) == order(rarely) and len(often.rows) > 3 * len(rarely.rows) - 3


def test_two_nodes_on_one_device_never_overlap():
    result = run(tiny("async-continuous", "server.device_slots=1"))
    spans = sorted((s, e) for s, e, _ in result.devices["server"])
    assert {n for _, _, n in result.devices["server"]} == {"averaging", "distillation"}
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert start >= end - 1e-9


def test_a_real_clock_run_finishes_and_overlaps_training_with_distillation(plain):
    # The same programs compiled first (a virtual-clock run shares them): on a loaded machine
    # compiling the distillation step alone could outlast the real run's 8 s before any chunk.
    plain("async-continuous")
    result = run(tiny("async-continuous", "clock=real", "stop.time_budget=8",
                      "stop.eval_interval=2"))
    assert result.rows[-1]["time"] == pytest.approx(8, abs=3)
    assert overlaps(intervals(result, "client0") + intervals(result, "client1"),
                    intervals(result, "distillation"))


def test_timing_separates_compute_from_the_runs_wall_time():
    result = run(tiny("async-continuous", "cost.mode=measured"))
    t = result.timing
    assert 0 < t["compute_seconds"] <= t["wall_seconds"]
    assert 0 <= t["compile_seconds"] < t["wall_seconds"]
