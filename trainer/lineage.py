"""The drafter registry in MLflow: versions, the `champion` / `challenger` aliases, verified downloads.

One registered model per drafter lineage (`registered_name`); each version is a LoggedModel whose
artifacts are a `save_draft` folder (model.safetensors + draft.json) or a `save_eagle` one
(model.safetensors + eagle.json). Its tags carry the sha256 of
the weights file, so a replica can refuse a download that does not match what the trainer wrote.

Atomicity: a version is created only after every artifact is uploaded and the LoggedModel is
finalised READY, and the sha256 of the folder is checked before the upload; an upload that fails
half way leaves a FAILED LoggedModel and no version. MLflow has no compare-and-set on aliases,
so there must be one promoter per lineage (the trainer); the previous champions are kept in the
registered model's `champion_history` tag so `rollback` can restore them.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from streams.schema import Promotion

WEIGHTS_FILE = "model.safetensors"
DRAFT_META_FILES = ("draft.json", "eagle.json")  # save_draft's and save_eagle's descriptions
CHAMPION, CHALLENGER = "champion", "challenger"
_HISTORY_TAG = "champion_history"  # JSON list of versions that held `champion`, oldest first
_HISTORY_KEEP = 50


class ArtifactError(RuntimeError):
    """A drafter artifact is missing, incomplete, or does not match its recorded sha256."""


# The MLflow client retries a failing HTTP request itself: 7 times with backoff factor 2 and a 120 s
# timeout by default, minutes in which a caller stands still while the server is down (the trainer
# loop; a replica's swapper, which then missed promotions for minutes after MLflow came back). Both
# retry on their own schedule, so one request should fail within seconds: one immediate retry
# (urllib3 sleeps before the second retry only), 10 s socket timeout. BACKOFF_FACTOR is parsed as
# an int by MLflow, hence "1" and not a fraction.
MLFLOW_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                        "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def bound_http_retries() -> None:
    """Make this process's MLflow requests fail within seconds (MLFLOW_HTTP_DEFAULTS); an operator's own setting wins."""
    for var, value in MLFLOW_HTTP_DEFAULTS.items():
        os.environ.setdefault(var, value)


class LineageError(RuntimeError):
    """A registry operation cannot be done (unknown name or version, nothing to roll back to)."""


def unreachable(exc: BaseException) -> bool:
    """True when `exc` (or what caused it) says the MLflow server is down or failing, not that the call is wrong.

    Connection errors and timeouts (requests, urllib3, the OS), and MlflowExceptions that map to
    HTTP 5xx or 429: the MLflow client turns a refused connection into a plain MlflowException,
    which maps to 500. A 4xx (unknown version, bad parameter) and every other error are not an
    outage: retrying them would repeat a mistake.
    """
    import requests
    import urllib3
    from mlflow.exceptions import MlflowException

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (requests.exceptions.RequestException, urllib3.exceptions.HTTPError,
                            ConnectionError, TimeoutError)):
            return True
        if isinstance(exc, MlflowException):
            status = exc.get_http_status_code()
            if status >= 500 or status == 429:
                return True
        exc = exc.__cause__ or exc.__context__
    return False


def backoff_s(failures: int, first_s: float, cap_s: float) -> float:
    """Wait before the next try after `failures` consecutive failures: first_s, doubling, at most cap_s."""
    return min(first_s * 2 ** (failures - 1), cap_s)


@dataclass
class PendingRegistration:
    """A gate winner that MLflow could not take yet; the trainer retries it with backoff.

    Stages are remembered so a retry never repeats one that succeeded: once `version` is set the
    weights are registered, and a retry only promotes (and announces) that version.
    """

    model: object  # the winner's weights (a deep copy of the student): the lineage's champion once registered
    folder: Path  # the same weights saved by save_draft, what register() uploads
    tags: dict[str, object]  # version tags (parent, offsets, sha256, gate metrics), as scored
    run_id: str | None  # the trainer run that produced it
    champion_acceptance: float  # of the champion it beat, for the log line
    acceptance: float  # its own, on the same hold-out
    version: int | None = None  # registered version number, once register() succeeded
    attempts: int = 0  # failed attempts so far
    next_try: float = 0.0  # time.monotonic() of the next attempt

    def failed(self, now: float, first_s: float, cap_s: float) -> float:
        """Count a failed attempt and schedule the next one: first_s, doubling, at most cap_s; returns the delay."""
        self.attempts += 1
        delay = backoff_s(self.attempts, first_s, cap_s)
        self.next_try = now + delay
        return delay


@dataclass(frozen=True)
class DrafterVersion:
    """One registered drafter version as serving and the CLI see it."""

    name: str  # registered model name
    version: int  # MLflow model version number
    source_uri: str  # where its artifacts live (models:/m-<id>)
    sha256: str  # of model.safetensors
    aliases: tuple[str, ...] = ()
    tags: dict[str, str] = field(default_factory=dict)
    run_id: str | None = None  # the trainer run that produced it
    created_at: float = 0.0  # unix seconds

    @property
    def model_uri(self) -> str:
        """The concrete (alias-free) URI to download: resolving an alias twice could race a promotion."""
        return f"models:/{self.name}/{self.version}"


def registered_name(domain: str | None = None, target: str | None = None, drafter: str = "draft-lm") -> str:
    """The registry name of a lineage: `spectutor-draft[-<target>][-<domain>]` for draft-lm versions,
    `spectutor-eagle[-<target>][-<domain>]` for eagle heads (general drafter: no domain)."""
    parts = ["spectutor-eagle" if drafter == "eagle" else "spectutor-draft"]
    for part in (target, domain):
        if part:
            clean = "".join(c if c.isalnum() or c in "-_" else "-" for c in part.lower())
            parts.append(clean)
    return "-".join(parts)


def weights_sha256(folder: str | Path) -> str:
    """sha256 of a draft folder's weights file (the same digest `save_draft` returns)."""
    path = Path(folder) / WEIGHTS_FILE
    if not path.is_file():
        raise ArtifactError(f"{path} is missing")
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def default_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else a sqlite registry under $SPECTUTOR_HOME (never ./mlflow.db in the cwd)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    from moe.loader import spectutor_home

    folder = spectutor_home() / "mlflow-embedded"
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


