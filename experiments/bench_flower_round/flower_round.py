"""Flower's side of the benchmark: the same FedAvg rounds in Flower's simulation, PyTorch clients.

Runs in the benchmark's scratch environment (``setup_scratch.sh``: flwr[simulation] and torch,
which are not fdjax dependencies), on the clients' images that ``run.py`` exported from fdjax's
own partition (``data.npz``), so both libraries train the same 6,000 images. The model is
``cnn6`` at width 1 written in PyTorch layer for layer (the layers of ``fdjax/core/models.py``:
He-normal convolutions, inputs scaled to [0, 1] and centred the same way), trained with Adam
(lr 1e-3), batch 32, one local epoch, channels-last. Prints one JSON object with the seconds of
each round (from ``configure_train`` to the end of ``aggregate_train`` of a FedAvg subclass) and
the test accuracy of the final model.

    python flower_round.py --data data.npz --rounds 4 --schedule default
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation

# Flower's simulation gives each ClientApp actor these resources; with 2 CPUs, "default"
# (Flower's own default: 2 CPUs per client) trains one client at a time with both cores,
# "parallel" all three at once, "sequential" one at a time with both cores, as "default".
SCHEDULES = {"default": None, "parallel": {"num_cpus": 2 / 3}, "sequential": {"num_cpus": 2}}
DATA = {}


def cnn6() -> torch.nn.Module:
    layers, c_in = [], 3
    for stage in ((32, 32), (64, 64)):
        for channels in stage:
            conv = torch.nn.Conv2d(c_in, channels, 3, padding=1)
            torch.nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            torch.nn.init.zeros_(conv.bias)
            layers += [conv, torch.nn.ReLU()]
            c_in = channels
        layers.append(torch.nn.MaxPool2d(2))
    layers += [torch.nn.Flatten(), torch.nn.Linear(64 * 8 * 8, 256), torch.nn.ReLU(),
               torch.nn.Linear(256, 10)]
    return torch.nn.Sequential(*layers).to(memory_format=torch.channels_last)


def as_input(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    return ((x / 255.0 - 0.5) / 0.25).contiguous(memory_format=torch.channels_last)


def load(path: str) -> dict:
    if path not in DATA:
        with np.load(path) as f:
            DATA[path] = {k: f[k] for k in f.files}
    return DATA[path]


client = ClientApp()


@client.train()
def train(msg: Message, context: Context) -> Message:
    data = load(os.environ["FLOWER_BENCH_DATA"])
    cid = int(context.node_config["partition-id"])
    images, labels = data[f"images{cid}"], torch.from_numpy(data[f"labels{cid}"]).long()
    net = cnn6()
    net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    net.train()
    for idx in torch.randperm(len(labels)).split(32):
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(net(as_input(images[idx.numpy()])), labels[idx])
        loss.backward()
        opt.step()
    content = RecordDict({"arrays": ArrayRecord(net.state_dict()),
                          "metrics": MetricRecord({"num-examples": len(labels)})})
    return Message(content=content, reply_to=msg)


class TimedFedAvg(FedAvg):
    """FedAvg that records when each round starts and when its aggregate is ready."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.starts, self.ends = [], []

    def configure_train(self, *args, **kwargs):
        self.starts.append(time.perf_counter())
        return super().configure_train(*args, **kwargs)

    def aggregate_train(self, *args, **kwargs):
        result = super().aggregate_train(*args, **kwargs)
        self.ends.append(time.perf_counter())
        return result


def accuracy(net: torch.nn.Module, data: dict) -> float:
    net.eval()
    with torch.no_grad():
        logits = torch.cat([net(as_input(data["test_images"][i:i + 500]))
                            for i in range(0, len(data["test_labels"]), 500)])
    return float((logits.argmax(1).numpy() == data["test_labels"]).mean())


def make_server(rounds: int, report: dict) -> ServerApp:
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        torch.manual_seed(0)
        strategy = TimedFedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=3,
                               min_available_nodes=3)
        start = time.perf_counter()
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(cnn6().state_dict()),
                                num_rounds=rounds)
        report["wall_seconds"] = time.perf_counter() - start
        report["round_seconds"] = [e - s for s, e in zip(strategy.starts, strategy.ends)]
        net = cnn6()
        net.load_state_dict(result.arrays.to_torch_state_dict())
        report["final_accuracy"] = accuracy(net, load(os.environ["FLOWER_BENCH_DATA"]))

    return server


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--schedule", choices=list(SCHEDULES), default="default")
    args = parser.parse_args()
    os.environ["FLOWER_BENCH_DATA"] = os.path.abspath(args.data)
    report = {"library": "flower", "schedule": args.schedule, "flwr": _version("flwr"),
              "torch": torch.__version__, "cpu_count": os.cpu_count()}
    resources = SCHEDULES[args.schedule]
    run_simulation(make_server(args.rounds, report), client, num_supernodes=3,
                   backend_config={"client_resources": resources} if resources else None)
    json.dump(report, sys.stdout)
    print()


def _version(name: str) -> str:
    from importlib.metadata import version
    return version(name)


if __name__ == "__main__":
    main()
