"""``distill.teacher = "ensemble"`` (FedDF): the averaging server hands over the round's client
models, reverse distillation is taught by their averaged logits, and each member's forward pass
is charged on the clock."""

from __future__ import annotations

import pytest

from fdjax.config import ConfigError, load_config
from fdjax.experiment import run
from fdjax.runtime.nodes import RoundModels
from tests.runtime.test_methods import TINY, events, intervals

CHUNK = 2 * 16  # steps x batch of TINY's reverse chunks
SERVER, CLIENT = 0.01, 0.01  # TINY's fixed seconds per example


def ensemble(method: str, *extra: str):
    return load_config(None, TINY + [f"method={method}", "distill.teacher=ensemble",
                                     "clients.count=3", *extra])


def chunk_seconds(result) -> set[float]:
    """The distinct durations of the distillation server's computations (to 1e-9 s)."""
    return {round(e - s, 9) for s, e in intervals(result, "distillation")}


@pytest.mark.parametrize("method, members", [("async-continuous", 3), ("sync", 3),
                                             ("fedbuff", 2)])
def test_every_reverse_chunk_is_taught_by_the_rounds_client_models(method, members):
    result = run(ensemble(method, "aggregation.buffer_size=2"))
    chunks = events(result, "reverse", "distillation")
    assert len(chunks) >= 2 and {e["members"] for e in chunks} == {members}
    assert result.rows[-1]["global_accuracy"] > 0


def test_each_member_beyond_the_first_adds_its_forward_pass_to_a_chunks_cost():
    average = run(load_config(None, TINY + ["method=async-continuous", "clients.count=3"]))
    assert chunk_seconds(average) == {round(CHUNK * SERVER, 9)}
    default = run(ensemble("async-continuous"))  # a member's pass: a third of a client step
    assert chunk_seconds(default) == {round(CHUNK * (SERVER + 2 * CLIENT / 3), 9)}
    set_rate = run(ensemble("async-continuous", "cost.teacher_seconds_per_example=0.02"))
    assert chunk_seconds(set_rate) == {round(CHUNK * (SERVER + 2 * 0.02), 9)}
    # the dearer chunks leave time for fewer of them in the same budget
    assert len(events(set_rate, "reverse")) < len(events(average, "reverse"))


def test_the_published_value_holds_the_average_and_its_members(monkeypatch):
    import fdjax.runtime.channels as channels

    seen = []
    publish = channels.Register.publish
    monkeypatch.setattr(channels.Register, "publish", lambda self, value, *a: (
        seen.append(value), publish(self, value, *a))[1])
    run(ensemble("async-round"))
    assert seen and all(isinstance(v, RoundModels) and len(v.members) == 3 for v in seen)


def test_an_unknown_teacher_and_the_ensemble_on_ray_are_refused():
    with pytest.raises(ConfigError, match="distill.teacher"):
        load_config(None, ["distill.teacher=median"])
    with pytest.raises(ConfigError, match='distill.teacher: "ensemble" is not available'):
        load_config(None, ["distill.teacher=ensemble", "backend=ray", "clock=real"])
