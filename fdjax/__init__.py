"""fdjax: federated learning with knowledge distillation, synchronous and asynchronous, in JAX.

Layers (each imports only those before it): ``fdjax.core`` (pure models, training, distillation,
aggregation), ``fdjax.data`` (sources and partitions), ``fdjax.runtime`` (compiled programs, nodes,
clocks, channels), ``fdjax.methods``, then ``fdjax.experiment``, ``fdjax.report`` and the CLI.

The top-level API is what notebooks and the CLI call::

    cfg = fdjax.load_config(None, ["method=sync"])
    result = fdjax.run(cfg)                      # -> fdjax.experiment.Run
    cmp = fdjax.compare(cfg, ["sync", "async-continuous"], seeds=2)
"""

__version__ = "0.1.0"

_LAZY = {"run": "fdjax.experiment", "compare": "fdjax.experiment", "Run": "fdjax.experiment",
         "Comparison": "fdjax.experiment", "load_config": "fdjax.config",
         "Config": "fdjax.config", "ConfigError": "fdjax.config"}


def __getattr__(name):  # imported on first use, so `import fdjax` stays light
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fdjax' has no attribute {name!r}")
