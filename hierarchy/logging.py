"""Console logging for runs, and an experiment tracker that never needs a network.

wandb runs ``offline`` by default and writes into the run folder; ``disabled``
turns it off and ``online`` is used only when a user asks for it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)


def setup_logging(level: str = "INFO") -> None:
    """Send the package's log lines to stderr with a timestamp."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


class Tracker:
    """A thin wrapper over a wandb run; a no-op when the mode is ``disabled``."""

    def __init__(self, mode: str, project: str, run_dir: Path, config: dict) -> None:
        self.run = None
        if mode == "disabled":
            return

        # wandb reads its settings from the environment when it is imported, and
        # the mode argument alone does not stop its telemetry from resolving a
        # remote host at exit; the environment does.
        os.environ["WANDB_MODE"] = mode
        os.environ.setdefault("WANDB_SILENT", "true")
        if mode != "online":
            os.environ["WANDB_DISABLE_GIT"] = "true"
            os.environ["WANDB_DISABLE_CODE"] = "true"
        import wandb

        run_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            mode=mode,
            project=project,
            dir=str(run_dir),
            config=config,
            name=run_dir.name,
            reinit="finish_previous",
        )
        logger.info("wandb %s run in %s", mode, run_dir / "wandb")

    def log(self, metrics: dict, step: int | None = None) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
