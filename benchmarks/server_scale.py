"""The server at scale: peak memory and time of one round through the strategy's real path.

Messages in, adapter out: every reply is a Flower ``Message`` whose ``ArrayRecord`` holds a
**distinct** 7B-shaped adapter (32 layers x q, v of 4096 x 4096, LoRA r=16: 33.5 MB in float32),
generated one at a time as replies would arrive, and handed to ``aggregate_train`` as a stream
(what :class:`fedlora.aggregation.streaming.StreamingGrid` gives it). Each cell runs in a fresh
process; its peak RSS (sampled every 0.2 s) is compared with the same process's RSS after setup
(the idle server: strategy, global adapter, one template). Generating a reply is the clients'
work, not the server's: its time is measured and subtracted from the round's.

Cells:
* FedIT with 10, 100 and 1,000 replies: peak RSS must be flat in the cohort (1,000 / 10 <= 1.2,
  increase over idle <= 1 GB);
* FlexLoRA with 1,000 replies of ranks 4, 8, 12, 16 (mixed): seconds per round through the
  single-pass sketch (goal <= 60 s on 2 cores);
* FlexLoRA with 31 and 32 replies, either side of ``hetero.sketch_from_clients``: below it the fold is
  exact only while the replies fit ``hetero.exact_budget_mb``, so the peak is flat (31 / 32 <= 1.2);
* the sketch's relative error against the exact path at the largest cohort where the exact stack
  fits here (100 clients). The synthetic updates share a 32-dimensional subspace plus noise, as
  the updates of one federation are correlated; with unrelated random factors every rank-16
  approximation of a 1,000-term sum is poor, the exact one included.

    .venv/bin/python -m benchmarks.server_scale            # about 20 minutes on 2 CPU cores
    .venv/bin/python -m benchmarks.server_scale --quick    # 10 and 100 replies only
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from benchmarks.common import RESULTS, ROOT, write

LAYERS, DIM, RANK = 32, 4096, 16
MODULES = [f"model.layers.{i}.self_attn.{p}_proj" for i in range(LAYERS) for p in "qv"]


def _template(rank: int):
    import torch

    from fedlora.factors import LoraFactors, ModuleFactors

    return LoraFactors(
        modules={
            n: ModuleFactors(A=torch.zeros(rank, DIM), B=torch.zeros(DIM, rank), alpha=2.0 * rank) for n in MODULES
        }
    )


def _client_factors(i: int, rank: int, shared):
    """Client i's adapter: A rows in a shared 32-dim subspace plus noise; B random; all distinct."""
    import torch

    from fedlora.factors import LoraFactors, ModuleFactors

    g = torch.Generator().manual_seed(1000 + i)
    mods = {}
    for n in MODULES:
        A = torch.randn(rank, shared.shape[0], generator=g) @ shared + 0.05 * torch.randn(rank, DIM, generator=g)
        mods[n] = ModuleFactors(A=A * 0.01, B=torch.randn(DIM, rank, generator=g) * 0.01, alpha=2.0 * rank)
    return LoraFactors(modules=mods)


class _Backlog:
    """A grid whose replies have all arrived when the round starts pulling (Flower's grids return
    every arrived reply of the ids asked): ``pull`` = how many it hands over per pull at most, here
    as many as asked. Replies are built when pulled, as a SuperLink holds them until then."""

    def __init__(self, make_reply) -> None:
        self.make_reply, self.pending, self.asked = make_reply, {}, []

    def push_messages(self, messages):
        for i, m in enumerate(messages):
            m.metadata.__dict__["_message_id"] = f"q{i}"
            self.pending[f"q{i}"] = i
        return list(self.pending)

    def pull_messages(self, ids):
        ids = list(ids)
        self.asked.append(len(ids))
        return [self.make_reply(self.pending.pop(i)) for i in ids if i in self.pending]


