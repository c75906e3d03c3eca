"""The promotion rule, pure, and the errors that end a promotion without a decision."""

from __future__ import annotations

import dataclasses
import math

NONE = "none"  # tag value for "no champion" / "no score"


class PromotionError(RuntimeError):
    pass


class CandidateInvalid(PromotionError):
    """The candidate's checkpoint is missing or corrupted: rejected, champion untouched."""


class ChampionUnavailable(PromotionError):
    """The current champion cannot be evaluated (its checkpoint is gone or corrupted)."""


class ChampionChanged(PromotionError):
    """Inside the lock, the champion is a version the caller has no score for: evaluate it, retry."""

    def __init__(self, version: str):
        self.version = version
        super().__init__(f"the champion is now v{version}, which has not been evaluated in this run")


@dataclasses.dataclass(frozen=True)
class Decision:
    accepted: bool
    reason: str
    candidate_version: str
    candidate_score: float | None
    champion_version: str | None  # the champion the candidate was compared with (before)
    champion_score: float | None
    changed: bool = False  # the alias moved to the candidate

    def tags(self, eval_data_digest: str) -> dict[str, str]:
        """The candidate version's tags recording this decision."""
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
           candidate_version: str, champion_version: str | None, metric: str = "accuracy",
           sft_score: float | None = None) -> Decision:
    """Accept iff candidate > champion + margin and candidate >= min_score. No champion yet: candidate >=
    min_score and, given the score of the SFT model it was trained from, candidate > SFT + margin."""
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
    if chv is None and sft_score is not None:  # the first champion must be better than where it started
        if not _finite(sft_score):
            raise ValueError(f"the SFT model of v{cv} has no valid {metric} ({sft_score!r})")
        if candidate_score <= sft_score + margin:
            return Decision(False, f"candidate v{cv} {metric} {candidate_score:.4f} does not beat its SFT model "
                                   f"{sft_score:.4f} (needs > {sft_score + margin:.4f}: margin {margin:.4f}); "
                                   "there is no champion yet", **d)
        return Decision(True, f"first champion: v{cv} {metric} {candidate_score:.4f} > its SFT model "
                              f"{sft_score:.4f} + margin {margin:.4f}, >= min_score {min_score:.4f}", **d)
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
