"""The base of every fedlora strategy: Flower's ``FedAvg`` round loop, LoRA-aware messages.

What it adds to ``FedAvg``:

* **setup**: the first time a node is sampled it is sent the run config (a ``query`` message) and
  answers with its :class:`~fedlora.protocol.NodeProfile` (identity, rank, data sizes);
* **per-node payloads**: each node receives the global adapter in its own form (its rank, its
  scaling) and only the parts the strategy's :class:`~fedlora.sharing.SharingPolicy` shares;
* **reply validation**: a reply with an error, wrong keys, a private part, a wrong rank or shape,
  NaN/Inf, or an implausible ``num-examples`` is dropped with a logged reason naming the client,
  and the round aggregates the rest (Flower's own consistency check would end the run instead);
* **accounting**: the bytes of every message, as Flower's protobuf framing serialises it.

Subclasses declare ``sharing_policy`` and implement :meth:`aggregate` (and, when their download
differs from "the global adapter at your rank", :meth:`client_payload`). The global adapter is
kept in effective form (see :mod:`fedlora.lora_math`).
"""

from __future__ import annotations

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
from fedlora.config import ConfigError, FedLoraConfig
from fedlora.factors import LoraFactors
from fedlora.lora_math import to_client
from fedlora.protocol import ARRAYS, BASE_PREFIX, CONFIG, METRICS, PROFILE, SETUP, NodeProfile
from fedlora.sharing import SharingPolicy

log = logging.getLogger("fedlora.server")


class RejectedReply(ValueError):
    """A client's reply that cannot be aggregated; the message says why."""


@dataclass
class Update:
    """One accepted client update, in the client's own form."""

    profile: NodeProfile
    factors: LoraFactors
    weight: float
    metrics: dict


