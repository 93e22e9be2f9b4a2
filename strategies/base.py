"""The base of every fedlora strategy: the round protocol on Flower's ``FedAvg``.

This file is the protocol: which nodes a round asks, what each receives, and how the replies of a
round become the new global adapter. The work on each reply is a pipeline of small stages, each
in its own file under :mod:`fedlora.aggregation`, run on every reply *as it arrives* (the server
wraps Flower's Grid in :class:`~fedlora.aggregation.streaming.StreamingGrid`) and then dropped:

    validate (replies.py) -> each extension's bound of one reply -> each extension's stage across
    the round's replies -> an extension's release (client-level DP's) or the round's fold (the
    strategy's, an extension's in its place, wrapped by extensions: see fedlora/extensions.py) ->
    finish, once

What the protocol does itself:

* **setup**: the first time a node is sampled it is sent the run config (a ``query`` message) and
  answers with its :class:`~fedlora.protocol.NodeProfile` (identity, rank, data sizes), checked
  like any reply;
* **per-node payloads**: each node receives the global adapter in its own form (its rank, its
  scaling) and only the parts the strategy's :class:`~fedlora.sharing.SharingPolicy` shares;
* **the round's outcome**: a bad reply is dropped with a logged reason naming the client and the
  round aggregates the rest (Flower's own consistency check would end the run instead); a node
  that never replies is named too; too few accepted replies skip the round; an aggregation that
  fails or is not finite leaves the global adapter at its last good value;
* **accounting**: the bytes of every message, as Flower's protobuf framing serialises it.

Subclasses declare ``sharing_policy`` and, where the weighted mean is not their aggregation,
:meth:`new_fold` / :meth:`finish_fold` (and, when their download differs from "the global adapter
at your rank", :meth:`client_payload`). The global adapter is kept in effective form (see
:mod:`fedlora.lora_math`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import ClassVar

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedlora import codec
from fedlora.aggregation.folds import Fold, WeightedMean
from fedlora.aggregation.product_sums import BudgetedProductSum, ProductSum, SketchedProductSum
from fedlora.aggregation.replies import accept_train_reply
from fedlora.aggregation.update import Update
from fedlora.config import FedLoraConfig
from fedlora.extensions import Extension, ReplyStage, RoundRelease, first_answer
from fedlora.factors import LoraFactors
from fedlora.lora_math import to_client, to_effective
from fedlora.protocol import ARRAYS, BASE_PREFIX, CONFIG, METRICS, NodeNames, NodeProfile
from fedlora.registry import extensions_for
from fedlora.sharing import SharingPolicy
from fedlora.strategies.evaluation import FederatedEvaluation
from fedlora.strategies.nodes import NodeSetup
from fedlora.strategies.round_log import RoundLog, weighted_metrics
from fedlora.validation import RejectedReply, short_reason

log = logging.getLogger("fedlora.server")


class LoraStrategy(NodeSetup, FederatedEvaluation, FedAvg):
    sharing_policy: ClassVar[SharingPolicy]
    strategy_name: ClassVar[str] = "base"

    def __init__(
        self,
        cfg: FedLoraConfig,
        template: LoraFactors,
        *,
        arrayrecord_key: str = ARRAYS,
        configrecord_key: str = CONFIG,
        metricrecord_key: str = METRICS,
        extensions: list[Extension] | None = None,
    ) -> None:
        f = cfg.federation
        super().__init__(
            fraction_train=f.fraction_train,
            fraction_evaluate=f.fraction_evaluate,
            min_train_nodes=min(f.min_train_clients, f.num_clients),
            min_evaluate_nodes=min(f.min_evaluate_clients, f.num_clients) if f.fraction_evaluate > 0 else 0,
            min_available_nodes=f.min_available_clients or f.min_train_clients,
            arrayrecord_key=arrayrecord_key,
            configrecord_key=configrecord_key,
        )
        self.cfg = cfg
        self.metricrecord_key = metricrecord_key
        self.template = template  # client-form shapes at the reference rank, heads included
        self.module_names = list(template.modules)  # the codec turns it into compact wire keys
        self.max_rank = template.modules[next(iter(template.modules))].rank if template.modules else cfg.lora.rank
        self.profiles: dict[int, NodeProfile] = {}
        self.refused: dict[int, str] = {}  # node id -> why its setup was refused (it is never sampled again)
        # Deployment with node authentication: node id -> the name its key was enrolled under (None in a
        # simulation). A node's client id is that name, never what it declares (see accept_profile).
        self.node_names: NodeNames | None = None
        self._outliers: set[int] = set()  # nodes already flagged for an outsized declared data size
        self.global_eff: LoraFactors = LoraFactors()
        self.rounds: dict[int, RoundLog] = {}
        self._digest = cfg.digest()
        self.label_names: list[str] | None = None  # the run's label space, sent with the setup
        self.round_offset = 0  # rounds completed before this process resumed the run (Flower counts from 1)
        self._set_up: set[int] = set()  # nodes that received this run's setup from this process
        self._starts: dict = {}  # start_factors of this round's global adapter, per (rank, alpha)
        # The run's extensions (fedlora.extensions), whose server-side hooks the round protocol calls.
        self.extensions: list[Extension] = extensions_for(cfg) if extensions is None else extensions
        for e in self.extensions:
            e.attach(self)

    # ------------------------------------------------------------------ subclass API: the round's fold
    def fold_input(self, update: Update) -> LoraFactors:
        """What the strategy's fold takes of an accepted update: its shared parts, effective form."""
        return to_effective(update.factors)

    def new_fold(self, server_round: int, sampled: int) -> Fold:
        """The round's accumulator (:mod:`fedlora.aggregation.folds`). The single-rank strategies'
        default: the weighted mean, unless an extension folds the round its own way
        (:meth:`~fedlora.extensions.Extension.aggregation`)."""
        return first_answer(self.extensions, lambda e: e.aggregation()) or WeightedMean()

    def finish_fold(self, server_round: int, fold: Fold) -> LoraFactors:
        """The new global adapter (effective form) from the round's fold."""
        return fold.finish()

    def product_fold(self, server_round: int, sampled: int, rank: int) -> Fold:
        """FLoRA's and FlexLoRA's sum of products, read at ``rank``, in the most exact form that fits
        ``hetero.exact_budget_mb``: the stack (below ``hetero.sketch_from_clients`` sampled
        clients), then the dense sum, then a single-pass sketch read at ``rank`` (or
        ``hetero.sketch_rank``) of that size plus ``hetero.sketch_oversampling``; the round log's
        product-fold names the form."""
        h = self.cfg.hetero
        read_rank = h.sketch_rank or rank

        def sketch() -> SketchedProductSum:
            return SketchedProductSum(
                read_rank, h.sketch_oversampling, seed=self.cfg.run.seed * 1_000_003 + server_round
            )

        return BudgetedProductSum(h.exact_budget_mb * 2**20, rank, sketch, stack=sampled < h.sketch_from_clients)

    def aggregate(self, server_round: int, updates: list[Update]) -> None:
        """Fold a list of accepted updates into ``self.global_eff`` (tests, benchmarks): the same
        fold the server runs over replies as they arrive, without the round's share cap."""
        fold = self.new_fold(server_round, len(updates))
        for u in updates:
            fold.add(self.fold_input(u), u.weight)
        self.global_eff = self.finish_fold(server_round, fold)

    def initial_global(self, init_eff: LoraFactors) -> LoraFactors:
        """The global adapter before round 1, from the seed-built initial adapter (effective form)."""
        return init_eff.select(self.sharing_policy.shared)

    def client_payload(self, profile: NodeProfile, server_round: int) -> tuple[LoraFactors, LoraFactors | None]:
        """(adapter parts in the client's form, optional base delta to merge) for one node."""
        return to_client(self.global_eff, profile.rank, profile.alpha).select(self.sharing_policy.shared), None

    def start_factors(self, profile: NodeProfile, server_round: int) -> LoraFactors:
        """The shared parts as the client held them when it started training this round (client form):
        what an update is measured from (an extension's bound on it)."""
        return self.client_payload(profile, server_round)[0]

    @property
    def has_global_model(self) -> bool:
        """Whether the server holds a complete model (FedSA keeps B on the clients: it does not)."""
        return self.sharing_policy.server_holds_model

    def global_rank(self) -> int:
        m = next(iter(self.global_eff.modules.values()), None)
        return 0 if m is None else m.rank

    # ------------------------------------------------------------------ state (checkpoint / resume)
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, JSON-able state): the global adapter, the node profiles and refusals, and every
        extension's state (a DP accountant, a task sequence's finished tasks).
        Everything a resumed server needs of the strategy."""

        tensors = dict(self.global_eff.tensors())
        for e in self.extensions:
            tensors.update(e.server_tensors())
        state = {
            "strategy": self.strategy_name,
            "config-digest": self._digest,
            "alpha": {n: m.alpha for n, m in self.global_eff.modules.items()},
            "profiles": [p.to_record() for p in self.profiles.values()],
            "refused": {str(k): v for k, v in self.refused.items()},
            "last-round": max(self.rounds, default=0),
            "extensions": {e.name: e.server_state() for e in self.extensions},
        }
        return tensors, state

    def load_state_dict(self, tensors: dict[str, torch.Tensor], state: dict) -> None:
        if state["strategy"] != self.strategy_name:
            raise ValueError(f"checkpoint of strategy {state['strategy']!r} cannot resume {self.strategy_name!r}")

        kept = state.get("extensions", {})
        own = dict(tensors)
        for e in self.extensions:
            e.load_server_state(kept.get(e.name, {}))
            own = e.load_server_tensors(own)
        self.global_eff = LoraFactors.from_tensors(own, state["alpha"])
        self.profiles = {int(p["node_id"]): NodeProfile.from_record(p) for p in state["profiles"]}
        self.refused = {int(k): v for k, v in state["refused"].items()}

    # ------------------------------------------------------------------ train
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.round_offset
        rl = self.rounds.setdefault(server_round, RoundLog(server_round=server_round))
        for e in self.extensions:
            e.begin_round(self, rl)
        node_ids = self.ensure_profiles(
            grid, self._sample(grid, self.fraction_train, self.min_train_nodes, server_round, "train"), rl
        )
        rl.sampled = len(node_ids)
        rl.sent[MessageType.TRAIN] = list(node_ids)
        extra = {}
        for e in self.extensions:
            extra.update(e.round_config(server_round))
        return self._messages(node_ids, server_round, config, MessageType.TRAIN, rl, extra=extra)

    def _messages(
        self, node_ids: list[int], server_round: int, config: ConfigRecord, mtype: str, rl: RoundLog | None, extra: dict
    ) -> list[Message]:
        cfg = ConfigRecord({**dict(config), "server-round": server_round, "config-digest": self._digest, **extra})
        cache: dict[tuple, ArrayRecord] = {}
        messages = []
        for node in node_ids:
            prof = self.profiles[node]
            key = (prof.rank, prof.alpha, *(e.payload_key(node) for e in self.extensions))
            if key not in cache:
                adapter, base = self.client_payload(prof, server_round)
                rec = codec.encode(adapter, self.cfg.federation.wire_dtype, modules=self.module_names)
                for e in self.extensions:
                    e.add_payload(self, rec, node)
                if base is not None:
                    for k, v in codec.encode(
                        base, self.cfg.federation.wire_dtype, prefix=BASE_PREFIX, modules=self.module_names
                    ).items():
                        rec[k] = v
                cache[key] = rec
            msg = Message(
                RecordDict({self.arrayrecord_key: cache[key], self.configrecord_key: cfg}),
                dst_node_id=node,
                message_type=mtype,
            )
            if rl is not None and mtype == MessageType.TRAIN:
                rl.bytes_down.append(rl.sizer_down(msg))
                rl.payload_down.append(codec.wire_bytes(cache[key]))
            messages.append(msg)
        return messages

    def _missing_replies(self, rl: RoundLog, mtype: str, answered: set[int], into: list[str]) -> None:
        """Nodes messaged this round that never answered: named, with the timeout they missed."""
        for node in rl.sent.get(mtype, []):
            if node not in answered:
                into.append(
                    f"{self.who(node)}: no reply within federation.round_timeout "
                    f"({self.cfg.federation.round_timeout:g} s)"
                )
                log.warning("round %d: %s", rl.server_round, into[-1])

    def round_fold(self, server_round: int, rl: RoundLog) -> Fold | RoundRelease:
        """The round's running state: an extension's release (client-level DP's clipped sum; its
        name goes to ``rl.released_by``), or the round's fold wrapped by each extension's
        :meth:`~fedlora.extensions.Extension.wrap_fold` (the robust layer's share cap)."""
        for e in self.extensions:
            release = e.round_release(server_round, rl.sampled, rl.dylora_rank or self.global_rank())
            if release is not None:
                rl.released_by = e.name
                return release
        fold = self.new_fold(server_round, rl.sampled)
        for e in self.extensions:
            fold = e.wrap_fold(fold, rl)
        return fold

    def fold_in(self, fold: Fold | RoundRelease, update: Update, server_round: int, released: bool = False) -> None:
        """Add one accepted update to the round's running state (an extension's release when
        ``released``), or :class:`RejectedReply` (the state is untouched: every fold checks its input
        before it adds)."""
        try:
            if released:
                fold.add(self.round_start(update.profile, server_round), update.factors)
            else:
                fold.add(self.fold_input(update), update.weight)
        except ValueError as exc:
            raise RejectedReply(f"cannot be aggregated: {exc}") from None

    def _fold_accepted(
        self, fold: Fold | RoundRelease, u: Update, server_round: int, rl: RoundLog, accepted: list[tuple[dict, int]]
    ) -> None:
        try:
            self.fold_in(fold, u, server_round, released=bool(rl.released_by))
        except RejectedReply as exc:
            rl.reject(f"{self.who(u.profile.node_id)}: {exc}")
            return
        for e in self.extensions:
            e.reply_accepted(u.profile.node_id, u.metrics)
        accepted.append((u.metrics, u.num_examples))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate, bound and fold each reply as it arrives (``replies`` may be a stream: see
        :class:`fedlora.aggregation.streaming.StreamingGrid`), then finish the round once."""
        server_round += self.round_offset
        rl = self.rounds.setdefault(server_round, RoundLog(server_round=server_round))
        fold = self.round_fold(server_round, rl)
        # Stages every accepted reply passes through before the fold (extensions' reply_stage).
        stages = [st for e in self.extensions if (st := e.reply_stage(self, rl)) is not None]
        answered: set[int] = set()
        accepted: list[tuple[dict, int]] = []  # (metrics, examples) per accepted reply: scalars only
        # The server's own work on replies, not its wait for them: CPU seconds of this thread (in a
        # simulation the ServerApp shares the process and the cores with Flower's engine, so its wall
        # time would count their work as its own).
        busy = 0.0
        for reply in replies:
            t_reply = time.thread_time()
            node = reply.metadata.src_node_id
            answered.add(node)
            prof = self.profiles.get(node)
            who = self.who(node)
            try:
                if reply.has_error():
                    raise RejectedReply(f"failed: {short_reason(reply.error.reason)}")
                if prof is None or node not in rl.sent.get(MessageType.TRAIN, [node]):
                    raise RejectedReply("reply from a node that was not asked to train this round")
                rl.bytes_up.append(rl.sizer_up(reply))
                u = self.validate_reply(prof, reply.content, server_round, rl)
                rl.payload_up.append(codec.wire_bytes(reply.content[self.arrayrecord_key]))
            except RejectedReply as exc:
                rl.reject(f"{who}: {exc}")
                busy += time.thread_time() - t_reply
                continue
            for ready in _through(stages, [u]):
                self._fold_accepted(fold, ready, server_round, rl, accepted)
            busy += time.thread_time() - t_reply
        t_finish = time.thread_time()
        for i, stage in enumerate(stages):  # what each stage still holds, through the stages after it
            for ready in _through(stages[i + 1 :], stage.flush()):
                self._fold_accepted(fold, ready, server_round, rl, accepted)
        for stage in stages:
            stage.end()
        self._missing_replies(rl, MessageType.TRAIN, answered, rl.rejected)
        rl.accepted = len(accepted)
        need = self.cfg.federation.min_accepted
        if len(accepted) < need:
            rl.skipped = (
                f"{len(accepted)} of {rl.sampled} replies accepted, fewer than federation.min_accepted "
                f"({need}): the round is skipped and the global adapter is unchanged"
            )
            log.warning("round %d: %s", server_round, rl.skipped)
            return None, None
        previous = self.global_eff
        t0 = time.perf_counter()
        try:
            if rl.released_by:
                self.global_eff, rl.figures = fold.finish(self.global_eff)
            else:
                self.global_eff = self.finish_fold(server_round, fold)
                for e in self.extensions:
                    self.global_eff = e.after_fold(self, rl, previous)
                error = getattr(fold, "last_error", None)
                if error is not None:
                    rl.figures["sketch-relative-error"] = error
                if isinstance(getattr(fold, "inner", fold), ProductSum):  # behind the share cap or not
                    rl.figures["product-fold"] = getattr(fold, "path", "sketch")
            for key, t in self.global_eff.tensors():
                if not bool(torch.isfinite(t).all()):
                    raise FloatingPointError(f"the aggregate's {key} is not finite")
        except Exception as exc:
            self.global_eff = previous
            rl.aggregation_error = f"{type(exc).__name__}: {exc}; the global adapter stays at its last good value"
            log.error("round %d: aggregation failed: %s", server_round, rl.aggregation_error)
            return None, None
        rl.aggregate_seconds = time.perf_counter() - t0
        rl.server_seconds = busy + (time.thread_time() - t_finish)
        for e in self.extensions:
            rl.figures.update(e.round_figures([m for m, _ in accepted]))
        metrics = weighted_metrics([m for m, _ in accepted], [float(n) for _, n in accepted])
        rl.train_metrics = metrics
        return codec.encode(self.global_eff), MetricRecord(metrics)

    # ------------------------------------------------------------------ the stages before the fold
    def validate_reply(
        self, prof: NodeProfile, content: RecordDict, server_round: int = 0, rl: RoundLog | None = None
    ) -> Update:
        """A train reply checked completely, decoded and bounded (:func:`fedlora.aggregation.replies.accept_train_reply`)."""
        return accept_train_reply(self, prof, content, server_round, rl)

    def round_start(self, prof: NodeProfile, server_round: int) -> LoraFactors:
        """:meth:`start_factors`, computed once per (round, rank, alpha) for the current global adapter:
        a round of 1,000 clients of one rank measures every update from the same start."""
        if self._starts.get("of") is not self.global_eff or self._starts.get("round") != server_round:
            self._starts = {"of": self.global_eff, "round": server_round}  # a new global: every start changes
        key = (prof.rank, prof.alpha)
        if key not in self._starts:
            self._starts[key] = self.start_factors(prof, server_round)
        return self._starts[key]

    def summary(self) -> None:
        log.info("fedlora strategy %s: %s", self.strategy_name, self.sharing_policy.describe())
        super().summary()


def _through(stages: list[ReplyStage], updates: list[Update]) -> list[Update]:
    """``updates`` offered to each stage in turn: what comes out of the last is ready to fold."""
    for stage in stages:
        updates = [ready for u in updates for ready in stage.offer(u)]
    return updates
