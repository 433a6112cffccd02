"""Two levels on random quadratics: an LSTM optimiser learned by gradient descent.

Meta-trains the coordinatewise LSTM of Andrychowicz et al. (2016) with Adam, then
compares it with SGD, NAG, RMSprop and Adam, each at its tuned learning rate, on
the same held-out problems. Prints the tables and says where the plots went.

    python examples/two_level_quadratic.py [key=value ...]  # meta.epochs=50
"""

import sys
from pathlib import Path

from hierarchy.cli import run_config

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "two_level_quadratic.yaml"

if __name__ == "__main__":
    raise SystemExit(run_config(CONFIG, sys.argv[1:]))
