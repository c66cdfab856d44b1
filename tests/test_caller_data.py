"""Data handed in from Python is recorded as such, and a run or comparison made with it cannot
be resumed from the command line as if its config could load that data again."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from fdjax.cli import main
from fdjax.data import split_federated
from fdjax.experiment import compare, prepare_data, run

from tests.runtime.test_methods import tiny
from tests.test_rundir_lock import snapshot


def own_data(config):
    """A caller's own split: the config's images with half the labels rotated by one class."""
    splits, _ = prepare_data(config)
    labels = splits.train.labels.copy()
    labels[::2] = (labels[::2] + 1) % splits.train.num_classes
    train = dataclasses.replace(splits.train, labels=labels)
    fed = split_federated(train, config.clients.count, proxy_size=config.data.proxy_size,
                          seed=config.seed)
    return dataclasses.replace(splits, train=train), fed


def test_a_run_on_callers_data_records_it_and_refuses_a_command_line_resume(tmp_path, capsys):
    cfg = tiny("async-continuous", "checkpoint.every_rounds=1")
    prepared = run(cfg, tmp_path / "prepared", data=prepare_data(cfg))
    assert 'source = "synthetic"' in (tmp_path / "prepared" / "config.toml").read_text()
    assert prepared.config.data.source == "synthetic"
    out = tmp_path / "own"
    result = run(cfg, out, data=own_data(cfg))
    assert 'source = "caller"' in (out / "config.toml").read_text()
    assert result.config.data.source == "caller"
    (out / "nodes.json").unlink()  # as if it had been killed after its checkpoints
    before = snapshot(out)
    assert main(["run", "--resume", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'data.source = "caller"' in err[0] and "from Python" in err[0]
    assert snapshot(out) == before  # nothing written
    # from Python, with the same data, it resumes
    resumed = run(result.config, out, data=own_data(cfg), resume=True)
    assert resumed.resumes and resumed.config.data.source == "caller"


def test_a_comparison_on_callers_data_uses_it_for_every_seed_and_records_it(tmp_path, capsys):
    cfg = tiny("sync", "stop.time_budget=3")
    data = own_data(cfg)
    comparison = compare(cfg, ["sync", "async-round"], seeds=2, out_dir=tmp_path / "cmp",
                         data=data)
    record = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert 'source = "caller"' in record["config"]
    for runs in comparison.runs.values():
        assert [r.config.data.source for r in runs] == ["caller", "caller"]
    assert main(["compare", "--resume", str(tmp_path / "cmp")]) == 2
    assert 'data.source = "caller"' in capsys.readouterr().err
    with pytest.raises(ValueError, match='data.source = "caller"'):
        run(comparison.runs["sync"][0].config)
    assert np.isfinite(comparison.runs["sync"][1].rows[-1]["global_accuracy"])
