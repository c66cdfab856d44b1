"""Fault injection in-process: bad updates, crashing, hanging and slow clients.

Every run is the tiny fixed-cost configuration of ``test_methods`` (so compiled programs are
shared) with faults injected through the ``faults.clients`` setting.
"""

from __future__ import annotations

import logging

import jax
import numpy as np
import pytest

from fdjax.experiment import run

from tests.runtime.test_methods import events, tiny

#: every kind of garbage update, the client sending it, when, and a word of the reason
GARBAGE = [("nan", 0, 1, "NaN"), ("inf", 1, 1, "Inf"), ("shape", 2, 1, "shape"),
           ("dtype", 0, 2, "dtype"), ("tree", 1, 2, "missing leaf"),
           ("version", 2, 2, "not served"), ("examples", 0, 3, "example count"),
           ("norm", 1, 3, "above the bound")]


def faults(*specs: str) -> str:
    return "faults.clients=[" + ", ".join(f'"{s}"' for s in specs) + "]"


def rounds(result) -> list[dict]:
    return events(result, "round_end", "averaging")


def max_abs(tree) -> float:
    return max(float(np.abs(np.asarray(x)).max()) for x in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize("method", ["sync", "async-continuous"])
def test_every_kind_of_garbage_update_is_rejected_and_the_run_goes_on(method, caplog):
    specs = [f"{kind}:{client}@{r}" for kind, client, r, _ in GARBAGE]
    with caplog.at_level(logging.WARNING, logger="fdjax"):
        result = run(tiny(method, faults(*specs), "aggregation.max_delta_norm=100"))
    got = {(r["client"], r["reason"]) for r in result.rejected}
    assert len(result.rejected) == len(GARBAGE)
    for kind, client, _, word in GARBAGE:
        assert any(c == client and word in reason for c, reason in got), (kind, got)
    # in the event log and the Python log, with the client and the reason
    logged = events(result, "rejected", "averaging")
    assert [(e["client"], e["reason"]) for e in logged] == [
        (r["client"], r["reason"]) for r in result.rejected]
    assert sum("rejected" in rec.getMessage() for rec in caplog.records) == len(GARBAGE)
    # in metrics.jsonl's counters, and nothing bad reached the model
    assert result.rows[-1]["rejected"] == len(GARBAGE)
    assert [r["rejected"] for r in result.rows] == sorted(r["rejected"] for r in result.rows)
    assert np.isfinite(max_abs(result.small_params)) and max_abs(result.small_params) < 10
    # the run went on, and the clients that sent garbage kept taking part
    assert len(rounds(result)) >= 5 and rounds(result)[-1]["clients"] == 3
    assert result.rows[-1]["small_accuracy"] > result.rows[0]["small_accuracy"] + 0.1


def test_robust_aggregation_bounds_a_huge_update_that_fedavg_lets_in():
    spec = faults("norm:1@1", "norm:1@2", "norm:1@3")
    wrecked = run(tiny("async-round", spec))
    bounded = run(tiny("async-round", spec, "aggregation.rule=median"))
    trimmed = run(tiny("async-round", spec, "aggregation.rule=trimmed_mean",
                       "aggregation.trim_fraction=0.34"))
    assert max_abs(wrecked.small_params) > 100
    assert max_abs(bounded.small_params) < 10 and max_abs(trimmed.small_params) < 10


def test_krum_and_clipping_bound_a_huge_update_in_a_run():
    """Five clients (Krum with f = 1 needs more than 4), one sending +1000 everywhere."""
    spec = faults("norm:1@1", "norm:1@2", "norm:1@3")
    five = ("clients.count=5", "clients.speeds=[0.25]", "stop.time_budget=10")
    wrecked = run(tiny("async-round", spec, *five))
    krum = run(tiny("async-round", spec, *five, "aggregation.rule=krum"))
    multi = run(tiny("async-round", spec, *five, "aggregation.rule=multi_krum"))
    clipped = run(tiny("async-round", spec, *five, "aggregation.clip_norm=1"))
    assert max_abs(wrecked.small_params) > 100
    final = wrecked.rows[-1]["small_accuracy"]
    for result in (krum, multi, clipped):  # nothing rejected: bounded, and still learning
        assert max_abs(result.small_params) < 10 and not result.rejected
        start = result.rows[0]["small_accuracy"]
        assert result.rows[-1]["small_accuracy"] > max(final, start) + 0.1


@pytest.mark.parametrize("method", ["sync-fwd", "async-continuous"])
def test_a_crashed_and_a_hung_client_do_not_stop_the_run(method):
    result = run(tiny(method, faults("crash:1@1", "hang:2@2"), "aggregation.round_timeout=1.0",
                      "stop.time_budget=10"))
    crashed = events(result, "crashed", "client1")
    assert len(crashed) == 1 and "injected crash" in crashed[0]["error"]
    assert result.rows[-1]["client_crashes"] == 1
    # one timeout per failure; afterwards rounds do not wait for clients that owe an answer
    timeouts = events(result, "round_timeout", "averaging")
    assert [e["missing"] for e in timeouts] == [[1], [2]]
    assert result.rows[-1]["round_timeouts"] == 2
    after = [r for r in rounds(result) if r["round"] > 3]
    assert len(after) >= 2 and all(r["clients"] == 1 for r in after)
    assert not events(result, "train_start", "client1")[1:]  # it never trained again


def test_clients_that_come_back_are_served_the_current_model():
    result = run(tiny("sync", faults("crash:1@1+1.5", "hang:2@2+0.5"),
                      "aggregation.round_timeout=0.8", "stop.time_budget=8"))
    for index in (1, 2):
        back = events(result, "rejoin", f"client{index}")
        joined = [e for e in events(result, "joined", "averaging") if e["client"] == index]
        assert len(back) == len(joined) == 1 and joined[0]["time"] > back[0]["time"]
        served = [e for e in events(result, "train_start", f"client{index}")
                  if e["time"] > back[0]["time"]]
        assert served, index
        # the first model it trains after coming back is the newest at the moment it asked
        current = max([e["round"] for e in rounds(result) if e["time"] <= joined[0]["time"]],
                      default=0)
        assert served[0]["version"] == current
    assert rounds(result)[-1]["clients"] == 3  # everyone is back in the later rounds


def test_a_round_waits_for_its_quorum_after_the_timeout():
    stuck = run(tiny("sync", faults("crash:1@1", "crash:2@1"), "aggregation.round_timeout=0.5",
                     "aggregation.quorum=2"))
    assert [r["round"] for r in rounds(stuck)] == [1]  # round 2 never gathers 2 updates
    going = run(tiny("sync", faults("crash:1@1", "crash:2@1"), "aggregation.round_timeout=0.5"))
    assert len(rounds(going)) >= 3 and rounds(going)[-1]["clients"] == 1


def test_all_clients_crashing_for_good_ends_the_run_with_an_error():
    with pytest.raises(RuntimeError, match="every client crashed"):
        run(tiny("async-continuous", faults("crash:0@0", "crash:1@0", "crash:2@0")))


def test_stragglers_are_dropped_by_sync_methods_and_merged_late_by_async_ones():
    slow = ["clients.speeds=[1.0, 1.0, 0.2]", "aggregation.round_timeout=1.0"]
    plain = run(tiny("sync", "clients.speeds=[1.0, 1.0, 0.2]"))
    sync = run(tiny("sync", *slow))
    assert len(rounds(sync)) > len(rounds(plain))  # rounds no longer wait for the straggler
    late = events(sync, "late", "averaging")
    assert late and all(e["client"] == 2 and "accepted" not in e for e in late)
    assert sync.rows[-1]["late"] == len(late)
    asynchronous = run(tiny("async-round", *slow))
    late = events(asynchronous, "late", "averaging")
    assert late and all(e["client"] == 2 and e["accepted"] for e in late)
    assert any(r["clients"] == 3 for r in rounds(asynchronous))  # a late update was averaged in


def test_staleness_parameters_from_the_config_reach_the_mixing():
    """async-fwd mixes forward-distilled models that are 1 or 2 rounds stale: a hinge at b = 5
    weighs them fully, one at b = 0 with a steep slope almost not at all."""
    base = ("distill.forward_every=1", "distill.staleness=hinge")
    full = run(tiny("async-fwd", *base, "distill.staleness_b=5"))
    faint = run(tiny("async-fwd", *base, "distill.staleness_a=1000", "distill.staleness_b=0"))
    again = run(tiny("async-fwd", *base, "distill.staleness_b=5", "distill.staleness_a=1000"))
    assert [e["staleness"] for e in events(full, "mixed", "averaging")][:3] == [1, 2, 2]
    # b = 5 covers every staleness seen, so a does not matter; b = 0 with a = 1000 does
    assert [r["small_accuracy"] for r in full.rows] == [r["small_accuracy"] for r in again.rows]
    assert [r["small_accuracy"] for r in full.rows] != [r["small_accuracy"] for r in faint.rows]
