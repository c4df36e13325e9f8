"""Datasets: JSONL files and built-in synthetic verifiable domains.

A line of JSONL is `{"prompt": str, "answer": str, "images": [path...]?, "video": [frame path...]?}`.
Built-in domains each have their own response pattern, so that branches trained
on them really diverge:

- `arith`   text   "arith 7+8="         -> "15"            (numeric)
- `reverse` text   "rev cab="           -> "bac"           (exact)
- `maxbox`  text   "max 3 9 5 1="       -> "\\boxed{9}"     (boxed)
- `color`   image  "<image> color?"     -> "red"           (exact)   see media.py
- `motion`  video  "<video> motion?"    -> "left"          (exact)   see media.py
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from pathlib import Path

from copd_core.spec import DatasetSpec, RewardSpec, Verifier
from copd_runtime.data.examples import Dataset, Example
from copd_runtime.data.media import vision_examples

# ---------------------------------------------------------------------------
# Built-in text domains


def _arith(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return f"arith {a}+{b}=", str(a + b)


def _reverse(rng: random.Random) -> tuple[str, str]:
    word = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(3, 4)))
    return f"rev {word}=", word[::-1]


def _maxbox(rng: random.Random) -> tuple[str, str]:
    xs = [rng.randint(0, 9) for _ in range(4)]
    return "max " + " ".join(map(str, xs)) + "=", "\\boxed{" + str(max(xs)) + "}"


TEXT_DOMAINS: dict[str, tuple[Callable[[random.Random], tuple[str, str]], RewardSpec]] = {
    "arith": (_arith, RewardSpec(verifier=Verifier.NUMERIC)),
    "reverse": (_reverse, RewardSpec(verifier=Verifier.EXACT)),
    "maxbox": (_maxbox, RewardSpec(verifier=Verifier.BOXED)),
}
VISION_DOMAINS = ("color", "motion")


EVAL_SHARE = 5  # 1 prompt in EVAL_SHARE (by hash) is held out for evaluation


def split_of(prompt: str) -> str:
    """`eval` or `train`, a fixed function of the prompt text: the builtin text domains' train and
    eval sets are disjoint by construction (a prompt is only ever drawn into its own split)."""
    return "eval" if hashlib.sha256(prompt.encode()).digest()[0] % EVAL_SHARE == 0 else "train"


def text_examples(domain: str, n: int, seed: int, split: str = "train") -> list[Example]:
    """`n` examples of a builtin text domain whose prompts belong to `split` (rejection sampling
    from the domain's generator; repeats are possible, crossing the split is not)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be train or eval, not {split!r}")
    gen, _ = TEXT_DOMAINS[domain]
    rng = random.Random(f"{domain}:{seed}")
    out: list[Example] = []
    while len(out) < n:
        prompt, answer = gen(rng)
        if split_of(prompt) == split:
            out.append(Example(prompt, answer, domain=domain))
    return out


def builtin_examples(domain: str, n: int, seed: int, media_dir: Path | None = None, split: str = "train"
                     ) -> list[Example]:
    if domain in TEXT_DOMAINS:
        return text_examples(domain, n, seed, split)
    if domain in VISION_DOMAINS:
        if media_dir is None:
            raise ValueError(f"domain {domain!r} writes images and needs a media directory")
        return vision_examples(domain, n, seed, media_dir)
    raise ValueError(f"unknown builtin domain {domain!r}")


def default_reward(domain: str) -> RewardSpec:
    if domain in TEXT_DOMAINS:
        return TEXT_DOMAINS[domain][1]
    return RewardSpec(verifier=Verifier.EXACT)


# ---------------------------------------------------------------------------
# JSONL


def read_jsonl(path: Path, domain: str) -> list[Example]:
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            out.append(
                Example(
                    prompt=str(d["prompt"]),
                    answer=str(d["answer"]),
                    domain=domain,
                    images=tuple(_resolve(path, p) for p in d.get("images", [])),
                    video=tuple(_resolve(path, p) for p in d.get("video", [])),
                )
            )
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{i}: not a {{prompt, answer}} record ({e})") from None
    if not out:
        raise ValueError(f"{path}: no examples")
    return out


def _resolve(jsonl: Path, p: str) -> str:
    return p if Path(p).is_absolute() else str(jsonl.parent / p)


def write_jsonl(path: Path, examples: list[Example]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(e.as_json()) + "\n" for e in examples))


def load_dataset(
    name: str, spec: DatasetSpec, reward: RewardSpec | None, storage: Path, seed: int, eval_size: int = 64
) -> Dataset:
    """Train and eval examples for one branch. Builtin text domains: eval prompts are disjoint from
    train prompts by construction (`split_of`); builtin vision domains: eval uses another seed."""
    if spec.builtin is not None:
        media = storage / "media" / spec.builtin
        train = builtin_examples(spec.builtin, spec.size, seed, media, "train")
        evals = builtin_examples(spec.builtin, eval_size, seed + 1_000_003, media, "eval")
        domain = spec.builtin
    else:
        path = Path(spec.path)
        path = path if path.is_absolute() else storage / path
        rows = read_jsonl(path, name)
        if spec.eval_path:
            ep = Path(spec.eval_path)
            evals = read_jsonl(ep if ep.is_absolute() else storage / ep, name)
            train = rows
        else:
            cut = max(1, len(rows) // 10)
            evals, train = rows[:cut], rows[cut:] or rows
        domain = name
    fields_set = reward is not None and reward.model_fields_set
    return Dataset(domain=domain, train=train, eval=evals, reward=reward if fields_set else default_reward(domain))
