"""Reply validation and aggregation of the strategies, without a Grid (pure server-side logic)."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from conftest import make_config
from fedlora import codec
from fedlora.config import FedLoraConfig
from fedlora.factors import LoraFactors, ModuleFactors
from fedlora.protocol import NodeProfile
from fedlora.registry import get_strategy
from fedlora.strategies import RejectedReply

IN, OUT = 16, 16
NAMES = ["l0.query", "l0.value"]


def _factors(rank: int, alpha: float, parts=("A", "B", "head"), seed=0) -> LoraFactors:
    g = torch.Generator().manual_seed(seed)
    f = LoraFactors(
        modules={
            n: ModuleFactors(
                A=torch.randn(rank, IN, generator=g) if "A" in parts else None,
                B=torch.randn(OUT, rank, generator=g) if "B" in parts else None,
                alpha=alpha,
            )
            for n in NAMES
        }
    )
    if "head" in parts:
        f.extras = {"classifier.weight": torch.randn(3, IN, generator=g), "classifier.bias": torch.zeros(3)}
    return f


def _strategy(name: str, **hetero):
    cfg = FedLoraConfig.load(
        None,
        [f"federation.strategy={name}", "lora.rank=4", "lora.alpha=8"] + [f"hetero.{k}={v}" for k, v in hetero.items()],
    )
    s = get_strategy(name)(cfg, _factors(8, 8.0))
    return s


def _reply(f: LoraFactors, n=10, rank=None, names=NAMES) -> RecordDict:
    m = {"num-examples": n}
    if rank is not None:
        m["rank"] = rank
    return RecordDict({"arrays": codec.encode(f, modules=names), "metrics": MetricRecord(m)})


def _prof(rank=4, alpha=8.0, num_train=50):
    return NodeProfile(
        node_id=1, client_id="client-00007", partition_id=7, rank=rank, alpha=alpha, num_train=num_train, num_test=5
    )


def test_fedit_accepts_a_good_reply():
    s = _strategy("fedit")
    u = s.validate_reply(_prof(), _reply(_factors(4, 8.0), rank=4))
    assert u.weight == 10 and set(u.factors.modules) == set(NAMES)


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda f: f.modules["l0.query"].__setattr__("A", torch.randn(3, IN)), "0/A: shape (3, 16), expected (4, 16)"),
        (lambda f: f.modules["l0.value"].__setattr__("B", torch.randn(OUT + 1, 4)), "shape (17, 4), expected (16, 4)"),
        (lambda f: f.modules["l0.value"].A.__setitem__((0, 0), math.inf), "holds NaN or Inf"),
        (lambda f: f.extras.__setitem__("classifier.weight", torch.zeros(2, IN)), "head/classifier.weight"),
    ],
)
def test_malformed_factors_are_rejected_with_reason(mutate, reason):
    s = _strategy("fedit")
    f = _factors(4, 8.0)
    mutate(f)
    with pytest.raises(RejectedReply) as exc:
        s.validate_reply(_prof(), _reply(f, rank=4))
    assert reason in str(exc.value)


def test_rank_reports_and_weights_are_checked():
    s = _strategy("fedit")
    with pytest.raises(RejectedReply, match="'rank'=8 is not in 1..4"):
        s.validate_reply(_prof(), _reply(_factors(4, 8.0), rank=8))
    with pytest.raises(RejectedReply, match="reports rank 2, but the client trains rank 4"):
        s.validate_reply(_prof(), _reply(_factors(2, 8.0), rank=2))
    with pytest.raises(RejectedReply, match=r"0/A: shape \(2, 16\), expected \(4, 16\)"):
        s.validate_reply(_prof(), _reply(_factors(2, 8.0), rank=4))  # a rank report that lies
    with pytest.raises(RejectedReply, match="'num-examples'=1000 is not in 1..50"):
        s.validate_reply(_prof(), _reply(_factors(4, 8.0), n=1000))
    extra = _factors(4, 8.0)
    extra.modules["l1.query"] = extra.modules["l0.query"]  # a module the run does not adapt
    with pytest.raises(RejectedReply, match=r"unexpected \['2/A', '2/B'\]"):
        s.validate_reply(_prof(), _reply(extra, rank=4, names=NAMES + ["l1.query"]))


def test_policies_are_enforced_on_replies():
    with pytest.raises(RejectedReply, match="carries B, head, which the fedsa policy"):
        _strategy("fedsa").validate_reply(_prof(), _reply(_factors(4, 8.0)))
    with pytest.raises(RejectedReply, match="carries A, which the ffa policy"):
        _strategy("ffa").validate_reply(_prof(), _reply(_factors(4, 8.0)))
    with pytest.raises(RejectedReply, match="lacks the shared part"):
        _strategy("fedit").validate_reply(_prof(), _reply(_factors(4, 8.0, parts=("A",))))
    assert _strategy("fedsa").validate_reply(_prof(), _reply(_factors(4, 8.0, parts=("A",))))


def test_hetlora_accepts_self_pruned_rank_only_when_enabled():
    f2 = _factors(2, 8.0)
    with pytest.raises(RejectedReply, match="reports rank 2, but the client trains rank 4"):
        _strategy("hetlora").validate_reply(_prof(), _reply(f2, rank=2))
    s = _strategy("hetlora", hetlora_prune="true")
    prof = _prof()
    s.validate_reply(prof, _reply(f2, rank=2))
    assert prof.rank == 2  # later payloads for this client are truncated to rank 2


def test_a_node_the_superlink_answers_for_is_named_as_itself_once(task_identity):
    """A node that dies mid-round: Flower's SuperLink answers its message itself (its own error
    message, from the SuperLink's node id). The stream hands it over as the dead node's reply, so the
    round names that node once, for what ended the wait, and no node that does not exist."""
    from flwr.app import Message
    from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

    from fedlora.aggregation.streaming import StreamingGrid

    class Link:  # what a SuperLink does with pushes and pulls; its answer for a dead node is Flower's own
        def __init__(self) -> None:
            self.pushed: list[Message] = []

        def push_messages(self, messages):
            for i, m in enumerate(messages):
                m.metadata.__dict__["_message_id"] = f"m{i}"  # as Flower's grids set it
                self.pushed.append(m)
            return [m.metadata.message_id for m in messages]

        def pull_messages(self, ids):
            alive, dead = self.pushed
            return [
                Message(RecordDict(), reply_to=alive),
                create_message_error_unavailable_res_message(dead.metadata, "node_unavail"),
            ]

    sent = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in (11, 12)]
    replies = list(StreamingGrid(Link()).send_and_receive(sent, timeout=5))
    assert [r.metadata.src_node_id for r in replies] == [11, 12]
    assert not replies[0].has_error() and replies[1].has_error()
    assert "Node Unavailable" in replies[1].error.reason
    assert replies[1].metadata.reply_to_message_id == "m1"


class _Link:
    """What Flower's SuperLink and grid do with a round's pulls: a pull takes (marks delivered) every
    reply that has arrived for the ids asked, then downloads each one's objects, ``download[id]``
    seconds, in turn (``inf``: a cut upload, until ``release``); an id asked again after its reply was
    taken is answered with Flower's own "Message Unavailable" error, and one whose node died
    (``dead[id]`` seconds after the push) with its "Node Unavailable" verdict."""

    def __init__(
        self, arrive: dict[str, float], download: dict[str, float], dead: dict[str, float] | None = None
    ) -> None:
        import threading

        self.arrive, self.download, self.dead = arrive, download, dead or {}
        self.pushed: dict = {}
        self.taken: set[str] = set()
        self.calls: list[list[str]] = []
        self.lock = threading.Lock()
        self.release = threading.Event()
        self.t0 = 0.0

    def push_messages(self, messages):
        import time

        for i, m in enumerate(messages):
            m.metadata.__dict__["_message_id"] = f"m{i}"
            self.pushed[f"m{i}"] = m
        self.t0 = time.monotonic()
        return list(self.pushed)

    def take(self, ids):
        """The pull's first step (the split form, as :class:`SplitPull` gives it): what the SuperLink
        answers for ``ids``, each with the download that brings it."""
        import time

        from flwr.app import Message
        from flwr.server.superlink.linkstate.utils import (
            create_message_error_unavailable_ins_message,
            create_message_error_unavailable_res_message,
        )

        ids = list(ids)
        with self.lock:
            self.calls.append(ids)
            gone = [i for i in ids if i in self.taken]
            now = time.monotonic() - self.t0
            took = [i for i in ids if i not in self.taken and self.arrive[i] <= now]
            self.taken.update(took)
            dead = [i for i in ids if i not in self.taken and self.dead.get(i, float("inf")) <= now]

        def download(i: str):
            self.release.wait(None if self.download[i] == float("inf") else self.download[i])
            return Message(RecordDict(), reply_to=self.pushed[i])

        answers = [(i, lambda i=i: create_message_error_unavailable_ins_message(i, 0)) for i in gone]
        answers += [
            (i, lambda i=i: create_message_error_unavailable_res_message(self.pushed[i].metadata, "node_unavail"))
            for i in dead
        ]
        return answers + [(i, lambda i=i: download(i)) for i in took]

    def pull_messages(self, ids):
        """Flower's pull, whole: every download in turn, all replies at the end."""
        return [fetch() for _, fetch in self.take(ids)]


