#!/usr/bin/env bash
# The benchmark's own scratch environment for Flower and PyTorch (not fdjax dependencies):
# experiments/bench_flower_round/.scratch, ignored by git.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .scratch
.scratch/bin/python -m pip install -q --upgrade pip
.scratch/bin/python -m pip install -q "flwr[simulation]==1.42.0" "torch==2.13.0" numpy
