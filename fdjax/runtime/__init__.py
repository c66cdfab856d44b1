"""The runtime: compiled programs of the core, clocks, channels and the nodes of a run.

It holds no learning math: nodes call ``fdjax.core`` through the compiled programs.
"""

from fdjax.runtime.compiled import (DRIVERS, LANES, ClientPool, CohortTrainer, Distiller,
                                    Evaluator, LocalTrainer, resolve_driver, resolve_lanes)

__all__ = ["DRIVERS", "LANES", "ClientPool", "CohortTrainer", "Distiller", "Evaluator",
           "LocalTrainer", "resolve_driver", "resolve_lanes"]
