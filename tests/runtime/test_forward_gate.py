"""``distill.forward_gate = "lead"``: async-fwd forward-distils only while the global model
leads the small one on a labeled holdout, cut from the distillation set or from the test split."""

from __future__ import annotations

import numpy as np
import pytest

import fdjax.experiment as experiment
from fdjax.config import ConfigError, load_config
from fdjax.experiment import prepare_data, run
from fdjax.runtime.nodes import DistillationServer, LeadGate
from tests.runtime.test_methods import TINY, events

HOLDOUT = 16
GATED = TINY + ["method=async-fwd", "distill.forward_every=1", "distill.forward_gate=lead",
                f"distill.gate_holdout={HOLDOUT}", "cost.forward_seconds_per_example=0.002"]


def gated(*extra: str):
    return load_config(None, GATED + list(extra))


def forced(monkeypatch, global_accuracy: float, small_accuracy: float) -> None:
    """Makes every gate check see these accuracies."""
    monkeypatch.setattr(LeadGate, "__call__",
                        lambda self, g, s: (global_accuracy, small_accuracy))


def share_no_image(a, b) -> bool:
    """Whether no image of ``a`` equals an image of ``b``."""
    a, b = np.asarray(a).reshape(len(a), -1), np.asarray(b).reshape(len(b), -1)
    return not (a[:, None, :] == b[None, :, :]).all(-1).any()


def spy_on_servers(monkeypatch) -> tuple[list, list]:
    """The distillation servers the next runs build, and the gates they were given."""
    servers, gates = [], []

    class Spy(DistillationServer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            servers.append(self)
            gates.append(kwargs["gate"])

    monkeypatch.setattr(experiment, "DistillationServer", Spy)
    return servers, gates


def test_a_closed_gate_skips_every_forward_distillation_and_charges_each_check(monkeypatch):
    forced(monkeypatch, 0.2, 0.6)
    result = run(gated())
    checks = events(result, "gate", "distillation")
    chunks = len(events(result, "reverse", "distillation"))
    assert chunks >= 3 and len(checks) in (chunks, chunks - 1)  # the last may be cut off
    assert not any(e["leads"] for e in checks)
    assert events(result, "forward") == [] and events(result, "mixed") == []
    assert result.rows[-1]["gate_checks"] == len(checks) and result.rows[-1]["gate_opens"] == 0
    # busy time: every reverse chunk plus every check, at the forward rate per holdout image
    chunk = 0.01 * 2 * 16  # server rate x steps x batch
    busy = result.nodes["distillation"]["busy"]
    assert busy == pytest.approx(chunks * chunk + len(checks) * 0.002 * HOLDOUT, abs=chunk)


def test_an_open_gate_forward_distils_after_every_check(monkeypatch):
    forced(monkeypatch, 0.6, 0.2)
    result = run(gated())
    checks = events(result, "gate", "distillation")
    forwards = events(result, "forward", "distillation")
    assert len(checks) >= 2 and all(e["leads"] for e in checks)
    assert len(forwards) in (len(checks), len(checks) - 1)  # the last may be in flight
    assert events(result, "mixed", "averaging")
    assert result.rows[-1]["gate_opens"] == result.rows[-1]["gate_checks"]


def test_the_gate_measures_both_models_on_a_holdout_apart_from_the_distillation_set(
        monkeypatch):
    config = gated()
    servers, gates = spy_on_servers(monkeypatch)
    result = run(config)
    proxy_size = config.data.proxy_size
    gate, server = gates[0], servers[0]
    assert gate.examples == HOLDOUT and server.examples == proxy_size - HOLDOUT
    assert len(server.proxy["images"]) == proxy_size - HOLDOUT
    assert share_no_image(gate.holdout["images"], server.proxy["images"])
    assert np.asarray(gate.holdout["labels"]).shape == (HOLDOUT,)
    for e in events(result, "gate"):  # real accuracies, and the decision follows them
        assert 0.0 <= e["global_accuracy"] <= 1.0 and 0.0 <= e["small_accuracy"] <= 1.0
        assert e["leads"] == (e["global_accuracy"] > e["small_accuracy"])


def test_a_holdout_from_the_test_split_leaves_every_training_image_where_it_was(monkeypatch):
    config = gated("distill.gate_holdout_from=test")
    plain = load_config(None, TINY + ["method=async-continuous"])
    splits, fed = prepare_data(config)
    plain_splits, plain_fed = prepare_data(plain)
    # the evaluated test images, the clients' data and the distillation set are unchanged
    np.testing.assert_array_equal(splits.test.images, plain_splits.test.images)
    np.testing.assert_array_equal(fed.proxy.images, plain_fed.proxy.images)
    for mine, theirs in zip(fed.clients, plain_fed.clients):
        np.testing.assert_array_equal(mine.images, theirs.images)
    assert share_no_image(splits.holdout.images, splits.test.images)
    assert share_no_image(splits.holdout.images, splits.train.images)

    servers, gates = spy_on_servers(monkeypatch)
    result = run(config)
    assert servers[0].examples == config.data.proxy_size  # nothing cut from distillation
    np.testing.assert_array_equal(np.asarray(gates[0].holdout["labels"]), splits.holdout.labels)
    assert events(result, "gate")
    with pytest.raises(ValueError, match="prepared without the gate's test holdout"):
        run(config, data=(plain_splits, plain_fed))


@pytest.mark.parametrize("mode", ["measured", "calibrated"])
def test_the_gate_is_charged_under_measured_and_calibrated_costs(mode):
    result = run(gated(f"cost.mode={mode}"))
    checks = events(result, "gate", "distillation")
    assert checks and result.rows[-1]["gate_checks"] == len(checks)


def test_always_is_the_default_and_leaves_async_fwd_as_it_was():
    plain = run(load_config(None, TINY + ["method=async-fwd", "distill.forward_every=1"]))
    assert events(plain, "gate") == [] and "gate_checks" not in plain.rows[-1]
    assert events(plain, "forward")


@pytest.mark.parametrize("extra, words", [
    ([f"data.proxy_size={HOLDOUT}"], "distill.gate_holdout: must be smaller than data.proxy_size"),
    (["backend=ray", "clock=real"], 'distill.forward_gate: "lead" is not available with backend'),
    (["distill.forward_gate=sometimes"], "distill.forward_gate"),
    (["distill.gate_holdout_from=clients"], "distill.gate_holdout_from"),
])
def test_gate_settings_that_cannot_work_are_one_line_errors(extra, words):
    with pytest.raises(ConfigError, match=words):
        gated(*extra)
