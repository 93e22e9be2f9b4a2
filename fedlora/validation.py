"""What a client says is data to check, never to trust: pure checks for replies and profiles.

The server checks every reply against the exact set of tensors (names, shapes, wire dtype) it
expects from *that* client for *that* round before decoding anything, and every scalar (counts,
ranks, losses, accuracies, profile fields) for type and range. A failed check raises
:class:`RejectedReply` with a sentence naming the problem; the strategy drops that reply (or that
node, for a profile), logs the reason with the client's id, and aggregates the rest. Nothing a
client sends can make a later step raise.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from numbers import Real

from fedlora.codec import STYPE, WIRE_DTYPES, module_index
from fedlora.factors import LoraFactors, extra_part

MAX_ID_CHARS = 128


class RejectedReply(ValueError):
    """A client's reply or profile that cannot be used; the message says why."""


def short_reason(reason: str, limit: int = 200) -> str:
    """One line out of a (possibly 40-line, Ray-wrapped) error: its last non-empty line, bounded."""
    lines = [ln.strip() for ln in str(reason).splitlines() if ln.strip()]
    line = lines[-1].rstrip("'>\"") if lines else "no reason given"  # Ray wraps the repr in <...'>
    # Flower's deployment wraps a ClientApp's exception as "<class 'RuntimeError'>:<'sentence'>".
    line = re.sub(r"^<class '[\w.]+'>:<['\"]?", "", line)
    return line if len(line) <= limit else line[: limit - 3] + "..."


