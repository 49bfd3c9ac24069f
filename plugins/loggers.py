"""Lightning loggers that need a word of setup beyond their config (``logger=`` group).

MLflow 3 keeps runs in a database; ``mlflow_logger`` points it at a SQLite file inside
the run folder unless a ``tracking_uri`` (a server) is given.
"""

from __future__ import annotations

from pathlib import Path


def mlflow_logger(save_dir: str, experiment_name: str = "llmzoo", run_name: str | None = None,
                  tracking_uri: str | None = None):
    from lightning.pytorch.loggers import MLFlowLogger

    uri = tracking_uri or f"sqlite:///{Path(save_dir).resolve()}"
    Path(save_dir).parent.mkdir(parents=True, exist_ok=True)
    return MLFlowLogger(experiment_name=experiment_name, run_name=run_name, tracking_uri=uri)