def cell(strategy_name: str, clients: int, exact_check: bool = False, through_grid: int = 0) -> dict:
    """One round in this process; returns its figures. ``through_grid``: replies come through
    StreamingGrid from a grid holding them all at once, ``through_grid`` ids asked per pull."""
    import psutil
    import torch
    from flwr.app import Message, MessageType, Metadata, MetricRecord, RecordDict

    from benchmarks.common import PeakRSS, set_task_identity
    from fedlora import codec
    from fedlora.config import FedLoraConfig
    from fedlora.lora_math import to_effective
    from fedlora.protocol import NodeProfile
    from fedlora.registry import get_strategy
    from fedlora.strategies.base import RoundLog

    set_task_identity()
    torch.set_num_threads(2)
    hetero = strategy_name != "fedit"
    cfg = FedLoraConfig.load(
        None,
        [
            f"federation.strategy={strategy_name}",
            f"lora.rank={RANK}",
            "lora.alpha_mode=proportional",
            f"federation.num_clients={max(clients, 2)}",
            "federation.fraction_train=1.0",
            f"federation.min_train_clients={clients}",
            "model.name=builtin:tiny-llama",
            "model.task=causal-lm",
        ]
        + (["hetero.client_ranks=[4, 8, 12, 16]"] if hetero else []),
    )
    strategy = get_strategy(strategy_name)(cfg, _template(RANK))
    strategy.global_eff = strategy.initial_global(to_effective(_template(RANK)))
    ranks = [[4, 8, 12, 16][i % 4] if hetero else RANK for i in range(clients)]
    for i in range(clients):
        strategy.profiles[100 + i] = NodeProfile(
            node_id=100 + i,
            client_id=f"c{i:05d}",
            partition_id=i,
            rank=ranks[i],
            alpha=cfg.lora.alpha_for_rank(ranks[i]),
            num_train=100,
            num_test=10,
        )
    rl = strategy.rounds.setdefault(1, RoundLog(server_round=1))
    rl.sampled = clients
    rl.sent[MessageType.TRAIN] = [100 + i for i in range(clients)]
    shared = torch.randn(32, DIM, generator=torch.Generator().manual_seed(7))
    idle = psutil.Process().memory_info().rss
    gen_seconds = [0.0]

    def reply(i: int):
        t0 = time.perf_counter()
        f = _client_factors(i, ranks[i], shared)
        content = RecordDict(
            {
                "arrays": codec.encode(f, modules=strategy.module_names),
                "metrics": MetricRecord({"num-examples": 50 + i % 50, "rank": ranks[i]}),
            }
        )
        md = Metadata(
            run_id=1,
            message_id=f"m{i}",
            src_node_id=100 + i,
            dst_node_id=0,
            reply_to_message_id=f"q{i}",
            group_id="1",
            created_at=time.time(),
            ttl=3600.0,
            message_type=MessageType.TRAIN,
        )
        msg = Message(content=content, metadata=md)
        del f, content
        gen_seconds[0] += time.perf_counter() - t0
        return msg

    def replies():
        for i in range(clients):
            yield reply(i)

    stream = replies()
    if through_grid:
        from fedlora.aggregation.streaming import StreamingGrid

        grid = _Backlog(reply)
        asks = [Message(RecordDict(), dst_node_id=100 + i, message_type=MessageType.TRAIN) for i in range(clients)]
        stream = StreamingGrid(grid, max_pull=through_grid).send_and_receive(asks, timeout=3600)
    t0 = time.perf_counter()
    with PeakRSS() as peak:
        strategy.aggregate_train(1, stream)
    wall = time.perf_counter() - t0
    assert rl.accepted == clients, rl.rejected[:3]
    out = {
        "strategy": strategy_name,
        "clients": clients,
        "idle_rss_mb": idle / 2**20,
        "peak_rss_mb": peak.peak / 2**20,
        "increase_mb": (peak.peak - idle) / 2**20,
        "round_seconds": wall,
        "reply_generation_seconds": gen_seconds[0],
        "server_seconds": wall - gen_seconds[0],
        "aggregate_seconds": rl.aggregate_seconds,
        "sketched": "sketch-relative-error" in rl.figures,
        "product_fold": rl.figures.get("product-fold"),
        "through_grid": through_grid,
        "max_replies_per_pull": max(grid.asked) if through_grid else None,
        "sketch_relative_error_estimate": rl.figures.get("sketch-relative-error"),
    }
    if exact_check:  # the same replies through the exact stack (memory grows with the cohort here)
        from fedlora.aggregation.product_sums import ExactProductSum, SketchedProductSum

        def dense(f, n):
            m = f.modules[n]
            return m.B.double() @ m.A.double()

        exact, sketch = ExactProductSum(), SketchedProductSum(RANK, cfg.hetero.sketch_oversampling, seed=1)
        for i in range(clients):
            u = to_effective(_client_factors(i, ranks[i], shared))
            exact.add(u, 50 + i % 50)
            sketch.add(u, 50 + i % 50)
        t1 = time.perf_counter()
        best = exact.result(RANK)
        out["exact_seconds"] = time.perf_counter() - t1
        approx = sketch.result(RANK)
        full = exact.result(None)
        num_s = num_b = den = num_sb = 0.0
        for n in MODULES[:8]:  # 8 modules: forming 4096 x 4096 products for all 64 is slow and says no more
            x = dense(full, n)
            num_b += float(((x - dense(best, n)) ** 2).sum())
            num_s += float(((x - dense(approx, n)) ** 2).sum())
            num_sb += float(((dense(best, n) - dense(approx, n)) ** 2).sum())
            den += float((x**2).sum())
        out.update(
            {
                "exact_truncation_error": (num_b / den) ** 0.5,
                "sketch_error": (num_s / den) ** 0.5,
                "sketch_vs_exact_flexlora": (num_sb / den) ** 0.5,
                "sketch_error_estimate": sketch.last_error,
            }
        )
    return out


