"""The runtime: compiled programs of the core, clocks, channels and the nodes of a run.

It holds no learning math: nodes call ``fdjax.core`` through the compiled programs.
"""

from fdjax.runtime.compiled import DRIVERS, Distiller, Evaluator, LocalTrainer, resolve_driver

__all__ = ["DRIVERS", "Distiller", "Evaluator", "LocalTrainer", "resolve_driver"]
