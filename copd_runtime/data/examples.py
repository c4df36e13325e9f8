"""The records every recipe passes around: one example, one branch's dataset."""

from __future__ import annotations

from dataclasses import dataclass, field

from copd_core.spec import RewardSpec


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str
    domain: str
    images: tuple[str, ...] = field(default_factory=tuple)
    video: tuple[str, ...] = field(default_factory=tuple)

    def as_json(self) -> dict:
        d = {"prompt": self.prompt, "answer": self.answer}
        if self.images:
            d["images"] = list(self.images)
        if self.video:
            d["video"] = list(self.video)
        return d


@dataclass(frozen=True)
class Dataset:
    domain: str
    train: list[Example]
    eval: list[Example]
    reward: RewardSpec
