"""fdjax: federated learning with knowledge distillation, synchronous and asynchronous, in JAX.

Layers (each imports only those before it): ``fdjax.core`` (pure models, training, distillation,
aggregation), ``fdjax.data`` (sources and partitions), ``fdjax.runtime`` (compiled programs, and
later nodes and clocks), then the CLI.
"""

__version__ = "0.1.0"