@pytest.mark.parametrize("split", [False, True], ids=["whole", "split"])
def test_a_slow_pull_hands_over_every_reply_it_took_never_flowers_not_found(task_identity, split):
    """Honest replies whose objects are still uploading make Flower's pull slow (its backoff): past
    the stall period their ids are asked again, and Flower answers "Message Unavailable" for a reply
    the slow pull already took. Those errors wait for the slow pull, which brings the replies: every
    node is handed over once, as itself, with its reply."""
    from flwr.app import Message

    from fedlora.aggregation.streaming import StreamingGrid

    link = _Link(arrive={"m0": 0.0, "m1": 0.0, "m2": 0.0}, download={"m0": 0.1, "m1": 1.2, "m2": 0.1})
    sent = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in (10, 11, 12)]
    grid = StreamingGrid(link, stall_seconds=0.5, split=link if split else None)
    replies = list(grid.send_and_receive(sent, timeout=10.0))
    assert sorted(r.metadata.src_node_id for r in replies) == [10, 11, 12]
    assert not any(r.has_error() for r in replies), [r.error.reason for r in replies if r.has_error()]
    # Whole, asked again once the joint pull stalled ("not found"); split, a taken id is never asked again.
    assert sum("m0" in c for c in link.calls) >= 2 if not split else len(link.calls) == 1, link.calls


