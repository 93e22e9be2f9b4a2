"""The base of every fedlora strategy: Flower's ``FedAvg`` round loop, LoRA-aware messages.

What it adds to ``FedAvg``:

* **setup**: the first time a node is sampled it is sent the run config (a ``query`` message) and
  answers with its :class:`~fedlora.protocol.NodeProfile` (identity, rank, data sizes);
* **per-node payloads**: each node receives the global adapter in its own form (its rank, its
  scaling) and only the parts the strategy's :class:`~fedlora.sharing.SharingPolicy` shares;
* **reply validation** (:mod:`fedlora.validation`): every reply and profile is checked completely
  (exact tensor set, shapes and dtype for that client and round; every scalar's type and range)
  before any arithmetic; a bad one is dropped with a logged reason naming the client, and the
  round aggregates the rest (Flower's own consistency check would end the run instead); a node
  that never replies is named too; an aggregation that fails or is not finite leaves the global
  adapter at its last good value;
* **bounded influence** (:mod:`fedlora.robust`): optional norm bound, robust average, share cap,
  and a minimum number of accepted replies per round;
* **accounting**: the bytes of every message, as Flower's protobuf framing serialises it.

Subclasses declare ``sharing_policy`` and implement :meth:`aggregate` (and, when their download
differs from "the global adapter at your rank", :meth:`client_payload`). The global adapter is
kept in effective form (see :mod:`fedlora.lora_math`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedlora import codec
from fedlora.config import FedLoraConfig
from fedlora.factors import LoraFactors, extra_part
from fedlora.lora_math import fit_rank, keep_uncovered, to_client, weighted_mean
from fedlora.protocol import ARRAYS, BASE_PREFIX, CONFIG, METRICS, PROFILE, SETUP, NodeProfile
from fedlora.robust import cap_shares, clip_update, coordinate_median, trimmed_mean
from fedlora.sharing import PARTS, SharingPolicy
from fedlora.validation import (RejectedReply, check_arrays, check_eval_metrics, check_finite, check_profile_fields,
                                check_train_metrics, expected_arrays, short_reason)

log = logging.getLogger("fedlora.server")


@dataclass
class Update:
    """One accepted client update, in the client's own form."""

    profile: NodeProfile
    factors: LoraFactors
    weight: float  # aggregation weight (example count, capped by robust.max_client_share)
    metrics: dict
    num_examples: int = 0


@dataclass
class RoundLog:
    """What the strategy saw in one round (read by the server to write metrics.jsonl)."""

    server_round: int = 0
    sampled: int = 0
    accepted: int = 0
    rejected: list[str] = field(default_factory=list)
    rejected_evaluate: list[str] = field(default_factory=list)
    flagged: list[str] = field(default_factory=list)
    clipped: list[str] = field(default_factory=list)
    skipped: str = ""
    aggregation_error: str = ""
    bytes_down: list[int] = field(default_factory=list)
    bytes_up: list[int] = field(default_factory=list)
    payload_down: list[int] = field(default_factory=list)
    payload_up: list[int] = field(default_factory=list)
    aggregate_seconds: float = 0.0
    dylora_rank: int | None = None
    privacy: dict = field(default_factory=dict)
    train_metrics: dict = field(default_factory=dict)
    eval_metrics: dict = field(default_factory=dict)
    eval_clients: list[dict] = field(default_factory=list)
    sent: dict[str, list[int]] = field(default_factory=dict)  # message type -> nodes messaged


