"""Verifiable rewards: a response is right (1.0) or wrong (0.0). Pure string logic."""

from __future__ import annotations

import re

from copd_core.spec import RewardSpec, Verifier

_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


def _norm(s: str) -> str:
    return " ".join(s.strip().casefold().split())


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}, braces balanced; None if there is none."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None


def exact_match(response: str, answer: str) -> float:
    return float(_norm(response) == _norm(answer))


def numeric_match(response: str, answer: str, tolerance: float = 0.0) -> float:
    got, want = _NUMBER.findall(response), _NUMBER.findall(answer)
    if not got or not want:
        return 0.0
    return float(abs(float(got[-1]) - float(want[-1])) <= tolerance + 1e-9)


def boxed_match(response: str, answer: str) -> float:
    got = last_boxed(response)
    want = last_boxed(answer)
    want = answer if want is None else want
    return 0.0 if got is None else float(_norm(got) == _norm(want))


def score(response: str, answer: str, reward: RewardSpec) -> float:
    if reward.verifier == Verifier.NUMERIC:
        return numeric_match(response, answer, reward.tolerance)
    if reward.verifier == Verifier.BOXED:
        return boxed_match(response, answer)
    return exact_match(response, answer)
