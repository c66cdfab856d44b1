"""Cost modes of the clock: measured, calibrated and fixed charges on virtual time."""

from __future__ import annotations

import time

import pytest

from fdjax.config import load_config
from fdjax.experiment import run
from fdjax.runtime import clock as clock_module
from fdjax.runtime.clock import CALIBRATION_CALLS, Clock, Cost, Device
from tests.runtime.test_methods import TINY


def charges(mode: str, durations: list[float], program="p"):
    """Runs one program once per duration (each call sleeps the next duration); the charges."""
    clock = Clock(virtual=True)
    loop = clock.new_loop()
    pending = list(durations)
    calls = []

    def fn():
        calls.append(1)
        time.sleep(pending.pop(0))
        return len(calls)

    async def main():
        device = Device("d", speed=2.0)
        return [await clock.compute(device, fn, cost=Cost(mode), program=program, node="n",
                                    label="work") for _ in range(len(durations) - extra(mode))]

    def extra(mode):
        return {"measured": 1, "calibrated": CALIBRATION_CALLS}[mode]

    try:
        results = loop.run_until_complete(main())
    finally:
        loop.close()
    return clock, [charged for _, charged in results], len(calls)


@pytest.fixture(autouse=True)
def fresh_programs(monkeypatch):
    monkeypatch.setattr(clock_module, "_COMPILED", set())
    monkeypatch.setattr(clock_module, "_CALIBRATED", {})


def test_calibrated_charges_the_fastest_calibration_call_for_every_call():
    # compile call, then CALIBRATION_CALLS timed calls (fastest 0.02 s), then slow later calls
    durations = [0.3, 0.06, 0.02, 0.2, 0.25]
    assert CALIBRATION_CALLS == 2
    clock, charged, calls = charges("calibrated", durations)
    assert calls == len(durations)
    assert len(charged) == 3
    # speed 2 halves the charge; every call is charged the same, whatever it took this time
    assert charged[0] == charged[1] == charged[2]
    assert 0.02 / 2 <= charged[0] < 0.05 / 2
    assert clock.calibrated == {"n work": pytest.approx(charged[0] * 2)}


def test_measured_charges_each_calls_own_time():
    _, charged, _ = charges("measured", [0.3, 0.02, 0.15])
    assert charged[0] < 0.1 / 2 < 0.15 / 2 <= charged[1]


def test_a_calibrated_run_charges_each_computation_its_calibrated_cost():
    result = run(load_config(None, TINY + ["method=sync", "cost.mode=calibrated"]))
    costs = result.timing["calibrated_seconds_per_call"]
    assert {"client0 train", "averaging fedavg", "distillation reverse"} <= set(costs)
    spans = [(end - start, node) for device in result.devices.values()
             for start, end, node in device]
    for span, node in spans:
        label = {"distillation": "reverse", "averaging": "fedavg"}.get(node, "train")
        # every device of TINY has speed 1
        assert span == pytest.approx(costs[f"{node} {label}"], rel=1e-6, abs=1e-9)


def test_unknown_cost_mode_is_rejected():
    with pytest.raises(ValueError, match="unknown cost mode"):
        Cost("guessed")


def spans(result, node):
    return [end - start for device in result.devices.values() for start, end, n in device
            if n == node]


def test_fixed_costs_charge_forward_distillation_and_large_clients_their_own_rates():
    fwd = run(load_config(None, TINY + ["method=sync-fwd", "cost.forward_seconds_per_example=0.02"]))
    examples = 2 * 16  # distill.steps_per_chunk * distill.batch_size in TINY
    distill = spans(fwd, "distillation")
    forwards = [e for e in fwd.events if e["event"] == "forward"]
    assert forwards and len(distill) > len(forwards)
    assert sorted(distill)[-len(forwards):] == pytest.approx([examples * 0.02] * len(forwards))
    assert sorted(distill)[:-len(forwards)] == pytest.approx(
        [examples * 0.01] * (len(distill) - len(forwards)))

    large = run(load_config(None, TINY + ["method=fedavg-large",
                                          "cost.large_client_seconds_per_example=0.03"]))
    per_client = (240 - 48) // 3  # TINY: data.limit minus the proxy, over three clients
    assert spans(large, "client0") == pytest.approx([per_client * 0.03] * len(spans(large, "client0")))


def first_calls(virtual: bool, durations: list[float], programs: list):
    """Computes once per entry of ``programs`` on one clock; each call of ``fn`` sleeps the
    next duration. Returns the clock, the charges and how many times ``fn`` ran."""
    clock = Clock(virtual=virtual)
    loop = clock.new_loop()
    pending = list(durations)

    def fn():
        time.sleep(pending.pop(0))

    async def main():
        device = Device("d")
        return [(await clock.compute(device, fn, cost=Cost("measured"), program=p, node="n"))[1]
                for p in programs]

    try:
        charged = loop.run_until_complete(main())
    finally:
        loop.close()
    return clock, charged, len(durations) - len(pending)


def test_both_clocks_report_each_programs_first_call_as_compile_seconds():
    # virtual: the first call is an extra one, never charged; its seconds are compile_seconds
    clock, charged, ran = first_calls(True, [0.3, 0.02, 0.05], ["p", "p"])
    assert ran == 3 and len(charged) == 2 and max(charged) < 0.25
    assert 0.3 <= clock.compile_seconds < 0.3 + 0.2 and clock.compute_seconds < 0.25
    # real: the first call is the node's own, charged on the wall clock, and counted apart
    # from compute; later calls, calls of no program and a second program's first call too
    # (programs new to the process: "p" has had its first call above)
    clock, charged, ran = first_calls(False, [0.3, 0.02, 0.05, 0.2], ["r", "r", None, "s"])
    assert ran == 4 and charged[0] >= 0.3 and charged[3] >= 0.2
    assert 0.5 <= clock.compile_seconds < 0.5 + 0.2
    assert 0.07 <= clock.compute_seconds < 0.25


def test_a_real_clock_run_reports_its_compilation_and_a_second_run_none():
    # shapes of no other test (batch 24, 252 examples); programs are new to the clock here (the
    # fixture), so the first run's first calls compile; the second run reuses its programs
    config = load_config(None, TINY + ["method=sync", "clock=real", "stop.time_budget=none",
                                       "stop.max_rounds=2", "data.limit=252",
                                       "clients.batch_size=24"])
    first, second = run(config), run(config)
    assert first.timing["compile_seconds"] > 0 and first.timing["compute_seconds"] > 0
    assert second.timing["compile_seconds"] == 0 and second.timing["compute_seconds"] > 0