@pytest.mark.parametrize("split", [False, True], ids=["whole", "split"])
def test_a_verdict_on_a_node_a_stalled_pull_also_asked_is_its_answer_once_that_pull_returns(task_identity, split):
    """m0's reply downloads slowly, so the pull of m0 and m1 stalls; m1's node dies meanwhile. The
    SuperLink's verdict on m1, got by a pull asked again, waits for the stalled pull (which might
    have held m1's reply) and is m1's answer when it returns without one: both nodes handed over
    once, m0 with its reply, m1 as itself with the verdict."""
    from flwr.app import Message

    from fedlora.aggregation.streaming import StreamingGrid

    link = _Link(arrive={"m0": 0.0, "m1": float("inf")}, download={"m0": 1.5, "m1": 0.0}, dead={"m1": 0.6})
    sent = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in (10, 11)]
    grid = StreamingGrid(link, stall_seconds=0.5, split=link if split else None)
    replies = {r.metadata.src_node_id: r for r in grid.send_and_receive(sent, timeout=10.0)}
    assert sorted(replies) == [10, 11]
    assert not replies[10].has_error() and "Node Unavailable" in replies[11].error.reason


@pytest.mark.parametrize("split", [False, True], ids=["whole", "split"])
def test_a_reply_stuck_in_its_upload_holds_back_no_reply_that_arrives_after_it(task_identity, split):
    """A node killed while it uploads its reply: Flower's pull that took it waits on objects that never
    complete. The ids asked with it are asked again in new pulls, so replies that arrive later are
    handed over as they come, each once, and the round ends at its timeout with only the stuck node
    missing (once Flower answers "not found" for it, it is not asked again)."""
    import time

    from flwr.app import Message

    from fedlora.aggregation.streaming import StreamingGrid

    inf = float("inf")
    link = _Link(arrive={"m0": 0.3, "m1": 0.3, "m2": 0.0}, download={"m0": 0.0, "m1": 0.0, "m2": inf})
    sent = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in (10, 11, 12)]
    t0 = time.monotonic()
    try:
        grid = StreamingGrid(link, stall_seconds=0.5, split=link if split else None)
        replies = list(grid.send_and_receive(sent, timeout=2.0))
        took = time.monotonic() - t0
    finally:
        link.release.set()
    assert sorted(r.metadata.src_node_id for r in replies) == [10, 11]  # each once; 12 missing
    assert not any(r.has_error() for r in replies)
    assert took < 3.0, took  # the timeout and one stall period, not the stuck pull's wait
    # Whole, once more after the stall ("not found"), then held; split, taken once and never asked again.
    assert sum("m2" in c for c in link.calls) == (1 if split else 2), link.calls


