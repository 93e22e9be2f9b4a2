"""LoraFactors <-> Flower ``ArrayRecord``, with a selectable wire dtype and exact byte accounting.

Each tensor travels as one ``Array`` with ``stype="raw"``: its bytes are the tensor's memory in
the wire dtype, nothing else (no ``.npy`` header, which costs 128 bytes per tensor, and bfloat16,
which numpy cannot hold, works). Keys are ``<module>/A``, ``<module>/B`` and ``head/<name>``;
given the run's module list (both sides build the same adapter, so both know it) ``<module>`` is
the module's index in that list rather than its 40-odd-character path. Alpha is configuration,
not payload, so it never travels.

:func:`wire_bytes` is the exact payload size (sum of numel x dtype width);
:func:`message_bytes` is what Flower's own protobuf framing makes of a whole message.
"""

from __future__ import annotations

import torch
from flwr.app import Array, ArrayRecord

from fedlora.factors import LoraFactors

STYPE = "raw"
NAMESPACES = ("base/",)  # prefixes of second factor sets sharing a record (FLoRA's global delta)
WIRE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CodecError(ValueError):
    """A record that does not decode into factors; the message names the key."""


def encode_tensor(t: torch.Tensor, wire_dtype: str = "float32") -> Array:
    dtype = WIRE_DTYPES[wire_dtype]
    t = t.detach().to("cpu", dtype).contiguous()
    # Byte view through an integer dtype of the same width: numpy has no bfloat16 (not even empty).
    data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return Array(dtype=wire_dtype, shape=tuple(t.shape), stype=STYPE, data=data)


def decode_tensor(key: str, arr: Array) -> torch.Tensor:
    if arr.stype != STYPE or arr.dtype not in WIRE_DTYPES:
        raise CodecError(f"{key}: unsupported array encoding (stype={arr.stype!r}, dtype={arr.dtype!r})")
    dtype = WIRE_DTYPES[arr.dtype]
    shape = tuple(arr.shape)
    expected = _numel(shape) * torch.tensor([], dtype=dtype).element_size()
    if len(arr.data) != expected:
        raise CodecError(f"{key}: {len(arr.data)} bytes do not hold a {arr.dtype} tensor of shape {shape}")
    if expected == 0:
        return torch.zeros(shape, dtype=torch.float32)
    t = torch.frombuffer(bytearray(arr.data), dtype=dtype).reshape(shape)
    return t.to(torch.float32)


def module_index(names: list[str] | None) -> dict[str, str] | None:
    """Module path -> wire key (its position in the sorted module list)."""
    return None if names is None else {n: str(i) for i, n in enumerate(sorted(names))}


def encode(
    factors: LoraFactors, wire_dtype: str = "float32", prefix: str = "", modules: list[str] | None = None
) -> ArrayRecord:
    """Factors -> ArrayRecord. ``prefix`` namespaces a second set in the same record; ``modules``
    (the run's module list) makes keys compact."""
    if wire_dtype not in WIRE_DTYPES:
        raise CodecError(f"unknown wire dtype {wire_dtype!r}; use one of {', '.join(WIRE_DTYPES)}")
    index = module_index(modules)
    record = ArrayRecord()
    for key, t in factors.tensors():
        if index is not None and not key.startswith("head/"):
            module, _, part = key.rpartition("/")
            if module not in index:
                raise CodecError(f"module {module!r} is not in the run's module list")
            key = f"{index[module]}/{part}"
        record[prefix + key] = encode_tensor(t, wire_dtype)
    return record


def decode(
    record: ArrayRecord, alpha: float | dict[str, float], prefix: str = "", modules: list[str] | None = None
) -> LoraFactors:
    """ArrayRecord -> factors (float32). ``alpha`` is one value or a per-module mapping;
    ``modules`` is the run's module list when keys are compact."""
    names = None if modules is None else sorted(modules)
    flat: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    for key, arr in record.items():
        if not key.startswith(prefix) or (not prefix and namespaced(key)):
            continue
        name = key[len(prefix) :]
        t = decode_tensor(key, arr)
        if name.startswith("head/"):
            flat[name] = t
            continue
        module, sep, part = name.rpartition("/")
        if not sep or part not in ("A", "B"):
            raise CodecError(f"{key}: not a LoRA factor key ('<module>/A', '<module>/B' or 'head/<name>')")
        if names is not None:
            if not module.isdigit() or int(module) >= len(names):
                raise CodecError(f"{key}: module index {module!r} is outside the run's {len(names)} modules")
            module = names[int(module)]
        a = alpha if isinstance(alpha, (int, float)) else alpha.get(module)
        if a is None:
            raise CodecError(f"{key}: no alpha known for module {module!r}")
        flat[f"{module}/{part}"], alphas[module] = t, float(a)
    return LoraFactors.from_tensors(flat, alphas)


def namespaced(key: str) -> bool:
    """A key of a second factor set: FLoRA's ``base/`` or a finished continual task's ``past<t>/``."""
    head = key.split("/", 1)[0]
    return head + "/" in NAMESPACES or (head.startswith("past") and head[4:].isdigit())


def wire_bytes(record: ArrayRecord) -> int:
    """Exact payload bytes: sum over arrays of numel x dtype width."""
    return sum(len(arr.data) for arr in record.values())


def raw_bytes(factors: LoraFactors, wire_dtype: str = "float32") -> int:
    """What ``factors`` weigh in ``wire_dtype`` with no framing at all."""
    width = torch.tensor([], dtype=WIRE_DTYPES[wire_dtype]).element_size()
    return factors.numel() * width


def message_bytes(message) -> int:
    """Size of a whole message as Flower serialises it (protobuf: metadata, keys, shapes, data)."""
    from flwr.common.serde import message_to_proto

    return message_to_proto(message).ByteSize()


class MessageSizer:
    """Message sizes for a round's byte accounting: exact (:func:`message_bytes`) for the first
    ``sample`` messages, then each message's own array bytes plus the mean framing (metadata, keys,
    shapes, metrics) of those exact ones. Serialising a message copies its payload: for a round of
    1,000 7B-sized replies that was minutes of the server's time spent measuring itself, while the
    framing of one round's messages differs by a few bytes."""

    def __init__(self, sample: int = 8) -> None:
        self.sample = sample
        self.framing: list[int] = []

    def __call__(self, message) -> int:
        payload = (
            sum(len(arr.data) for rec in message.content.array_records.values() for arr in rec.values())
            if message.has_content()
            else 0
        )
        if len(self.framing) < self.sample:
            total = message_bytes(message)
            self.framing.append(total - payload)
            return total
        return payload + round(sum(self.framing) / len(self.framing))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
