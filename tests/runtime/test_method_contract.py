"""The contract every registered method keeps, run for each name in ``fdjax.methods.names()``.

A method added to the registry (a module of its own, see ``fdjax/methods/fedbuff.py``) is picked
up here with no edit: it must learn on the tiny fixed-cost config, reject garbage updates and go
on, train only the clients sampled for a model version, and resume a killed run on the schedule
of the uninterrupted one. The methods that existed before the registry must also give the very
rows they gave before it (``method_rows_before.json``, recorded with ``record_rows.py`` on the
code before the change).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest

from fdjax.config import ConfigError, load_config
from fdjax.experiment import run
from fdjax.methods import METHODS, Method, get_method, names, register
from fdjax.runtime.nodes import AveragingServer
from fdjax.runtime.sampling import ClientSampler

from tests.runtime.record_rows import RECORDED
from tests.runtime.record_rows import rows as current_rows
from tests.runtime.test_faults import faults, max_abs
from tests.runtime.test_methods import TINY, events, tiny
from tests.test_resume import Killed, kill_at, lines

BEFORE = json.loads((Path(__file__).parent / "method_rows_before.json").read_text())
#: Row fields that the fixed-cost schedule alone decides: equal on every machine.
SCHEDULE = ("time", "round", "distill_chunks", "last_staleness", "rejected", "late",
            "round_timeouts", "client_crashes", "method", "seed")


@functools.lru_cache(maxsize=None)
def tiny_rows(method: str) -> tuple:
    """The rows of ``method``'s run on TINY with the recorded global model (``RECORDED``), 6
    virtual seconds, without wall times: compared with the recorded rows below, and the
    uninterrupted run that a killed and resumed one must follow (one run for both)."""
    return tuple(current_rows(method))


@pytest.mark.parametrize("method", sorted(BEFORE))
def test_the_methods_give_the_rows_they_gave_before_the_registry(method):
    """Recorded before methods became modules of a registry: the schedule is equal on every
    machine, and on the recording machine the accuracies were equal too (bit for bit); other
    CPUs round floats differently, so they are held to two test images in a hundred here."""
    before, now = BEFORE[method], list(tiny_rows(method))
    assert [{k: r[k] for k in SCHEDULE} for r in now] == [
        {k: r[k] for k in SCHEDULE} for r in before]
    assert set(now[0]) == set(before[0])
    for a, b in zip(now, before):
        for key in ("global_accuracy", "small_accuracy"):
            assert (a[key] is None) == (b[key] is None)
            if a[key] is not None:
                assert a[key] == pytest.approx(b[key], abs=0.02)


@pytest.mark.parametrize("method", names())
def test_every_registered_method_learns(method):
    # TINY's two distillation steps a chunk, as every other run here: a chunk costs its steps,
    # so the server distils about as many steps a virtual second with any length; another
    # length compiles every distillation step again (the chunk's batch plan is an input)
    # to 30% (10 classes: chance is 0.1), within 18 virtual seconds; a run stops where it gets
    # there (most methods in 3 to 6 s, sync-fwd at about 13.5 s), since the rest proves nothing
    result = run(tiny(method, "stop.time_budget=18", "cost.client_seconds_per_example=0.002",
                      "cost.server_seconds_per_example=0.001", "stop.target_accuracy=0.3"))
    first, last = result.rows[0]["global_accuracy"], result.rows[-1]["global_accuracy"]
    assert first < 0.2 and last >= 0.3, [r["global_accuracy"] for r in result.rows]
    assert [r["time"] for r in result.rows] == [1.5 * i for i in range(len(result.rows))]


@pytest.mark.parametrize("method", names())
def test_every_registered_method_rejects_garbage_and_goes_on(method):
    result = run(tiny(method, faults("nan:0@1", "shape:1@1", "version:2@2"),
                      "stop.time_budget=9"))
    assert sorted(r["client"] for r in result.rejected) == [0, 1, 2]
    assert result.rows[-1]["rejected"] == 3
    assert np.isfinite(max_abs(result.small_params if result.small_params is not None
                                else result.global_params))
    assert result.rows[-1]["round"] >= 4  # the run went on
    trained_late = {e["node"] for e in events(result, "train_start") if e["version"] >= 3}
    assert trained_late == {"client0", "client1", "client2"}  # nobody was dropped for good


@pytest.mark.parametrize("method", names())
def test_every_registered_method_trains_only_the_clients_sampled_for_a_version(method):
    result = run(tiny(method, "clients.sample_count=2", "stop.time_budget=9"))
    sampler = ClientSampler(3, 2, seed=0)
    trainings = events(result, "train_start")
    assert len({e["version"] for e in trainings}) >= 3
    for e in trainings:
        assert int(e["node"].removeprefix("client")) in sampler(e["version"]), e


@pytest.mark.parametrize("method", names())
def test_every_registered_method_resumes_a_killed_run_on_the_same_schedule(method, tmp_path):
    """Killed at 4.5 of 6 virtual seconds, resumed from its last checkpoint: the rows it kept
    are untouched, and the run ends on the schedule of the same run never interrupted and never
    checkpointed (``tiny_rows``, shared with the test above)."""
    cfg = tiny(method, "checkpoint.every_rounds=2", *RECORDED)
    with pytest.raises(Killed):
        run(cfg, tmp_path / "killed", on_row=kill_at(4.5))
    before = lines(tmp_path / "killed")
    resumed = run(cfg, tmp_path / "killed", resume=True)
    kept = resumed.resumes[-1]["rows_kept"]
    assert 0 < kept < len(before)
    assert lines(tmp_path / "killed")[:kept] == before[:kept]
    whole = tiny_rows(method)
    assert [r["time"] for r in resumed.rows] == [r["time"] for r in whole]
    assert [r["round"] for r in resumed.rows] == [r["round"] for r in whole]


class _NewestWins(AveragingServer):
    """A method of a test's own: the round's model is the newest update alone."""

    def aggregate(self, models, weights):
        del weights
        return models[-1]


def test_a_method_registered_from_outside_runs_with_no_edit_to_fdjax(tmp_path):
    method = register(Method("newest-wins", "the newest update is the round's model",
                             distill_mode="round", averaging=_NewestWins))
    try:
        assert "newest-wins" in names()
        result = run(tiny("newest-wins"), tmp_path / "run")
        assert result.rows[-1]["method"] == "newest-wins"
        assert (tmp_path / "run" / "config.toml").read_text().startswith('method = "newest-wins"')
        assert result.rows[-1]["round"] >= 3
    finally:
        METHODS.pop(method.name)
    with pytest.raises(ConfigError, match="method: must be one of"):
        tiny("newest-wins")


def test_a_method_refuses_settings_it_cannot_honour_before_anything_runs():
    with pytest.raises(ConfigError, match="aggregation.rule: fedbuff"):
        load_config(None, TINY + ["method=fedbuff", "aggregation.rule=median"])
    with pytest.raises(ConfigError, match="aggregation.round_timeout: fedbuff"):
        load_config(None, TINY + ["method=fedbuff", "aggregation.round_timeout=3"])
    with pytest.raises(ValueError, match="averaging must be AveragingServer"):
        Method("broken", "", distill_mode=None, averaging=dict)
    with pytest.raises(ValueError, match="already registered"):
        register(get_method("sync"))
