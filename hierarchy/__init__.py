"""hierarchy: optimisers learned by gradient descent, stacked as deep as you like."""

from hierarchy.baselines import BASELINES, HandRule
from hierarchy.config import Config, ConfigError, load_config
from hierarchy.level import Level, Problem, Task, build_stack
from hierarchy.optim import LearnedOptimizer, load_rule
from hierarchy.rules import LSTMRule, MLPRule, UpdateRule, preprocess
from hierarchy.trainer import MetaTrainer
from hierarchy.unroll import Carry, start, unroll

__version__ = "0.1.0"

__all__ = [
    "BASELINES",
    "Carry",
    "Config",
    "ConfigError",
    "HandRule",
    "LSTMRule",
    "LearnedOptimizer",
    "Level",
    "MLPRule",
    "MetaTrainer",
    "Problem",
    "Task",
    "UpdateRule",
    "build_stack",
    "load_config",
    "load_rule",
    "preprocess",
    "start",
    "unroll",
]
