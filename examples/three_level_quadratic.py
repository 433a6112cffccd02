"""Three levels on random quadratics: an LSTM meta-optimiser trains an MLP optimiser.

Meta-trains the stack optimisee <- MLP optimiser <- LSTM meta-optimiser <- Adam,
then answers two questions on the same problems. Does the LSTM train the MLP
optimiser better than Adam at its tuned learning rate (the MLP's meta-loss over
its own training steps)? And is the MLP it trains better on held-out quadratics
than the same MLP meta-trained directly by Adam, the two-level LSTM optimiser
(both with as many quadratic steps as the three-level meta-training took) and
SGD, NAG, RMSprop and Adam at tuned learning rates? Prints the tables and says
where the plots went.

    python examples/three_level_quadratic.py [key=value ...]  # meta.epochs=20
"""

import sys
from pathlib import Path

from hierarchy.cli import run_config

CONFIG = (
    Path(__file__).resolve().parent.parent / "configs" / "three_level_quadratic.yaml"
)

if __name__ == "__main__":
    raise SystemExit(run_config(CONFIG, sys.argv[1:]))
