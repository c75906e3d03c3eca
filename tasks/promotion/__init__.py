"""Promotion in the MLflow registry, without Prefect; modules import only earlier ones: rule, lock, registry, report."""

from tasks import tracking as mlf  # noqa: F401

from .lock import LOCK_SUFFIX, LockLost, LockTimeout, RegistryLock  # noqa: F401
from .registry import (CHAMPION, CHECKPOINT, champion_checkpoint, champion_version, checkpoint_artifact,  # noqa: F401
                       checkpoint_uri, latest_version, promote_version, record_decision, start_promotion_run)
from .rule import (NONE, CandidateInvalid, ChampionChanged, ChampionUnavailable, Decision,  # noqa: F401
                   PromotionError, decide)
