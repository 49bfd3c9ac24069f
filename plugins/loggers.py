"""Lightning loggers that need a word of setup beyond their config (``logger=`` group).

MLflow 3 keeps runs in a database; ``mlflow_logger`` points it at a SQLite file inside
the run folder unless a ``tracking_uri`` (a server) is given. ``TensorBoard`` writes the
resolved config to TensorBoard's HParams tab, linked to the runs' loss curves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import TensorBoardLogger


class TensorBoard(TensorBoardLogger):
    """Lightning's TensorBoardLogger whose hyper-parameters reach the HParams tab. Lightning
    writes that tab's session only with a metric value (its placeholder ``hp_metric`` = -1);
    this one names the metrics the run logs anyway (``metrics``: ``val_loss`` and
    ``train_loss``), so the tab shows each run's config beside its own losses, and nothing
    made up is logged."""

    def __init__(self, *args: Any, metrics: tuple[str, ...] = ("val_loss", "train_loss"), **kwargs: Any):
        super().__init__(*args, **{"default_hp_metric": False, **kwargs})
        self.hparam_metrics = tuple(metrics)

    def log_hyperparams(self, params: Any, metrics: Any = None, step: int | None = None) -> None:
        super().log_hyperparams(params, metrics, step)  # hparams.yaml
        if metrics is not None or self._default_hp_metric:
            return  # Lightning wrote the session itself
        from torch.utils.tensorboard.summary import hparams

        flat = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in self.hparams.items()}
        writer = self.experiment._get_file_writer()
        for summary in hparams(flat, dict.fromkeys(self.hparam_metrics, 0.0)):  # names only: no values logged
            writer.add_summary(summary)


def mlflow_logger(save_dir: str, experiment_name: str = "llmzoo", run_name: str | None = None,
                  tracking_uri: str | None = None):
    from lightning.pytorch.loggers import MLFlowLogger

    uri = tracking_uri or f"sqlite:///{Path(save_dir).resolve()}"
    Path(save_dir).parent.mkdir(parents=True, exist_ok=True)
    return MLFlowLogger(experiment_name=experiment_name, run_name=run_name, tracking_uri=uri)
