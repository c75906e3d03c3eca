"""Promotion in the MLflow model registry, without Prefect (flows/promote.py evaluates and calls it).

    rule       decide(): candidate > champion + margin and candidate >= min_score, pure
    lock       RegistryLock: mutual exclusion between promotions on unique registered-model names
    registry   promote_version(): under the lock, re-read the champion, decide, move the alias, tag
    report     the summary, the markdown comparison and the promotion run's tags
"""

from tasks import tracking as mlf  # noqa: F401

from .lock import LOCK_SUFFIX, LockLost, LockTimeout, RegistryLock  # noqa: F401
from .registry import (CHAMPION, CHECKPOINT, champion_checkpoint, champion_version, checkpoint_artifact,  # noqa: F401
                       latest_version, promote_version, record_decision, start_promotion_run)
from .rule import (NONE, CandidateInvalid, ChampionChanged, ChampionUnavailable, Decision,  # noqa: F401
                   PromotionError, decide)