@pytest.mark.parametrize("split", [False, True], ids=["whole", "split"])
def test_a_stuck_upload_holds_back_no_reply_its_pull_took_when_the_pull_is_split(task_identity, split):
    """A node killed while it uploads, its reply taken by the same pull as two honest ones: Flower's
    own pull (whole) holds the honest replies with the stuck one past the round's timeout; split, as
    a deployment's pull is, each reply downloads on its own and only the stuck node is missing."""
    import time

    from flwr.app import Message

    from fedlora.aggregation.streaming import StreamingGrid

    inf = float("inf")
    link = _Link(arrive={"m0": 0.0, "m1": 0.0, "m2": 0.0}, download={"m0": 0.0, "m1": 0.2, "m2": inf})
    sent = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in (10, 11, 12)]
    grid = StreamingGrid(link, stall_seconds=0.5, split=link if split else None)
    t0 = time.monotonic()
    try:
        replies = list(grid.send_and_receive(sent, timeout=2.0))
        took = time.monotonic() - t0
    finally:
        link.release.set()
    got = sorted(r.metadata.src_node_id for r in replies)
    assert got == ([10, 11] if split else []), got
    assert not any(r.has_error() for r in replies)
    assert took < 3.0, took  # the timeout and one stall period, not the stuck download's wait
    assert link.calls[0] == ["m0", "m1", "m2"]  # the three were taken together


@pytest.mark.parametrize("split", [False, True], ids=["whole", "split"])
def test_an_enrolled_grid_hears_the_same_replies_in_a_split_pull_as_in_a_whole_one(task_identity, split):
    """A deployment's grid drops a reply from a node that is not enrolled (here: refused after the
    push); split, it drops it where each reply is downloaded, and the node is then answered as in a
    whole pull (its id asked again: Flower's "not found"), never awaited forever."""
    from flwr.app import Message

    from fedlora.aggregation.streaming import StreamingGrid
    from fedlora.deploy.control import EnrolledGrid

    class Nodes:
        refused: set[int] = set()

        def allows(self, node_id: int) -> bool:
            return node_id not in self.refused

    class SplitLink(_Link):
        keep = None

        def take(self, ids):
            heard = self.keep or (lambda reply: True)
            return [(i, lambda f=f: (lambda r: r if heard(r) else None)(f())) for i, f in super().take(ids)]

    link = SplitLink(arrive={"m0": 0.0, "m1": 0.0}, download={"m0": 0.0, "m1": 0.0})
    if split:
        SplitLink.split_pull = lambda self: self  # as Flower's HttpGrid is split by split_pull_of
    nodes = Nodes()
    grid = StreamingGrid(EnrolledGrid(link, nodes), stall_seconds=0.5)
    assert (grid._split is link) == split
    sent = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in (10, 12)]
    stream = grid.send_and_receive(sent, timeout=3.0)
    nodes.refused.add(12)
    replies = {r.metadata.src_node_id: r for r in stream}
    assert sorted(replies) == [10, 12] and not replies[10].has_error()
    assert "Message Unavailable" in replies[12].error.reason  # named as missing, not its reply