@dataclass
class RoundLog:
    """What the strategy saw in one round (read by the server to write metrics.jsonl)."""

    server_round: int = 0
    sampled: int = 0
    accepted: int = 0
    rejected: list[str] = field(default_factory=list)
    bytes_down: list[int] = field(default_factory=list)
    bytes_up: list[int] = field(default_factory=list)
    payload_down: list[int] = field(default_factory=list)
    payload_up: list[int] = field(default_factory=list)
    aggregate_seconds: float = 0.0
    train_metrics: dict = field(default_factory=dict)
    eval_metrics: dict = field(default_factory=dict)
    eval_clients: list[dict] = field(default_factory=list)


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
            min_available_nodes=f.num_clients, arrayrecord_key=arrayrecord_key, configrecord_key=configrecord_key,
        )
        self.cfg = cfg
        self.metricrecord_key = metricrecord_key
        self.template = template  # client-form shapes at the reference rank, heads included
        self.module_names = list(template.modules)  # the codec turns it into compact wire keys
        self.profiles: dict[int, NodeProfile] = {}
        self.global_eff: LoraFactors = LoraFactors()
        self.rounds: dict[int, RoundLog] = {}
        self._digest = cfg.digest()

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

    @property
    def has_global_model(self) -> bool:
        """Whether the server holds a complete model (FedSA keeps B on the clients: it does not)."""
        return not ({"A", "B"} & self.sharing_policy.private)

    def check_profiles(self, profiles: list[NodeProfile]) -> None:
        """Refuse, before training, a federation this strategy cannot aggregate."""
        ranks = sorted({p.rank for p in profiles})
        if not self.sharing_policy.heterogeneous_ranks and len(ranks) > 1:
            raise ConfigError(
                f"strategy {self.strategy_name!r} averages factors of one rank, but clients have ranks {ranks}; "
                "use hetlora, flora or flexlora for mixed ranks")

    def global_rank(self) -> int:
        m = next(iter(self.global_eff.modules.values()), None)
        return 0 if m is None else m.rank

    # ------------------------------------------------------------------ setup of nodes
    def ensure_profiles(self, grid: Grid, node_ids: list[int]) -> list[int]:
        """Send the run config to nodes seen for the first time; return the nodes ready to work."""
        new = [n for n in node_ids if n not in self.profiles]
        if new:
            content = ConfigRecord({"action": SETUP, "run-config": self.cfg.to_json()})
            msgs = [Message(RecordDict({CONFIG: content}), dst_node_id=n, message_type=MessageType.QUERY) for n in new]
            fresh = []
            for reply in grid.send_and_receive(msgs, timeout=self.cfg.federation.round_timeout):
                node = reply.metadata.src_node_id
                if reply.has_error():
                    log.warning("node %s failed setup and is left out: %s", node, reply.error.reason)
                    continue
                try:
                    prof = NodeProfile.from_record(dict(reply.content[PROFILE]))
                except (KeyError, TypeError, ValueError) as exc:
                    log.warning("node %s sent a malformed profile and is left out: %s", node, exc)
                    continue
                prof.node_id = node
                fresh.append(prof)
            self.check_profiles(list(self.profiles.values()) + fresh)
            for p in fresh:
                self.profiles[p.node_id] = p
        return [n for n in node_ids if n in self.profiles]

    def _sample(self, grid: Grid, fraction: float, minimum: int) -> list[int]:
        from flwr.serverapp.strategy.strategy_utils import sample_nodes

        num = int(len(list(grid.get_node_ids())) * fraction)
        node_ids, _ = sample_nodes(grid, self.min_available_nodes, max(num, minimum))
        return node_ids

    # ------------------------------------------------------------------ train
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        rl = self.rounds.setdefault(server_round, RoundLog(server_round=server_round))
        node_ids = self.ensure_profiles(grid, self._sample(grid, self.fraction_train, self.min_train_nodes))
        rl.sampled = len(node_ids)
        return self._messages(node_ids, server_round, config, MessageType.TRAIN, rl, extra={})

    def _messages(self, node_ids: list[int], server_round: int, config: ConfigRecord, mtype: str,
                  rl: RoundLog | None, extra: dict) -> list[Message]:
        cfg = ConfigRecord({**dict(config), "server-round": server_round, "config-digest": self._digest, **extra})
        cache: dict[tuple, ArrayRecord] = {}
        messages = []
        for node in node_ids:
            prof = self.profiles[node]
            key = (prof.rank, prof.alpha)
            if key not in cache:
                adapter, base = self.client_payload(prof, server_round)
                rec = codec.encode(adapter, self.cfg.federation.wire_dtype, modules=self.module_names)
                if base is not None:
                    for k, v in codec.encode(base, self.cfg.federation.wire_dtype, prefix=BASE_PREFIX,
                                             modules=self.module_names).items():
                        rec[k] = v
                cache[key] = rec
            msg = Message(RecordDict({self.arrayrecord_key: cache[key], self.configrecord_key: cfg}),
                          dst_node_id=node, message_type=mtype)
            if rl is not None:
                rl.bytes_down.append(codec.message_bytes(msg))
                rl.payload_down.append(codec.wire_bytes(cache[key]))
            messages.append(msg)
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        rl = self.rounds.setdefault(server_round, RoundLog(server_round=server_round))
        updates: list[Update] = []
        for reply in replies:
            node = reply.metadata.src_node_id
            prof = self.profiles.get(node)
            who = f"client {prof.client_id} (node {node})" if prof else f"node {node}"
            try:
                if reply.has_error():
                    raise RejectedReply(f"error reply: {reply.error.reason}")
                if prof is None:
                    raise RejectedReply("reply from a node that was never set up")
                rl.bytes_up.append(codec.message_bytes(reply))
                updates.append(self.validate_reply(prof, reply.content))
                rl.payload_up.append(codec.wire_bytes(reply.content[self.arrayrecord_key]))
            except RejectedReply as exc:
                rl.rejected.append(f"{who}: {exc}")
                log.warning("round %d: rejected reply from %s: %s", server_round, who, exc)
        rl.accepted = len(updates)
        if not updates:
            log.warning("round %d: no valid update; the global adapter is unchanged", server_round)
            return None, None
        t0 = time.perf_counter()
        self.aggregate(server_round, updates)
        rl.aggregate_seconds = time.perf_counter() - t0
        metrics = _weighted_metrics([u.metrics for u in updates], [u.weight for u in updates])
        rl.train_metrics = metrics
        return codec.encode(self.global_eff), MetricRecord(metrics)

    # ------------------------------------------------------------------ validation
    def validate_reply(self, prof: NodeProfile, content: RecordDict) -> Update:
        policy = self.sharing_policy
        if self.arrayrecord_key not in content.array_records:
            raise RejectedReply(f"no '{self.arrayrecord_key}' record in the reply")
        if self.metricrecord_key not in content.metric_records:
            raise RejectedReply(f"no '{self.metricrecord_key}' record in the reply")
        metrics = dict(content.metric_records[self.metricrecord_key])
        n = metrics.get(self.weighted_by_key)
        limit = self.cfg.federation.max_num_examples or prof.num_train
        if not isinstance(n, (int, float)) or not math.isfinite(n) or n <= 0 or n > limit:
            raise RejectedReply(f"'{self.weighted_by_key}'={n!r} is not in 1..{limit} (the client declared "
                                f"{prof.num_train} training examples)")
        try:
            factors = codec.decode(content.array_records[self.arrayrecord_key], alpha=prof.alpha,
                                   modules=self.module_names)
        except codec.CodecError as exc:
            raise RejectedReply(str(exc)) from None
        parts = factors.parts()
        leaked = parts - policy.shared
        if leaked:
            raise RejectedReply(f"carries {', '.join(sorted(leaked))}, which the {self.strategy_name} policy "
                                f"({policy.describe()}) never lets leave a client")
        missing = policy.shared - parts - ({"head"} if not self.template.extras else set())
        if missing:
            raise RejectedReply(f"lacks the shared part(s) {', '.join(sorted(missing))}")
        if set(factors.modules) != set(self.template.modules):
            extra = sorted(set(factors.modules) - set(self.template.modules))[:3]
            absent = sorted(set(self.template.modules) - set(factors.modules))[:3]
            raise RejectedReply(f"modules differ from the run's adapter (unexpected {extra}, missing {absent})")
        reported = metrics.get("rank", prof.rank)
        rank = None
        for name, m in factors.modules.items():
            ref = self.template.modules[name]
            out_dim, in_dim = ref.B.shape[0], ref.A.shape[1]
            r = m.rank
            if m.A is not None and m.B is not None and m.A.shape[0] != m.B.shape[1]:
                raise RejectedReply(f"{name}: A has rank {m.A.shape[0]} but B has rank {m.B.shape[1]}")
            if m.A is not None and tuple(m.A.shape) != (r, in_dim):
                raise RejectedReply(f"{name}/A: shape {tuple(m.A.shape)}, expected ({r}, {in_dim})")
            if m.B is not None and tuple(m.B.shape) != (out_dim, r):
                raise RejectedReply(f"{name}/B: shape {tuple(m.B.shape)}, expected ({out_dim}, {r})")
            if rank is None:
                rank = r
            elif r != rank:
                raise RejectedReply(f"{name}: rank {r} differs from the other modules' rank {rank}")
        for name, t in factors.extras.items():
            ref_t = self.template.extras.get(name)
            if ref_t is None or tuple(ref_t.shape) != tuple(t.shape):
                raise RejectedReply(f"head/{name}: unexpected tensor or shape {tuple(t.shape)}")
        if rank is not None and int(reported) != rank:
            raise RejectedReply(f"reports rank {reported} but its factors have rank {rank}")
        pruning = self.cfg.hetero.hetlora_prune and self.sharing_policy.heterogeneous_ranks
        if rank is not None and rank != prof.rank:
            if not (pruning and rank < prof.rank):
                raise RejectedReply(f"factors of rank {rank}, but the client trains rank {prof.rank}")
            prof.rank, prof.alpha = rank, self.cfg.lora.alpha_for_rank(rank)
            for m in factors.modules.values():
                m.alpha = prof.alpha
        for key, t in factors.tensors():
            if not torch.isfinite(t).all():
                raise RejectedReply(f"{key} holds NaN or Inf")
        return Update(profile=prof, factors=factors, weight=float(n), metrics=metrics)

    # ------------------------------------------------------------------ evaluate
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        last = server_round >= self.cfg.run.rounds
        if self.fraction_evaluate == 0.0 or (server_round % self.cfg.federation.evaluate_every and not last):
            return []
        if last and self.sharing_policy.private:
            # Every client evaluates (and saves) its personalized adapter at the end.
            node_ids = list(grid.get_node_ids())
            extra = {"save-adapter": True, "global-view": not self.has_global_model}
        else:
            node_ids = self._sample(grid, self.fraction_evaluate, self.min_evaluate_nodes)
            extra = {}
        node_ids = self.ensure_profiles(grid, node_ids)
        return self._messages(node_ids, server_round, config, MessageType.EVALUATE, None, extra)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        rl = self.rounds.setdefault(server_round, RoundLog(server_round=server_round))
        clients = []
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error() or self.metricrecord_key not in reply.content.metric_records:
                log.warning("round %d: evaluation from node %s failed: %s", server_round, node,
                            reply.error.reason if reply.has_error() else "no metrics")
                continue
            m = dict(reply.content.metric_records[self.metricrecord_key])
            prof = self.profiles.get(node)
            m["client-id"] = prof.client_id if prof else str(node)
            clients.append(m)
        if not clients:
            return None
        clients.sort(key=lambda m: m["client-id"])
        rl.eval_clients = clients
        accs = [float(m["accuracy"]) for m in clients]
        ns = [float(m["num-examples"]) for m in clients]
        out = {
            "personal-accuracy-mean": sum(accs) / len(accs),
            "personal-accuracy-worst": min(accs),
            "personal-accuracy-weighted": sum(a * n for a, n in zip(accs, ns)) / max(sum(ns), 1.0),
            "personal-loss": sum(float(m["loss"]) * n for m, n in zip(clients, ns)) / max(sum(ns), 1.0),
            "num-clients": len(clients),
        }
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
