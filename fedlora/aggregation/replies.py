"""Stage 1 of a round's aggregation: a train reply checked completely, decoded, and bounded.

Nothing in a reply is trusted: it must hold exactly the records ``arrays`` and ``metrics``,
``arrays`` exactly the tensors this client shares at its rank (names, shapes, wire dtype), every
metric a finite number, ``num-examples`` an integer in 1..the client's declared size, ``rank`` its
rank (or lower, for HetLoRA self-pruning when enabled). Then the decoded factors must be finite,
in effective form too, and each extension bounds the update and its weight on their own
(:meth:`fedlora.extensions.Extension.bound_reply`: the robust layer's absolute norm bound and weight
cap, :mod:`fedlora.aggregation.bound`). Any failure
is a :class:`~fedlora.validation.RejectedReply` naming the problem; the strategy drops that reply
and the round goes on. Only then does the update reach the round's fold.
"""

from __future__ import annotations

from flwr.app import RecordDict

from fedlora import codec
from fedlora.aggregation.update import Update
from fedlora.factors import extra_part
from fedlora.protocol import NodeProfile
from fedlora.sharing import PARTS
from fedlora.validation import RejectedReply, check_arrays, check_finite, check_train_metrics, expected_arrays


def accept_train_reply(strategy, prof: NodeProfile, content: RecordDict, server_round: int = 0, rl=None) -> Update:
    """Check a train reply completely before any arithmetic; return it as an ``Update``.

    The reply must hold exactly the records ``arrays`` and ``metrics``; ``arrays`` exactly the
    tensors this client shares at its rank (names, shapes, wire dtype); every metric a finite
    number, ``num-examples`` an integer in 1..the client's declared size, ``rank`` its rank
    (or lower, for HetLoRA self-pruning when enabled). Then the decoded factors must be finite,
    and each extension's bound on the update and its weight passed (:meth:`Extension.bound_reply`)."""
    policy = strategy.sharing_policy
    records = set(content.array_records) | set(content.metric_records) | set(content.config_records)
    if strategy.arrayrecord_key not in content.array_records:
        raise RejectedReply(f"no '{strategy.arrayrecord_key}' record in the reply")
    if strategy.metricrecord_key not in content.metric_records:
        raise RejectedReply(f"no '{strategy.metricrecord_key}' record in the reply")
    extra_records = sorted(records - {strategy.arrayrecord_key, strategy.metricrecord_key})
    if extra_records:
        raise RejectedReply(f"unexpected record(s) {extra_records[:3]} in the reply")
    metrics = dict(content.metric_records[strategy.metricrecord_key])
    cap = strategy.cfg.federation.max_num_examples
    limit = min(cap, prof.num_train) if cap else prof.num_train
    n, reported = check_train_metrics(
        metrics, max_examples=limit, max_rank=prof.rank, weight_key=strategy.weighted_by_key
    )
    rank = prof.rank if reported is None else reported
    pruning = strategy.cfg.hetero.hetlora_prune and policy.heterogeneous_ranks
    block_rank = rl.dylora_rank if rl is not None else None
    if block_rank is not None:
        if rank != block_rank:
            raise RejectedReply(f"reports rank {rank}, but this round's DyLoRA rank is {block_rank}")
    elif rank != prof.rank and not pruning:
        raise RejectedReply(f"reports rank {rank}, but the client trains rank {prof.rank}")
    parts = set(policy.shared) & (
        strategy.template.parts() | {"A", "B"}
    )  # a head or selector only if the model has one
    record = content.array_records[strategy.arrayrecord_key]
    sent = {extra_part(k[len("head/") :]) if k.startswith("head/") else k.rpartition("/")[2] for k in record.keys()}
    leaked = sent & set(PARTS) - set(policy.shared)
    if leaked:
        raise RejectedReply(
            f"carries {', '.join(sorted(leaked))}, which the {strategy.strategy_name} policy "
            f"({policy.describe()}) never lets leave a client"
        )
    if parts - sent:
        raise RejectedReply(f"lacks the shared part(s) {', '.join(sorted(parts - sent))}")
    check_arrays(
        record,
        expected_arrays(strategy.template, parts, rank, strategy.module_names),
        strategy.cfg.federation.wire_dtype,
    )
    alpha = strategy.cfg.lora.alpha_for_rank(rank)
    if block_rank is not None:  # a DyLoRA block keeps the full adapter's per-component scaling
        alpha = prof.alpha * block_rank / prof.rank
    try:
        factors = codec.decode(record, alpha=alpha, modules=strategy.module_names)
    except codec.CodecError as exc:  # checked above already; kept as a second line of defence
        raise RejectedReply(str(exc)) from None
    check_finite(factors)
    weight = float(n)
    for e in strategy.extensions:
        factors, weight = e.bound_reply(strategy, prof, factors, weight, server_round, rl)
    if (
        rank != prof.rank and block_rank is None
    ):  # an accepted self-pruning: later payloads are truncated to the new rank
        prof.rank, prof.alpha = rank, alpha
    return Update(profile=prof, factors=factors, weight=weight, metrics=metrics, num_examples=n)