@pytest.mark.parametrize("split", [False, True], ids=["whole", "split"])
def test_streaming_grid_pulls_a_bounded_number_of_replies_whatever_the_backlog(task_identity, split):
    """100 replies of 1 MB have all arrived when the round starts pulling (Flower's grids hand over
    every arrived reply of the ids asked). With max_pull = 4 no pull asks for more than 4 ids, and
    the replies held at once (traced allocations) stay those of a few replies, where asking for
    every id at once holds the whole backlog; split, as a deployment's pulls are, the next pull
    waits for the downloads of the last one as the whole pull did."""
    import tracemalloc

    import numpy as np
    from flwr.app import ArrayRecord, Message, RecordDict

    from fedlora.aggregation.streaming import StreamingGrid

    class Backlog:  # a SuperLink holding 100 replies until they are pulled
        def __init__(self) -> None:
            self.asked: list[int] = []
            self.sent: dict[str, Message] = {}

        def push_messages(self, messages):
            for i, m in enumerate(messages):
                m.metadata.__dict__["_message_id"] = f"m{i}"
                self.sent[f"m{i}"] = m
            return list(self.sent)

        def take(self, ids):
            ids = list(ids)
            self.asked.append(len(ids))
            taken = [(i, self.sent.pop(i)) for i in ids if i in self.sent]
            return [(i, lambda m=m: self.reply(m)) for i, m in taken]  # the reply is made as it downloads

        def reply(self, original: Message) -> Message:
            return Message(RecordDict({"arrays": ArrayRecord([np.full(250_000, 1, np.float32)])}), reply_to=original)

        def pull_messages(self, ids):
            return [fetch() for _, fetch in self.take(ids)]

    def peak_mb(max_pull: int) -> tuple[float, Backlog]:
        grid = Backlog()
        messages = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in range(100)]
        tracemalloc.start()
        seen = 0
        stream = StreamingGrid(grid, max_pull=max_pull, split=grid if split else None)
        for reply in stream.send_and_receive(messages, timeout=30):
            seen += 1  # the fold takes the reply and drops it
            del reply
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        assert seen == 100
        return peak, grid

    bounded, grid = peak_mb(4)
    assert max(grid.asked) == 4 and sum(grid.asked) == 100, grid.asked
    unbounded, _ = peak_mb(1_000_000)
    single, _ = peak_mb(1)
    assert unbounded > 50 * 0.95, unbounded  # the whole backlog at once (1 MB a reply)
    assert bounded < single + 4 * 1.1, (bounded, single)
    print(
        f"peak MiB of replies held: one at a time {single:.1f}, max_pull 4 {bounded:.1f}, all at once {unbounded:.1f}"
    )


