"""Factors out of and into PEFT models; the ArrayRecord codec and its byte accounting."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import make_config
from fedlora import codec
from fedlora.factors import FactorShapeError, LoraFactors, ModuleFactors, extract_factors, load_factors
from fedlora.model import AdapterSpec, build_peft_model


def _model(tmp_path, name="builtin:tiny-bert", rank=4, targets=("query", "value")):
    cfg = make_config(tmp_path, model={"name": name})
    return build_peft_model(cfg, 4, AdapterSpec(rank=rank, alpha=8.0, dropout=0.0, target_modules=targets))


def _randomise(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                p.copy_(torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("name", ["builtin:tiny-bert", "builtin:all-MiniLM-L6-v2"])
def test_extract_load_round_trip_is_bit_exact(tmp_path, name):
    src = _model(tmp_path, name)
    _randomise(src, 1)
    f = extract_factors(src)
    assert len(f.modules) == (4 if name.endswith("tiny-bert") else 12)
    assert set(f.extras) == {"classifier.weight", "classifier.bias"}
    dst = _model(tmp_path, name)
    _randomise(dst, 2)
    load_factors(dst, f)
    g = extract_factors(dst)
    for (ka, a), (kb, b) in zip(f.tensors(), g.tensors()):
        assert ka == kb and torch.equal(a, b)


def test_partial_load_leaves_other_parts(tmp_path):
    m = _model(tmp_path)
    _randomise(m, 3)
    before = extract_factors(m)
    new = extract_factors(m).select({"A"})
    for mf in new.modules.values():
        mf.A = torch.zeros_like(mf.A)
    load_factors(m, new)
    after = extract_factors(m)
    for name in before.modules:
        assert torch.equal(after.modules[name].B, before.modules[name].B)
        assert torch.count_nonzero(after.modules[name].A) == 0


def test_shape_mismatch_names_the_module(tmp_path):
    m = _model(tmp_path, rank=4)
    f = extract_factors(_model(tmp_path, rank=2))
    with pytest.raises(
        FactorShapeError, match=r"attention\.self\.query/A: shape \(2, 64\) does not fit the model's \(4, 64\)"
    ):
        load_factors(m, f)


@pytest.mark.parametrize("dtype,width", [("float32", 4), ("float16", 2), ("bfloat16", 2)])
def test_codec_bytes_equal_numel_times_width(tmp_path, dtype, width):
    m = _model(tmp_path)
    _randomise(m)
    f = extract_factors(m)
    rec = codec.encode(f, dtype)
    assert codec.wire_bytes(rec) == f.numel() * width == codec.raw_bytes(f, dtype)
    assert codec.raw_bytes(f) == f.numel() * 4  # float32 unless told otherwise
    back = codec.decode(rec, alpha=8.0)
    for (k, a), (_, b) in zip(f.tensors(), back.tensors()):
        if dtype == "float32":
            assert torch.equal(a, b)
        else:
            assert torch.equal(a.to(getattr(torch, dtype)).float(), b), k


def test_codec_rejects_corrupt_arrays():
    from flwr.app import Array, ArrayRecord

    rec = ArrayRecord()
    rec["m/A"] = Array(dtype="float32", shape=(2, 3), stype="raw", data=b"\x00" * 20)
    with pytest.raises(codec.CodecError, match="m/A: 20 bytes do not hold a float32 tensor of shape"):
        codec.decode(rec, alpha=1.0)
    rec = ArrayRecord()
    rec["weird"] = codec.encode_tensor(torch.zeros(2))
    with pytest.raises(codec.CodecError, match="not a LoRA factor key"):
        codec.decode(rec, alpha=1.0)


def test_effective_form_and_select():
    A, B = torch.randn(3, 5), torch.randn(4, 3)
    f = LoraFactors(modules={"m": ModuleFactors(A=A, B=B, alpha=6.0)}, extras={"h": torch.ones(2)})
    assert f.modules["m"].scaling == 2.0
    assert torch.allclose(f.modules["m"].delta(), 2.0 * B @ A)
    only_a = f.select({"A"})
    assert only_a.parts() == {"A"} and only_a.modules["m"].B is None and not only_a.extras


def test_compact_keys_use_the_module_list(tmp_path):
    m = _model(tmp_path)
    _randomise(m)
    f = extract_factors(m)
    names = sorted(f.modules)
    rec = codec.encode(f, "float32", modules=names)
    assert set(rec.keys()) == {f"{i}/{p}" for i in range(len(names)) for p in "AB"} | {
        "head/classifier.weight",
        "head/classifier.bias",
    }
    back = codec.decode(rec, alpha=8.0, modules=names)
    for (ka, a), (kb, b) in zip(f.tensors(), back.tensors()):
        assert ka == kb and torch.equal(a, b)
    with pytest.raises(codec.CodecError, match="outside the run's 2 modules"):
        codec.decode(rec, alpha=8.0, modules=names[:2])


# ------------------------------------------------------------------------------ property tests


@settings(deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 6), st.integers(0, 9), st.integers(0, 9)), min_size=1, max_size=4),
    st.sampled_from(["float32", "float16", "bfloat16"]),
    st.booleans(),
    st.integers(0, 1000),
)
def test_codec_round_trip_any_shapes_and_dtypes(mods, wire, head, seed):
    import torch

    from fedlora import codec
    from fedlora.factors import LoraFactors, ModuleFactors

    g = torch.Generator().manual_seed(seed)
    f = LoraFactors(
        modules={
            f"layer.{i}.q": ModuleFactors(
                A=torch.randn(r, n_in, generator=g), B=torch.randn(n_out, r, generator=g), alpha=2.0 + i
            )
            for i, (r, n_in, n_out) in enumerate(mods)
        }
    )
    if head:
        f.extras["classifier.weight"] = torch.randn(3, 4, generator=g)
    names = list(f.modules)
    rec = codec.encode(f, wire, modules=names)
    assert codec.wire_bytes(rec) == codec.raw_bytes(f, wire)
    back = codec.decode(rec, alpha={n: m.alpha for n, m in f.modules.items()}, modules=names)
    dt = codec.WIRE_DTYPES[wire]
    for (k1, t1), (k2, t2) in zip(f.tensors(), back.tensors()):
        assert k1 == k2 and t1.shape == t2.shape
        assert torch.equal(t1.to(dt).float(), t2)  # exactly what the wire dtype holds
    assert {n: m.alpha for n, m in back.modules.items()} == {n: m.alpha for n, m in f.modules.items()}


def test_message_bytes_is_flowers_serialised_size_and_counts_the_framing(task_identity):
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.common.serde import message_to_proto

    f = LoraFactors(modules={"m": ModuleFactors(A=torch.ones(2, 8), B=torch.ones(8, 2), alpha=2.0)})
    msg = Message(
        RecordDict({"arrays": codec.encode(f), "config": ConfigRecord({"server-round": 1})}),
        dst_node_id=5,
        message_type="train",
    )
    n = codec.message_bytes(msg)
    assert n == message_to_proto(msg).ByteSize()
    assert n > codec.wire_bytes(msg.content["arrays"]) == 32 * 4


def test_decode_keeps_second_factor_sets_apart_and_names_malformed_keys():
    from flwr.app import ArrayRecord

    main = LoraFactors(modules={"m": ModuleFactors(A=torch.ones(2, 3), B=torch.ones(4, 2), alpha=2.0)})
    other = LoraFactors(modules={"m": ModuleFactors(A=torch.full((2, 3), 5.0), B=torch.full((4, 2), 5.0), alpha=2.0)})
    rec = codec.encode(main, modules=["m"])
    for prefix in ("base/", "past0/", "past12/"):  # FLoRA's merged delta, finished continual tasks
        for k, v in codec.encode(other, prefix=prefix, modules=["m"]).items():
            rec[k] = v
    plain = codec.decode(rec, alpha=2.0, modules=["m"])
    assert torch.equal(plain.modules["m"].A, torch.ones(2, 3))  # the namespaced sets are not read as the main one
    for prefix in ("base/", "past0/", "past12/"):
        got = codec.decode(rec, alpha=2.0, prefix=prefix, modules=["m"])
        assert torch.equal(got.modules["m"].B, torch.full((4, 2), 5.0))
    assert not codec.decode(rec, alpha=2.0, prefix="past1/", modules=["m"]).modules  # "past1/" is not "past12/"
    bad = ArrayRecord()
    bad["garbage"] = codec.encode_tensor(torch.ones(2))
    with pytest.raises(codec.CodecError, match="garbage: not a LoRA factor key"):
        codec.decode(bad, alpha=1.0)
    pastless = ArrayRecord()
    pastless["pastry/A"] = codec.encode_tensor(torch.ones(2, 3))  # only past<digits>/ is a namespace
    assert "pastry" in codec.decode(pastless, alpha=1.0).modules


def test_codec_errors_name_the_problem():
    from flwr.app import Array, ArrayRecord

    f = LoraFactors(modules={"m": ModuleFactors(A=torch.ones(2, 3), B=torch.ones(4, 2), alpha=2.0)})
    with pytest.raises(codec.CodecError, match=r"unknown wire dtype 'int4'; use one of float32, float16, bfloat16"):
        codec.encode(f, "int4")
    with pytest.raises(codec.CodecError, match=r"module 'm' is not in the run's module list"):
        codec.encode(f, modules=["other"])
    rec = codec.encode(f, modules=["m"])
    with pytest.raises(codec.CodecError, match=r"no alpha known for module 'm'"):
        codec.decode(rec, alpha={"other": 1.0}, modules=["m"])
    odd = ArrayRecord()
    odd["0/C"] = codec.encode_tensor(torch.ones(2))
    with pytest.raises(codec.CodecError, match=r"0/C: not a LoRA factor key"):
        codec.decode(odd, alpha=1.0, modules=["m"])
    ints = ArrayRecord()
    ints["0/A"] = Array(dtype="int8", shape=(2,), stype=codec.STYPE, data=b"\x01\x02")
    with pytest.raises(codec.CodecError, match=r"0/A: unsupported array encoding \(stype=.*, dtype='int8'\)"):
        codec.decode(ints, alpha=1.0, modules=["m"])


def test_decoded_tensors_are_float32_whatever_the_wire_dtype():
    f = LoraFactors(modules={"m": ModuleFactors(A=torch.ones(2, 3), B=torch.zeros(4, 2), alpha=2.0)})
    for wire in ("float16", "bfloat16"):
        back = codec.decode(codec.encode(f, wire), alpha=2.0)
        assert back.modules["m"].A.dtype == torch.float32 and back.modules["m"].B.dtype == torch.float32


def test_message_sizes_are_exact_for_a_sample_then_payload_plus_their_framing():
    from flwr.app import Message, MetricRecord, RecordDict

    from fedlora.codec import MessageSizer, encode, message_bytes
    from fedlora.factors import LoraFactors, ModuleFactors
    from fleet import train_reply

    def msg(i: int, rank: int) -> Message:
        f = LoraFactors(modules={"m": ModuleFactors(A=torch.randn(rank, 32), B=torch.randn(16, rank), alpha=8.0)})
        content = RecordDict({"arrays": encode(f), "metrics": MetricRecord({"num-examples": 10 + i, "rank": rank})})
        return train_reply(100 + i, content, message_id=f"m{i}")

    sizer = MessageSizer(sample=4)
    exact = [message_bytes(msg(i, 4)) for i in range(10)]
    got = [sizer(msg(i, 4)) for i in range(10)]
    assert got[:4] == exact[:4] and len(sizer.framing) == 4
    assert all(abs(g - e) <= 4 for g, e in zip(got[4:], exact[4:]))  # same structure: the framing barely moves
    bigger = msg(20, 8)  # a larger payload is counted in full, with the sampled framing
    assert abs(sizer(bigger) - message_bytes(bigger)) <= 8
