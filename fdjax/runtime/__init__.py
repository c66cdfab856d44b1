"""The runtime: compiled programs of the core (and, later, nodes, clocks and backends)."""

from fdjax.runtime.compiled import DRIVERS, Distiller, Evaluator, LocalTrainer, resolve_driver

__all__ = ["DRIVERS", "Distiller", "Evaluator", "LocalTrainer", "resolve_driver"]
