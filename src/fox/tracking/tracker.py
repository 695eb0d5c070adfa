"""The MLflow run of one grid cell, through MlflowClient, with every call retried and none ever raising."""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

from fox.files import atomic_path, file_lock, read_jsonl, write_atomic

RUN_ID_FILE = "mlflow_run_id"
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
"""MLflow 3's experiment-kind tag: opens the experiment as model training (runs, charts), not GenAI (traces)."""
ATTEMPTS, BACKOFF_S = 3, 1.0
OFFLINE_S = 60.0
"""After a call fails ATTEMPTS times, further calls are skipped for this long, so that an unreachable server
costs a training a few seconds per minute at most; what was skipped waits in train_log.jsonl."""
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
"""MLflow's own HTTP retries default to ~4 minutes per call; ours come on top of these (an explicit setting wins)."""
BATCH = 1000  # MLflow's limit of metric values per log_batch call

T = TypeVar("T")


def is_local_sqlite(uri: str) -> bool:
    return uri.startswith("sqlite:///")


def store_folder(uri: str) -> Path:
    """The folder of a local sqlite store: it holds mlartifacts/ and the lock serialising store creation."""
    return Path(uri.removeprefix("sqlite:///")).resolve().parent


class Tracker:
    """The MLflow run of one grid cell. With enabled=False (ranks other than 0) every call does nothing.

    Calls return whether they reached MLflow. A failure is retried ATTEMPTS times and then reported once on
    stderr; the stage goes on.
    """

    def __init__(self, run_cfg: dict, enabled: bool = True):
        from fox.tracking import tracking_uri

        self.enabled = enabled
        self.run_cfg = run_cfg
        self.uri = tracking_uri(run_cfg)
        self.run_id: str | None = None
        self.artifact_uri: str | None = None
        self._client = None
        self._offline_until = 0.0
        self._warned = False
        self._start_args: dict | None = None

    # ---- plumbing ----

    def _call(self, what: str, call: Callable[[], T]) -> T | None:
        """call() with retries; None when MLflow could not be reached."""
        if not self.enabled or time.monotonic() < self._offline_until:
            return None
        for attempt in range(ATTEMPTS):
            try:
                return call()
            except Exception as error:  # any tracking failure (HTTP, a locked sqlite file, ...) is survivable
                if attempt + 1 < ATTEMPTS:
                    time.sleep(BACKOFF_S * 2**attempt)
                    continue
                self._offline_until = time.monotonic() + OFFLINE_S
                if not self._warned:
                    self._warned = True
                    print(f"[fox] warning: MLflow at {self.uri}: {what} failed {ATTEMPTS} times "
                          f"({type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}); "
                          f"{self.run_cfg['run']} goes on without it, and what MLflow missed is logged from the "
                          "run folder once it answers", file=sys.stderr, flush=True)
        return None

    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            for key, value in HTTP_DEFAULTS.items():
                os.environ.setdefault(key, value)
            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    # ---- the run ----

    def start(self, *, create: bool = True, training: bool = False) -> str | None:
        """Open the cell's MLflow run: the one recorded in the run folder if it still exists, else a new one
        (create=False: None instead). training=True marks it RUNNING and tags the code's git commit."""
        if not self.enabled:
            return None
        self._start_args = {"create": create, "training": training}
        id_file = Path(self.run_cfg["run_dir"]) / RUN_ID_FILE
        previous = id_file.read_text().strip() if id_file.is_file() else None
        self.run_id = self._call("opening the run", lambda: self._open(previous, create))
        if self.run_id is not None and self.run_id != previous:
            write_atomic(id_file, self.run_id)
        if self.run_id is not None and training:
            from fox.tracking import git_commit

            commit = git_commit()
            tags = {"mlflow.source.git.commit": commit} if commit else {}
            self._call("marking the run RUNNING", lambda: self._running(tags))
        return self.run_id

    def _open(self, previous: str | None, create: bool) -> str | None:
        from mlflow.exceptions import MlflowException

        if previous:
            try:
                run = self.client.get_run(previous)
                self.artifact_uri = run.info.artifact_uri
                return previous
            except MlflowException as error:
                if error.get_http_status_code() != 404:
                    raise
        if not create:
            return None
        from fox.tracking import param_values

        experiment_id = self._experiment()
        grid = self.run_cfg["grid"]
        tags = param_values(grid) | {"fox.run": self.run_cfg["run"]}
        run = self.client.create_run(experiment_id, run_name=self.run_cfg["run"], tags=tags)
        self.artifact_uri = run.info.artifact_uri
        return run.info.run_id

    def _experiment(self) -> str:
        """The config's experiment, created on first use with the training view's kind and artifacts relative
        to the store; an empty Default experiment of a local store is deleted (nobody logs there)."""
        name = self.run_cfg["experiment"]
        if not is_local_sqlite(self.uri):
            return self._get_or_create(name, "mlflow-artifacts:/" + _slug(name))
        # parallel jobs start their runs at once: creating the sqlite schema and the experiment must happen in one
        # process at a time, or the losers fail
        folder = store_folder(self.uri)
        folder.mkdir(parents=True, exist_ok=True)
        with file_lock(folder / ".mlflow.lock"):
            experiment_id = self._get_or_create(name, "mlflow-artifacts:/" + _slug(name))
            default = self.client.get_experiment("0")
            if default.lifecycle_stage == "active" and not self.client.search_runs(["0"], max_results=1):
                self.client.delete_experiment("0")
        return experiment_id

    def _get_or_create(self, name: str, artifact_location: str) -> str:
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            return self.client.create_experiment(name, artifact_location=artifact_location,
                                                 tags=dict([EXPERIMENT_KIND]))
        if experiment.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:
            self.client.set_experiment_tag(experiment.experiment_id, *EXPERIMENT_KIND)
        return experiment.experiment_id

    def _running(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.update_run(self.run_id, status="RUNNING")
        if tags:
            self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def end(self, status: str | None = None) -> None:
        """Set the run's final status (training: FINISHED, KILLED or FAILED); other stages leave it as is."""
        if self.run_id is not None and status is not None:
            self._call(f"setting status {status}", lambda: self.client.set_terminated(self.run_id, status))

    def _opened(self) -> bool:
        """Whether the run is open; one that could not be opened before is tried again (after an outage)."""
        if self.run_id is None and self._start_args is not None and time.monotonic() >= self._offline_until:
            self.start(**self._start_args)
        return self.run_id is not None

    # ---- what goes into the run ----

    def log_params(self, params: dict) -> bool:
        """Params as flattened text; keys already logged keep their value (MLflow params are immutable)."""
        if not self._opened():
            return False
        from mlflow.entities import Param

        from fox.tracking import param_values

        def log() -> bool:
            existing = self.client.get_run(self.run_id).data.params
            new = [Param(k, v) for k, v in param_values(params).items() if k not in existing]
            for start in range(0, len(new), 100):  # MLflow's limit per batch
                self.client.log_batch(self.run_id, params=new[start:start + 100])
            return True

        return bool(self._call("logging params", log))

    def log_metrics(self, metrics: dict[str, float | None], step: int) -> bool:
        return self.log_records([(step, metrics)])

    def log_records(self, records: Iterable[tuple[int, dict[str, float | None]]]) -> bool:
        """Metric values at several steps in as few calls as MLflow allows; None values are left out."""
        if not self._opened():
            return False
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        values = [Metric(key, float(value), now, step) for step, metrics in records
                  for key, value in metrics.items() if value is not None]

        def log() -> bool:
            for start in range(0, len(values), BATCH):
                self.client.log_batch(self.run_id, metrics=values[start:start + BATCH])
            return True

        return bool(self._call("logging metrics", log))

    def last_step(self, key: str) -> int:
        """The largest step logged for metric `key` (0 if none), or -1 when MLflow cannot be reached."""
        if not self._opened():
            return -1
        history = self._call(f"reading {key}", lambda: self.client.get_metric_history(self.run_id, key))
        if history is None:
            return -1
        return max((metric.step for metric in history), default=0)

    def has_metric(self, key: str) -> bool:
        if not self._opened():
            return False
        run = self._call("reading the run", lambda: self.client.get_run(self.run_id))
        return run is not None and key in run.data.metrics

    def sync_train_log(self, path: Path, names: dict[str, str]) -> int:
        """Log the records of train_log.jsonl past the last step MLflow holds; returns that step (-1: MLflow
        not reached)."""
        done = self.last_step(names["loss"])
        if done < 0 or not path.is_file():
            return done
        records = read_jsonl(path)
        missing = [(r["step"], {names[k]: v for k, v in r.items() if k in names}) for r in records if r["step"] > done]
        if not missing:
            return done
        return missing[-1][0] if self.log_records(missing) else -1

    def log_artifact(self, path: str | Path, folder: str | None = None, name: str | None = None) -> bool:
        """The file as <folder>/<name or its own name> in the run's artifacts, replacing an earlier one."""
        if not self._opened():
            return False
        path = Path(path)
        name = name or path.name
        if self.artifact_uri and self.artifact_uri.startswith("mlflow-artifacts:/") and is_local_sqlite(self.uri):
            # no server to upload through: write where `mlflow ui --artifacts-destination` will look
            relative = self.artifact_uri.removeprefix("mlflow-artifacts:/").lstrip("/")
            target = store_folder(self.uri) / "mlartifacts" / relative / (folder or "") / name

            def copy() -> bool:
                with atomic_path(target) as tmp:
                    shutil.copyfile(path, tmp)
                return True

            return bool(self._call(f"storing {name}", copy))

        def upload() -> bool:
            with tempfile.TemporaryDirectory() as tmp:
                named = Path(tmp) / name
                shutil.copyfile(path, named)
                self.client.log_artifact(self.run_id, str(named), folder)
            return True

        return bool(self._call(f"uploading {name}", upload))


def _slug(name: str) -> str:
    """An experiment name as one safe path component of the artifact store."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "experiment"
