"""The aggregation's config sections: ``[hetero]`` (heterogeneous ranks, FLoRA's and FlexLoRA's folds)
and ``[robust]`` (what one client's reply may do to a round). Loaded without torch or Flower."""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedlora.schema import _meta, _require


@dataclass
class HeteroConfig:
    device_classes: dict[str, int] = _meta(
        "Rank per device class, e.g. {edge=4, laptop=8, server=32}.", default_factory=dict
    )
    client_classes: list[str] = _meta(
        "Device class of client i (cycled if shorter than num_clients).", default_factory=list
    )
    class_distribution: dict[str, float] = _meta(
        "Alternative to client_classes: share of clients per class.", default_factory=dict
    )
    client_ranks: list[int] = _meta(
        "Explicit rank of client i (cycled); overrides device classes.", default_factory=list
    )
    flora_max_rank: int = _meta(
        "FLoRA: cap on the stacked global rank; above it the stack is recompressed by SVD.", default=256
    )
    hetlora_prune: bool = _meta("HetLoRA: local rank self-pruning.", default=False)
    hetlora_prune_ratio: float = _meta(
        "HetLoRA: prune the trailing components while their norm share is below this.", default=0.05
    )
    hetlora_keep_uncovered: bool = _meta(
        "HetLoRA: keep the previous global's rank components that no client sampled this round covers "
        "(false = the paper's zero-padding formula, which zeroes them for good).",
        default=True,
    )
    sketch_from_clients: int = _meta(
        "FlexLoRA, FLoRA: below this many sampled clients a round starts by stacking the replies (exact; it holds "
        "them while they fit hetero.exact_budget_mb); from it on, or once the stack outgrows the budget, the sum "
        "of products is folded as replies arrive, into the dense sum when that fits the budget, else the sketch.",
        default=32,
    )
    exact_budget_mb: float = _meta(
        "FlexLoRA, FLoRA: MiB the exact forms of a round's sum of products may hold: the stack of replies, then "
        "the dense out x in sums (8 bytes per weight of every adapted module). Only when neither fits does the "
        "round use the single-pass sketch; the round log's product-fold says which (exact, dense or sketch), so "
        "the server's memory is bounded at every cohort size.",
        default=128.0,
    )
    sketch_oversampling: int = _meta(
        "Sketch size beyond the rank read from it (range sketch k = rank + this; co-range 2k + 1). Exact while "
        "the summed update's rank is <= k; beyond it the error against the exact truncation falls as this "
        "grows (benchmarks/results/sketch_quality.json), and the memory grows with it.",
        default=80,
    )
    sketch_rank: int = _meta(
        "Rank the sketch is read at (0: FlexLoRA's largest client rank, FLoRA's flora_max_rank).", default=0
    )

    def validate(self) -> None:
        for name, r in self.device_classes.items():
            _require(int(r) >= 1, f"hetero.device_classes.{name}", f"rank must be >= 1, got {r}")
        for c in list(self.client_classes) + list(self.class_distribution):
            _require(
                c in self.device_classes,
                "hetero.client_classes",
                f"device class {c!r} is not defined in hetero.device_classes",
            )
        for r in self.client_ranks:
            _require(int(r) >= 1, "hetero.client_ranks", f"every rank must be >= 1, got {r}")
        if self.class_distribution:
            _require(
                abs(sum(self.class_distribution.values()) - 1.0) < 1e-6,
                "hetero.class_distribution",
                "shares must sum to 1",
            )
        _require(self.flora_max_rank >= 1, "hetero.flora_max_rank", "must be >= 1")
        _require(
            0.0 < self.hetlora_prune_ratio < 1.0,
            "hetero.hetlora_prune_ratio",
            f"must be in (0, 1): the norm share pruned from the tail, got {self.hetlora_prune_ratio}",
        )
        _require(self.sketch_from_clients >= 1, "hetero.sketch_from_clients", "must be >= 1")
        _require(self.sketch_oversampling >= 0, "hetero.sketch_oversampling", "must be >= 0")
        _require(self.exact_budget_mb >= 0, "hetero.exact_budget_mb", "must be >= 0")
        _require(self.sketch_rank >= 0, "hetero.sketch_rank", "must be >= 0 (0 = the strategy's own rank)")

    @property
    def enabled(self) -> bool:
        return bool(self.client_ranks or self.client_classes or self.class_distribution)