CELLS = [
    ("fedit", 10, False),
    ("fedit", 100, False),
    ("fedit", 1000, False),
    ("flexlora", 31, False),
    ("flexlora", 32, False),
    ("flexlora", 1000, False),
    ("flexlora", 100, True),
    # 100 replies waiting at once behind the grid: asked one id at a time, as many as fit
    # federation.pull_budget_mb (128 MiB: 4 replies of 32 MiB), and every id at once
    ("fedit-grid-1", 100, False),
    ("fedit-grid-budget", 100, False),
    ("fedit-grid-all", 100, False),
]


def cell_named(name: str, clients: int, exact: bool) -> dict:
    """A cell of CELLS by name: ``fedit-grid-1`` / ``-budget`` / ``-all`` are FedIT through a backlogged grid."""
    if name.startswith("fedit-grid-"):
        from fedlora.aggregation.streaming import replies_per_pull
        from fedlora.config import FedLoraConfig

        per_pull = {"fedit-grid-1": 1, "fedit-grid-all": clients}.get(name) or replies_per_pull(
            FedLoraConfig(), _template(RANK)
        )
        return {**cell("fedit", clients, exact, through_grid=per_pull), "strategy": name}
    return cell(name, clients, exact)


def run(quick: bool = False, only: str = "") -> dict:
    """Every cell (or those named in ``only``, ``NAME:CLIENTS,...``, merged into the existing results)."""
    wanted = {tuple(x.split(":")) for x in only.split(",") if x}
    rows = []
    if wanted and (RESULTS / "server_scale.json").exists():
        rows = [
            r
            for r in json.loads((RESULTS / "server_scale.json").read_text())["rows"]
            if (r["strategy"], str(r["clients"])) not in wanted
        ]
    for name, clients, exact in CELLS:
        if (quick and clients > 100) or (wanted and (name, str(clients)) not in wanted):
            continue
        args = [sys.executable, "-m", "benchmarks.server_scale", "--cell", f"{name}:{clients}:{int(exact)}"]
        res = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, check=True)
        row = json.loads(res.stdout.strip().splitlines()[-1])
        print(row, flush=True)
        rows.append(row)
    order = {(n, c): i for i, (n, c, _) in enumerate(CELLS)}
    rows.sort(key=lambda r: order.get((r["strategy"], r["clients"]), len(order)))
    fedit = {r["clients"]: r for r in rows if r["strategy"] == "fedit"}
    summary = {}
    flex = {r["clients"]: r for r in rows if r["strategy"] == "flexlora"}
    if 31 in flex and 32 in flex:  # below hetero.sketch_from_clients (exact while it fits), and from it on
        summary["flexlora_peak_rss_31_over_32"] = flex[31]["peak_rss_mb"] / flex[32]["peak_rss_mb"]
    grid = {r["strategy"]: r for r in rows if r["strategy"].startswith("fedit-grid-")}
    if {"fedit-grid-1", "fedit-grid-budget"} <= set(grid):  # a backlog of 100: the budget's pulls against one per pull
        summary["backlog_peak_rss_budget_over_one_at_a_time"] = (
            grid["fedit-grid-budget"]["peak_rss_mb"] / grid["fedit-grid-1"]["peak_rss_mb"]
        )
    if 10 in fedit and max(fedit) > 10:
        top = max(fedit)
        summary.update(
            {
                f"fedit_peak_rss_{top}_over_10": fedit[top]["peak_rss_mb"] / fedit[10]["peak_rss_mb"],
                f"fedit_increase_mb_at_{top}": fedit[top]["increase_mb"],
            }
        )
    _plot(rows)
    write(
        "server_scale",
        {
            "shape": f"{LAYERS} layers x q,v of {DIM}x{DIM}, LoRA r={RANK} (FlexLoRA: ranks 4-16)",
            "rows": rows,
            "summary": summary,
        },
    )
    return {"rows": rows, "summary": summary}


def _plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fedit = [r for r in rows if r["strategy"] == "fedit"]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].plot([r["clients"] for r in fedit], [r["peak_rss_mb"] for r in fedit], "o-", label="peak RSS")
    ax[0].plot([r["clients"] for r in fedit], [r["idle_rss_mb"] for r in fedit], "s--", label="idle server RSS")
    ax[0].set_xscale("log")
    ax[0].set_xlabel("distinct 7B-shaped replies in the round")
    ax[0].set_ylabel("MiB")
    ax[0].set_title("FedIT server memory: replies folded as they arrive")
    ax[0].legend()
    ax[1].bar([f"{r['strategy']}\n{r['clients']}" for r in rows], [r["server_seconds"] for r in rows])
    ax[1].set_ylabel("server seconds per round (reply generation excluded)")
    ax[1].set_title("round time at 7B")
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(RESULTS / "server_scale.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--cell", default="")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="", help="NAME:CLIENTS,... run these cells only, merged into the results")
    a = ap.parse_args()
    if a.cell:
        from benchmarks.common import setup_env

        setup_env()
        name, n, exact = a.cell.split(":")
        print(json.dumps(cell_named(name, int(n), bool(int(exact)))))
    else:
        from benchmarks.common import setup_env

        setup_env()
        print(json.dumps(run(quick=a.quick, only=a.only)["summary"], indent=2))
