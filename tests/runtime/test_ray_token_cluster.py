"""A token-protected Ray cluster of two nodes on this machine, started as the README says
(``RAY_AUTH_MODE=token``, ``ray get-auth-token --generate``, ``ray start --head``, ``ray start
--address``): fdjax joins it with the token, and a driver without it gets a one-line error.

The cluster keeps to itself: a temporary ``HOME`` (the token file), ``--temp-dir`` (where
``ray start`` records the cluster that a bare ``ray.init()`` on this machine would join) and
free ports, so neither the user's ``~/.ray/auth_token`` nor other Ray instances running here
see it or are seen. Every process it started is checked gone at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import pytest

ray = pytest.importorskip("ray")  # a protection only: CI installs the extra and runs these

from tests.runtime.test_ray_backend import RAY_TINY, wait_gone  # noqa: E402

if not hasattr(ray.exceptions, "AuthenticationError"):
    pytest.skip("token authentication needs Ray >= 2.52", allow_module_level=True)

BIN = Path(sys.executable).parent
#: a short run of the Ray tests' tiny config: servers on the head, the client on the other node
#: (one client: what is checked is where each role's actors run, and each actor is a process
#: that starts, imports JAX and loads its programs)
RUN = [o for o in RAY_TINY if not o.startswith(("clock=", "backend=", "stop."))] + [
    "stop.time_budget=4", "stop.eval_interval=2", "clients.count=1",
    'ray.server_resources=["server_machine=1"]', 'ray.client_resources=["client_machine=1"]',
]


class TokenCluster(NamedTuple):
    address: str  # the head's HOST:PORT
    token: str
    env: dict[str, str]  # a clean environment (no RAY_* settings, an empty HOME) for drivers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """This process's environment without its Ray settings (``RAY_ADDRESS``, a token), with
    ``home`` as ``HOME``, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return env | {"HOME": str(home), **extra}


def ray_start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """``ray start ... --block``: the node lives as long as this process (SIGTERM ends both)."""
    with log.open("w") as out:
        return subprocess.Popen(
            [str(BIN / "ray"), "start", "--block", "--disable-usage-stats", "--node-ip-address",
             "127.0.0.1", "--object-store-memory", "100000000", "--num-cpus", "1",
             "--dashboard-agent-listen-port", str(free_port()), *args],
            env=env, stdout=out, stderr=subprocess.STDOUT)