# ----------------------------------------------------------------------------------- scalars
def as_int(value: object, what: str, lo: int, hi: int) -> int:
    """An integer-valued number in lo..hi (2.0 passes, 2.5, NaN, True and '2' do not)."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise RejectedReply(f"{what}={value!r} is not a number")
    if not math.isfinite(value) or float(value) != int(value):
        raise RejectedReply(f"{what}={value!r} is not an integer")
    if not lo <= int(value) <= hi:
        raise RejectedReply(f"{what}={int(value)} is not in {lo}..{hi}")
    return int(value)


def as_float(value: object, what: str, lo: float = -math.inf, hi: float = math.inf) -> float:
    """A finite number in [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise RejectedReply(f"{what}={value!r} is not a number")
    if not math.isfinite(value):
        raise RejectedReply(f"{what}={value!r} is not finite")
    if not lo <= float(value) <= hi:
        raise RejectedReply(f"{what}={value!r} is not in [{lo:g}, {hi:g}]")
    return float(value)


def as_text(value: object, what: str, limit: int = MAX_ID_CHARS, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise RejectedReply(f"{what}={value!r} is not text")
    if (not value and not allow_empty) or len(value) > limit or not value.isprintable():
        raise RejectedReply(f"{what}={value[:40]!r} must be 1..{limit} printable characters")
    return value


# ----------------------------------------------------------------------------------- tensors
def expected_arrays(
    template: LoraFactors, parts: Iterable[str], rank: int, module_names: list[str]
) -> dict[str, tuple[int, ...]]:
    """Wire key -> shape of every tensor a client of ``rank`` sends when it shares ``parts``."""
    parts = set(parts)
    index = module_index(module_names)
    out: dict[str, tuple[int, ...]] = {}
    for name, m in template.modules.items():
        key = index[name] if index is not None else name
        if "A" in parts:
            out[f"{key}/A"] = (rank, int(m.A.shape[1]))
        if "B" in parts:
            out[f"{key}/B"] = (int(m.B.shape[0]), rank)

    for name, t in template.extras.items():
        if extra_part(name) in parts:
            out[f"head/{name}"] = tuple(int(s) for s in t.shape)
    return out


def check_arrays(record: Mapping, expected: Mapping[str, tuple[int, ...]], wire_dtype: str) -> None:
    """The record holds exactly the expected keys, each a raw array of the wire dtype and shape."""
    keys = set(record.keys())
    missing, unexpected = sorted(set(expected) - keys), sorted(keys - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}" + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
        if unexpected:
            parts.append(
                f"unexpected {unexpected[:3]}" + (f" and {len(unexpected) - 3} more" if len(unexpected) > 3 else "")
            )
        raise RejectedReply(f"tensors differ from what this client must send: {'; '.join(parts)}")
    width = {name: _width(name) for name in WIRE_DTYPES}
    for key, shape in expected.items():
        arr = record[key]
        if arr.stype != STYPE or arr.dtype != wire_dtype:
            raise RejectedReply(f"{key}: encoding {arr.dtype}/{arr.stype}, expected {wire_dtype}/{STYPE}")
        if tuple(arr.shape) != tuple(shape):
            raise RejectedReply(f"{key}: shape {tuple(arr.shape)}, expected {tuple(shape)}")
        n = 1
        for s in shape:
            n *= s
        if len(arr.data) != n * width[wire_dtype]:
            raise RejectedReply(f"{key}: {len(arr.data)} bytes do not hold a {wire_dtype} tensor of shape {shape}")


def _width(dtype: str) -> int:
    import torch

    return torch.tensor([], dtype=WIRE_DTYPES[dtype]).element_size()


def check_finite(factors: LoraFactors) -> None:
    """Every tensor finite, and every B still finite in float32 once its scaling is applied (the
    effective form every aggregation works in): a client sending float32's largest values must be
    named and dropped here, not turn the round's aggregate into Inf."""
    import math

    import torch

    largest: dict[str, float] = {}
    for key, t in factors.tensors():
        if not t.numel():
            continue
        # One pass per tensor and no boolean copy (isfinite() would allocate one per tensor): min and
        # max propagate NaN, and Inf shows in one of them.
        lo, hi = torch.aminmax(t.detach())
        lo, hi = float(lo), float(hi)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise RejectedReply(f"{key} holds NaN or Inf")
        largest[key] = max(-lo, hi)
    limit = torch.finfo(torch.float32).max
    for name, m in factors.modules.items():
        if m.B is not None and m.B.numel():
            biggest = largest[f"{name}/B"]
            if biggest * m.scaling > limit:
                raise RejectedReply(
                    f"{name}/B times its scaling {m.scaling:g} overflows float32 (largest |entry| "
                    f"{biggest:.3g}): its effective factors are not finite"
                )


# ----------------------------------------------------------------------------------- metrics
def check_numbers(metrics: Mapping, what: str) -> None:
    """Every value is a finite number (or a list of them): nothing else reaches an average."""
    for k, v in metrics.items():
        vals = v if isinstance(v, list) else [v]
        for x in vals:
            if isinstance(x, bool) or not isinstance(x, Real) or not math.isfinite(x):
                raise RejectedReply(f"{what} '{k}'={v!r} is not a finite number")


def check_train_metrics(
    metrics: Mapping, *, max_examples: int, max_rank: int, weight_key: str
) -> tuple[int, int | None]:
    """(num-examples, reported rank or None) of a train reply."""
    check_numbers(metrics, "metric")
    if weight_key not in metrics:
        raise RejectedReply(f"no '{weight_key}' in the metrics")
    n = as_int(metrics[weight_key], f"'{weight_key}'", 1, max_examples)
    rank = as_int(metrics["rank"], "'rank'", 1, max_rank) if "rank" in metrics else None
    if "train-loss" in metrics:
        as_float(metrics["train-loss"], "'train-loss'", 0.0)
    return n, rank


EVAL_FRACTIONS = ("accuracy", "val-accuracy", "global-accuracy")


def check_eval_metrics(metrics: Mapping, *, max_examples: int, weight_key: str, scored: bool = True) -> dict:
    """An evaluation reply's metrics: accuracies in [0, 1], a finite non-negative loss, a count.
    ``scored=False``: the task has no labels to score (a causal LM on free-form instructions), so
    accuracy is not required."""
    check_numbers(metrics, "metric")
    for key in ("accuracy", "loss", weight_key) if scored else ("loss", weight_key):
        if key not in metrics:
            raise RejectedReply(f"no '{key}' in the evaluation metrics")
    out = dict(metrics)
    for key in EVAL_FRACTIONS:
        if key in metrics:
            out[key] = as_float(metrics[key], f"'{key}'", 0.0, 1.0)
    out["loss"] = as_float(metrics["loss"], "'loss'", 0.0)
    if "val-loss" in metrics:
        out["val-loss"] = as_float(metrics["val-loss"], "'val-loss'", 0.0)
    out[weight_key] = as_int(metrics[weight_key], f"'{weight_key}'", 1, max(max_examples, 1))
    return out


# ----------------------------------------------------------------------------------- profiles
def check_profile_fields(record: Mapping, *, max_rank: int) -> dict:
    """Types and ranges of a setup profile's fields; the caller applies the run's own rules."""
    for key in ("client_id", "partition_id", "rank", "num_train", "num_test"):
        if key not in record:
            raise RejectedReply(f"profile has no '{key}'")
    return {
        "client_id": as_text(record["client_id"], "client_id"),
        "partition_id": as_int(record["partition_id"], "partition_id", 0, 10**9),
        "rank": as_int(record["rank"], "rank", 1, max_rank),
        "num_train": as_int(record["num_train"], "num_train", 1, 10**15),
        "num_test": as_int(record["num_test"], "num_test", 0, 10**15),
        "device_class": as_text(record.get("device_class", ""), "device_class", 64, allow_empty=True),
    }