def promotion_message(v: DrafterVersion) -> Promotion:
    """The Redis announcement that `v` is champion."""
    return Promotion(name=v.name, version=str(v.version), model_uri=v.model_uri, sha256=v.sha256)


class Lineage:
    """Registry operations over one MLflow tracking server (or a sqlite URI)."""

    def __init__(self, tracking_uri: str | None = None):
        from mlflow import MlflowClient

        self.tracking_uri = tracking_uri or default_tracking_uri()
        self.client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    # ---- writing -------------------------------------------------------------------------------

    def register(self, name: str, folder: str | Path, *, run_id: str | None = None,
                 tags: dict[str, object] | None = None, alias: str | None = None,
                 experiment: str | None = None) -> DrafterVersion:
        """Upload a `save_draft` or `save_eagle` folder and make it version N+1 of `name`; optionally alias it.

        If `tags` carries a "sha256", the folder must match it (a checkpoint changed after it was
        scored is refused). Raises ArtifactError for a bad folder; nothing is registered then.
        """
        from mlflow.entities import LoggedModelStatus

        folder = Path(folder)
        sha = weights_sha256(folder)
        tags = {k: _tag(v) for k, v in (tags or {}).items()}
        if tags.setdefault("sha256", sha) != sha:
            raise ArtifactError(f"{folder}: weights sha256 {sha} != expected {tags['sha256']}")
        if not any((folder / meta).is_file() for meta in DRAFT_META_FILES):
            raise ArtifactError(f"{folder} has no {' or '.join(DRAFT_META_FILES)}")
        self._ensure_registered(name)
        if run_id is not None:
            experiment_id = self.client.get_run(run_id).info.experiment_id
        else:
            experiment_id = self._experiment_id(experiment or f"spectutor/{name}")
        model = self.client.create_logged_model(experiment_id, name="draft", source_run_id=run_id,
                                                tags={"sha256": sha}, model_type="spectutor-draft")
        try:
            self.client.log_model_artifacts(model.model_id, str(folder))
        except Exception:
            self.client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
            raise
        self.client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
        mv = self.client.create_model_version(name, source=f"models:/{model.model_id}", run_id=run_id, tags=tags,
                                              model_id=model.model_id)
        if str(mv.status) not in ("READY", "ModelVersionStatus.READY"):
            raise LineageError(f"{name} version {mv.version} ended {mv.status}")
        if alias:
            self.client.set_registered_model_alias(name, alias, mv.version)
        return self.get(name, int(mv.version))

    def promote(self, name: str, version: int) -> DrafterVersion:
        """Move `champion` to `version` and remember the previous champion for `rollback`."""
        v = self.get(name, version)
        current = self.by_alias(name, CHAMPION)
        if current is not None and current.version == v.version:
            return v
        history = self._history(name)
        if current is not None and (not history or history[-1] != current.version):
            history.append(current.version)
        self.client.set_registered_model_tag(name, _HISTORY_TAG, json.dumps(history[-_HISTORY_KEEP:]))
        self.client.set_registered_model_alias(name, CHAMPION, str(v.version))
        self.client.set_model_version_tag(name, str(v.version), "promoted_at", f"{time.time():.3f}")
        return self.get(name, v.version)

    def rollback(self, name: str) -> DrafterVersion:
        """Give `champion` back to the version that held it before the current one."""
        history = self._history(name)
        current = self.by_alias(name, CHAMPION)
        while history and current is not None and history[-1] == current.version:
            history.pop()
        if not history:
            raise LineageError(f"{name}: no earlier champion to roll back to")
        previous = history.pop()
        if current is not None:
            self.client.set_model_version_tag(name, str(current.version), "rolled_back_at", f"{time.time():.3f}")
        self.client.set_registered_model_tag(name, _HISTORY_TAG, json.dumps(history))
        self.client.set_registered_model_alias(name, CHAMPION, str(previous))
        return self.get(name, previous)

    def set_alias(self, name: str, alias: str, version: int) -> None:
        """Point `alias` (e.g. `challenger`) at `version`."""
        self.client.set_registered_model_alias(name, alias, str(version))

    # ---- reading -------------------------------------------------------------------------------

    def get(self, name: str, version: int) -> DrafterVersion:
        """One version; LineageError when it does not exist."""
        from mlflow.exceptions import MlflowException

        try:
            mv = self.client.get_model_version(name, str(version))
        except MlflowException as exc:
            raise LineageError(f"{name} has no version {version}") from exc
        return _to_version(mv)

    def by_alias(self, name: str, alias: str = CHAMPION) -> DrafterVersion | None:
        """The version `alias` points at, or None (no such alias or registered model)."""
        from mlflow.exceptions import MlflowException

        try:
            mv = self.client.get_model_version_by_alias(name, alias)
        except MlflowException as exc:
            if _not_found(exc):
                return None
            raise
        return _to_version(mv)

    def versions(self, name: str) -> list[DrafterVersion]:
        """Every version of `name`, oldest first (empty for an unknown name)."""
        found = self.client.search_model_versions(f"name = '{name}'")
        if not found:
            return []
        # Search results leave `aliases` empty; the registered model has the alias map.
        by_version: dict[int, list[str]] = {}
        for alias, version in self.client.get_registered_model(name).aliases.items():
            by_version.setdefault(int(version), []).append(alias)
        out = [dataclasses.replace(v, aliases=tuple(sorted(by_version.get(v.version, ()))))
               for v in map(_to_version, found)]
        return sorted(out, key=lambda v: v.version)

    def names(self) -> list[str]:
        """Registered drafter lineages."""
        return sorted(m.name for m in self.client.search_registered_models()
                      if m.name.startswith("spectutor-draft"))

    def fetch(self, v: DrafterVersion, dest_root: str | Path) -> Path:
        """Download `v` into `dest_root/<name>-v<version>` and check its sha256; returns the folder.

        Downloads go to a temporary sibling first and are renamed only when complete and verified,
        so a folder that exists under its final name is always whole.
        """
        import mlflow.artifacts

        dest_root = Path(dest_root)
        final = dest_root / f"{v.name}-v{v.version}"
        if final.is_dir() and _matches(final, v.sha256):
            return final
        dest_root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{v.name}-v{v.version}-", dir=dest_root))
        try:
            mlflow.artifacts.download_artifacts(artifact_uri=v.model_uri, dst_path=str(tmp),
                                                tracking_uri=self.tracking_uri)
            got = weights_sha256(tmp)
            if got != v.sha256:
                raise ArtifactError(f"{v.model_uri}: downloaded weights sha256 {got} != registered {v.sha256}")
            # Several processes may share dest_root: a complete, matching folder that appeared
            # meanwhile may already be loading elsewhere, so it is kept and ours is dropped.
            if final.is_dir() and _matches(final, v.sha256):
                return final
            if final.exists():  # a stale or corrupt copy: move it aside in one rename, then delete it
                stale = Path(tempfile.mkdtemp(prefix=f".stale-{final.name}-", dir=dest_root))
                final.rename(stale / "old")
                shutil.rmtree(stale, ignore_errors=True)
            try:
                tmp.rename(final)
            except OSError:
                if not _matches(final, v.sha256):  # someone else's rename won, with bad bytes
                    raise
            return final
        except ArtifactError:
            raise
        except Exception as exc:  # network, missing artifact: one error type for the caller to count
            raise ArtifactError(f"{v.model_uri}: download failed: {exc}") from exc
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # ---- internals -----------------------------------------------------------------------------

    def _ensure_registered(self, name: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(name)
        except MlflowException as exc:
            if not _not_found(exc):
                raise
            try:
                self.client.create_registered_model(name, description="spectutor draft model lineage")
            except MlflowException as race:  # another writer created it first
                if "already exists" not in str(race).lower() and "RESOURCE_ALREADY_EXISTS" not in str(race):
                    raise

    def _experiment_id(self, experiment: str) -> str:
        found = self.client.get_experiment_by_name(experiment)
        return found.experiment_id if found is not None else self.client.create_experiment(experiment)

    def _history(self, name: str) -> list[int]:
        raw = self.client.get_registered_model(name).tags.get(_HISTORY_TAG, "[]")
        try:
            return [int(x) for x in json.loads(raw)]
        except (ValueError, TypeError):
            return []


def _tag(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _matches(folder: Path, sha: str) -> bool:
    try:
        return weights_sha256(folder) == sha
    except ArtifactError:
        return False


def _not_found(exc: Exception) -> bool:
    code = getattr(exc, "error_code", "")
    return code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE") or "not found" in str(exc).lower()


def _to_version(mv) -> DrafterVersion:
    return DrafterVersion(name=mv.name, version=int(mv.version), source_uri=mv.source, sha256=mv.tags.get("sha256", ""),
                          aliases=tuple(sorted(mv.aliases or ())), tags=dict(mv.tags), run_id=mv.run_id or None,
                          created_at=(mv.creation_timestamp or 0) / 1000.0)
