"""Any Flax module as a model: a BatchNorm + Dropout ResNet from an import path through ``fdjax
run``, from Python, resumed, and the one-line errors of a model that cannot be built."""

from __future__ import annotations

import json
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdjax.cli import main
from fdjax.core import aggregation
from fdjax.core.models import ModelError, ModelSpec
from fdjax.core.resnet import ResNet
from fdjax.core.training import init_train_state, make_optimizer, train_step
from fdjax.experiment import compare, run

from tests.runtime.test_methods import TINY, tiny
from tests.test_resume import Killed, kill_at, steps
from tests.test_rundir_lock import snapshot

RESNETS = ["--set", "models.global_model=fdjax.core.resnet:resnet10",
           "--set", "models.small_model=fdjax.core.resnet:resnet6"]


def tiny_toml(tmp_path, *extra: str):
    path = tmp_path / "tiny.toml"
    sections: dict[str, dict[str, str]] = {}
    for item in TINY + list(extra):  # a later setting replaces an earlier one
        key, value = item.split("=", 1)
        section, name = key.split(".", 1)
        if not value.startswith(("[", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9")):
            value = json.dumps(value)
        sections.setdefault(section, {})[name] = value
    path.write_text("\n".join(f"[{s}]\n" + "\n".join(f"{k} = {v}" for k, v in kv.items())
                              for s, kv in sections.items()))
    return path


def flat(npz) -> dict[str, np.ndarray]:
    return {k: npz[k] for k in npz.files}


def stem_resnet(num_classes: int) -> ResNet:
    """The ResNet's stem alone: convolution, BatchNorm, pooling, Dropout and logits. It has the
    running statistics and the dropout draws that the tests below are about, and compiles in a
    fraction of resnet6's time (in a fresh process, a third); the residual blocks run through
    ``fdjax run`` in the tests of the real ResNets."""
    return ResNet((), num_classes, width=8)


def test_a_batchnorm_dropout_resnet_runs_through_fdjax_run_from_an_import_path(tmp_path):
    out = tmp_path / "run"
    # batches of 8: enough steps per round for BatchNorm's running statistics (which
    # evaluation uses) to follow the training batches' within a few rounds
    assert main(["run", "--config", str(tiny_toml(tmp_path, "clients.batch_size=8")),
                 "--method", "async-fwd", "--out", str(out), *RESNETS]) == 0
    recorded = (out / "config.toml").read_text()
    assert 'global_model = "fdjax.core.resnet:resnet10"' in recorded
    assert 'small_model = "fdjax.core.resnet:resnet6"' in recorded
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) >= 3 and rows[-1]["round"] >= 2 and rows[-1]["distill_chunks"] >= 1
    assert all(np.isfinite(r["global_accuracy"]) and np.isfinite(r["small_accuracy"])
               for r in rows)
    # the averaged model learned the synthetic task well above chance (10 classes: 0.1)
    assert max(r["small_accuracy"] for r in rows) > 0.3
    # the running statistics were trained, averaged and distilled, not left at their start
    for name in ("global_params.npz", "small_params.npz"):
        params = flat(np.load(out / name))
        means = [v for k, v in params.items() if "batch_stats" in k and k.endswith("['mean']")]
        variances = [v for k, v in params.items() if "batch_stats" in k and "['var']" in k]
        assert means and variances, sorted(params)
        assert all(np.abs(m).max() > 1e-3 for m in means), name  # init: all zeros
        assert all(np.abs(v - 1).max() > 1e-3 for v in variances), name  # init: all ones


def test_training_updates_batch_stats_and_dropout_draws_from_the_step_key():
    model = ModelSpec(stem_resnet(10), (16, 16, 3), 10).build()
    variables = model.init(jax.random.key(0))
    assert set(variables) == {"params", "batch_stats"}
    images = jnp.asarray(np.random.default_rng(1).integers(0, 256, (8, 16, 16, 3)), jnp.uint8)
    batch = {"images": images, "labels": jnp.arange(8) % 10, "mask": jnp.ones(8)}
    optimizer = make_optimizer()
    state, _ = train_step(init_train_state(variables, optimizer), batch, jax.random.key(2),
                          train_fn=model.train_fn, optimizer=optimizer)
    leaves = lambda tree: jax.tree_util.tree_leaves(tree)
    # the running statistics moved towards the batch's (momentum 0.9), as Flax computes them
    _, stats = model.module.apply(variables, images, train=True, mutable=["batch_stats"],
                                  rngs={"dropout": jax.random.key(2)})
    for got, want in zip(leaves(state.params["batch_stats"]), leaves(stats["batch_stats"])):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    assert any(np.abs(a - b).max() > 0 for a, b in zip(leaves(state.params["batch_stats"]),
                                                        leaves(variables["batch_stats"])))
    # dropout: training mode depends on the key, evaluation mode on nothing
    a, _ = model.train_fn(variables, images, jax.random.key(3))
    b, _ = model.train_fn(variables, images, jax.random.key(4))
    assert np.abs(np.asarray(a - b)).max() > 0
    np.testing.assert_array_equal(model.apply_fn(variables, images),
                                  model.apply_fn(variables, images))


def test_fedavg_averages_the_running_statistics_like_every_other_leaf():
    model = ModelSpec(stem_resnet(10), (16, 16, 3), 10).build()
    one, two = model.init(jax.random.key(0)), model.init(jax.random.key(1))
    two = jax.tree_util.tree_map(lambda x: x + 1.0, two)
    mean = aggregation.fedavg(aggregation.stack_trees([one, two]), jnp.asarray([1.0, 3.0]))
    for a, b, m in zip(*(jax.tree_util.tree_leaves(t["batch_stats"]) for t in (one, two, mean))):
        np.testing.assert_allclose(m, 0.25 * a + 0.75 * b, rtol=1e-6)


def test_a_resnet_run_resumes_from_its_checkpoint(tmp_path):
    # the ResNet run's settings above (batches of 8, async-fwd): its programs, compiled once
    cfg = tiny("async-fwd", "checkpoint.every_rounds=1", "clients.batch_size=8",
               "models.global_model=fdjax.core.resnet:resnet10",
               "models.small_model=fdjax.core.resnet:resnet6")
    with pytest.raises(Killed):
        run(cfg, tmp_path, on_row=kill_at(3.5))
    assert steps(tmp_path) and not (tmp_path / "nodes.json").exists()
    assert main(["run", "--resume", str(tmp_path)]) == 0  # the import path, from config.toml
    nodes = json.loads((tmp_path / "nodes.json").read_text())
    assert nodes["resumes"] and nodes["resumes"][-1]["rows_kept"] > 0
    assert "batch_stats" in "".join(np.load(tmp_path / "small_params.npz").files)


class TinyNet(nn.Module):
    num_classes: int = 10

    @nn.compact
    def __call__(self, images, *, train: bool):
        x = images.reshape(images.shape[0], -1).astype(jnp.float32) / 255.0
        x = nn.Dropout(0.2, deterministic=not train)(nn.relu(nn.Dense(32)(x)))
        return nn.Dense(self.num_classes)(x)


def tiny_net(num_classes, input_shape):
    """A module-level factory: imports back by its path, so a run records it."""
    del input_shape
    return TinyNet(num_classes)


def test_models_from_python_are_recorded_by_import_path_or_as_caller(tmp_path, capsys):
    cfg = tiny("async-continuous", "checkpoint.every_rounds=1", "stop.time_budget=3")
    by_path = run(cfg, tmp_path / "path", models={"small": tiny_net})
    assert by_path.config.models.small_model == "tests.test_any_model:tiny_net"
    assert by_path.config.models.global_model is None  # the preset, as the config says
    out = tmp_path / "object"
    result = run(cfg, out, models={"global": stem_resnet(10), "small": TinyNet()})
    recorded = (out / "config.toml").read_text()
    assert 'global_model = "caller"' in recorded and 'small_model = "caller"' in recorded
    (out / "nodes.json").unlink()  # as if killed after its checkpoints
    before = snapshot(out)
    assert main(["run", "--resume", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'models.global_model = "caller"' in err[0], err
    assert snapshot(out) == before
    resumed = run(result.config, out, models={"global": stem_resnet(10), "small": TinyNet()},
                  resume=True)
    assert resumed.resumes
    comparison = compare(cfg, ["sync", "fedbuff"], out_dir=tmp_path / "cmp",
                         models={"small": tiny_net})
    assert all(r.config.models.small_model == "tests.test_any_model:tiny_net"
               for runs in comparison.runs.values() for r in runs)


def test_a_factory_of_the_callers_own_package_is_imported_from_the_path(tmp_path, monkeypatch,
                                                                        capsys):
    package = tmp_path / "src" / "mylab"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(textwrap.dedent("""
        import flax.linen as nn

        class Mlp(nn.Module):
            num_classes: int

            @nn.compact
            def __call__(self, images, *, train):
                x = images.reshape(images.shape[0], -1) / 255.0
                return nn.Dense(self.num_classes)(nn.relu(nn.Dense(16)(x)))

        def mlp(num_classes, input_shape):
            return Mlp(num_classes)
    """))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "mylab", raising=False)
    monkeypatch.delitem(sys.modules, "mylab.nets", raising=False)
    # the command line imports it from the directory it runs in, as ``python -m`` would
    monkeypatch.chdir(tmp_path / "src")
    out = tmp_path / "run"
    assert main(["run", "--config", str(tiny_toml(tmp_path, "stop.time_budget=3")), "--method",
                 "sync", "--set", "models.small_model=mylab.nets:mlp", "--out", str(out)]) == 0
    assert 'small_model = "mylab.nets:mlp"' in (out / "config.toml").read_text()
    assert sys.modules["mylab.nets"].__file__ == str(package / "nets.py")
    small = np.load(out / "small_params.npz").files
    assert any("Dense_1" in k for k in small) and not any("Conv" in k for k in small)


BAD_MODELS = [
    ("models.global_model=nowhere.at_all:net", "models.global_model: cannot import 'nowhere"),
    ("models.small_model=fdjax.core.resnet:resnet99", "models.small_model: module "
                                                      "'fdjax.core.resnet' has no 'resnet99'"),
    ("models.small_model=fdjax.core.models:count_params", "models.small_model: "
                                                          "fdjax.core.models:count_params("),
    ("models.small_model=tests.test_any_model:not_a_module", "returned a int, not a "
                                                             "flax.linen.Module"),
    ("models.global_model=tests.test_any_model:seven_classes", "gives logits of shape (1, 7)"),
    ("models.global_model=not a path", "models.global_model: must be an import path"),
]


def not_a_module(num_classes, input_shape):
    return 3


def seven_classes(num_classes, input_shape):
    return TinyNet(7)


@pytest.mark.parametrize("setting, message", BAD_MODELS)
def test_a_model_that_cannot_be_built_is_one_line_exit_2_and_nothing_written(
        tmp_path, capsys, setting, message):
    out = tmp_path / "run"
    argv = ["run", "--config", str(tiny_toml(tmp_path)), "--method", "sync", "--out", str(out),
            "--set", setting]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists() or not any(out.iterdir())
    cmp = tmp_path / "cmp"
    assert main(["compare", "--config", str(tiny_toml(tmp_path)), "--methods", "sync,fedbuff",
                 "--out", str(cmp), "--set", setting]) == 2
    assert message in capsys.readouterr().err
    assert not cmp.exists() or not any(cmp.iterdir())


class InputScaled(nn.Module):
    """A model whose parameter's initial value is computed from the input batch's values."""
    num_classes: int = 10

    @nn.compact
    def __call__(self, images, *, train: bool):
        x = images.reshape(images.shape[0], -1).astype(jnp.float32)
        scale = self.param("scale", lambda key: jnp.mean(x) + 1.0)
        return nn.Dense(self.num_classes)(x) * scale


def test_a_model_whose_initial_values_depend_on_the_input_still_initialises():
    """``Model.init`` traces the forward pass on the input's shape only (flax's ``lazy_init``);
    a module that needs the input's values to make its variables is initialised on the dummy
    batch instead (zeros, so ``scale`` starts at 1), and a plain one gets the same values both
    ways."""
    model = ModelSpec(InputScaled(), (4, 4, 1), 10).build()
    variables = model.init(jax.random.key(0))
    assert float(variables["params"]["scale"]) == 1.0
    plain = ModelSpec(TinyNet(), (4, 4, 1), 10).build()
    lazy = plain.init(jax.random.key(1))
    eager = plain.module.init(jax.random.key(1), jnp.zeros((1, 4, 4, 1), jnp.uint8), train=False)
    for a, b in zip(jax.tree_util.tree_leaves(lazy), jax.tree_util.tree_leaves(eager), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_an_unknown_role_in_models_is_an_error():
    with pytest.raises(ModelError, match="unknown role 'large'"):
        run(tiny("sync"), models={"large": TinyNet()})


@pytest.fixture(scope="module")
def each_client_alone():
    """Two clients of a BatchNorm + Dropout model, and where each client's own ``LocalTrainer``
    leaves it after two epochs: what both kinds of cohort lanes below must reproduce, trained
    (and compiled) once for both."""
    from fdjax.data.sources import load_synthetic
    from fdjax.runtime.compiled import LocalTrainer

    model = ModelSpec(stem_resnet(4), (8, 8, 1), 4).build()
    sizes = [5, 40]
    data = load_synthetic(sum(sizes), (8, 8, 1), 4, seed=2).arrays()
    clients = [{k: v[:5] for k, v in data.items()}, {k: v[5:] for k, v in data.items()}]
    keys = jax.random.split(jax.random.key(5), 2)
    params = model.init(jax.random.key(0))
    alone = LocalTrainer(model, make_optimizer(), batch_size=16, driver="loop")
    trained = []
    for client in (0, 1):
        state = alone.init(params)
        for epoch in range(2):
            key = jax.random.fold_in(jax.random.fold_in(keys[client], 3), epoch)
            state, _ = alone.epoch(state, jax.device_put(clients[client]), key)
        trained.append(state.params)
    return model, clients, keys, params, trained


@pytest.mark.parametrize("lanes", ["vmap", "sequential"])
def test_a_cohort_trains_a_batchnorm_dropout_model_as_each_client_alone(lanes, each_client_alone):
    """Cohort lanes carry each client's running statistics and draw its dropout keys exactly as
    its own ``LocalTrainer`` does (the same keys: a different key would change the dropout
    masks and so the parameters)."""
    from fdjax.runtime.compiled import ClientPool, CohortTrainer

    model, clients, keys, params, alone = each_client_alone
    trainer = CohortTrainer(model, make_optimizer(), 16, driver="loop", lanes=lanes, max_lanes=2)
    trained, _ = trainer.train(params, ClientPool.from_datasets(clients), [0, 1], keys,
                               version=3, epochs=2)
    for client in (0, 1):
        assert set(trained[client]) == {"params", "batch_stats"}
        for got, want in zip(jax.tree_util.tree_leaves(trained[client]),
                             jax.tree_util.tree_leaves(alone[client])):
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)
        moved = jax.tree_util.tree_leaves(trained[client]["batch_stats"])
        assert any(np.abs(a - b).max() > 1e-4 for a, b in
                   zip(moved, jax.tree_util.tree_leaves(params["batch_stats"])))