def wait_listening(port: int, head: subprocess.Popen, seconds: float = 120.0) -> None:
    """Waits until the head's GCS accepts connections (fdjax checks that before joining)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and head.poll() is None:
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        time.sleep(0.5)
    raise RuntimeError(f"the head did not start (exit status {head.poll()})")


def descendants(nodes: list[subprocess.Popen]) -> set[int]:
    """The ``ray start`` processes and every process under them (daemons, workers)."""
    import psutil

    pids = set()
    for node in nodes:
        with contextlib.suppress(psutil.Error):
            pids |= {node.pid} | {p.pid for p in psutil.Process(node.pid).children(True)}
    return pids


def stop(nodes: list[subprocess.Popen]) -> list[int]:
    """SIGTERMs each ``ray start`` (which then stops its node's processes), worker nodes
    first; returns the processes still running after that, SIGKILLed."""
    pids = descendants(nodes)
    for node in reversed(nodes):
        node.terminate()
        try:
            node.wait(60)
        except subprocess.TimeoutExpired:
            node.kill()
    left = wait_gone(pids, 30)
    for pid in left:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    return left


@pytest.fixture(scope="module")
def token_cluster():
    """A head and one worker node, both with ``RAY_AUTH_MODE=token`` and the token made by
    ``ray get-auth-token --generate`` (the worker reads a copy through
    ``RAY_AUTH_TOKEN_PATH``, as a machine the file was copied to would)."""
    root = Path(tempfile.mkdtemp(prefix="fdjax-ray-", dir="/tmp"))  # short: socket paths
    (root / "home").mkdir()
    (root / "stranger").mkdir()  # a HOME without a token
    env = clean_env(root / "home", RAY_AUTH_MODE="token",
                    RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")  # stop at once on SIGTERM
    token = subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=env,
                           check=True, capture_output=True, text=True).stdout.strip()
    assert (root / "home/.ray/auth_token").read_text().strip() == token
    shutil.copy(root / "home/.ray/auth_token", root / "copied_token")
    port, temp = free_port(), ["--temp-dir", str(root / "ray")]
    nodes = [ray_start(["--head", "--port", str(port), "--include-dashboard=false",
                        "--ray-client-server-port", str(free_port()),
                        "--resources", '{"server_machine": 2}', *temp], env, root / "head.log")]
    try:
        wait_listening(port, nodes[0])
        nodes.append(ray_start(["--address", f"127.0.0.1:{port}", "--resources",
                                '{"client_machine": 3}', *temp],
                               env | {"RAY_AUTH_TOKEN_PATH": str(root / "copied_token")},
                               root / "worker.log"))
        yield TokenCluster(f"127.0.0.1:{port}", token, clean_env(root / "stranger"))
    finally:
        left = stop(nodes)
        shutil.rmtree(root, ignore_errors=True)
    assert left == [], "Ray processes left behind"


def fdjax_run(cluster: TokenCluster, out: Path, env: dict[str, str]
              ) -> subprocess.CompletedProcess:
    """``fdjax run --backend ray --address <head>`` as a driver process of its own."""
    argv = [str(BIN / "fdjax"), "run", "--backend", "ray", "--address", cluster.address,
            "--out", str(out)]
    for override in RUN:
        argv += ["--set", override]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=400)


def test_fdjax_joins_a_token_cluster_with_the_token(token_cluster, tmp_path):
    """The driver gives the token as ``RAY_AUTH_TOKEN`` (the third way the README names);
    its actors run on both nodes, the servers on the head and the client on the worker."""
    env = token_cluster.env | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token_cluster.token}
    done = fdjax_run(token_cluster, tmp_path / "run", env)
    assert done.returncode == 0, done.stderr[-3000:]
    placement = json.loads((tmp_path / "run/nodes.json").read_text())["placement"]
    assert set(placement) == {"averaging", "distillation", "client0"}
    servers = {placement[node]["node_id"] for node in ("averaging", "distillation")}
    assert len(servers) == 1 and servers != {placement["client0"]["node_id"]}
    assert (tmp_path / "run/metrics.jsonl").read_text().strip()


@pytest.mark.parametrize("auth, why", [
    ({}, "it refused this driver, which sent none"),
    ({"RAY_AUTH_MODE": "token"}, "RAY_AUTH_MODE=token here, but no token was found"),
    ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}, "it refused this driver's token"),
], ids=["mode-unset", "no-token-here", "wrong-token"])
def test_a_driver_without_the_token_is_refused_in_one_line(token_cluster, tmp_path, auth, why):
    """The cluster refuses the driver (or, in token mode without a token, ``ray.init`` stops
    first); fdjax says so in one line, with how to give the token, and writes nothing."""
    # Ray retries a refused connection for 20 s, a second at a time; two tries show it
    env = token_cluster.env | auth | {"RAY_gcs_server_port_wait_time_s": "2"}
    done = fdjax_run(token_cluster, tmp_path / "run", env)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    # Ray's own log lines of its tries may come first; fdjax's error is one line, the last
    (error,) = [line for line in done.stderr.splitlines() if line.startswith("fdjax:")]
    assert error == done.stderr.strip().splitlines()[-1]
    assert error.startswith(f"fdjax: error: ray.address '{token_cluster.address}': the Ray "
                            f"cluster requires a token; {why}")
    assert "Set RAY_AUTH_MODE=token" in error and "RAY_AUTH_TOKEN" in error
    assert not (tmp_path / "run").exists()