def test_replies_per_pull_fits_the_budget():
    from fedlora.aggregation.streaming import replies_per_pull
    from fedlora.config import FedLoraConfig
    from fedlora.factors import LoraFactors

    cfg = FedLoraConfig()
    t = LoraFactors.from_tensors({"m/A": torch.zeros(16, 4096), "m/B": torch.zeros(4096, 16)}, {"m": 32.0})
    one_mb = t.numel() * 4 / 2**20  # 0.5 MiB in float32
    cfg.federation.pull_budget_mb = 128.0
    assert replies_per_pull(cfg, t) == int(128 // one_mb) == 256
    cfg.federation.wire_dtype = "bfloat16"
    assert replies_per_pull(cfg, t) == 512
    cfg.federation.pull_budget_mb = 0.1  # smaller than one reply: still one at a time
    assert replies_per_pull(cfg, t) == 1


def test_pruned_client_sends_its_real_update_not_an_inflated_one(tmp_path, shared_data, task_identity):
    from fedlora.clients.app import app
    from fedlora.clients.session import ClientSession
    from fedlora.factors import LoraFactors, ModuleFactors, load_factors
    from fedlora.lora_math import to_effective

    cfg = make_config(
        tmp_path,
        federation={"strategy": "hetlora"},
        lora={"rank": 8, "alpha": 16},
        hetero={"hetlora_prune": True, "hetlora_prune_ratio": 0.02, "client_ranks": [8, 8, 8]},
        simulation={"state_dir": str(tmp_path / "state")},
    )
    ctx = Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    app(
        Message(
            RecordDict({"config": ConfigRecord({"action": "setup", "run-config": cfg.to_json()})}),
            dst_node_id=7,
            message_type="query",
        ),
        ctx,
    )
    session = ClientSession.from_context(ctx, cfg.digest())
    model = session.model()
    g = torch.Generator().manual_seed(0)
    trained = LoraFactors()
    from fedlora.factors import extract_factors

    before = extract_factors(model)
    for name, m in before.modules.items():
        B = torch.randn(m.B.shape, generator=g)
        B[:, 6:] *= 1e-3  # the last two components carry almost nothing: they are pruned
        trained.modules[name] = ModuleFactors(A=torch.randn(m.A.shape, generator=g), B=B, alpha=m.alpha)
    load_factors(model, trained)
    sent = session.finish_training(model)
    assert {m.rank for m in sent.modules.values()} == {8}  # what the client trained; then, as the ClientApp does:
    client = session.client_round(model, ArrayRecord(), LoraFactors(), 1, {})
    for ext in session.extensions:
        sent = ext.reply_factors(client, sent)
    assert {m.rank for m in sent.modules.values()} == {6}
    for name, m in trained.modules.items():
        real = m.scaling * (m.B[:, :6].double() @ m.A[:6].double())
        got = to_effective(sent).modules[name]
        assert torch.allclose(got.B.double() @ got.A.double(), real, rtol=1e-5, atol=1e-6)
    assert session.store.load(session.profile.client_id, "rank") == 6


def test_server_takes_a_pruned_reply_at_its_real_scale():
    from test_strategy_maths import _reply, _template

    from fedlora.lora_math import prune_to_rank, to_effective
    from fedlora.protocol import NodeProfile

    cfg = FedLoraConfig.load(
        None, ["federation.strategy=hetlora", "lora.rank=8", "lora.alpha=16", "hetero.hetlora_prune=true"]
    )
    from fedlora.strategies import HetLoRA

    tmpl = _template(8)
    s = HetLoRA(cfg, tmpl)
    prof = NodeProfile(1, "c", 0, 8, 16.0, 100, 10)
    g = torch.Generator().manual_seed(1)
    f = tmpl.clone()
    for m in f.modules.values():
        m.B = torch.randn(m.B.shape, generator=g)
        m.alpha = 16.0
    pruned = prune_to_rank(f, 6, cfg.lora.alpha_for_rank(6))
    u = s.validate_reply(prof, _reply(s, pruned, 10, 6))
    assert prof.rank == 6
    for name, m in f.modules.items():
        eff = to_effective(u.factors).modules[name]
        want = m.scaling * (m.B[:, :6].double() @ m.A[:6].double())
        assert torch.allclose(eff.B.double() @ eff.A.double(), want, rtol=1e-5, atol=1e-5)
