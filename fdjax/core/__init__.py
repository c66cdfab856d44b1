"""The pure core of fdjax: models, local training, evaluation, distillation and aggregation.

Every function here is pure and un-jitted; ``fdjax.runtime.compiled`` jits them once per node.
"""

from fdjax.core.aggregation import (AGGREGATION_RULES, AggregationRule, StreamingAverage,
                                    aggregate, buffered_update, check_weights, clip_update, coordinate_median,
                                    fedavg, mix, stack_trees,
                                    staleness_mix, staleness_weight, streaming_add,
                                    streaming_init, streaming_result, trimmed_mean,
                                    validate_update)
from fdjax.core.distillation import distill_step, distillation_loss, kl_divergence
from fdjax.core.evaluation import evaluate
from fdjax.core.models import (CNN, PRESETS, Model, ModelError, ModelSpec, count_params,
                               make_model)
from fdjax.core.training import (OptimizerSettings, TrainState, init_train_state, make_optimizer,
                                 summarize, train_step)

__all__ = [
    "AGGREGATION_RULES", "AggregationRule", "CNN", "PRESETS", "Model", "ModelError", "ModelSpec",
    "OptimizerSettings",
    "StreamingAverage", "TrainState", "aggregate", "buffered_update", "check_weights", "clip_update",
    "coordinate_median", "count_params", "distill_step", "distillation_loss", "evaluate", "fedavg",
    "init_train_state", "kl_divergence", "make_model", "make_optimizer", "mix", "stack_trees",
    "staleness_mix", "staleness_weight", "streaming_add", "streaming_init", "streaming_result",
    "summarize", "train_step", "trimmed_mean", "validate_update",
]
