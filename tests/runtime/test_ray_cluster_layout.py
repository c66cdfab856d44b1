"""The README's paper layout on a real multi-node Ray cluster: a head tagged ``server_machine``
and three worker nodes tagged ``client_machine``, each its own raylet (``ray.cluster_utils.
Cluster``, all on this machine). fdjax joins it by address; ``nodes.json`` then says where every
actor ran, and each ran on a node that offers what its role asks for: both servers on the head,
one client on each worker."""

from __future__ import annotations

import json

import pytest

ray = pytest.importorskip("ray")  # a protection only: CI installs the extra and runs these

from ray.cluster_utils import Cluster  # noqa: E402

from fdjax.config import load_config  # noqa: E402
from fdjax.experiment import run  # noqa: E402
from tests.runtime.test_ray_backend import RAY_TINY, fdjax_actors  # noqa: E402

#: ``sync`` to its second round: its clients wait while the distillation server distils the first
#: average, so by then every node has computed. (A fixed 6 s of ``async-continuous`` once ended,
#: on a loaded machine, before the first average reached the distillation server.) The time
#: budget is only a cap for a run that hangs.
LAYOUT = [o for o in RAY_TINY if not o.startswith("stop.")] + [
    "stop.max_rounds=2", "stop.time_budget=120", "stop.eval_interval=2", "method=sync",
    'ray.server_resources=["server_machine=1"]', 'ray.client_resources=["client_machine=1"]',
    "ray.start_timeout=120",
]


@pytest.fixture
def cluster():
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {"server_machine": 2}, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=1, resources={"client_machine": 1}) for _ in range(3)]
    cluster.wait_for_nodes()
    try:
        yield cluster, workers
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()


def test_the_paper_layout_places_every_actor_on_the_node_its_resources_name(cluster, tmp_path):
    cluster, workers = cluster
    cfg = load_config(None, LAYOUT + [f"ray.address={cluster.address}"])
    run(cfg, tmp_path / "run")
    record = json.loads((tmp_path / "run" / "nodes.json").read_text())
    placement = record["placement"]
    assert set(placement) == {"averaging", "distillation", "client0", "client1", "client2"}
    head = cluster.head_node.node_id
    assert placement["averaging"]["node_id"] == head
    assert placement["distillation"]["node_id"] == head
    clients = [placement[f"client{i}"]["node_id"] for i in range(3)]
    assert sorted(clients) == sorted(w.node_id for w in workers)  # one client per worker
    assert len({p["pid"] for p in placement.values()}) == 5  # each actor a process of its own
    # and every actor did its share: busy time in nodes.json, rows in metrics.jsonl
    assert all(n["busy"] > 0 for n in record["nodes"].values()), record["nodes"]
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) >= 2 and json.loads(rows[-1])["round"] == 2
    # fdjax joined the cluster and left it running, with none of its actors behind
    ray.init(address=cluster.address)
    assert fdjax_actors() == []
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert alive == {head, *(w.node_id for w in workers)}
