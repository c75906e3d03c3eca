"""Promotion in the MLflow model registry: the gate, the lock, the `champion` alias, the record.

    decide()            the rule, pure: candidate > champion + margin and candidate >= min_score
                        (the first version only needs min_score)
    RegistryLock        mutual exclusion between promotions, built on unique registered-model names
    promote_version()   under the lock: re-read the champion, decide, move the alias, tag the candidate
    champion_checkpoint()  the champion's checkpoint as a local `from_pretrained` directory

MLflow has no compare-and-set on aliases: two promotions that each read the champion, decide,
then set the alias can lose an update (a worse candidate overwrites a better one). Creating a
registered model is atomic and unique by name, so `{name}.promotion-lock` is a mutex: whoever
creates it holds it; the others poll. The lock model carries its owner and acquisition time; a
lock older than `stale_after_s` (its holder crashed) is broken. Every delete of the lock (release
or break) is itself serialised by a second, short-lived `{name}.promotion-lock.breaker` model and
re-checks the owner first, so a slow holder's release never deletes a successor's lock.

No Prefect here: the flow in flows/promote.py evaluates, this module decides and records.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import posixpath
import random
import socket
import time
import uuid
from pathlib import Path
from typing import Mapping

from stages.common import store
from tasks import tracking as mlf

log = logging.getLogger(__name__)

CHAMPION = "champion"
LOCK_SUFFIX = ".promotion-lock"
BREAKER_SUFFIX = ".breaker"
CHECKPOINT = "checkpoint"
NONE = "none"  # tag value for "no champion" / "no score"


class PromotionError(RuntimeError):
    pass


class CandidateInvalid(PromotionError):
    """The candidate's checkpoint is missing or corrupted: rejected, champion untouched."""


class ChampionUnavailable(PromotionError):
    """The current champion cannot be evaluated (its checkpoint is gone or corrupted)."""


class LockTimeout(PromotionError):
    pass


class LockLost(PromotionError):
    """Our lock was broken as stale while we held it: nothing was changed."""


class ChampionChanged(PromotionError):
    """Inside the lock, the champion is a version the caller has no score for: evaluate it, retry."""

    def __init__(self, version: str):
        self.version = version
        super().__init__(f"the champion is now v{version}, which has not been evaluated in this run")


# --- the rule --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Decision:
    accepted: bool
    reason: str
    candidate_version: str
    candidate_score: float | None
    champion_version: str | None  # the champion the candidate was compared with (before)
    champion_score: float | None
    changed: bool = False  # the alias moved to the candidate

    @property
    def champion_after(self) -> str | None:
        return self.candidate_version if self.accepted else self.champion_version

    def tags(self, eval_data_digest: str) -> dict[str, str]:
        return {
            "promotion": "accepted" if self.accepted else "rejected",
            "promotion_reason": self.reason[:5000],
            "candidate_score": _num(self.candidate_score),
            "champion_score": _num(self.champion_score),
            "champion_version": self.champion_version or NONE,
            "eval_data_digest": eval_data_digest or NONE,
        }


