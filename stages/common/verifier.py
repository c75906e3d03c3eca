"""Programmatic verifiers: the reward of record for tasks with a checkable answer."""

from __future__ import annotations

import re

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def exact_match(response: str, answer: str) -> float:
    return float(response.strip() == answer.strip())


def numeric_match(response: str, answer: str) -> float:
    """The last number in the response equals the answer's (GSM8K-style '#### 42' too)."""

    def last_number(text: str) -> float | None:
        found = _NUMBER.findall(text.split("####")[-1] if "####" in text else text)
        if not found:
            return None
        try:
            return float(found[-1].replace(",", ""))
        except ValueError:
            return None

    got, want = last_number(response), last_number(answer)
    return float(got is not None and want is not None and abs(got - want) < 1e-6)


VERIFIERS = {"exact": exact_match, "numeric": numeric_match}
