"""The nodes a round may ask: waiting for enough of them, sampling, and each node's setup (the run
config out, its profile back, checked like any reply, its identity bound to its key in a
deployment). A mixin of :class:`~fedlora.strategies.base.LoraStrategy`."""

from __future__ import annotations

import json
import logging
import time

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedlora.protocol import CONFIG, PROFILE, SETUP, NodeProfile
from fedlora.strategies.round_log import RoundLog
from fedlora.validation import RejectedReply, check_profile_fields, short_reason

log = logging.getLogger("fedlora.server")


class NodeSetup:
    def who(self, node: int) -> str:
        prof = self.profiles.get(node)
        return f"client {prof.client_id} (node {node})" if prof else f"node {node}"

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
                rl.rejected.append(
                    f"node {node}: no setup reply within federation.round_timeout "
                    f"({self.cfg.federation.round_timeout:g} s); asked again when next sampled"
                )
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
        if self.node_names is not None:
            # Identity is what the runtime knows of the node, not what it declares: in a deployment the
            # name bound to its authenticated key at enrolment, in a simulation its partition's id. So
            # a node cannot take another's id by declaring it first.
            bound = self.node_names(node)
            how = self.node_names.binding
            if not bound:
                raise RejectedReply(
                    f"node {node} (declaring client id {cid!r}) has no client id bound to it ({how} none)"
                )
            if bound != cid:
                rl.flagged.append(f"node {node} declares client id {cid!r}; {how} {bound!r}, which is its client id")
            cid = bound
        if self.sharing_policy.heterogeneous_ranks:
            if rank > self.max_rank:
                raise RejectedReply(
                    f"client {cid}: rank {rank} is above the largest rank the run's global "
                    f"adapter holds ({self.max_rank})"
                )
        elif rank != self.max_rank:
            raise RejectedReply(
                f"client {cid}: rank {rank} contradicts the run: {self.strategy_name} trains every "
                f"client at rank {self.max_rank}"
            )
        holder = next((p.node_id for p in self.profiles.values() if p.client_id == cid and p.node_id != node), None)
        if holder is not None and holder in self._set_up:
            raise RejectedReply(f"client id {cid!r} is already held by node {holder}")
        if holder is not None:  # a profile from a checkpoint: the client came back as a new node
            del self.profiles[holder]
        num_train = f["num_train"]
        cap = self.cfg.federation.max_declared_examples
        if num_train > cap:
            rl.flagged.append(
                f"client {cid} (node {node}): declared {num_train} training examples; capped at "
                f"federation.max_declared_examples ({cap})"
            )
            num_train = cap
        alpha = self.cfg.lora.alpha_for_rank(rank)
        declared_alpha = record.get("alpha")
        if declared_alpha is not None and declared_alpha != alpha:
            rl.flagged.append(
                f"client {cid} (node {node}): declared alpha {declared_alpha!r} ignored; the run "
                f"config sets {alpha:g} for rank {rank}"
            )
        return NodeProfile(
            node_id=node,
            client_id=cid,
            partition_id=f["partition_id"],
            rank=rank,
            alpha=alpha,
            num_train=num_train,
            num_test=f["num_test"],
            device_class=f["device_class"],
        )

    def _flag_outliers(self, rl: RoundLog) -> None:
        sizes = sorted(p.num_train for p in self.profiles.values())
        if len(sizes) < 3:
            return
        median = sizes[len(sizes) // 2]
        factor = self.cfg.federation.outlier_factor
        for p in self.profiles.values():
            if p.num_train > factor * median and p.node_id not in self._outliers:
                rl.flagged.append(
                    f"client {p.client_id} (node {p.node_id}): declares {p.num_train} training "
                    f"examples, over {factor:g}x the federation's median ({median})"
                )
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
                raise TimeoutError(
                    f"{len(connected)} of the {need} clients the run needs "
                    f"(federation.min_available_clients) connected within federation.wait_timeout "
                    f"({limit:g} s)"
                )
            if waited >= next_note:
                log.warning(
                    "waiting for clients: %d of %d connected (federation.min_available_clients); "
                    "%.0f s of federation.wait_timeout (%g s) left",
                    len(connected),
                    need,
                    limit - waited,
                    limit,
                )
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
