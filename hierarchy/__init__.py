"""hierarchy: optimisers learned by gradient descent, stacked as deep as you like."""

from hierarchy.baselines import BASELINES, HandRule
from hierarchy.checkpoint import CheckpointError, save_rule
from hierarchy.config import Config, ConfigError, load_config
from hierarchy.diagnostics import GradientCheck, check_meta_gradient
from hierarchy.level import Level, Problem, Task, build_stack
from hierarchy.optim import LearnedOptimizer, load_rule
from hierarchy.rules import (
    LSTMRule,
    MLPRule,
    Params,
    State,
    UpdateRule,
    Updates,
    preprocess,
)
from hierarchy.trainer import MetaTrainer, NonFiniteError
from hierarchy.unroll import Carry, start, unroll

__version__ = "0.1.0"

__all__ = [
    "BASELINES",
    "Carry",
    "CheckpointError",
    "Config",
    "ConfigError",
    "GradientCheck",
    "HandRule",
    "LSTMRule",
    "LearnedOptimizer",
    "Level",
    "MLPRule",
    "MetaTrainer",
    "NonFiniteError",
    "Params",
    "Problem",
    "State",
    "Task",
    "UpdateRule",
    "Updates",
    "build_stack",
    "check_meta_gradient",
    "load_config",
    "load_rule",
    "preprocess",
    "save_rule",
    "start",
    "unroll",
]
