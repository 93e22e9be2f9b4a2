"""Federated evaluation: who evaluates in a round (everyone at the end when clients keep private
parts, so each saves its personalized adapter), and the clients' metrics folded as they arrive.
A mixin of :class:`~fedlora.strategies.base.LoraStrategy`."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid

from fedlora.strategies.round_log import RoundLog
from fedlora.validation import RejectedReply, check_eval_metrics, short_reason

log = logging.getLogger("fedlora.server")


class FederatedEvaluation:
    # ------------------------------------------------------------------ evaluate
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
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
        clients, answered = [], set()
        for reply in replies:  # folded as they arrive: only each client's scalar metrics are kept
            node = reply.metadata.src_node_id
            answered.add(node)
            prof = self.profiles.get(node)
            try:
                if reply.has_error():
                    raise RejectedReply(f"failed: {short_reason(reply.error.reason)}")
                if prof is None or self.metricrecord_key not in reply.content.metric_records:
                    raise RejectedReply("no metrics" if prof else "reply from a node that was never set up")
                m = check_eval_metrics(
                    dict(reply.content.metric_records[self.metricrecord_key]),
                    max_examples=prof.num_test,
                    weight_key=self.weighted_by_key,
                    scored=self.cfg.model.task != "causal-lm" or self.cfg.data.prompt_format == "label",
                )
                for e in self.extensions:
                    e.reply_accepted(node, m)
            except RejectedReply as exc:
                rl.rejected_evaluate.append(f"{self.who(node)}: {exc}")
                log.warning("round %d: evaluation from %s dropped: %s", server_round, self.who(node), exc)
                continue
            m["client-id"] = prof.client_id
            clients.append(m)
        self._missing_replies(rl, MessageType.EVALUATE, answered, rl.rejected_evaluate)
        if not clients:
            return None
        clients.sort(key=lambda m: m["client-id"])
        rl.eval_clients = clients
        ns = [float(m[self.weighted_by_key]) for m in clients]
        loss = sum(float(m["loss"]) * n for m, n in zip(clients, ns)) / max(sum(ns), 1.0)
        out = {"personal-loss": loss, "num-clients": len(clients)}
        if all("accuracy" in m for m in clients):
            accs = [float(m["accuracy"]) for m in clients]
            out.update(
                {
                    "personal-accuracy-mean": sum(accs) / len(accs),
                    "personal-accuracy-worst": min(accs),
                    "personal-accuracy-weighted": sum(a * n for a, n in zip(accs, ns)) / max(sum(ns), 1.0),
                }
            )
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
