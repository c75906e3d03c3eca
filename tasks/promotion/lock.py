"""A mutex between promotions: MLflow has no compare-and-set on aliases, but creating a registered
model is atomic and unique by name. Whoever creates `{name}.promotion-lock` holds it; the others poll;
a stale one (its holder crashed) is broken. Every delete (release or break) holds the `.breaker` model
and re-checks the owner first, so a slow holder's release never deletes its successor's lock."""

from __future__ import annotations

import logging
import os
import random
import socket
import time
import uuid
from typing import NamedTuple

from .rule import PromotionError

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".promotion-lock"
TRANSIENT = ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED")
MISSING = ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")


class LockTimeout(PromotionError):
    pass


class LockLost(PromotionError):
    """Our lock was broken as stale while we held it: nothing was changed."""


def _registry_call(fn, *expected_codes: str, attempts: int = 6, delay_s: float = 0.2):
    """`fn()`, or None for an error with one of `expected_codes`; transient errors (a busy SQLite file,
    a restarting server) are retried with backoff, lock traffic being bursty by nature."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as err:
            code = str(getattr(err, "error_code", ""))  # MlflowException's
            if any(c in code for c in expected_codes):
                return None
            if i + 1 == attempts or not (isinstance(err, OSError) or any(c in code for c in TRANSIENT)):
                raise
            log.warning("registry call failed (%s), retrying", err)
            time.sleep(delay_s * 2**i * (0.5 + random.random()))


class Holder(NamedTuple):
    owner: str
    age: float  # seconds since it took the lock, by its clock


class _Mutex:
    """One registered model as a mutex: create to take, (checked) delete to give back."""

    def __init__(self, client, model_name: str, *, stale_after_s: float, purpose: str = ""):
        self.client = client
        self.model_name = model_name
        self.stale_after_s = stale_after_s
        self.purpose = purpose
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"

    def try_create(self) -> bool:
        # False: taken; or taken and released while the store looked up the winner ("not found").
        return _registry_call(lambda: self.client.create_registered_model(
            self.model_name,
            tags={"lock.owner": self.owner, "lock.acquired_at": repr(time.time()), "lock.purpose": self.purpose},
            description=f"alignflow promotion lock ({self.purpose}): deleted on release, broken when stale",
        ), "RESOURCE_ALREADY_EXISTS", *MISSING) is not None

    def holder(self) -> Holder | None:
        rm = _registry_call(lambda: self.client.get_registered_model(self.model_name), *MISSING)
        if rm is None:
            return None
        tags = rm.tags or {}
        try:
            at = float(tags["lock.acquired_at"])
        except (KeyError, ValueError):
            at = (rm.creation_timestamp or 0) / 1000.0
        return Holder(tags.get("lock.owner", "?"), time.time() - at)

    def delete(self) -> None:
        _registry_call(lambda: self.client.delete_registered_model(self.model_name), *MISSING)


class RegistryLock:
    """Serialises promotions of a model across machines; `verify()` just before moving the alias."""

    def __init__(self, client, name: str, *, timeout_s: float = 600.0, stale_after_s: float = 120.0,
                 poll_s: float = 0.25, purpose: str = ""):
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self.lock = _Mutex(client, name + LOCK_SUFFIX, stale_after_s=stale_after_s, purpose=purpose)
        # Held for two registry calls at most; a crashed breaker is stale after 30 s.
        self.breaker = _Mutex(client, name + LOCK_SUFFIX + ".breaker", stale_after_s=min(30.0, stale_after_s),
                              purpose=f"delete {name + LOCK_SUFFIX}")
        self.held = False

    def _take(self, mutex: _Mutex, timeout_s: float, break_stale) -> None:
        """Create `mutex`, polling while a live holder has it; `break_stale(holder)` when its holder is stale."""
        deadline = time.monotonic() + timeout_s
        while not mutex.try_create():
            holder = mutex.holder()
            if holder is not None and holder.owner == mutex.owner:  # created, though the call reported a failure
                return
            if holder is not None and holder.age > mutex.stale_after_s:
                log.warning("breaking stale %s: held by %s for %.0fs (stale after %.0fs)", mutex.model_name,
                            holder.owner, holder.age, mutex.stale_after_s)
                break_stale(holder)
                continue
            if time.monotonic() > deadline:
                who = f"{holder.owner} (for {holder.age:.0f}s)" if holder else "others (taken at each try)"
                raise LockTimeout(f"promotion lock {mutex.model_name} is held by {who}; gave up after {timeout_s:.0f}s")
            if holder is not None:  # else released between our create and our read: again at once
                time.sleep(self.poll_s * (0.5 + random.random()))

    def _delete_if_owner(self, expected_owner: str) -> bool:
        """Delete the lock if `expected_owner` still holds it; every deleter holds the breaker."""
        self._take(self.breaker, max(30.0, self.timeout_s), lambda _: self.breaker.delete())
        try:
            current = self.lock.holder()
            if current is None or current.owner != expected_owner:
                return False
            self.lock.delete()
            return True
        finally:
            self.breaker.delete()

    def acquire(self) -> "RegistryLock":
        self._take(self.lock, self.timeout_s, lambda holder: self._delete_if_owner(holder.owner))
        self.held = True
        return self

    def verify(self) -> None:
        """Raise LockLost unless we still hold the lock (call just before changing the registry)."""
        current = self.lock.holder()
        if not self.held or current is None or current.owner != self.lock.owner:
            raise LockLost(f"promotion lock {self.lock.model_name} is no longer ours "
                           f"(now held by {current.owner if current else 'nobody'}); nothing was changed")

    def release(self) -> None:
        if self.held:
            self.held = False
            if not self._delete_if_owner(self.lock.owner):
                log.warning("promotion lock %s was broken while we held it", self.lock.model_name)

    def __enter__(self) -> "RegistryLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
