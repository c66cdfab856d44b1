"""The Ray backend against a real local Ray instance (no mock): runs, files, faults, cleanup.

Every run is the tiny synthetic configuration of ``test_methods`` on the real clock, with
fractional CPUs per actor so that five actors fit a 2-core machine. A run stops once the global
model reaches 50% accuracy (chance is 10%), or at a generous time budget (a run that ends there
fails the accuracy check, never a timing assertion).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

ray = pytest.importorskip("ray")  # a protection only: CI installs the extra and runs these

from fdjax.cli import main  # noqa: E402
from fdjax.config import load_config  # noqa: E402
from fdjax.experiment import run  # noqa: E402
from tests.runtime.test_methods import TINY, events  # noqa: E402

TARGET = 0.5
RAY_TINY = TINY + [
    "clock=real", "backend=ray", "ray.client_cpus=0.25", "ray.server_cpus=0.25",
    "clients.local_epochs=3", "clients.learning_rate=0.003", "distill.steps_per_chunk=10",
    "distill.learning_rate=0.003", "distill.chunks_per_round=2", "stop.time_budget=240",
    "stop.eval_interval=3", f"stop.target_accuracy={TARGET}",
]
NODES = {"client0", "client1", "client2", "averaging", "distillation"}


def ray_tiny(method: str, *extra: str):
    return load_config(None, RAY_TINY + [f"method={method}", *extra])


def ray_processes() -> dict[int, str]:
    """This process's descendants that belong to Ray (its daemons and actor workers)."""
    import psutil

    found = {}
    for child in psutil.Process().children(recursive=True):
        try:
            name = " ".join(child.cmdline()[:2]) or child.name()
        except psutil.Error:
            continue
        if any(word in name for word in ("raylet", "gcs_server", "ray::", "ray/", "ray_")):
            found[child.pid] = name
    return found


def alive(pids) -> list[int]:
    import psutil

    running = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                running.append(pid)
        except psutil.NoSuchProcess:
            pass
    return running


def wait_gone(pids, seconds: float = 60.0) -> list[int]:
    """The processes of ``pids`` still running after waiting up to ``seconds`` for them."""
    deadline = time.monotonic() + seconds
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.5)
    return alive(pids)


def fdjax_actors() -> list[str]:
    return [a["name"] if isinstance(a, dict) else a for a in ray.util.list_named_actors()
            if (a["name"] if isinstance(a, dict) else a).startswith("fdjax/")]


def check_run_directory(out, method: str, lost: str | None = None) -> list[dict]:
    """Every file an in-process run writes, consistent with each other; returns the rows.

    ``lost``: a node whose actor was killed, maybe before it finished any computation."""
    for name in ("config.toml", "metrics.jsonl", "nodes.json", "global_params.npz",
                 "small_params.npz"):
        assert (out / name).stat().st_size > 0, name
    assert 'backend = "ray"' in (out / "config.toml").read_text()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(r["method"] == method for r in rows)
    record = json.loads((out / "nodes.json").read_text())
    assert set(record["nodes"]) == NODES and set(record["placement"]) == NODES
    working = {name: n for name, n in record["nodes"].items() if name != lost}
    assert all(n["busy"] > 0 for n in working.values())  # each computed in its actor
    assert all(n["bytes"] > 0 for name, n in working.items() if name != "distillation")
    assert record["timing"]["ray_start_seconds"] > 0
    # one actor process per node, each on the CPU as the role asked
    assert len({p["pid"] for p in record["placement"].values()}) == len(NODES)
    assert all(p["jax_devices"] == ["cpu:0"] for p in record["placement"].values())
    # the suite's compilation cache reached every actor (tests/conftest.py): clients warm up
    # after the first one and load its programs (``warm_up_waves``)
    assert {p["compilation_cache"] for p in record["placement"].values()} == {
        os.environ["JAX_COMPILATION_CACHE_DIR"]}
    with np.load(out / "global_params.npz") as params:
        assert params.files and all(np.isfinite(params[k]).all() for k in params.files)
    return rows


