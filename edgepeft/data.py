"""Device-side data: JSONL examples, the bundle's tokenizer, and batches of numpy arrays that
match the bundle's input signature. Torch-free."""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from edgepeft import names
from edgepeft.errors import BundleError, DataError
from edgepeft.manifest import Manifest

_NP = {"int64": np.int64, "int32": np.int32, "float32": np.float32}


@dataclass(frozen=True)
class Example:
    """A text and its class label (None for next-token tasks, where the text is the target)."""

    text: str
    label: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            raise DataError(f"Example.text must be a string, got {type(self.text).__name__} {self.text!r:.40}")
        if self.label is not None and not isinstance(self.label, str):
            raise DataError(f"Example.label must be a label name (a string) or None for next-token data, got "
                            f"{type(self.label).__name__} {self.label!r:.40}: e.g. Example(text, str(label))")


@dataclass(frozen=True)
class Batch:
    """Model inputs by name, and label ids (None for inference)."""

    feeds: dict[str, np.ndarray]
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(next(iter(self.feeds.values())))


def read_jsonl(path: str | Path, text_field: str = "text", label_field: str | None = "label") -> list[Example]:
    """Examples from a JSONL file; ``label_field=None`` for next-token data (text only)."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"data file {str(path)!r} is a folder; give a JSONL file")
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist")
    out: list[Example] = []
    for i, line in _lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise DataError(f"{path}:{i}: not valid JSON ({e})") from None
        fields = [text_field] + ([label_field] if label_field else [])
        if not isinstance(row, dict) or any(f not in row for f in fields):
            raise DataError(f"{path}:{i}: each line needs the fields {fields}, "
                            f"got keys {sorted(row) if isinstance(row, dict) else type(row).__name__}")
        if not isinstance(row[text_field], str):
            raise DataError(f"{path}:{i}: {text_field!r} must be a string")
        out.append(Example(row[text_field], str(row[label_field]) if label_field else None))
    if not out:
        raise DataError(f"data file {str(path)!r} holds no examples")
    return out


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 file (a BOM is allowed); DataError naming the line and the
    byte where the text is not UTF-8, or when the file cannot be read."""
    try:
        with open(path, "rb") as f:
            for i, raw in enumerate(f, 1):
                try:
                    yield i, raw.decode("utf-8-sig" if i == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}:{i}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                                    "JSONL data must be UTF-8: re-save the file as UTF-8 (e.g. `iconv -f UTF-16 "
                                    "-t UTF-8`)") from None
    except OSError as e:
        raise DataError(f"data file {str(path)!r} cannot be read ({e.strerror or e})") from None


def write_jsonl(path: str | Path, examples: Iterable[Example]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for e in examples:
            f.write(json.dumps({"text": e.text, "label": e.label}) + "\n")


def _tokenize(tok, texts: list[str]):
    """The tokenizer's encodings; a tokenizer file that loads but fails (or panics) on text is a
    damaged bundle."""
    if not all(isinstance(t, str) for t in texts):
        bad = next(t for t in texts if not isinstance(t, str))
        raise DataError(f"texts must be strings, got {type(bad).__name__} {bad!r:.40}")
    try:
        return tok.encode_batch(texts)
    except BaseException as e:  # pyo3 panics are BaseExceptions
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise BundleError(f"the bundle's tokenizer ({names.TOKENIZER}) failed on the text ({type(e).__name__}: "
                          f"{e}); the bundle is corrupted or was altered: re-export it") from None


class TextEncoder:
    """Turns texts and label names into a ``Batch`` for a bundle (tokenizer from the bundle)."""

    def __init__(self, tokenizer_path: Path, manifest: Manifest):
        from tokenizers import Tokenizer

        self.manifest = manifest
        try:
            self.tok = Tokenizer.from_file(str(tokenizer_path))
            self.tok.no_padding()
            self.tok.enable_truncation(manifest.max_length)
        except BaseException as e:  # tokenizers raises its own types, and pyo3 panics are BaseExceptions
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            raise BundleError(f"the bundle's tokenizer ({names.TOKENIZER}) cannot be loaded ({type(e).__name__}: "
                              f"{e}); the bundle is corrupted or was altered: re-export it") from None
        pad = self.tok.token_to_id("[PAD]")
        self.pad_id = 0 if pad is None else pad
        self.label_ids = {name: i for i, name in enumerate(manifest.labels)}
        given = [i.name for i in manifest.inputs]
        if given != ["input_ids", "attention_mask"]:
            raise DataError(f"text data needs a bundle with inputs (input_ids, attention_mask), this one has {given}")
        self.dtypes = {i.name: _NP.get(i.dtype, np.int64) for i in manifest.inputs}

    def encode(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        if not texts:
            raise DataError("empty input: give at least one text")
        encs = _tokenize(self.tok, list(texts))
        t = max(len(e.ids) for e in encs)
        ids = np.full((len(encs), t), self.pad_id, dtype=self.dtypes["input_ids"])
        mask = np.zeros((len(encs), t), dtype=self.dtypes["attention_mask"])
        for i, e in enumerate(encs):
            ids[i, : len(e.ids)] = e.ids
            mask[i, : len(e.ids)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    @property
    def causal(self) -> bool:
        return self.manifest.task == "causal-lm"

    def next_token_labels(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """Labels for causal LM: position t predicts token t+1; the last position and padding
        are IGNORE_INDEX (the training graph's loss skips them)."""
        ids, mask = feeds["input_ids"], feeds["attention_mask"]
        labels = np.full(ids.shape, names.IGNORE_INDEX, dtype=np.int64)
        labels[:, :-1] = np.where(mask[:, 1:] > 0, ids[:, 1:], names.IGNORE_INDEX)
        return labels

    def label_array(self, labels: Sequence[str | None]) -> np.ndarray:
        unknown = sorted({lab for lab in labels if lab not in self.label_ids})
        if unknown:
            raise DataError(f"labels {unknown[:5]} are not in the bundle's label set {list(self.label_ids)}")
        return np.array([self.label_ids[lab] for lab in labels], dtype=np.int64)

    def batch(self, examples: Sequence[Example]) -> Batch:
        feeds = self.encode([e.text for e in examples])
        if self.causal:
            return Batch(feeds, self.next_token_labels(feeds))
        return Batch(feeds, self.label_array([e.label for e in examples]))

    def batches(self, examples: Sequence[Example], batch_size: int, *, shuffle: bool = False,
                seed: int = 0) -> Iterator[Batch]:
        """Every example once (the last batch may be smaller: ORT takes any batch size)."""
        if not self.causal:
            self.label_array([e.label for e in examples])  # fail before any work on a bad label
        order = list(range(len(examples)))
        if shuffle:
            random.Random(seed).shuffle(order)
        for s in range(0, len(order), batch_size):
            yield self.batch([examples[i] for i in order[s:s + batch_size]])
