"""MLflow tracking: one experiment per config, one MLflow run per trained model, only rank 0 writes.

The default store is sqlite under results_dir (no server); config `tracking_uri` or MLFLOW_TRACKING_URI
point it anywhere. The MLflow run id is kept in runs/{run}/mlflow_run_id so that a resumed training and the
later stages (average, evaluate, plot) all log into the same MLflow run.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from fox.files import write_atomic

RUN_ID_FILE = "mlflow_run_id"


def tracking_uri(run_cfg: dict) -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if run_cfg.get("tracking_uri"):
        return run_cfg["tracking_uri"]
    return f"sqlite:///{Path(run_cfg['results_dir']).resolve() / 'mlflow.db'}"


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1}} -> {"train.lr": 1}, the form MLflow params take."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


class Tracker:
    """The MLflow run of one grid cell. With enabled=False (ranks other than 0) every call does nothing."""

    def __init__(self, run_cfg: dict, enabled: bool = True):
        self.enabled = enabled
        self.run_cfg = run_cfg
        self.run_id: str | None = None

    def start(self) -> str | None:
        """Open the cell's MLflow run, continuing the one recorded in the run folder if it still exists."""
        if not self.enabled:
            return None
        import mlflow

        uri = tracking_uri(self.run_cfg)
        mlflow.set_tracking_uri(uri)
        name = self.run_cfg["experiment"]
        # Parallel pipeline jobs start their runs at once: creating the sqlite store (schema migrations) and the
        # experiment must happen in one process at a time, or the losers fail.
        with _exclusive(Path(self.run_cfg["results_dir"]) / ".mlflow.lock"):
            client = mlflow.MlflowClient()
            if client.get_experiment_by_name(name) is None:
                artifacts = None
                if uri.startswith("sqlite:///"):
                    artifacts = (Path(self.run_cfg["results_dir"]).resolve() / "mlartifacts").as_uri()
                client.create_experiment(name, artifact_location=artifacts)
        mlflow.set_experiment(name)

        id_file = Path(self.run_cfg["run_dir"]) / RUN_ID_FILE
        previous = id_file.read_text().strip() if id_file.is_file() else None
        if previous and _run_exists(client, previous):
            mlflow.start_run(run_id=previous)
        else:
            mlflow.start_run(run_name=self.run_cfg["run"], tags=self.run_cfg["grid"] | {"fox.run": self.run_cfg["run"]})
            write_atomic(id_file, mlflow.active_run().info.run_id)
        self.run_id = mlflow.active_run().info.run_id
        return self.run_id

    def log_params(self, params: dict) -> None:
        if self.enabled:
            import mlflow

            flat = flatten(params)
            existing = mlflow.get_run(self.run_id).data.params
            mlflow.log_params({k: v for k, v in flat.items() if k not in existing})

    def log_metrics(self, metrics: dict[str, float | None], step: int) -> None:
        if self.enabled:
            import mlflow

            mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None}, step=step)

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        if self.enabled:
            import mlflow

            mlflow.log_artifact(str(path), artifact_path=folder)

    def end(self, status: str = "FINISHED") -> None:
        if self.enabled:
            import mlflow

            mlflow.end_run(status=status)


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    """An advisory file lock (fcntl) held for the duration of the block."""
    import fcntl

    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _run_exists(client, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_run(run_id)
    except MlflowException:
        return False
    return True
