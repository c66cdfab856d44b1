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