class LoraStrategy(FedAvg):
    sharing_policy: ClassVar[SharingPolicy]
    strategy_name: ClassVar[str] = "base"

    def __init__(self, cfg: FedLoraConfig, template: LoraFactors, *, arrayrecord_key: str = ARRAYS,
                 configrecord_key: str = CONFIG, metricrecord_key: str = METRICS) -> None:
        f = cfg.federation
        super().__init__(
            fraction_train=f.fraction_train, fraction_evaluate=f.fraction_evaluate,
            min_train_nodes=min(f.min_train_clients, f.num_clients),
            min_evaluate_nodes=min(f.min_evaluate_clients, f.num_clients) if f.fraction_evaluate > 0 else 0,
            min_available_nodes=f.min_available_clients or f.min_train_clients, arrayrecord_key=arrayrecord_key,
            configrecord_key=configrecord_key,
        )
        self.cfg = cfg
        self.metricrecord_key = metricrecord_key
        self.template = template  # client-form shapes at the reference rank, heads included
        self.module_names = list(template.modules)  # the codec turns it into compact wire keys
        self.max_rank = template.modules[next(iter(template.modules))].rank if template.modules else cfg.lora.rank
        self.profiles: dict[int, NodeProfile] = {}
        self.refused: dict[int, str] = {}  # node id -> why its setup was refused (it is never sampled again)
        self._outliers: set[int] = set()  # nodes already flagged for an outsized declared data size
        self.global_eff: LoraFactors = LoraFactors()
        self.rounds: dict[int, RoundLog] = {}
        self._digest = cfg.digest()
        self.label_names: list[str] | None = None  # the run's label space, sent with the setup
        self.round_offset = 0  # rounds completed before this process resumed the run (Flower counts from 1)
        self._set_up: set[int] = set()  # nodes that received this run's setup from this process
        self.past_tasks: list[LoraFactors] = []  # continual: finished tasks' frozen factors (effective form)
        self._past_held: dict[int, int] = {}  # continual: how many of them each node reported holding
        self.dp = None
        if cfg.privacy.client_dp:
            from fedlora.privacy.client_level import ClientLevelDP

            self.dp = ClientLevelDP(cfg)

    # ------------------------------------------------------------------ subclass API
    def aggregate(self, server_round: int, updates: list[Update]) -> None:
        """Fold accepted updates into ``self.global_eff``."""
        raise NotImplementedError

    def initial_global(self, init_eff: LoraFactors) -> LoraFactors:
        """The global adapter before round 1, from the seed-built initial adapter (effective form)."""
        return init_eff.select(self.sharing_policy.shared)

    def client_payload(self, profile: NodeProfile, server_round: int) -> tuple[LoraFactors, LoraFactors | None]:
        """(adapter parts in the client's form, optional base delta to merge) for one node."""
        return to_client(self.global_eff, profile.rank, profile.alpha).select(self.sharing_policy.shared), None

    def start_factors(self, profile: NodeProfile, server_round: int) -> LoraFactors:
        """The shared parts as the client held them when it started training this round (client form):
        what an update is measured from (``robust.update_norm_bound``)."""
        return self.client_payload(profile, server_round)[0]

    def average(self, updates_eff: list[LoraFactors], weights: list[float]) -> LoraFactors:
        """The same-shape average of the single-rank strategies: weighted mean, or a robust statistic."""
        r = self.cfg.robust
        if r.aggregation == "median":
            return coordinate_median(updates_eff)
        if r.aggregation == "trimmed-mean":
            return trimmed_mean(updates_eff, r.trim_fraction)
        return weighted_mean(updates_eff, weights)

    @property
    def has_global_model(self) -> bool:
        """Whether the server holds a complete model (FedSA keeps B on the clients: it does not)."""
        return not ({"A", "B"} & self.sharing_policy.private)

    def global_rank(self) -> int:
        m = next(iter(self.global_eff.modules.values()), None)
        return 0 if m is None else m.rank

    def who(self, node: int) -> str:
        prof = self.profiles.get(node)
        return f"client {prof.client_id} (node {node})" if prof else f"node {node}"

    # ------------------------------------------------------------------ state (checkpoint / resume)
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, JSON-able state): the global adapter, the node profiles and refusals, and the
        privacy layer's state (clip, accountant). Everything a resumed server needs of the strategy."""
        from fedlora.continual.federation import past_tensors

        tensors = dict(self.global_eff.tensors())
        tensors.update(past_tensors(self))
        state = {
            "strategy": self.strategy_name,
            "config-digest": self._digest,
            "alpha": {n: m.alpha for n, m in self.global_eff.modules.items()},
            "profiles": [p.to_record() for p in self.profiles.values()],
            "refused": {str(k): v for k, v in self.refused.items()},
            "last-round": max(self.rounds, default=0),
            "privacy": self.dp.state_dict() if self.dp is not None else None,
            "past-tasks": len(self.past_tasks),
        }
        return tensors, state

    def load_state_dict(self, tensors: dict[str, torch.Tensor], state: dict) -> None:
        if state["strategy"] != self.strategy_name:
            raise ValueError(f"checkpoint of strategy {state['strategy']!r} cannot resume {self.strategy_name!r}")
        from fedlora.continual.federation import load_past

        own = load_past(self, tensors, int(state.get("past-tasks", 0)))
        self.global_eff = LoraFactors.from_tensors(own, state["alpha"])
        self.profiles = {int(p["node_id"]): NodeProfile.from_record(p) for p in state["profiles"]}
        self.refused = {int(k): v for k, v in state["refused"].items()}
        if self.dp is not None and state.get("privacy"):
            self.dp.load_state_dict(state["privacy"])

    # ------------------------------------------------------------------ setup of nodes
    def ensure_profiles(self, grid: Grid, node_ids: list[int], rl: RoundLog) -> list[int]:
        """Send the run config to nodes seen for the first time; return the nodes ready to work.

        A profile is checked like any reply: a node whose profile is malformed, contradicts the
        run or claims another node's client id is left out of the run with a logged reason."""
        # A node this process has not set up: new, or known from a checkpoint (a resumed run is a new
        # Flower run, and a node's run state starts empty in it).
        new = [n for n in node_ids if n not in self._set_up and n not in self.refused]
        if new:
            record = {"action": SETUP, "run-config": self.cfg.to_json()}
            if self.label_names is not None:
                record["label-names"] = json.dumps(self.label_names)
            content = ConfigRecord(record)
            msgs = [Message(RecordDict({CONFIG: content}), dst_node_id=n, message_type=MessageType.QUERY) for n in new]
            replies = list(grid.send_and_receive(msgs, timeout=self.cfg.federation.round_timeout))
            for node in sorted(set(new) - {r.metadata.src_node_id for r in replies}):
                rl.rejected.append(f"node {node}: no setup reply within federation.round_timeout "
                                   f"({self.cfg.federation.round_timeout:g} s); asked again when next sampled")
            for reply in replies:
                node = reply.metadata.src_node_id
                try:
                    if reply.has_error():
                        raise RejectedReply(f"setup failed: {short_reason(reply.error.reason)}")
                    if PROFILE not in reply.content.config_records:
                        raise RejectedReply("setup reply carries no profile")
                    prof = self.accept_profile(node, dict(reply.content.config_records[PROFILE]), rl)
                except RejectedReply as exc:
                    self.refused[node] = str(exc)
                    rl.rejected.append(f"node {node}: left out of the run: {exc}")
                    log.warning("node %s is left out of the run: %s", node, exc)
                    continue
                self.profiles[node] = prof
                self._set_up.add(node)
            self._flag_outliers(rl)
        return [n for n in node_ids if n in self.profiles]

    def accept_profile(self, node: int, record: dict, rl: RoundLog) -> NodeProfile:
        """A profile the run can use, or :class:`RejectedReply`. Alpha is the run's, never the client's."""
        f = check_profile_fields(record, max_rank=10**6)
        rank, cid = f["rank"], f["client_id"]
        if self.sharing_policy.heterogeneous_ranks:
            if rank > self.max_rank:
                raise RejectedReply(f"client {cid}: rank {rank} is above the largest rank the run's global "
                                    f"adapter holds ({self.max_rank})")
        elif rank != self.max_rank:
            raise RejectedReply(f"client {cid}: rank {rank} contradicts the run: {self.strategy_name} trains every "
                                f"client at rank {self.max_rank}")
        holder = next((p.node_id for p in self.profiles.values() if p.client_id == cid and p.node_id != node), None)
        if holder is not None and holder in self._set_up:
            raise RejectedReply(f"client id {cid!r} is already held by node {holder}")
        if holder is not None:  # a profile from a checkpoint: the client came back as a new node
            del self.profiles[holder]
        num_train = f["num_train"]
        cap = self.cfg.federation.max_declared_examples
        if num_train > cap:
            rl.flagged.append(f"client {cid} (node {node}): declared {num_train} training examples; capped at "
                              f"federation.max_declared_examples ({cap})")
            num_train = cap
        alpha = self.cfg.lora.alpha_for_rank(rank)
        declared_alpha = record.get("alpha")
        if declared_alpha is not None and declared_alpha != alpha:
            rl.flagged.append(f"client {cid} (node {node}): declared alpha {declared_alpha!r} ignored; the run "
                              f"config sets {alpha:g} for rank {rank}")
        return NodeProfile(node_id=node, client_id=cid, partition_id=f["partition_id"], rank=rank, alpha=alpha,
                           num_train=num_train, num_test=f["num_test"], device_class=f["device_class"])

    def _flag_outliers(self, rl: RoundLog) -> None:
        sizes = sorted(p.num_train for p in self.profiles.values())
        if len(sizes) < 3:
            return
        median = sizes[len(sizes) // 2]
        factor = self.cfg.federation.outlier_factor
        for p in self.profiles.values():
            if p.num_train > factor * median and p.node_id not in self._outliers:
                rl.flagged.append(f"client {p.client_id} (node {p.node_id}): declares {p.num_train} training "
                                  f"examples, over {factor:g}x the federation's median ({median})")
                self._outliers.add(p.node_id)

    def wait_for_nodes(self, grid: Grid) -> list[int]:
        """The connected nodes not refused, once at least ``min_available_nodes`` are connected; says
        what it waits for while it waits, and stops the run after ``federation.wait_timeout`` seconds."""
        need, limit = self.min_available_nodes, self.cfg.federation.wait_timeout
        t0 = time.monotonic()
        next_note = 0.0
        while True:
            # Connected nodes count towards the minimum even when refused (as in Flower's sampling): a
            # refused node must not make the run wait for a replacement that may never come.
            connected = sorted(grid.get_node_ids())
            nodes = [n for n in connected if n not in self.refused]
            waited = time.monotonic() - t0
            if len(connected) >= need:
                if waited > 1:
                    log.info("%d clients connected after %.0f s; starting", len(connected), waited)
                return nodes
            if waited >= limit:
                raise TimeoutError(f"{len(connected)} of the {need} clients the run needs "
                                   f"(federation.min_available_clients) connected within federation.wait_timeout "
                                   f"({limit:g} s)")
            if waited >= next_note:
                log.warning("waiting for clients: %d of %d connected (federation.min_available_clients); "
                            "%.0f s of federation.wait_timeout (%g s) left", len(connected), need, limit - waited, limit)
                next_note += 15.0
            time.sleep(1.0)

    def _sample(self, grid: Grid, fraction: float, minimum: int, server_round: int, purpose: str) -> list[int]:
        """Nodes for one round: drawn with a generator seeded by (run seed, round, purpose) from the
        sorted connected nodes, so a resumed run samples as the uninterrupted one would."""
        import random

        nodes = self.wait_for_nodes(grid)
        k = min(len(nodes), max(int(len(nodes) * fraction), minimum))
        rng = random.Random(f"{self.cfg.run.seed}/{server_round}/{purpose}")
        return sorted(rng.sample(nodes, k))

    # ------------------------------------------------------------------ train
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        server_round += self.round_offset
        rl = self.rounds.setdefault(server_round, RoundLog(server_round=server_round))
        if self.cfg.continual.enabled:
            from fedlora.continual.federation import switch_task

            switch_task(self, server_round)
        node_ids = self.ensure_profiles(
            grid, self._sample(grid, self.fraction_train, self.min_train_nodes, server_round, "train"), rl)
        rl.sampled = len(node_ids)
        rl.sent[MessageType.TRAIN] = list(node_ids)
        extra = {}
        if self.cfg.dylora.enabled:
            from fedlora.dylora import round_rank

            rl.dylora_rank = round_rank(self.cfg.run.seed, server_round, self.cfg.dylora.min_rank, self.max_rank)
            extra["dylora-rank"] = rl.dylora_rank
        return self._messages(node_ids, server_round, config, MessageType.TRAIN, rl, extra=extra)

    def _messages(self, node_ids: list[int], server_round: int, config: ConfigRecord, mtype: str,
                  rl: RoundLog | None, extra: dict) -> list[Message]:
        cfg = ConfigRecord({**dict(config), "server-round": server_round, "config-digest": self._digest, **extra})
        cache: dict[tuple, ArrayRecord] = {}
        messages = []
        for node in node_ids:
            prof = self.profiles[node]
            need_past = self._past_held.get(node, 0) < len(self.past_tasks)
            key = (prof.rank, prof.alpha, need_past)
            if key not in cache:
                adapter, base = self.client_payload(prof, server_round)
                rec = codec.encode(adapter, self.cfg.federation.wire_dtype, modules=self.module_names)
                if need_past:
                    from fedlora.continual.federation import add_past_tasks

                    add_past_tasks(self, rec, need_past)
                if base is not None:
                    for k, v in codec.encode(base, self.cfg.federation.wire_dtype, prefix=BASE_PREFIX,
                                             modules=self.module_names).items():
                        rec[k] = v
                cache[key] = rec
            msg = Message(RecordDict({self.arrayrecord_key: cache[key], self.configrecord_key: cfg}),
                          dst_node_id=node, message_type=mtype)
            if rl is not None and mtype == MessageType.TRAIN:
                rl.bytes_down.append(codec.message_bytes(msg))
                rl.payload_down.append(codec.wire_bytes(cache[key]))
            messages.append(msg)
        return messages

    def _note_past_held(self, node: int, metrics: dict) -> None:
        """Continual: the finished tasks a node says it holds (bounded: a lie only costs it bytes)."""
        from fedlora.continual.federation import PAST_KEY

        if PAST_KEY in metrics:
            held = metrics[PAST_KEY]
            ok = isinstance(held, (int, float)) and float(held).is_integer()
            self._past_held[node] = min(max(int(held), 0), len(self.past_tasks)) if ok else 0

    def _missing_replies(self, rl: RoundLog, mtype: str, replies: list[Message], into: list[str]) -> None:
        """Nodes messaged this round that never answered: named, with the timeout they missed."""
        answered = {r.metadata.src_node_id for r in replies}
        for node in rl.sent.get(mtype, []):
            if node not in answered:
                into.append(f"{self.who(node)}: no reply within federation.round_timeout "
                            f"({self.cfg.federation.round_timeout:g} s)")
                log.warning("round %d: %s", rl.server_round, into[-1])

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        rl = self.rounds.setdefault(server_round, RoundLog(server_round=server_round))
        replies = list(replies)
        self._missing_replies(rl, MessageType.TRAIN, replies, rl.rejected)
        updates: list[Update] = []
        for reply in replies:
            node = reply.metadata.src_node_id
            prof = self.profiles.get(node)
            who = self.who(node)
            try:
                if reply.has_error():
                    raise RejectedReply(f"failed: {short_reason(reply.error.reason)}")
                if prof is None or node not in rl.sent.get(MessageType.TRAIN, [node]):
                    raise RejectedReply("reply from a node that was not asked to train this round")
                rl.bytes_up.append(codec.message_bytes(reply))
                u = self.validate_reply(prof, reply.content, server_round, rl)
                updates.append(u)
                self._note_past_held(node, u.metrics)
                rl.payload_up.append(codec.wire_bytes(reply.content[self.arrayrecord_key]))
            except RejectedReply as exc:
                rl.rejected.append(f"{who}: {exc}")
                log.warning("round %d: rejected reply from %s: %s", server_round, who, exc)
        updates.sort(key=lambda u: u.profile.client_id)  # replies arrive in any order; sums must not depend on it
        rl.accepted = len(updates)
        need = self.cfg.federation.min_accepted
        if len(updates) < need:
            rl.skipped = (f"{len(updates)} of {rl.sampled} replies accepted, fewer than federation.min_accepted "
                          f"({need}): the round is skipped and the global adapter is unchanged")
            log.warning("round %d: %s", server_round, rl.skipped)
            return None, None
        shares = cap_shares([u.weight for u in updates], self.cfg.robust.max_client_share)
        for u, share in zip(updates, shares):
            u.weight = share
        previous = self.global_eff
        t0 = time.perf_counter()
        try:
            if self.dp is not None:
                starts = [self.start_factors(u.profile, server_round) for u in updates]
                self.global_eff, rl.privacy = self.dp.release(
                    self.global_eff, starts, [u.factors for u in updates], rl.sampled, server_round,
                    rl.dylora_rank or self.global_rank())
            else:
                self.aggregate(server_round, updates)
                if rl.dylora_rank is not None:  # only the leading block was trained and sent
                    self.global_eff = keep_uncovered(fit_rank(self.global_eff, self.max_rank), previous,
                                                     rl.dylora_rank)
            for key, t in self.global_eff.tensors():
                if not bool(torch.isfinite(t).all()):
                    raise FloatingPointError(f"the aggregate's {key} is not finite")
        except Exception as exc:  # noqa: BLE001 - one round's failure must not end the run or lose the adapter
            self.global_eff = previous
            rl.aggregation_error = f"{type(exc).__name__}: {exc}; the global adapter stays at its last good value"
            log.error("round %d: aggregation failed: %s", server_round, rl.aggregation_error)
            return None, None
        rl.aggregate_seconds = time.perf_counter() - t0
        eps = [u.metrics["dp-sgd-epsilon"] for u in updates if "dp-sgd-epsilon" in u.metrics]
        if eps:
            rl.privacy["dp-sgd-epsilon-max"] = max(eps)
        metrics = _weighted_metrics([u.metrics for u in updates], [float(u.num_examples) for u in updates])
        rl.train_metrics = metrics
        return codec.encode(self.global_eff), MetricRecord(metrics)

    # ------------------------------------------------------------------ validation
    def validate_reply(self, prof: NodeProfile, content: RecordDict, server_round: int = 0,
                       rl: RoundLog | None = None) -> Update:
        """Check a train reply completely before any arithmetic; return it as an :class:`Update`.

        The reply must hold exactly the records ``arrays`` and ``metrics``; ``arrays`` exactly the
        tensors this client shares at its rank (names, shapes, wire dtype); every metric a finite
        number, ``num-examples`` an integer in 1..the client's declared size, ``rank`` its rank
        (or lower, for HetLoRA self-pruning when enabled). Then the decoded factors must be finite,
        and the update within ``robust.update_norm_bound`` (clipped or rejected above it)."""
        policy = self.sharing_policy
        records = set(content.array_records) | set(content.metric_records) | set(content.config_records)
        if self.arrayrecord_key not in content.array_records:
            raise RejectedReply(f"no '{self.arrayrecord_key}' record in the reply")
        if self.metricrecord_key not in content.metric_records:
            raise RejectedReply(f"no '{self.metricrecord_key}' record in the reply")
        extra_records = sorted(records - {self.arrayrecord_key, self.metricrecord_key})
        if extra_records:
            raise RejectedReply(f"unexpected record(s) {extra_records[:3]} in the reply")
        metrics = dict(content.metric_records[self.metricrecord_key])
        cap = self.cfg.federation.max_num_examples
        limit = min(cap, prof.num_train) if cap else prof.num_train
        n, reported = check_train_metrics(metrics, max_examples=limit, max_rank=prof.rank,
                                          weight_key=self.weighted_by_key)
        rank = prof.rank if reported is None else reported
        pruning = self.cfg.hetero.hetlora_prune and policy.heterogeneous_ranks
        block_rank = rl.dylora_rank if rl is not None else None
        if block_rank is not None:
            if rank != block_rank:
                raise RejectedReply(f"reports rank {rank}, but this round's DyLoRA rank is {block_rank}")
        elif rank != prof.rank and not pruning:
            raise RejectedReply(f"reports rank {rank}, but the client trains rank {prof.rank}")
        parts = set(policy.shared) & (self.template.parts() | {"A", "B"})  # a head or selector only if the model has one
        record = content.array_records[self.arrayrecord_key]
        sent = {extra_part(k[len("head/"):]) if k.startswith("head/") else k.rpartition("/")[2] for k in record.keys()}
        leaked = sent & set(PARTS) - set(policy.shared)
        if leaked:
            raise RejectedReply(f"carries {', '.join(sorted(leaked))}, which the {self.strategy_name} policy "
                                f"({policy.describe()}) never lets leave a client")
        if parts - sent:
            raise RejectedReply(f"lacks the shared part(s) {', '.join(sorted(parts - sent))}")
        check_arrays(record, expected_arrays(self.template, parts, rank, self.module_names),
                     self.cfg.federation.wire_dtype)
        alpha = self.cfg.lora.alpha_for_rank(rank)
        if block_rank is not None:  # a DyLoRA block keeps the full adapter's per-component scaling
            alpha = prof.alpha * block_rank / prof.rank
        try:
            factors = codec.decode(record, alpha=alpha, modules=self.module_names)
        except codec.CodecError as exc:  # checked above already; kept as a second line of defence
            raise RejectedReply(str(exc)) from None
        check_finite(factors)
        factors = self._bound(prof, factors, server_round, rl)
        if rank != prof.rank and block_rank is None:  # an accepted self-pruning: later payloads are truncated to the new rank
            prof.rank, prof.alpha = rank, alpha
        return Update(profile=prof, factors=factors, weight=float(n), metrics=metrics, num_examples=n)

    def _bound(self, prof: NodeProfile, factors: LoraFactors, server_round: int, rl: RoundLog | None) -> LoraFactors:
        bound = self.cfg.robust.update_norm_bound
        if bound <= 0:
            return factors
        start = self.start_factors(prof, server_round)
        clipped, norm = clip_update(start, factors, bound)
        if norm > bound:
            if self.cfg.robust.norm_action == "reject":
                raise RejectedReply(f"update norm {norm:.4g} is above robust.update_norm_bound ({bound:g})")
            if rl is not None:
                rl.clipped.append(f"client {prof.client_id}: update norm {norm:.4g} clipped to {bound:g}")
        return clipped

    # ------------------------------------------------------------------ evaluate
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        server_round += self.round_offset
        rl = self.rounds.setdefault(server_round, RoundLog(server_round=server_round))
        last = server_round >= self.cfg.run.rounds
        if self.fraction_evaluate == 0.0 or (server_round % self.cfg.federation.evaluate_every and not last):
            return []
        if last and self.sharing_policy.private:
            # Every client evaluates (and saves) its personalized adapter at the end.
            node_ids = [n for n in grid.get_node_ids() if n not in self.refused]
            extra = {"save-adapter": True, "global-view": not self.has_global_model}
        else:
            node_ids = self._sample(grid, self.fraction_evaluate, self.min_evaluate_nodes, server_round, "evaluate")
            extra = {}
        node_ids = self.ensure_profiles(grid, node_ids, rl)
        rl.sent[MessageType.EVALUATE] = list(node_ids)
        return self._messages(node_ids, server_round, config, MessageType.EVALUATE, None, extra)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        server_round += self.round_offset
        rl = self.rounds.setdefault(server_round, RoundLog(server_round=server_round))
        replies = list(replies)
        self._missing_replies(rl, MessageType.EVALUATE, replies, rl.rejected_evaluate)
        clients = []
        for reply in replies:
            node = reply.metadata.src_node_id
            prof = self.profiles.get(node)
            try:
                if reply.has_error():
                    raise RejectedReply(f"failed: {short_reason(reply.error.reason)}")
                if prof is None or self.metricrecord_key not in reply.content.metric_records:
                    raise RejectedReply("no metrics" if prof else "reply from a node that was never set up")
                m = check_eval_metrics(dict(reply.content.metric_records[self.metricrecord_key]),
                                       max_examples=prof.num_test, weight_key=self.weighted_by_key,
                                       scored=self.cfg.model.task != "causal-lm" or self.cfg.data.prompt_format == "label")
                self._note_past_held(node, m)
            except RejectedReply as exc:
                rl.rejected_evaluate.append(f"{self.who(node)}: {exc}")
                log.warning("round %d: evaluation from %s dropped: %s", server_round, self.who(node), exc)
                continue
            m["client-id"] = prof.client_id
            clients.append(m)
        if not clients:
            return None
        clients.sort(key=lambda m: m["client-id"])
        rl.eval_clients = clients
        ns = [float(m[self.weighted_by_key]) for m in clients]
        loss = sum(float(m["loss"]) * n for m, n in zip(clients, ns)) / max(sum(ns), 1.0)
        out = {"personal-loss": loss, "num-clients": len(clients)}
        if all("accuracy" in m for m in clients):
            accs = [float(m["accuracy"]) for m in clients]
            out.update({
                "personal-accuracy-mean": sum(accs) / len(accs),
                "personal-accuracy-worst": min(accs),
                "personal-accuracy-weighted": sum(a * n for a, n in zip(accs, ns)) / max(sum(ns), 1.0),
            })
        if self.cfg.model.task == "causal-lm" and loss < 700:
            out["personal-perplexity"] = math.exp(loss)  # of the example-weighted mean loss per response token
        vals = [float(m["val-accuracy"]) for m in clients if "val-accuracy" in m]
        if vals:
            out["personal-val-accuracy-mean"] = sum(vals) / len(vals)
        glob = [float(m["global-accuracy"]) for m in clients if "global-accuracy" in m]
        if glob:
            out["personal-global-accuracy-mean"] = sum(glob) / len(glob)
        rl.eval_metrics = out
        return MetricRecord(out)

    def summary(self) -> None:
        log.info("fedlora strategy %s: %s", self.strategy_name, self.sharing_policy.describe())
        super().summary()


def _weighted_metrics(metrics: list[dict], weights: list[float]) -> dict:
    total = sum(weights)
    keys = {k for m in metrics for k, v in m.items() if isinstance(v, (int, float))}
    keys.discard("partition-id")
    out = {}
    for k in sorted(keys):
        vals = [(float(m[k]), w) for m, w in zip(metrics, weights) if k in m]
        if k.startswith("bytes") or k.endswith("seconds") or k == "rank":
            out[k] = sum(v for v, _ in vals) / len(vals)  # per-client means, unweighted
        else:
            out[k] = sum(v * w for v, w in vals) / max(total, 1e-12)
    out["num-examples"] = int(total)
    return out