def _num(x: float | None) -> str:
    return NONE if x is None else repr(float(x))


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def decide(candidate_score: float | None, champion_score: float | None, *, margin: float, min_score: float,
           candidate_version: str, champion_version: str | None, metric: str = "accuracy") -> Decision:
    """Promote only when candidate > champion + margin and candidate >= min_score.

    No champion yet: the candidate becomes champion if it reaches min_score. A candidate that is
    already the champion stays so (accepted, nothing changes). Equal scores are a rejection.
    """
    cv, chv = str(candidate_version), None if champion_version is None else str(champion_version)
    d = dict(candidate_version=cv, candidate_score=candidate_score, champion_version=chv,
             champion_score=champion_score)
    if not _finite(candidate_score):
        return Decision(False, f"candidate v{cv} has no valid {metric} ({candidate_score!r})", **d)
    if chv is not None and chv == cv:
        return Decision(True, f"v{cv} is already the champion", **d)
    if candidate_score < min_score:
        return Decision(False, f"candidate v{cv} {metric} {candidate_score:.4f} is below min_score {min_score:.4f}",
                        **d)
    if chv is None:
        return Decision(True, f"first champion: v{cv} {metric} {candidate_score:.4f} >= min_score "
                              f"{min_score:.4f} and there is no champion yet", **d)
    if not _finite(champion_score):
        raise ValueError(f"champion v{chv} has no valid {metric} ({champion_score!r})")
    if candidate_score > champion_score + margin:
        return Decision(True, f"candidate v{cv} {metric} {candidate_score:.4f} > champion v{chv} "
                              f"{champion_score:.4f} + margin {margin:.4f}", **d)
    how = "equals" if candidate_score == champion_score else (
        "is below" if candidate_score < champion_score else "does not beat by the margin")
    return Decision(False, f"candidate v{cv} {metric} {candidate_score:.4f} {how} champion v{chv} "
                           f"{champion_score:.4f} (needs > {champion_score + margin:.4f}: margin {margin:.4f})",
                    **d)


# --- the lock --------------------------------------------------------------------------------


def _code(err: Exception) -> str:
    return str(getattr(err, "error_code", ""))


def _already_exists(err: Exception) -> bool:
    return "RESOURCE_ALREADY_EXISTS" in _code(err)


def _missing(err: Exception) -> bool:
    return "RESOURCE_DOES_NOT_EXIST" in _code(err) or "NOT_FOUND" in _code(err)


