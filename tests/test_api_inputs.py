"""The Python API checks what it is given and says what it expected (DataError), before any
work: nothing changes, and a misuse never surfaces as a TypeError/AttributeError from deep
inside, or as a silently wrong answer (a string read as one text per character)."""
from __future__ import annotations

import numpy as np
import pytest

from edgepeft.data import Batch, Example
from edgepeft.errors import BackendError, DataError, EdgePeftError


@pytest.fixture
def session(open_session, bundle_int8):
    return open_session(bundle_int8.path)


BAD_CALLS = [
    pytest.param(lambda s: s.infer([123]), ["infer()", "list of texts", "item 0 is int 123"], id="infer-int"),
    pytest.param(lambda s: s.infer("hello"), ["one string", "['hello']"], id="infer-one-string"),
    pytest.param(lambda s: s.predict("hello"), ["one string"], id="predict-one-string"),
    pytest.param(lambda s: s.infer(42), ["list of texts or a mapping"], id="infer-number"),
    pytest.param(lambda s: s.train_step([("hi", "pos")]), ["Example(text, label)", "item 0 is tuple",
                                                          "Example('hi', 'pos')"], id="train-tuple"),
    pytest.param(lambda s: s.train_step("hi"), ["train_step()", "got str"], id="train-string"),
    pytest.param(lambda s: s.train_step([Example("hi", "pos"), "bad"]), ["item 1 is str"], id="train-mixed"),
    pytest.param(lambda s: s.evaluate([Example("hi", "pos")]), ["evaluate() takes batches", "encoder.batches"],
                 id="evaluate-examples"),
    pytest.param(lambda s: s.evaluate(s.encoder.batch([Example("hi", "pos")])), ["one Batch", "[batch]"],
                 id="evaluate-one-batch"),
    pytest.param(lambda s: s.evaluate([[("hi", "pos")]]), ["item 0 is tuple"], id="evaluate-tuples"),
    pytest.param(lambda s: s.infer({"input_ids": [["a"]], "attention_mask": np.ones((1, 1), np.int64)}),
                 ["'input_ids'", "numeric array"], id="infer-feeds-strings"),
    pytest.param(lambda s: s.infer({"input_ids": np.ones((2, 3), np.int64), "attention_mask": np.ones((1, 3), np.int64)}),
                 ["different batch sizes"], id="infer-feeds-batch-mismatch"),
    pytest.param(lambda s: s.infer({"input_ids": np.ones((1, 999), np.int64), "attention_mask": np.ones((1, 999), np.int64)}),
                 ["longer than the bundle's max_length"], id="infer-feeds-too-long"),
    pytest.param(lambda s: s.infer({"input_ids": np.ones((1, 3), np.int64)}), ["attention_mask"],
                 id="infer-feeds-missing"),
]


def refused_unchanged(session, call, parts, error=DataError) -> None:
    """``call(session)`` raises ``error`` whose message holds ``parts``, and changes nothing."""
    before = session.parameters()
    with pytest.raises(error) as exc:
        call(session)
    assert all(p in str(exc.value) for p in parts), str(exc.value)
    assert session.steps == 0
    for n, v in session.parameters().items():
        np.testing.assert_array_equal(v, before[n])


@pytest.mark.parametrize("call, parts", BAD_CALLS)
def test_misuse_raises_a_data_error_that_says_what_was_expected(session, call, parts):
    refused_unchanged(session, call, parts)


@pytest.mark.parametrize("make, parts", [
    (lambda: Example(None, "pos"), ["Example.text must be a string", "NoneType"]),
    (lambda: Example(b"bytes", "pos"), ["Example.text must be a string"]),
    (lambda: Example("hi", 1), ["Example.label", "str(label)"]),
], ids=["text-none", "text-bytes", "label-int"])
def test_examples_are_checked_at_construction(make, parts):
    with pytest.raises(DataError) as exc:
        make()
    assert all(p in str(exc.value) for p in parts), str(exc.value)


def test_engine_errors_while_running_become_backend_errors(session):
    """Inputs of the right names but the wrong dtype reach onnxruntime: its error comes back as a
    BackendError naming the backend and the phase, with onnxruntime's message kept."""
    feeds = {"input_ids": np.zeros((1, 3), np.float32), "attention_mask": np.ones((1, 3), np.int64)}
    with pytest.raises(BackendError) as exc:
        session.infer(feeds)
    msg = str(exc.value)
    assert "ort-training: inference failed" in msg and "RuntimeError" in msg, msg
    assert exc.value.__cause__ is not None  # the engine's own exception is chained, nothing lost


def test_good_calls_still_work(session, train_examples):
    b = session.encoder.batch(train_examples)
    session.train_step(train_examples)
    session.train_step(b)
    assert session.evaluate([train_examples[:4], b]).n == 4 + len(train_examples)
    assert session.infer(["one", "two"]).shape == (2, 2)
    assert session.infer(b.feeds).shape == (len(train_examples), 2)
    assert session.infer(("one", "two")).shape == (2, 2)  # any sequence of texts
    assert session.predict(["one"])[0] in ("neg", "pos")
    assert isinstance(session.evaluate(iter([b])).loss, float)


def test_every_misuse_error_is_an_edgepeft_error():
    assert issubclass(DataError, EdgePeftError) and issubclass(BackendError, EdgePeftError)
    assert Batch  # the public types the checks name


@pytest.mark.parametrize("kw, parts", [
    (dict(threads="2"), ["`threads`", "'2'"]),
    (dict(threads=-1), ["`threads`"]),
    (dict(batch_size=0), ["`batch_size`"]),
    (dict(optimizer="adamw"), ["`optimizer`", "OptimizerSpec("]),
    (dict(update_guard=5), ["`update_guard`", "UpdateGuard("]),
], ids=["threads-str", "threads-negative", "batch-size-0", "optimizer-str", "guard-int"])
def test_session_open_checks_its_options(open_session, bundle_int8, tmp_path, kw, parts):
    from edgepeft.errors import SpecError

    with pytest.raises(SpecError) as exc:
        open_session(bundle_int8.path, **kw)
    assert all(p in str(exc.value) for p in parts), str(exc.value)
    assert not (tmp_path / "store").exists()


def test_update_guard_is_part_of_the_public_api():
    from edgepeft.runtime import UpdateGuard

    assert UpdateGuard(max_ratio=100).floor == 0.1


def test_personalizer_add_takes_a_list(session, tmp_path):
    from edgepeft.runtime import Personalizer, PersonalizerConfig

    p = Personalizer(session, tmp_path / "loop", PersonalizerConfig(every=0))
    for bad in ("a lovely film", Example("a lovely film", "pos"), {"text": "x", "label": "pos"}):
        with pytest.raises(DataError, match="takes a list of samples"):
            p.add("alice", bad)
    assert p.add("alice", [Example("a lovely film", "pos")]) is None
