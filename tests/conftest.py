"""Shared fixtures: the prepared CIFAR-10 TFDS directory and small models."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

# One persistent XLA compilation cache for the whole suite run, set before anything imports JAX.
# The suite compiles the same small programs again and again in separate processes: both xdist
# workers, and the subprocesses that tests start (killed-and-resumed runs, the four-device
# cohort checks, the CLI). Each process compiled them all anew; a cache shared by the run lets
# a later process load what an earlier one compiled (the cohort checks' subprocess: 29 s cold,
# 7 s warm). The cache starts empty in every run, as on a fresh machine, and is deleted after
# it: a run is timed cold. The workers and subprocesses find it through the environment.
_CACHE_OWNER = "FDJAX_TEST_XLA_CACHE"
_MADE_CACHE = None  # set in the one process that made it
if not os.environ.get(_CACHE_OWNER) and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    os.environ[_CACHE_OWNER] = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(
        prefix="fdjax-test-xla-cache-")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # default: only > 1 s
    _MADE_CACHE = os.environ[_CACHE_OWNER]

import pytest  # noqa: E402

from fdjax.data import TFDS_DIR_VARIABLE, default_tfds_dir  # noqa: E402

#: One setting locates the prepared TFDS directory; the default is the checkout's sibling.
TFDS_DIR = default_tfds_dir()


@pytest.fixture(scope="session")
def tfds_dir() -> str:
    if not (Path(TFDS_DIR) / "cifar10").is_dir():
        pytest.skip(f"prepared CIFAR-10 TFDS directory not found at {TFDS_DIR} "
                    f"(set {TFDS_DIR_VARIABLE})")
    return TFDS_DIR


#: The modules whose tests take longest in all (Ray instances and clusters, subprocesses, the
#: notebook, whole runs), from ``--durations=0``. They are collected first, each module's tests
#: kept in their order: longest first is the classic rule for spreading jobs over two machines,
#: so that with ``-n 2`` the run ends on short modules instead of one worker finishing a long
#: one while the other idles.
LONGEST_FIRST = ("test_any_model", "test_ray_backend", "test_ray_cluster_layout",
                 "test_ray_token_cluster", "test_gpu_script", "test_cohort_sharding", "test_cli",
                 "test_methods", "test_method_contract", "test_faults", "test_notebook",
                 "test_sigkill_resume", "test_compare_resume", "test_rundir_lock")
#: Under ``pytest -n`` each module is a unit of work, sent whole to the first free worker in the
#: order above (``pytest_xdist_make_scheduler`` below). A module's tests share its fixtures,
#: caches and compiled programs, which a split would build again on the other worker; and the
#: Ray modules are one unit, since ``ray.init()`` joins a cluster that another worker's test
#: started with ``ray start``, and the tests count Ray's processes. (xdist's default, ``--dist
#: load``, sent each worker a quarter of the suite up front: one got every long module in its
#: first batch and ran them one after another while the other ran out of work. Its
#: ``xdist_group`` mark does not take effect with pytest 9.2, whose node ids it can no longer
#: rename.)
#:
#: ``test_any_model`` joins the Ray unit, ahead of it: its ResNet runs and the Ray test of models
#: from import paths have the same settings, so the Ray actors load the ResNets' programs from
#: the suite's compilation cache instead of compiling them again (sent to different workers,
#: the two ran at about the same time and both compiled them).
GROUPS = {"tests/runtime/test_ray_": "ray", "tests/test_any_model.py": "ray"}


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    order = {id(item): n for n, item in enumerate(items)}
    module = lambda item: getattr(item.module, "__name__", "").rsplit(".", 1)[-1]
    items.sort(key=lambda item: (rank.get(module(item), len(rank)), order[id(item)]))


def pytest_xdist_make_scheduler(config, log):
    """``pytest -n N`` (its default ``--dist load``): one module at a time, in the order above,
    to the first free worker; the Ray modules together."""
    if config.getvalue("dist") != "load":
        return None  # a mode chosen on the command line is left as asked
    from xdist.scheduler import LoadScopeScheduling

    class ByModule(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            group = next((g for prefix, g in GROUPS.items() if nodeid.startswith(prefix)), None)
            return group or nodeid.split("::", 1)[0]

    config.option.loadscopereorder = False  # keep the order above, not largest module first
    return ByModule(config, log)


#: Modules whose tests compile more than they compute run with XLA's optimisations off
#: (``jax_disable_most_optimizations``: LLVM at -O0, as the GPU script's smoke run), and so do the
#: subprocesses and Ray actors they start, which read it from the environment. Chosen module by
#: module, from each module's CPU time run alone both ways (tests/TIMINGS.md); the other modules
#: train more than they compile, which -O0 makes slower, and keep XLA's default. What these
#: tests check (results, files, schedules, equalities between two ways of computing) does not
#: depend on how hard XLA optimises; the rest of the suite runs the default programs.
QUICK_COMPILE = ("test_layers", "test_models", "test_augment", "test_robust_aggregation",
                 "test_flower_oracle", "test_aggregation", "test_cohort", "test_cohort_sharding")


@pytest.fixture(autouse=True, scope="module")
def _quick_compile_modules(request):
    """XLA's optimisations off for a module of ``QUICK_COMPILE``, and back on after it.

    JAX's in-memory caches do not tell the two levels apart, so they are emptied when such a
    module starts and when it ends: the module runs only programs compiled at -O0 (not one an
    earlier module compiled at the default level: their results can differ in the last bit,
    which tests that compare two ways of computing bit for bit would see), and a later module
    on the same worker compiles its own (or loads them from the suite's cache, whose keys do
    tell the levels apart) at the default level instead of reusing a slower -O0 program."""
    if request.module.__name__.rsplit(".", 1)[-1] not in QUICK_COMPILE:
        yield
        return
    import jax

    before = jax.config.read("jax_disable_most_optimizations")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
        jax.config.update("jax_disable_most_optimizations", True)
        jax.clear_caches()
        try:
            yield
        finally:
            jax.config.update("jax_disable_most_optimizations", before)
            jax.clear_caches()


def pytest_unconfigure(config):
    """The process that made the suite's compilation cache deletes it (see the top)."""
    if _MADE_CACHE:
        shutil.rmtree(_MADE_CACHE, ignore_errors=True)