def _transient(err: Exception) -> bool:
    """A busy SQLite file, a restarting server: worth another try (MLflow's REST client has retried already)."""
    return isinstance(err, (OSError, ConnectionError)) or any(
        c in _code(err) for c in ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"))


def _retry(fn, attempts: int = 6, delay_s: float = 0.2):
    """Call `fn`, retrying transient registry errors with backoff (lock traffic is bursty by nature)."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as err:
            if i + 1 == attempts or not _transient(err):
                raise
            log.warning("registry call failed (%s), retrying", err)
            time.sleep(delay_s * 2**i * (0.5 + random.random()))


@dataclasses.dataclass(frozen=True)
class Holder:
    owner: str
    acquired_at: float  # epoch seconds, the holder's clock

    @property
    def age(self) -> float:
        return time.time() - self.acquired_at


class _Mutex:
    """One registered model as a mutex: create to take, (checked) delete to give back."""

    def __init__(self, client, model_name: str, *, stale_after_s: float, purpose: str = ""):
        self.client = client
        self.model_name = model_name
        self.stale_after_s = stale_after_s
        self.purpose = purpose
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"

    def try_create(self) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            _retry(lambda: self.client.create_registered_model(
                self.model_name,
                tags={"lock.owner": self.owner, "lock.acquired_at": repr(time.time()), "lock.purpose": self.purpose},
                description=f"alignflow promotion lock held by {self.owner} ({self.purpose}); "
                            "deleted on release, broken when older than its stale timeout",
            ))
            return True
        except MlflowException as err:
            # Taken; or taken and released while the store looked up the winner (it then says "not found").
            if _already_exists(err) or _missing(err):
                return False
            raise

    def holder(self) -> Holder | None:
        from mlflow.exceptions import MlflowException

        try:
            rm = _retry(lambda: self.client.get_registered_model(self.model_name))
        except MlflowException as err:
            if _missing(err):
                return None
            raise
        tags = rm.tags or {}
        try:
            at = float(tags["lock.acquired_at"])
        except (KeyError, ValueError):
            at = (rm.creation_timestamp or 0) / 1000.0
        return Holder(tags.get("lock.owner", "?"), at)

    def delete(self) -> None:
        from mlflow.exceptions import MlflowException

        try:
            _retry(lambda: self.client.delete_registered_model(self.model_name))
        except MlflowException as err:
            if not _missing(err):
                raise


class RegistryLock:
    """Serialises promotions of one registered model across processes and machines.

        with RegistryLock(client, "my-policy", timeout_s=600, stale_after_s=120) as lock:
            ...            # read the champion, decide
            lock.verify()  # still ours: move the alias
    """

    def __init__(self, client, name: str, *, timeout_s: float = 600.0, stale_after_s: float = 120.0,
                 poll_s: float = 0.25, purpose: str = ""):
        self.client = client
        self.name = name
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self.lock = _Mutex(client, name + LOCK_SUFFIX, stale_after_s=stale_after_s, purpose=purpose)
        # Held for two registry calls at most; a crashed breaker is stale after 30 s.
        self.breaker = _Mutex(client, name + LOCK_SUFFIX + BREAKER_SUFFIX, stale_after_s=min(30.0, stale_after_s),
                              purpose=f"delete {name + LOCK_SUFFIX}")
        self.held = False
        self.broken_stale: list[Holder] = []

    @property
    def owner(self) -> str:
        return self.lock.owner

    def _sleep(self) -> None:
        time.sleep(self.poll_s * (0.5 + random.random()))

    def _delete_if_owner(self, expected_owner: str) -> bool:
        """Delete the lock if `expected_owner` still holds it; every deleter holds the breaker."""
        deadline = time.monotonic() + max(30.0, self.timeout_s)
        while not self.breaker.try_create():
            b = self.breaker.holder()
            if b is not None and b.age > self.breaker.stale_after_s:
                log.warning("breaking stale %s held by %s for %.0fs", self.breaker.model_name, b.owner, b.age)
                self.breaker.delete()
                continue
            if time.monotonic() > deadline:
                raise LockTimeout(f"could not take {self.breaker.model_name} (held by {b.owner if b else '?'})")
            self._sleep()
        try:
            current = self.lock.holder()
            if current is None or current.owner != expected_owner:
                return False
            self.lock.delete()
            return True
        finally:
            self.breaker.delete()

    def acquire(self) -> "RegistryLock":
        deadline = time.monotonic() + self.timeout_s
        while True:
            if self.lock.try_create():
                self.held = True
                return self
            holder = self.lock.holder()
            if holder is None:  # released between our create and our read: try again at once
                if time.monotonic() > deadline:
                    raise LockTimeout(f"promotion lock {self.lock.model_name}: could not take it in "
                                      f"{self.timeout_s:.0f}s")
                continue
            if holder.owner == self.owner:  # our create went through although the call reported a failure
                self.held = True
                return self
            if holder.age > self.lock.stale_after_s:
                log.warning("breaking stale promotion lock %s: held by %s for %.0fs (stale after %.0fs)",
                            self.lock.model_name, holder.owner, holder.age, self.lock.stale_after_s)
                if self._delete_if_owner(holder.owner):
                    self.broken_stale.append(holder)
                continue
            if time.monotonic() > deadline:
                raise LockTimeout(f"promotion lock {self.lock.model_name} is held by {holder.owner} "
                                  f"(for {holder.age:.0f}s); gave up after {self.timeout_s:.0f}s")
            self._sleep()

    def verify(self) -> None:
        """Raise LockLost unless we still hold the lock (call just before changing the registry)."""
        current = self.lock.holder()
        if not self.held or current is None or current.owner != self.owner:
            raise LockLost(f"promotion lock {self.lock.model_name} is no longer ours "
                           f"(now held by {current.owner if current else 'nobody'}); nothing was changed")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        if not self._delete_if_owner(self.owner):
            log.warning("promotion lock %s was broken while we held it", self.lock.model_name)

    def __enter__(self) -> "RegistryLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# --- the registry ----------------------------------------------------------------------------


def champion_version(client, name: str) -> str | None:
    """The version the `champion` alias points at (str: SQLite gives int, a server gives str)."""
    aliases = client.get_registered_model(name).aliases or {}
    v = aliases.get(CHAMPION)
    return None if v is None else str(v)


def latest_version(client, name: str) -> str:
    versions = [int(mv.version) for mv in client.search_model_versions(f"name = '{name}'")]
    if not versions:
        raise PromotionError(f"registered model {name!r} has no versions to promote")
    return str(max(versions))


def record_decision(client, name: str, decision: Decision, eval_data_digest: str,
                    extra_tags: Mapping[str, str] | None = None) -> None:
    for k, v in {**decision.tags(eval_data_digest), **(extra_tags or {})}.items():
        client.set_model_version_tag(name, decision.candidate_version, k, str(v)[:5000])


def promote_version(client, name: str, version: str, candidate_score: float | None,
                    champion_scores: Mapping[str, float], *, margin: float, min_score: float,
                    metric: str = "accuracy", eval_data_digest: str = "", extra_tags: Mapping[str, str] | None = None,
                    lock_timeout_s: float = 600.0, stale_lock_s: float = 120.0, poll_s: float = 0.25) -> Decision:
    """Under the lock: re-read the champion, decide, move the alias if accepted, tag the candidate.

    `champion_scores` maps versions to their score on the same held-out set (evaluated by the
    caller). If the champion found inside the lock is not in it, ChampionChanged is raised and
    nothing is changed: evaluate that version and call again.
    """
    version = str(version)
    with RegistryLock(client, name, timeout_s=lock_timeout_s, stale_after_s=stale_lock_s, poll_s=poll_s,
                      purpose=f"promote v{version}") as lock:
        champ = champion_version(client, name)
        if champ is not None and champ != version and champ not in champion_scores:
            raise ChampionChanged(champ)
        decision = decide(candidate_score, None if champ is None else champion_scores.get(champ),
                          margin=margin, min_score=min_score, candidate_version=version, champion_version=champ,
                          metric=metric)
        if champ == version:  # a rerun of an earlier promotion: keep its record
            return decision
        if decision.accepted:
            lock.verify()
            client.set_registered_model_alias(name, CHAMPION, version)
            decision = dataclasses.replace(decision, changed=True)
        # The alias first, then the record: the alias is the truth if we die in between.
        record_decision(client, name, decision, eval_data_digest, extra_tags)
        if decision.changed and champ is not None:
            client.set_model_version_tag(name, champ, "superseded_by", version)
    return decision


# --- checkpoints -----------------------------------------------------------------------------


def checkpoint_artifact(source: str, storage_options: dict | None = None) -> store.Artifact:
    """The pipeline artifact whose `checkpoint/` a model version's source points at.

    Raises store.ArtifactError (naming the file) if the manifest is missing or unreadable, a file
    is missing or has the wrong size, or the source is not `<artifact>/checkpoint`.
    """
    src = source.rstrip("/")
    if posixpath.basename(src) != CHECKPOINT:
        raise store.ArtifactError(f"{source}: not a pipeline checkpoint (expected <artifact uri>/{CHECKPOINT})")
    art = store.read_artifact(src[: -len(CHECKPOINT) - 1], storage_options)
    if not art.files_under(CHECKPOINT):
        raise store.ArtifactError(f"{source}: the manifest lists no files under {CHECKPOINT}/")
    return art


def verify_checkpoint(art: store.Artifact, storage_options: dict | None = None, chunk: int = 8 << 20) -> None:
    """Hash every checkpoint file in place (streamed) against the manifest."""
    fs, base = store.filesystem(art.uri, storage_options)
    for entry in art.files_under(CHECKPOINT):
        h = hashlib.sha256()
        try:
            with fs.open(posixpath.join(base, entry.path), "rb") as fh:
                while block := fh.read(chunk):
                    h.update(block)
        except FileNotFoundError:
            raise store.ArtifactError(f"{store.join(art.uri, entry.path)}: missing (listed in the manifest)") from None
        if h.hexdigest() != entry.sha256:
            raise store.ArtifactError(f"{store.join(art.uri, entry.path)}: content does not match its manifest "
                                      "hash (corrupted)")


def _default_storage_options(source: str) -> dict:
    endpoint = os.environ.get("MLFLOW_S3_ENDPOINT_URL")
    if source.startswith("s3://") and endpoint:
        return {"client_kwargs": {"endpoint_url": endpoint}}
    return {}


def champion_checkpoint(tracking_uri: str, name: str, dst: str | os.PathLike,
                        storage_options: dict | None = None, alias: str = CHAMPION) -> Path:
    """Download `models:/<name>@champion` into `dst`; returns the directory `from_pretrained` loads.

    A pipeline checkpoint (its manifest beside it) is fetched through the store, every file
    hash-checked; any other source goes through MLflow's own `download_artifacts`.
    For s3:// sources without `storage_options`, $MLFLOW_S3_ENDPOINT_URL gives the endpoint.
    """
    client = mlf.client(tracking_uri)
    mv = client.get_model_version_by_alias(name, alias)
    opts = _default_storage_options(mv.source) if storage_options is None else storage_options
    try:
        art = checkpoint_artifact(mv.source, opts)
    except store.ArtifactError:
        art = None
    if art is not None:
        return store.download_dir(art, CHECKPOINT, dst, opts)
    import mlflow.artifacts

    # The resolved source, not `models:/...`: that would resolve through the default registry URI.
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=str(dst),
                                                    tracking_uri=tracking_uri))


# --- the MLflow run that holds a promotion's evidence -----------------------------------------


def start_promotion_run(tracking_uri: str, experiment: str, *, pipeline: str, config_digest: str,
                        parent_run_id: str | None = None, experiment_id: str | None = None,
                        flow_run_id: str | None = None, run_name: str = "promote") -> mlf.Tracking:
    """A run for one promotion: nested under the pipeline run, or top level (tagged with the flow run,
    so a retry of the same Prefect flow run continues it). Its evaluate runs nest under it."""
    c = mlf.client(tracking_uri)
    if experiment_id is None:
        exp = c.get_experiment_by_name(experiment)
        experiment_id = exp.experiment_id if exp else c.create_experiment(experiment)
    tags = {"alignflow.kind": "promotion", "alignflow.stage": "promote", "alignflow.pipeline": pipeline,
            "alignflow.config_digest": config_digest}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    elif flow_run_id:
        found = c.search_runs([experiment_id], max_results=1, filter_string=(
            f"tags.`prefect.flow_run_id` = '{flow_run_id}' and tags.`alignflow.kind` = 'promotion'"))
        if found:
            c.update_run(found[0].info.run_id, status="RUNNING")
            return mlf.Tracking(tracking_uri, experiment_id, found[0].info.run_id)
        tags["prefect.flow_run_id"] = flow_run_id
    run = c.create_run(experiment_id, run_name=run_name, tags=tags)
    return mlf.Tracking(tracking_uri, experiment_id, run.info.run_id)


def run_link(tracking_uri: str, experiment_id: str, run_id: str | None) -> str:
    if not run_id:
        return "-"
    if tracking_uri.startswith(("http://", "https://")):
        return f"[{run_id[:12]}]({tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id})"
    return f"`{run_id}`"


def version_link(tracking_uri: str, name: str, version: str | None) -> str:
    if version is None:
        return "-"
    if tracking_uri.startswith(("http://", "https://")):
        return f"[v{version}]({tracking_uri.rstrip('/')}/#/models/{name}/versions/{version})"
    return f"v{version}"


__all__ = [
    "CHAMPION", "CandidateInvalid", "ChampionChanged", "ChampionUnavailable", "Decision", "LockLost", "LockTimeout",
    "PromotionError", "RegistryLock", "champion_checkpoint", "champion_version", "checkpoint_artifact", "decide",
    "latest_version", "promote_version", "record_decision", "start_promotion_run", "verify_checkpoint",
]