@dataclass
class RobustConfig:
    update_norm_bound: float = _meta(
        "Bound on each client's update (its change from what it started the round with, effective form, "
        "shared parts) in L2 norm; 0 = off.",
        default=0.0,
    )
    relative_norm_bound: float = _meta(
        "Bound on each client's update, as a multiple of the round's median size-normalised update norm (update "
        "norm / examples^norm_size_power, over the round's own replies, in any arrival order: the largest held back "
        "until the round ends); above it the update is clipped onto it (or rejected, norm_action) and the client "
        "named. On by default so no client moves the global adapter much further than an honest one of its size "
        "(honest clients lie within 0.87-1.29x on the default task); 0 = off. Off under client-level DP (its clip "
        "bounds every client).",
        default=1.5,
    )
    relative_norm_reject: float = _meta(
        "A reply whose size-normalised update norm is above this many times the round's median is left out of the "
        "fold and named, not clipped: clipped, it would still pull as hard as relative_norm_bound allows, and no "
        "honest client is anywhere near (0.87-1.29x on the default task). On by default with relative_norm_bound; "
        "0 = off (clip it, norm_action). Must be above relative_norm_bound.",
        default=10.0,
    )
    norm_size_power: float = _meta(
        "relative_norm_bound and weight_from_norm compare update norms divided by (example count)^this, so a client "
        "that trained on more examples (more local steps) may move further: 0.5 fits AdamW at a fixed learning rate, "
        "whose honest update norms grow as the square root of the steps; 0 compares plain norms (and turns "
        "weight_from_norm off).",
        default=0.5,
    )
    weight_from_norm: bool = _meta(
        "A reply's aggregation weight is at most the example count its update norm supports: a size-normalised norm "
        "below 1/relative_norm_bound of the round's median cuts the weight to n x (ratio x bound)^(1/norm_size_power) "
        "and names the client, so a client that claims more examples than it trained on, or sends back what it was "
        "given, cannot buy weight. On by default; needs relative_norm_bound and norm_size_power.",
        default=True,
    )
    max_weight_factor: float = _meta(
        "Cap on a reply's aggregation weight (its example count): this many times the median training-set size "
        "the clients declared; above it the weight is capped and the client named. On by default; 0 = off. A group "
        "of k clients at the cap holds at most k x factor / (k x factor + the others' weight in medians) of a round.",
        default=4.0,
    )
    min_cosine: float = _meta(
        "Direction bound: a reply whose update (its change, effective form, shared parts) has cosine similarity "
        "below this with the sum of the round's other update directions (each of unit norm, weighed by min(its "
        "examples, the round's median)) is left out of the fold and named, the lowest first, the others' cosines "
        "taken again without it. On by default (-0.1: honest non-IID updates lean towards the others, a "
        "sign-flipped one away); -1 = off. Checked when the round's replies (at least 5) fit robust.held_back_mb "
        "and share one rank. Off under client-level DP.",
        default=-0.1,
    )
    cosine_spread: float = _meta(
        "With robust.min_cosine: a reply is left out only if its cosine is also this many robust standard "
        "deviations (1.4826 x the median absolute deviation of the round's cosines) below their median, so a round "
        "whose honest updates scatter widely (no direction the clients share) leaves none of them out; a reply below "
        "robust.min_cosine that it keeps weighs at most the round's median weight times its cosine's place between "
        "that floor (0) and robust.min_cosine (1), named, so a reply just inside the floor has about the say of one "
        "just outside. 0 = robust.min_cosine alone.",
        default=2.5,
    )
    direction_probation: int = _meta(
        "With robust.min_cosine: for this many rounds after a client's update direction fell below robust.min_cosine "
        "(left out, or weighed down by robust.cosine_spread's ramp), or after it was left out on probation, the "
        "client's updates are kept only if their "
        "cosine with the sum of the others' is at least 0: neither robust.min_cosine's margin nor robust.cosine_spread "
        "keeps one that leans away, so a client caught flipping cannot flip just inside the floor in the rounds "
        "after. Kept in the run's checkpoints. 0 = off.",
        default=2,
    )
    held_back_mb: float = _meta(
        "MiB of replies held back until the round's medians are known (the largest update norms first; at least "
        "one reply): the norm bound is exact in any arrival order while no more replies exceed it than this "
        "holds, and the direction bound runs when the whole round fits (it takes as much again while it runs).",
        default=256.0,
    )
    norm_action: str = _meta(
        "Above a bound: 'clip' (scale onto the bound) or 'reject' (drop the reply).", default="clip"
    )
    aggregation: str = _meta(
        "'mean' (the strategy's own weighted average), 'median' or 'trimmed-mean' (coordinate-wise, over "
        "effective factors, unweighted; single-rank strategies only).",
        default="mean",
    )
    trim_fraction: float = _meta("trimmed-mean: share of clients dropped at each end, per coordinate.", default=0.2)
    max_client_share: float = _meta("Cap on any one client's normalised aggregation weight (1 = no cap).", default=1.0)
    trust_examples: int = _meta(
        "Trust scores from the server's own data (opt-in; 0 = off), after FLTrust (Cao et al. 2021): this many "
        "examples (labels in turn, from trust_data) are the server's, in no client's data and no evaluation; each round the server "
        "trains on them from the global adapter for a median client's steps, and a reply's weight is multiplied by "
        "the cosine of its update with the server's, a reply at or below 0 left out and named. FedIT and FFA-LoRA "
        "(clients start from the global adapter); the server builds the model, as federation.server_eval does.",
        default=0,
    )
    trust_data: str = _meta(
        "Where trust_examples come from: 'eval' (the held-out split the server evaluates on, data.test_split or "
        "the part carved from train: the clients' data is unchanged and the server evaluates on the rest) or "
        "'train' (the training split before it is partitioned: every client's partition changes).",
        default="eval",
    )
    trust_action: str = _meta(
        "trust_examples: 'weigh' (a reply's bounded weight times its trust, 0 left out), 'fltrust' (FLTrust's own "
        "aggregate: every kept update rescaled to the norm of the server's update and weighed by its trust alone; "
        "relative_norm_bound, weight_from_norm and max_weight_factor then off) or 'report' (the scores logged, "
        "those at 0 flagged, the fold untouched).",
        default="weigh",
    )
    held_updates_budget_mb: float = _meta(
        "median and trimmed-mean hold every reply of a round (the other aggregations fold each reply as it "
        "arrives): a run whose cohort x adapter size exceeds this many MiB is refused before it starts.",
        default=4096.0,
    )

    @property
    def trust_is_fltrust(self) -> bool:
        """FLTrust's own aggregate decides every kept reply's norm and weight (the size bounds are off)."""
        return self.trust_examples > 0 and self.trust_action == "fltrust"

    def validate(self) -> None:
        _require(self.update_norm_bound >= 0, "robust.update_norm_bound", "must be >= 0 (0 = off)")
        _require(
            self.relative_norm_bound == 0 or self.relative_norm_bound >= 1,
            "robust.relative_norm_bound",
            f"must be 0 (off) or >= 1 (a multiple of the median normalised norm), got {self.relative_norm_bound}",
        )
        _require(
            self.relative_norm_reject == 0 or self.relative_norm_reject > self.relative_norm_bound,
            "robust.relative_norm_reject",
            f"must be 0 (off) or above robust.relative_norm_bound ({self.relative_norm_bound:g}), "
            f"got {self.relative_norm_reject}",
        )
        _require(0.0 <= self.norm_size_power <= 1.0, "robust.norm_size_power", "must be in [0, 1]")
        _require(self.held_back_mb >= 0, "robust.held_back_mb", "must be >= 0")
        _require(
            -1.0 <= self.min_cosine < 1.0,
            "robust.min_cosine",
            f"must be in [-1, 1): -1 is off, 0 cuts updates that point away from the others' sum, got {self.min_cosine}",
        )
        _require(
            math.isfinite(self.cosine_spread) and self.cosine_spread >= 0,
            "robust.cosine_spread",
            f"must be a finite number >= 0 (0: robust.min_cosine alone), got {self.cosine_spread}",
        )
        _require(self.direction_probation >= 0, "robust.direction_probation", "must be >= 0 (0 = off)")
        _require(
            self.max_weight_factor == 0 or self.max_weight_factor >= 1,
            "robust.max_weight_factor",
            f"must be 0 (off) or >= 1, got {self.max_weight_factor}",
        )
        _require(self.norm_action in ("clip", "reject"), "robust.norm_action", "must be 'clip' or 'reject'")
        _require(
            self.aggregation in ("mean", "median", "trimmed-mean"),
            "robust.aggregation",
            f"must be 'mean', 'median' or 'trimmed-mean', got {self.aggregation!r}",
        )
        _require(0.0 <= self.trim_fraction < 0.5, "robust.trim_fraction", "must be in [0, 0.5)")
        _require(0.0 < self.max_client_share <= 1.0, "robust.max_client_share", "must be in (0, 1]")
        _require(self.trust_examples >= 0, "robust.trust_examples", "must be >= 0 (0 = off)")
        _require(
            self.trust_data in ("eval", "train"),
            "robust.trust_data",
            f"must be 'eval' or 'train', got {self.trust_data!r}",
        )
        _require(
            self.trust_action in ("weigh", "fltrust", "report"),
            "robust.trust_action",
            f"must be 'weigh', 'fltrust' or 'report', got {self.trust_action!r}",
        )
        _require(self.held_updates_budget_mb > 0, "robust.held_updates_budget_mb", "must be > 0")
