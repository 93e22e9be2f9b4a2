"""The pure checks behind reply and profile validation: every scalar's type and range."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import Array

from fedlora import codec
from fedlora.factors import LoraFactors, ModuleFactors
from fedlora.validation import (
    RejectedReply,
    as_float,
    as_int,
    check_arrays,
    check_eval_metrics,
    check_profile_fields,
    check_train_metrics,
    expected_arrays,
    short_reason,
)


@pytest.mark.parametrize(
    "value, why",
    [
        (2.5, "not an integer"),
        (math.nan, "not an integer"),
        (math.inf, "not an integer"),
        (True, "not a number"),
        ("3", "not a number"),
        (0, "not in 1..10"),
        (11, "not in 1..10"),
        (-100, "not in 1..10"),
    ],
)
def test_as_int_refuses(value, why):
    with pytest.raises(RejectedReply, match=why):
        as_int(value, "x", 1, 10)


def test_as_int_and_as_float_accept():
    assert as_int(4.0, "x", 1, 10) == 4 and as_int(10, "x", 1, 10) == 10 and as_int(1, "x", 1, 10) == 1
    assert as_float(0.0, "a", 0, 1) == 0.0 and as_float(1, "a", 0, 1) == 1.0
    for bad in (1.0001, -0.1, math.nan, "x"):
        with pytest.raises(RejectedReply):
            as_float(bad, "a", 0.0, 1.0)


def test_train_metrics():
    assert check_train_metrics(
        {"num-examples": 5, "rank": 4, "train-loss": 0.3}, max_examples=5, max_rank=4, weight_key="num-examples"
    ) == (5, 4)
    assert check_train_metrics({"num-examples": 5}, max_examples=5, max_rank=4, weight_key="num-examples") == (5, None)
    for m, why in [
        ({"rank": 4}, "no 'num-examples'"),
        ({"num-examples": 6}, "not in 1..5"),
        ({"num-examples": 2.5}, "not an integer"),
        ({"num-examples": 3, "rank": 4.7}, "not an integer"),
        ({"num-examples": 3, "rank": math.nan}, "not a finite number"),
        ({"num-examples": 3, "train-loss": -1.0}, "not in"),
        ({"num-examples": 3, "x": math.inf}, "'x'"),
    ]:
        with pytest.raises(RejectedReply, match=why):
            check_train_metrics(m, max_examples=5, max_rank=4, weight_key="num-examples")


def test_eval_metrics():
    ok = check_eval_metrics(
        {"accuracy": 0.5, "loss": 1.2, "num-examples": 4}, max_examples=10, weight_key="num-examples"
    )
    assert ok["accuracy"] == 0.5 and ok["num-examples"] == 4
    for m, why in [
        ({"loss": 1.0, "num-examples": 3}, "no 'accuracy'"),
        ({"accuracy": 5.0, "loss": 1.0, "num-examples": 3}, "'accuracy'=5.0 is not in"),
        ({"accuracy": 0.5, "loss": math.nan, "num-examples": 3}, "not a finite number"),
        ({"accuracy": 0.5, "loss": 1.0, "num-examples": -100}, "not in 1..10"),
        ({"accuracy": 0.5, "loss": 1.0, "num-examples": 3, "val-accuracy": 2}, "'val-accuracy'"),
    ]:
        with pytest.raises(RejectedReply, match=why):
            check_eval_metrics(m, max_examples=10, weight_key="num-examples")
    # A task without labels (a causal LM on free-form instructions) is scored by its loss alone.
    assert (
        check_eval_metrics({"loss": 1.0, "num-examples": 3}, max_examples=10, weight_key="num-examples", scored=False)[
            "loss"
        ]
        == 1.0
    )
    with pytest.raises(RejectedReply, match="no 'loss'"):
        check_eval_metrics({"num-examples": 3}, max_examples=10, weight_key="num-examples", scored=False)


def test_profile_fields():
    good = {"client_id": "c-1", "partition_id": 0, "rank": 4, "num_train": 10, "num_test": 2, "alpha": 8.0}
    assert check_profile_fields(good, max_rank=8)["rank"] == 4
    for change, why in [
        ({"rank": 0}, "rank=0 is not in 1..8"),
        ({"rank": "4"}, "rank='4' is not a number"),
        ({"rank": 4.5}, "not an integer"),
        ({"client_id": ""}, "printable"),
        ({"client_id": "x" * 500}, "printable"),
        ({"num_train": 0}, "num_train"),
        ({"client_id": 5}, "not text"),
    ]:
        with pytest.raises(RejectedReply, match=why):
            check_profile_fields({**good, **change}, max_rank=8)
    with pytest.raises(RejectedReply, match="profile has no 'rank'"):
        check_profile_fields({k: v for k, v in good.items() if k != "rank"}, max_rank=8)


def _template():
    return LoraFactors(
        modules={
            "a.q": ModuleFactors(A=torch.zeros(8, 6), B=torch.zeros(5, 8), alpha=16.0),
            "a.v": ModuleFactors(A=torch.zeros(8, 6), B=torch.zeros(5, 8), alpha=16.0),
        },
        extras={"classifier.weight": torch.zeros(3, 6), "classifier.bias": torch.zeros(3)},
    )


def test_expected_arrays_and_check_arrays():
    t = _template()
    names = list(t.modules)
    exp = expected_arrays(t, {"A", "B", "head"}, 4, names)
    assert exp == {
        "0/A": (4, 6),
        "0/B": (5, 4),
        "1/A": (4, 6),
        "1/B": (5, 4),
        "head/classifier.weight": (3, 6),
        "head/classifier.bias": (3,),
    }
    good = LoraFactors(
        modules={n: ModuleFactors(A=torch.ones(4, 6), B=torch.ones(5, 4), alpha=8.0) for n in names},
        extras={"classifier.weight": torch.ones(3, 6), "classifier.bias": torch.ones(3)},
    )
    rec = codec.encode(good, "float32", modules=names)
    check_arrays(rec, exp, "float32")
    missing = codec.encode(good, "float32", modules=names)
    del missing["1/B"]
    with pytest.raises(RejectedReply, match=r"missing \['1/B'\]"):
        check_arrays(missing, exp, "float32")
    extra = codec.encode(good, "float32", modules=names)
    extra["base/0/A"] = codec.encode_tensor(torch.ones(4, 6))
    with pytest.raises(RejectedReply, match=r"unexpected \['base/0/A'\]"):
        check_arrays(extra, exp, "float32")
    wrong_dtype = codec.encode(good, "float16", modules=names)
    with pytest.raises(RejectedReply, match="encoding float16/raw, expected float32/raw"):
        check_arrays(wrong_dtype, exp, "float32")
    short = codec.encode(good, "float32", modules=names)
    short["0/A"] = Array(dtype="float32", shape=(4, 6), stype="raw", data=b"\0" * 10)
    with pytest.raises(RejectedReply, match="10 bytes do not hold"):
        check_arrays(short, exp, "float32")


def test_short_reason_keeps_one_line():
    tb = "Traceback (most recent call last):\n  File x\n    raise\n\nValueError: disk on fire\n\n"
    assert short_reason(tb) == "ValueError: disk on fire"
    assert len(short_reason("x" * 1000)) == 200 and short_reason("") == "no reason given"


def test_messages_and_returned_values_exactly():
    """The exact sentences (operators read them in metrics.jsonl) and every returned field."""
    with pytest.raises(RejectedReply) as e:
        as_int("3", "x", 1, 10)
    assert str(e.value) == "x='3' is not a number"
    with pytest.raises(RejectedReply) as e:
        as_int(2.5, "x", 1, 10)
    assert str(e.value) == "x=2.5 is not an integer"
    with pytest.raises(RejectedReply) as e:
        as_int(11, "x", 1, 10)
    assert str(e.value) == "x=11 is not in 1..10"
    with pytest.raises(RejectedReply) as e:
        as_float("a", "y")
    assert str(e.value) == "y='a' is not a number"
    with pytest.raises(RejectedReply) as e:
        as_float(math.inf, "y")
    assert str(e.value) == "y=inf is not finite"
    with pytest.raises(RejectedReply) as e:
        as_float(2.0, "y", 0.0, 1.0)
    assert str(e.value) == "y=2.0 is not in [0, 1]"
    out = check_eval_metrics(
        {"accuracy": 0.5, "loss": 1.25, "num-examples": 4.0, "val-accuracy": 0.75, "global-accuracy": 1},
        max_examples=10,
        weight_key="num-examples",
    )
    assert out == {"accuracy": 0.5, "loss": 1.25, "num-examples": 4, "val-accuracy": 0.75, "global-accuracy": 1.0}
    assert isinstance(out["num-examples"], int) and isinstance(out["global-accuracy"], float)
    assert (
        check_eval_metrics(
            {"accuracy": 0.5, "loss": 0.0, "num-examples": 1}, max_examples=0, weight_key="num-examples"
        )["num-examples"]
        == 1
    )
    rec = {"client_id": "c-1", "partition_id": 3.0, "rank": 4, "num_train": 10, "num_test": 0, "device_class": "edge"}
    assert check_profile_fields(rec, max_rank=8) == {
        "client_id": "c-1",
        "partition_id": 3,
        "rank": 4,
        "num_train": 10,
        "num_test": 0,
        "device_class": "edge",
    }
    assert check_profile_fields({k: v for k, v in rec.items() if k != "device_class"}, max_rank=8)["device_class"] == ""
    with pytest.raises(RejectedReply) as e:
        check_profile_fields({**rec, "device_class": "x" * 65}, max_rank=8)
    assert "device_class" in str(e.value) and "1..64 printable" in str(e.value)
    with pytest.raises(RejectedReply) as e:
        check_profile_fields({**rec, "num_test": -1}, max_rank=8)
    assert str(e.value) == "num_test=-1 is not in 0..1000000000000000"
    with pytest.raises(RejectedReply) as e:
        check_profile_fields({**rec, "partition_id": -1}, max_rank=8)
    assert str(e.value) == "partition_id=-1 is not in 0..1000000000"
    with pytest.raises(RejectedReply) as e:
        check_train_metrics({"num-examples": 3, "loss": "x"}, max_examples=5, max_rank=4, weight_key="num-examples")
    assert str(e.value) == "metric 'loss'='x' is not a finite number"
    with pytest.raises(RejectedReply) as e:
        check_eval_metrics({"accuracy": 0.5, "num-examples": 3}, max_examples=5, weight_key="num-examples")
    assert str(e.value) == "no 'loss' in the evaluation metrics"
    assert check_train_metrics(
        {"num-examples": 3, "rank": 2, "train-loss": 0.0, "lst": [1, 2.5]},
        max_examples=5,
        max_rank=4,
        weight_key="num-examples",
    ) == (3, 2)


def test_short_reason_strips_rays_wrapping():
    assert (
        short_reason("Traceback...\nException ClientAppException occurred. Message: disk on fire'>")
        == "Exception ClientAppException occurred. Message: disk on fire"
    )
    assert short_reason('x\n  ValueError: "quoted" \n') == 'ValueError: "quoted'
    assert short_reason("a" * 199 + "bc", limit=200) == "a" * 197 + "..."
    assert short_reason("a" * 200) == "a" * 200
    # a deployed ClientApp's exception, as Flower's SuperNode wraps it: the sentence alone
    assert (
        short_reason("<class 'RuntimeError'>:<'client node-2: --data d: label 'x' is not the run's'>")
        == "client node-2: --data d: label 'x' is not the run's"
    )


def test_check_arrays_counts_what_it_does_not_list():
    t = _template()
    names = list(t.modules)
    exp = expected_arrays(t, {"A", "B", "head"}, 4, names)
    with pytest.raises(RejectedReply) as e:
        check_arrays({}, exp, "float32")
    assert str(e.value) == ("tensors differ from what this client must send: missing ['0/A', '0/B', '1/A'] and 3 more")
    only_a = expected_arrays(t, {"A"}, 2, names)
    assert only_a == {"0/A": (2, 6), "1/A": (2, 6)}
    assert expected_arrays(t, {"B", "head"}, 3, None)["a.q/B"] == (5, 3)


def test_each_refusal_names_its_field_and_bound_in_the_exact_sentence():
    """The sentence is what the operator reads: each field's refusal names that field and its bound."""
    from fedlora.validation import as_text

    def refusal(fn, *args, **kwargs) -> str:
        with pytest.raises(RejectedReply) as e:
            fn(*args, **kwargs)
        return str(e.value)

    ev = {"accuracy": 0.5, "loss": 1.0, "num-examples": 3}
    kw = {"max_examples": 10, "weight_key": "num-examples"}
    assert refusal(check_eval_metrics, {**ev, "loss": math.nan}, **kw) == "metric 'loss'=nan is not a finite number"
    assert refusal(check_eval_metrics, {**ev, "loss": -1.0}, **kw) == "'loss'=-1.0 is not in [0, inf]"
    assert refusal(check_eval_metrics, {**ev, "val-loss": -1.0}, **kw) == "'val-loss'=-1.0 is not in [0, inf]"
    assert refusal(check_eval_metrics, {**ev, "num-examples": 11}, **kw) == "'num-examples'=11 is not in 1..10"
    assert (
        refusal(check_eval_metrics, {**ev, "num-examples": 2}, max_examples=1, weight_key="num-examples")
        == "'num-examples'=2 is not in 1..1"
    )
    out = check_eval_metrics({**ev, "val-loss": 1}, **kw)  # checked and stored as a float, nothing added
    assert out == {**ev, "val-loss": 1.0} and isinstance(out["val-loss"], float)
    good = {"client_id": "c-1", "partition_id": 0, "rank": 4, "num_train": 10, "num_test": 2}
    assert refusal(check_profile_fields, {**good, "client_id": 5}, max_rank=8) == "client_id=5 is not text"
    assert (
        refusal(check_profile_fields, {**good, "num_train": 0}, max_rank=8)
        == "num_train=0 is not in 1..1000000000000000"
    )
    assert check_profile_fields({**good, "num_train": 10**15}, max_rank=8)["num_train"] == 10**15
    assert (
        refusal(check_profile_fields, {**good, "device_class": "\n"}, max_rank=8)
        == "device_class='\\n' must be 1..64 printable characters"
    )
    # Text exactly at its limit passes; the refusal quotes at most 40 characters of what was sent.
    assert as_text("x" * 64, "device_class", 64) == "x" * 64
    assert (
        refusal(as_text, "y" * 60 + "\n", "client_id") == f"client_id={'y' * 40!r} must be 1..128 printable characters"
    )
    # Ray wraps an error's repr as <...'>: those characters come off the end, and nothing else does.
    assert short_reason("ValueError('bad')'>") == "ValueError('bad')"
    assert short_reason("rank too large: X") == "rank too large: X"