def improved(rows: list[dict]) -> bool:
    return rows[0]["global_accuracy"] < 0.25 and rows[-1]["global_accuracy"] >= TARGET


# Quick checks first: they need no Ray instance running in this process.

def test_without_ray_the_backend_is_a_one_line_error(monkeypatch, capsys, tmp_path):
    import fdjax.runtime

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now fails as if not installed
    monkeypatch.delitem(sys.modules, "fdjax.runtime.ray_backend", raising=False)
    monkeypatch.delattr(fdjax.runtime, "ray_backend", raising=False)
    out = tmp_path / "run"
    assert main(["run", "--backend", "ray", "--set", "stop.time_budget=1", "--out",
                 str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and 'pip install "fdjax[ray]"' in err
    assert not out.exists()


def test_address_needs_the_ray_backend_and_nothing_else_imports_ray(capsys):
    assert main(["run", "--address", "auto", "--set", "stop.time_budget=1"]) == 2
    assert "--address" in capsys.readouterr().err
    code = ("import sys, fdjax.cli, fdjax.experiment, fdjax.runtime.nodes, fdjax.report; "
            "assert 'ray' not in sys.modules, 'ray imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("address, words", [("127.0.0.1:1", "no Ray cluster answers"),
                                             ("nonsense", "expected auto, HOST:PORT")])
def test_an_address_without_a_cluster_is_a_quick_one_line_error(address, words, capsys,
                                                                 tmp_path):
    """Ray itself would retry a dead HOST:PORT for minutes; fdjax checks it first."""
    assert not ray.is_initialized()  # else the run would use the instance this process has
    out = tmp_path / "run"
    assert main(["run", "--backend", "ray", "--address", address, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and words in err and not out.exists()


def test_clients_sharing_a_compilation_cache_warm_up_after_the_first_one():
    """Clients on one Ray node with one persistent compilation cache: the first compiles, the
    others warm up after it and load its programs; without a cache, or on another Ray node,
    every client compiles at once. Nodes without warm-up calls are left out."""
    from fdjax.runtime.ray_backend import warm_up_waves

    calls = {"client0": [1], "client1": [1], "client2": [1], "distillation": [1], "averaging": []}
    cached = {node: {"node_id": "a", "compilation_cache": "/c"} for node in calls}
    assert warm_up_waves(calls, cached) == [["client0", "distillation"], ["client1", "client2"]]
    uncached = {node: {"node_id": "a", "compilation_cache": None} for node in calls}
    assert warm_up_waves(calls, uncached) == [["client0", "client1", "client2", "distillation"]]
    apart = dict(cached, client2={"node_id": "b", "compilation_cache": "/c"})
    assert warm_up_waves(calls, apart) == [["client0", "client2", "distillation"], ["client1"]]


def test_actors_get_the_jax_memory_settings_of_their_role():
    from fdjax.runtime.ray_backend import Role

    assert Role(1, 0, {}).env_vars() == {"JAX_PLATFORMS": "cpu"}
    shared = Role(1, 0.5, {}).env_vars()  # two servers on one GPU: 45% of it each
    assert shared["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    assert shared["XLA_PYTHON_CLIENT_MEM_FRACTION"] == shared["XLA_CLIENT_MEM_FRACTION"] == "0.450"
    assert Role(1, 1, {}, 0.3).env_vars()["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.300"
    options = Role(0.25, 0, {"client_machine": 1.0}).options("fdjax/x/client0")
    assert options["resources"] == {"client_machine": 1.0} and options["num_cpus"] == 0.25
    assert options["runtime_env"] == {"env_vars": {"JAX_PLATFORMS": "cpu"}}


def test_compare_on_ray_starts_its_own_instance_and_leaves_nothing_behind(tmp_path, monkeypatch):
    """``fdjax compare --backend ray``: sync and async-continuous on one local instance that
    fdjax starts and stops; both improve the global model and write every file."""
    import fdjax.experiment as experiment

    assert not ray.is_initialized()
    seen: dict[int, str] = {}
    before = set(ray_processes())
    out = tmp_path / "cmp"
    real_run = experiment.run

    def spying_run(*args, **kwargs):  # notes Ray's processes while a run is going on
        kwargs["on_row"] = lambda row: seen.update(ray_processes())
        return real_run(*args, **kwargs)

    monkeypatch.setattr(experiment, "run", spying_run)
    argv = ["compare", "--backend", "ray", "--methods", "sync,async-continuous", "--out", str(out)]
    for override in RAY_TINY:
        if not override.startswith(("clock=", "backend=")):
            argv += ["--set", override]
    assert main(argv) == 0
    assert any("raylet" in name for name in seen.values())  # a real instance ran the runs
    for method in ("sync", "async-continuous"):
        rows = check_run_directory(out / method / "seed0", method)
        assert improved(rows), (method, rows[0], rows[-1])
    # the second run reused the first one's actors, each node's own (``reuse_actors``)
    first, second = (json.loads((out / m / "seed0" / "nodes.json").read_text())
                     for m in ("sync", "async-continuous"))
    assert {n: p["pid"] for n, p in first["placement"].items()} == \
        {n: p["pid"] for n, p in second["placement"].items()}
    assert (first["timing"]["ray_actors_reused"], second["timing"]["ray_actors_reused"]) == (0, 5)
    assert json.loads((out / "results.json").read_text())
    # fdjax stopped the instance it started: no daemon or actor process is left
    assert not ray.is_initialized()
    assert wait_gone(set(seen) - before) == []


@pytest.fixture(scope="module")
def ray_instance():
    """One local instance for the fault tests; shut down, and checked gone, afterwards."""
    ray.init(num_cpus=4, include_dashboard=False)
    started = set(ray_processes())
    try:
        yield
    finally:
        ray.shutdown()
        assert wait_gone(started) == [], "Ray processes left behind"


@pytest.fixture(scope="module")
def pool(ray_instance):
    """One pool of actors for the module's runs (as a comparison holds one): each node's actor
    starts once and is reused by the runs after, except where a test killed it. Every actor is
    gone once the pool closes."""
    from fdjax.runtime.ray_backend import current_pool, reuse_actors

    with reuse_actors() as actors:
        yield actors
        # the tests' runs found it as experiment.run does, and it did not leak past the block
        assert current_pool() is actors
    assert current_pool() is None and fdjax_actors() == []


def pooled_only(pool, lost: str | None = None) -> None:
    """After a pooled run: every fdjax actor still alive is one the pool holds idle, each
    node's own; the actor of ``lost`` (killed during the run) is neither alive nor held."""
    held = {name for _, _, name in pool.idle.values()}
    assert set(fdjax_actors()) == held
    assert set(pool.idle) == NODES - ({lost} if lost else set())


def test_a_run_returns_only_once_ray_holds_its_actors_dead(ray_instance, monkeypatch):
    """``ray.kill`` returns before Ray's head has the actor dead (the request is sent, not
    waited for); ``Deployment.close`` waits until it has. Here the kill reaches the head half
    a second late, as a loaded head may get to it, so without that wait the actor would still
    be listed after ``close``: the teardown flake of the fault tests, made certain. (One actor:
    each is a process that starts and imports JAX, and one shows it.)"""
    import threading

    from fdjax.runtime.ray_backend import Deployment, Role

    role = Role(0.25, 0, {})
    deployment = Deployment(None, None, None, role, role, start_timeout=120)
    deployment.start("client0", "client", {}, None)
    deployment.wait_started()
    assert len([a for a in fdjax_actors() if f"/{deployment.tag}/" in a]) == 1
    real_kill, timers = ray.kill, []

    def late_kill(actor, **kwargs):
        timers.append(threading.Timer(0.5, real_kill, (actor,), kwargs))
        timers[-1].start()

    monkeypatch.setattr(ray, "kill", late_kill)
    deployment.close()
    assert len(timers) == 1 and not [a for a in fdjax_actors() if f"/{deployment.tag}/" in a]


def test_a_pool_gives_a_live_actor_to_the_next_run_and_replaces_a_killed_one(ray_instance):
    """``ActorPool``: after a run, its live actors wait idle for the next run, which loads its
    own programs into them; one killed during the run is not given back, so the next run
    starts a new actor for that node. Closing the pool kills the rest."""
    from fdjax.runtime.ray_backend import ActorPool, Deployment, Role

    role, nodes = Role(0.25, 0, {}), ("client0", "averaging")

    def deploy(pool, programs):
        deployment = Deployment(None, None, None, role, role, start_timeout=120, pool=pool)
        for node in nodes:
            deployment.start(node, "client", programs, None)
        return deployment, deployment.wait_started()

    pool, names = ActorPool(), set()  # a pool of the test's own, not the module's
    try:
        first, where = deploy(pool, {"old": int})
        names |= set(first.names.values())
        ray.kill(first.actors["client0"])
        first.lost.add("client0")  # as the run's RayClock records an actor found gone
        first.close()
        assert set(pool.idle) == {"averaging"}
        assert set(fdjax_actors()) & names == {first.names["averaging"]}
        second, again = deploy(pool, {"new": int})
        names |= set(second.names.values())
        assert second.reused == {"averaging"} and (pool.started, pool.reused) == (2 + 1, 1)
        assert again["averaging"]["pid"] == where["averaging"]["pid"]
        assert again["client0"]["pid"] != where["client0"]["pid"]
        # the reused actor holds the second run's programs, not the first one's
        assert ray.get(second.actors["averaging"].holds.remote()) == ["new"]
        second.close()
        assert set(pool.idle) == set(nodes)
        assert set(fdjax_actors()) & names == {name for _, _, name in pool.idle.values()}
        # an idle actor that dies in the pool is replaced when the next run finds it gone
        ray.kill(pool.idle["averaging"][1])
        deadline = time.monotonic() + 30  # until Ray's head has it dead (the kill is sent only)
        while pool.idle["averaging"][2] in fdjax_actors() and time.monotonic() < deadline:
            time.sleep(0.05)
        third, last = deploy(pool, {"newer": int})
        names |= set(third.names.values())
        assert third.reused == {"client0"} and last["client0"]["pid"] == again["client0"]["pid"]
        assert last["averaging"]["pid"] != again["averaging"]["pid"]
        assert ray.get(third.actors["averaging"].holds.remote()) == ["newer"]
        third.close()
    finally:
        pool.close()
    assert not set(fdjax_actors()) & names


def kill_client_once(index: int):
    """An ``on_row`` hook that kills client ``index``'s actor (``ray.kill``) at the run's first
    evaluation, when the clients have just been served their first model; returns the hook and
    what it did. The run then needs several more rounds to reach its target accuracy."""
    done: dict = {}

    def hook(row: dict) -> None:
        if "killed" not in done:
            (name,) = [a for a in fdjax_actors() if a.endswith(f"/client{index}")]
            ray.kill(ray.get_actor(name))
            done["killed"] = row["time"]
    return hook, done


def test_a_killed_client_actor_does_not_stop_an_async_run(pool, tmp_path):
    hook, done = kill_client_once(1)
    result = run(ray_tiny("async-continuous", "aggregation.round_timeout=3"), tmp_path / "run",
                 on_row=hook)
    assert "killed" in done
    crashed = events(result, "crashed", "client1")
    assert len(crashed) == 1 and "Ray actor of client1 is gone" in crashed[0]["error"]
    assert result.rows[-1]["client_crashes"] == 1
    # the run went on without it, rounds and distillation, to the target accuracy
    later = [e for e in events(result, "round_end", "averaging") if e["time"] > crashed[0]["time"]]
    assert len(later) >= 2 and all(e["clients"] >= 1 for e in later)
    assert improved(result.rows)
    check_run_directory(tmp_path / "run", "async-continuous", lost="client1")
    pooled_only(pool, lost="client1")  # the lost actor was not given back to the pool


def test_a_sync_round_goes_on_without_a_killed_client_after_its_timeout(pool):
    hook, done = kill_client_once(1)
    result = run(ray_tiny("sync", "aggregation.round_timeout=3", "aggregation.quorum=2"),
                 on_row=hook)
    assert "killed" in done
    crashed = events(result, "crashed", "client1")
    assert len(crashed) == 1
    # exactly one round waited out its timeout for the lost client, then closed with the others
    timeouts = events(result, "round_timeout", "averaging")
    assert [(e["missing"], e["answered"]) for e in timeouts] == [([1], 2)]
    ends = events(result, "round_end", "averaging")
    after = [e for e in ends if e["time"] >= timeouts[0]["time"]]
    assert len(after) >= 2 and all(e["clients"] == 2 for e in after)
    assert improved(result.rows)
    pooled_only(pool, lost="client1")


def test_fedbuff_runs_on_ray_with_no_ray_code_of_its_own(pool, tmp_path):
    """A method that brings its own averaging loop (``fdjax/methods/fedbuff.py``) runs on Ray
    through the nodes' executors: its server step is a ``Program`` sent to the averaging
    server's actor, its clients train in theirs."""
    import fdjax.methods.fedbuff as fedbuff
    import fdjax.runtime.ray_backend as ray_backend

    assert "ray" not in vars(fedbuff)
    result = run(ray_tiny("fedbuff", "aggregation.buffer_size=2"), tmp_path / "run")
    ends = events(result, "round_end", "averaging")
    assert len(ends) >= 2 and all(e["clients"] == 2 for e in ends)
    assert improved(result.rows)
    check_run_directory(tmp_path / "run", "fedbuff")
    node_classes = {cls for cls in vars(ray_backend).values() if isinstance(cls, type)}
    from fdjax.runtime import nodes

    assert not any(issubclass(cls, (nodes.Client, nodes.AveragingServer,
                                    nodes.DistillationServer)) for cls in node_classes)
    pooled_only(pool)


def test_models_from_import_paths_are_built_in_the_actors(pool, tmp_path):
    """The ResNets with BatchNorm and Dropout, named by import path: each actor imports the
    factory and builds its own programs; the running statistics come back trained."""
    # The settings of test_any_model's ResNet run (TINY, batches of 8, async-fwd), so that the
    # actors' programs are that run's: whichever of the two runs second loads them from the
    # suite's compilation cache instead of compiling the ResNets again. To the fourth averaging
    # round (about 7 s after the actors are warm on an idle 2-core machine), not a fixed 20 s:
    # what is checked is done by then.
    cfg = load_config(None, TINY + [
        "clock=real", "backend=ray", "ray.client_cpus=0.25", "ray.server_cpus=0.25",
        "method=async-fwd", "models.global_model=fdjax.core.resnet:resnet10",
        "models.small_model=fdjax.core.resnet:resnet6", "clients.batch_size=8",
        "stop.max_rounds=4", "stop.eval_interval=1", "stop.time_budget=60"])
    result = run(cfg, tmp_path / "run")
    rows = check_run_directory(tmp_path / "run", "async-fwd")
    assert len(rows) >= 3 and rows[-1]["round"] >= 2 and rows[-1]["distill_chunks"] >= 1
    assert 'small_model = "fdjax.core.resnet:resnet6"' in (
        tmp_path / "run" / "config.toml").read_text()
    for params in (result.small_params, result.global_params):
        stats = jax.tree_util.tree_flatten_with_path(params["batch_stats"])[0]
        means = [np.asarray(v) for path, v in stats if jax.tree_util.keystr(path)[-7:-1] ==
                 "'mean'"]
        assert means and all(np.abs(m).max() > 1e-3 for m in means)  # they start at zero
    pooled_only(pool)
