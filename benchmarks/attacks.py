"""Clients that lie inside every default bound, against the defaults, on the embedded default task.

The task is ``fedlora simulate``'s own default: MiniLM on the fortunes set, 10 clients on a
Dirichlet 0.5 split, FedIT, 3 rounds. Each cell runs that federation with some partitions replaced
by attackers this benchmark writes as ClientApps: fedlora's own client, whose reply is then
rewritten. Each attacker sits just inside the run's own bounds (AT_BOUND of each):

* ``flip``: its own change sign-flipped at 0.95 x ``robust.relative_norm_bound`` (1.425x at the
  default 1.5, whose figure is size-normalised: an honest client's own change is the median's);
* ``size``: declares, and reports training on, 0.95 x ``robust.max_weight_factor`` times the median
  declared size (3.8x at the default 4); its update is honest;
* ``flip+size``: both, its flip further scaled by sqrt(declared / trained), the room its claimed
  size buys under ``robust.norm_size_power``;
* ``flip-1e6``: its own change sign-flipped x1e6 (the clients that answer first: partitions 0-3
  run first in the in-process engine);
* ``silent``: sends back what it was given (a free rider; its declared size is true);
* ``absent``: never replies: what a detector that left the client out would give.

Cells, each over ``--seeds`` run seeds (the partition, the initial adapter and training): at the
defaults, honest (Dirichlet and IID), honest at the previous defaults (a 4x plain-norm bound, a 10x
weight cap, no direction bound), and each attack above (1 client, partition 3; 3 colluding flips;
4 first-arriving x1e6, and the same four never replying: what leaving them out gives). Each one-client
attack is also paired with that client never replying (``accuracy_vs_absent``; the colluders with
the three never replying), and the flip is repeated at partitions 6 and 9 with their own absences. Then the
opt-in defences: the coordinate median (against 1 flip, the 3 colluders, and honest), client-level
DP's clip (honest and 1 flip), a 0.2 share cap (1 flip), the direction bound off (``robust.min_cosine
= -1``: honest, 1 flip, 1 flip+size, the 3 colluders, and the four first-arriving clients never
replying: whether the bound is what the six left lose by), and trust
scores from 64 server examples (``robust.trust_examples``) taken from the training split (``trust``
cells) or from the held-out split the server evaluates on (``trust-eval`` cells), each against the
attacks and with a ``report`` cell (scores only) as its same-data baseline; the ``defaults+trust``
cells take the same train-split scores on top of every default (the direction bound on): the one
option the colluder criterion may name, with its cost on the honest run. Last, an honest
federation in which client 0 holds ten times the data of each other client (an IID ``sizes`` split), at the
defaults and with the size bounds off: what the defaults cost a real 10x client. (The trimmed
mean is left out: on this task one honest run, seed 42, ended at 0.44 with it against 0.82 with the
mean.) For each run: the final accuracy and loss of the server's held-out set, every round's loss,
every client named (clipped, rejected or flagged) with whether it was an attacker, and under DP the
clip's counts and epsilon. The summary holds the issue's criteria, each with whether it is met.
Writes benchmarks/results/attacks.json after every run and a plot at the end.

    .venv/bin/python -m benchmarks.attacks                 # every cell: the criteria's 5 seeds, the others 3
    .venv/bin/python -m benchmarks.attacks --cells honest,flip-1 --seeds 1
    .venv/bin/python -m benchmarks.attacks --cells honest,flip-1 --set robust.relative_norm_bound=2 --name try-2
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import RESULTS, setup_env, write

AT_BOUND = 0.95  # an attacker scales its lie to this share of the default bound it hides under

CELLS = {
    # Every setting at its default.
    "honest": {},
    "honest-iid": {},
    "honest previous-defaults": {},
    "flip-1": {3: "flip"},
    "size-1": {3: "size"},
    "flip+size-1": {3: "flip+size"},
    "silent-1": {3: "silent"},
    "absent-1": {3: "absent"},
    "flip-3-colluders": {1: "flip", 4: "flip", 7: "flip"},
    "flip-1e6-4-first": {0: "flip-1e6", 1: "flip-1e6", 2: "flip-1e6", 3: "flip-1e6"},
    "absent-4-first": {0: "absent", 1: "absent", 2: "absent", 3: "absent"},  # what leaving those four out gives
    "absent-3-colluders": {1: "absent", 4: "absent", 7: "absent"},  # what leaving the colluders out gives
    # The one flip at two other clients, each with its own absence: what the flip costs apart from whose data it holds.
    "flip-1 at client-6": {6: "flip"},
    "absent-1 at client-6": {6: "absent"},
    "flip-1 at client-9": {9: "flip"},
    "absent-1 at client-9": {9: "absent"},
    # The opt-in defences, against a flipped client or the colluders, and what one costs an honest run.
    "flip-1 median": {3: "flip"},
    "flip-1 max_client_share=0.2": {3: "flip"},
    "flip-3-colluders median": {1: "flip", 4: "flip", 7: "flip"},
    "honest median": {},
    "honest dp": {},
    "flip-1 dp": {3: "flip"},
    # The direction bound off (robust.min_cosine = -1): what it adds against a flip, what it costs an honest run,
    # and what it does to the six clients left when the first four never reply.
    "honest min_cosine=-1": {},
    "flip-1 min_cosine=-1": {3: "flip"},
    "flip+size-1 min_cosine=-1": {3: "flip+size"},
    "flip-3-colluders min_cosine=-1": {1: "flip", 4: "flip", 7: "flip"},
    "absent-4-first min_cosine=-1": {0: "absent", 1: "absent", 2: "absent", 3: "absent"},  # the six left, unbounded
    # Trust scores from 64 server-held examples (robust.trust_examples, opt-in): the same attacks, and its cost.
    "honest trust": {},
    "flip-1 trust": {3: "flip"},
    "absent-1 trust": {3: "absent"},
    "flip+size-1 trust": {3: "flip+size"},
    "flip-3-colluders trust": {1: "flip", 4: "flip", 7: "flip"},
    "flip-1e6-4-first trust": {0: "flip-1e6", 1: "flip-1e6", 2: "flip-1e6", 3: "flip-1e6"},
    "honest trust report": {},  # the scores only: the cost of holding the examples, apart from weighing
    "honest trust fltrust": {},  # FLTrust's own aggregate (robust.trust_action = "fltrust"): its honest cost
    # The same 64 examples taken from the held-out split the server evaluates on (robust.trust_data = "eval"):
    # the clients' data is unchanged, the server evaluates on the rest.
    "honest trust-eval": {},
    "flip-1 trust-eval": {3: "flip"},
    "flip+size-1 trust-eval": {3: "flip+size"},
    "flip-3-colluders trust-eval": {1: "flip", 4: "flip", 7: "flip"},
    "flip-1e6-4-first trust-eval": {0: "flip-1e6", 1: "flip-1e6", 2: "flip-1e6", 3: "flip-1e6"},
    "honest trust-eval report": {},  # the scores only: the same evaluation set, the fold untouched
    # The same trust scores on top of every default (the direction bound on): the one option against colluders.
    "honest defaults+trust": {},
    "honest defaults+trust report": {},  # the scores only, at the defaults: the same data, the fold untouched
    "flip-3-colluders defaults+trust": {1: "flip", 4: "flip", 7: "flip"},
    "flip-1 defaults+trust": {3: "flip"},
    "flip+size-1 defaults+trust": {3: "flip+size"},
    "flip-1e6-4-first defaults+trust": {0: "flip-1e6", 1: "flip-1e6", 2: "flip-1e6", 3: "flip-1e6"},
    # An honest client with ten times the data of each other (an IID 'sizes' split): what the defaults cost it.
    "honest 10x-client": {},
    "honest 10x-client no size bounds": {},
}
# Client-level DP as a defence: its clip bounds every client equally and its mean is unweighted. C = 10
# is about the honest clients' median update norm on this task; z = 0.01 keeps the task learnable, so
# the epsilon it spends protects nothing (the run reports it): these cells measure the clip, not a
# privacy setting.
DP = ["privacy.client_dp=true", "privacy.client_clip=10", "privacy.client_noise_multiplier=0.01"]
# ALONE: the override that turns the direction bound off, so an opt-in defence's cells show it by itself.
ALONE = ["robust.min_cosine=-1"]
TRUST = [*ALONE, "robust.trust_examples=64", 'robust.trust_data="train"']
TRUST_EVAL = [*ALONE, "robust.trust_examples=64", 'robust.trust_data="eval"']
DEFAULTS_TRUST = ["robust.trust_examples=64", 'robust.trust_data="train"']
TEN_X = ['data.partitioner="sizes"', "data.partition_sizes=[10, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
OVERRIDES = {
    "honest-iid": ['data.partitioner="iid"'],
    # The defaults before this benchmark's defaults: a 4x plain-norm bound, a 10x weight cap, no direction bound.
    "honest previous-defaults": [
        "robust.min_cosine=-1",
        "robust.relative_norm_bound=4",
        "robust.norm_size_power=0",
        "robust.weight_from_norm=false",
        "robust.max_weight_factor=10",
    ],
    **{cell: ["robust.min_cosine=-1"] for cell in CELLS if cell.endswith(" min_cosine=-1")},
    "flip-1 median": [*ALONE, 'robust.aggregation="median"'],
    "flip-3-colluders median": [*ALONE, 'robust.aggregation="median"'],
    "honest median": [*ALONE, 'robust.aggregation="median"'],
    "flip-1 max_client_share=0.2": [*ALONE, "robust.max_client_share=0.2"],
    "honest dp": DP,
    "flip-1 dp": DP,
    **{cell: TRUST for cell in CELLS if cell.endswith(" trust")},
    "honest trust report": [*TRUST, 'robust.trust_action="report"'],
    "honest trust fltrust": [*TRUST, 'robust.trust_action="fltrust"'],
    **{cell: TRUST_EVAL for cell in CELLS if cell.endswith(" trust-eval")},
    "honest trust-eval report": [*TRUST_EVAL, 'robust.trust_action="report"'],
    **{cell: DEFAULTS_TRUST for cell in CELLS if cell.endswith(" defaults+trust")},
    "honest defaults+trust report": [*DEFAULTS_TRUST, 'robust.trust_action="report"'],
    "honest 10x-client": TEN_X,
    "honest 10x-client no size bounds": [
        *TEN_X,
        "robust.relative_norm_bound=0",
        "robust.weight_from_norm=false",
        "robust.max_weight_factor=0",
    ],
}
# The cells the criteria read at the defaults and with the one option against colluders, and
# the baselines they are compared with: run over more seeds (--criteria-seeds) than the other opt-in
# defences, since their spread across seeds is as large as the differences the criteria ask about.
CRITERIA_CELLS = {
    *("honest", "honest-iid", "honest previous-defaults", "flip-1", "size-1", "flip+size-1", "absent-1"),
    *("flip-3-colluders", "absent-3-colluders", "flip-1e6-4-first", "absent-4-first", "absent-4-first min_cosine=-1"),
    *(f"{attack}-1 at client-{p}" for attack in ("flip", "absent") for p in (6, 9)),
    *(c for c in CELLS if "defaults+trust" in c),
}
# Cells compared with another cell of their own split rather than with "honest" (paired by seed).
BASELINES = {"honest 10x-client": "honest 10x-client no size bounds"}
# Attack cells compared also with the same clients never replying (paired by seed): what a detector
# that left them out would give, the floor of any rule that only cuts the attackers.
ABSENT = {
    **{c: "absent-1" for c in ("flip-1", "size-1", "flip+size-1")},
    **{f"flip-1 at client-{p}": f"absent-1 at client-{p}" for p in (6, 9)},
    "flip-3-colluders": "absent-3-colluders",
    "flip-1e6-4-first": "absent-4-first",
}
# Cells compared with "honest" and also with the honest run on their own data: the server's trust
# examples are taken out of the clients' rows, which changes every partition.
SAME_DATA = {
    **{c: "honest trust report" for c in CELLS if c.endswith(" trust") or c == "honest trust fltrust"},
    **{c: "honest trust-eval report" for c in CELLS if c.endswith(" trust-eval")},
    **{c: "honest defaults+trust report" for c in CELLS if c.endswith(" defaults+trust")},
}


def attack_app(bad: dict[int, str], declared: int, flip: float, power: float):
    """fedlora's ClientApp with partition p rewritten as ``bad[p]`` says; ``declared``: the size a
    'size' attacker claims; ``flip``: the factor a 'flip' attacker scales its own change by (negated);
    a 'flip+size' attacker scales it further by (declared / trained)^``power``, the room
    ``robust.norm_size_power`` gives the size it claims."""
    import torch
    from flwr.app import Message
    from flwr.clientapp import ClientApp

    from fedlora import codec
    from fedlora.clients.app import app as real

    app = ClientApp()

    def kind(context) -> str:
        return bad.get(int(context.node_config["partition-id"]), "")

    @app.query()
    def q(msg: Message, context):
        reply = real(msg, context)
        if "size" in kind(context):
            reply.content["profile"]["num_train"] = declared
        return reply

    @app.evaluate()
    def e(msg: Message, context):
        return real(msg, context)

    @app.train()
    def t(msg: Message, context):
        k = kind(context)
        if k == "absent":  # never replies: what a perfect detector that left it out would give
            raise RuntimeError("this client does not train")
        reply = real(msg, context)
        if not k or reply.has_error():
            return reply
        arrays = reply.content["arrays"]
        trained = int(reply.content["metrics"]["num-examples"])
        if "size" in k:
            reply.content["metrics"]["num-examples"] = declared
        room = (declared / trained) ** power if k == "flip+size" else 1.0
        scale = {"flip": -flip, "flip+size": -flip * room, "flip-1e6": -1e6, "silent": 0.0}.get(k)
        if scale is not None:
            for key in list(arrays.keys()):
                if key in msg.content["arrays"].keys():
                    start = codec.decode_tensor(key, msg.content["arrays"][key])
                    new = codec.decode_tensor(key, arrays[key])
                    arrays[key] = codec.encode_tensor((start + scale * (new - start)).to(torch.float32))
        return reply

    return app


def median_declared(cfg) -> int:
    from fedlora.partitions import client_data

    sizes = sorted(len(client_data(cfg, p).train) for p in range(cfg.federation.num_clients))
    return sizes[len(sizes) // 2]


def lies(cfg) -> tuple[float, float]:
    """(flip, size): the factors an attacker inside the run's bounds uses: its own change scaled by
    AT_BOUND x ``robust.relative_norm_bound`` (assuming its own size-normalised norm is the round's
    median, as an honest client's is to within about 20%), and AT_BOUND x ``robust.max_weight_factor``
    times the median declared size."""
    r = cfg.robust
    flip = AT_BOUND * r.relative_norm_bound if r.relative_norm_bound else 3.5
    size = AT_BOUND * r.max_weight_factor if r.max_weight_factor else 9.5
    return flip, size


def one_run(cell: str, seed: int, out: Path, extra: list[str]) -> dict:
    from fedlora.config import FedLoraConfig
    from fedlora.simulate import simulate

    sets = [f"run.seed={seed}", f'run.output_dir="{out}"'] + OVERRIDES.get(cell, []) + extra  # extra wins
    cfg = FedLoraConfig.load(None, sets)
    bad = CELLS[cell]
    flip, size = lies(cfg)
    declared = int(size * median_declared(cfg)) if any("size" in k for k in bad.values()) else 0
    code = code_version()  # before the run: a commit made while it runs is not the code it ran
    t0 = time.perf_counter()
    run_dir = simulate(cfg, client_app=attack_app(bad, declared, flip, cfg.robust.norm_size_power), engine="inprocess")
    rows = run_dir.read_metrics()
    attackers = {f"client-{p:05d}" for p in bad}
    named: list[str] = []
    for r in rows:
        for key in ("clipped", "rejected", "flagged"):
            named += [f"round {r['round']} {key}: {x}" for x in r.get(key) or []]
    ids = {m for line in named for m in re.findall(r"client-\d{5}", line)}
    left_out = {m for line in named if " rejected: " in line for m in re.findall(r"client-\d{5}", line)}
    last = rows[-1]
    return {
        "cell": cell,
        "seed": seed,
        "attackers": sorted(attackers),
        "declared_by_size_attackers": declared,
        "flip_factor": flip,
        "accuracy": last["server-accuracy"],
        "loss": last["server-loss"],
        "round1_loss": next(r["server-loss"] for r in rows if r["round"] == 1),
        "losses": [r["server-loss"] for r in rows if "server-loss" in r and r["round"] >= 1],
        "named": named,
        "honest_named": sorted(ids - attackers),
        "honest_left_out": sorted(left_out - attackers),
        "attackers_named": sorted(ids & attackers),
        "unnamed_lines": [x for x in named if not re.search(r"client-\d{5}", x)],
        # The direction bound's share and cut act only on a cosine below robust.min_cosine: the lowest seen says if it could.
        "lowest_cosine": min((c for r in rows for c in (r.get("direction-cosines") or {}).values()), default=None),
        "dp_clip_counts": [  # under client-level DP: how many the clip cut, how many far beyond it, epsilon
            {"round": r["round"], **{k: v for k, v in r.items() if "clip" in k or "epsilon" in k}}
            for r in rows
            if any("clients-clipped" in k for k in r)
        ],
        "seconds": time.perf_counter() - t0,
        "run_dir": str(run_dir.path),
        "code": code,
    }


@functools.cache  # once, when the first run starts: the code a process runs is what it imported then
def code_version() -> str:
    """The commit the run's code is at, with "+changes" when the package's code (not docs or results)
    differs from it in the working tree."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1]
        ).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    code = ("fedlora", "clients", "server", "strategies", "benchmarks/attacks.py")
    return head + ("+changes" if git("status", "--porcelain", "--untracked-files=no", "--", *code) else "")


def _paired_difference(runs: list[dict], cell: str, base: str) -> float | None:
    """The mean over seeds of ``cell``'s final accuracy minus ``base``'s in the same seed (None when
    no seed ran both)."""
    base_at = {r["seed"]: r["accuracy"] for r in runs if r["cell"] == base}
    diffs = [r["accuracy"] - base_at[r["seed"]] for r in runs if r["cell"] == cell and r["seed"] in base_at]
    return statistics.mean(diffs) if diffs else None


def summarise(runs: list[dict]) -> dict:
    out = {}
    for cell in CELLS:
        rs = [r for r in runs if r["cell"] == cell]
        if not rs:
            continue
        acc = [r["accuracy"] for r in rs]
        loss = [r["loss"] for r in rs]
        out[cell] = {
            "seeds": len(rs),
            "accuracy_mean": statistics.mean(acc),
            "accuracy_spread": (max(acc) - min(acc)),
            "loss_mean": statistics.mean(loss),
            "round1_loss_max": max(r["round1_loss"] for r in rs),
            "honest_named": sorted({c for r in rs for c in r["honest_named"]}),
            "honest_left_out": sorted({c for r in rs for c in r.get("honest_left_out", [])}),
            "attackers_named_in_every_run": all(set(r["attackers_named"]) == set(r["attackers"]) for r in rs),
        }
    if "honest" in out:
        h = out["honest"]
        for cell, s in out.items():
            paired = _paired_difference(runs, cell, "honest")
            s["accuracy_vs_honest"] = paired if paired is not None else s["accuracy_mean"] - h["accuracy_mean"]
        r1 = {  # the mean round-1 loss of each cell a loss is compared with, where it ran
            c: statistics.mean(r["round1_loss"] for r in runs if r["cell"] == c)
            for c in {"honest", *SAME_DATA.values()}
            if c in out
        }
        worst = {  # each four-first-arriving cell's worst loss over every run and round
            c: max(max(r.get("losses") or [r["loss"], r["round1_loss"]]) for r in runs if r["cell"] == c)
            for c in out
            if c.startswith(("flip-1e6-4-first", "absent-4-first"))
        }
        for cell, loss in worst.items():
            out[cell]["max_loss_over_honest_round1"] = loss / r1["honest"]
        for cell, base in {**SAME_DATA, **BASELINES}.items():  # paired by seed against a cell of the same data
            if cell in BASELINES:  # another split than "honest": no comparison with it
                for c in (cell, base):
                    out.get(c, {}).pop("accuracy_vs_honest", None)
            paired = _paired_difference(runs, cell, base)
            if cell in out and paired is not None:
                out[cell]["baseline"] = base
                out[cell]["accuracy_vs_baseline"] = paired
                if cell in worst:
                    out[cell]["max_loss_over_baseline_round1"] = worst[cell] / r1[base]
        for cell, floor in ABSENT.items():
            paired = _paired_difference(runs, cell, floor)
            if cell in out and paired is not None:
                out[cell]["absent"] = floor
                out[cell]["accuracy_vs_absent"] = paired
        out["criteria"] = criteria(out)
    return out


def criteria(out: dict) -> dict:
    """The issue's figures where their cells ran: name -> {"cell", the summary key measured with its
    value, "met"}."""
    got: dict = {}

    def check(name: str, cell: str, key: str, ok) -> None:
        if cell in out and key in out[cell]:
            v = out[cell][key]
            got[name] = {"cell": cell, key: v, "met": bool(ok(v))}

    for cell in ("flip-1", "size-1", "flip+size-1", "flip-1 at client-6", "flip-1 at client-9"):
        check(f"one attacker within 5 points ({cell})", cell, "accuracy_vs_honest", lambda v: v >= -0.05)
    check("three colluders within 10 points (defaults)", "flip-3-colluders", "accuracy_vs_honest", lambda v: v >= -0.10)
    check(
        "three colluders within 10 points (coordinate median)",
        "flip-3-colluders median",
        "accuracy_vs_honest",
        lambda v: v >= -0.10,
    )
    for cell in (
        "flip-1e6-4-first",
        "flip-1e6-4-first trust",
        "flip-1e6-4-first trust-eval",
        "flip-1e6-4-first defaults+trust",
    ):
        check(
            f"four first-arriving: loss never above 1.1x the honest round-1 loss ({cell})",
            cell,
            "max_loss_over_honest_round1",
            lambda v: v <= 1.1,
        )
    for option in ("trust", "trust-eval", "defaults+trust"):  # the same attacks against the opt-in trust scores
        for cell in (f"flip-1 {option}", f"flip+size-1 {option}"):
            check(f"one attacker within 5 points ({cell})", cell, "accuracy_vs_honest", lambda v: v >= -0.05)
        check(
            f"three colluders within 10 points ({option} scores)",
            f"flip-3-colluders {option}",
            "accuracy_vs_honest",
            lambda v: v >= -0.10,
        )
    check(  # what trust-eval would cost the honest run as a default
        "honest run loses at most 1 point with trust-eval",
        "honest trust-eval",
        "accuracy_vs_honest",
        lambda v: v >= -0.01,
    )
    check(
        "honest run loses at most 1 point against the previous defaults",
        "honest previous-defaults",
        "accuracy_vs_honest",
        lambda v: v <= 0.01,
    )
    for cell in ("honest", "honest-iid"):
        check(f"no honest client named ({cell})", cell, "honest_named", lambda v: not v)
    return got


def run(
    cells: list[str],
    seeds: list[int],
    extra: list[str] | None = None,
    name: str = "attacks",
    criteria_seeds: list[int] | None = None,
) -> dict:
    """Every (cell, seed) not yet in benchmarks/results/<name>.json, with ``extra`` config overrides
    on every run, after each cell's own (a defence tried against every attack, or a cell's setting
    varied: write those to another ``name``). The cells of CRITERIA_CELLS run ``criteria_seeds``
    where given, the others ``seeds``."""
    extra = list(extra or [])
    seeds_of = {c: criteria_seeds if criteria_seeds is not None and c in CRITERIA_CELLS else seeds for c in cells}
    seeds = sorted({s for c in cells for s in seeds_of[c]})
    path = RESULTS / f"{name}.json"
    # Runs already recorded are kept (a cell not asked for this time keeps its seeds) and not repeated.
    runs = [r for r in json.loads(path.read_text()).get("runs", []) if r["cell"] in CELLS] if path.exists() else []
    done = {(r["cell"], r["seed"]) for r in runs}
    work = Path(tempfile.mkdtemp(prefix="fedlora-attacks-"))
    for seed in seeds:
        for cell in cells:
            if (cell, seed) in done or seed not in seeds_of[cell]:
                continue
            r = one_run(cell, seed, work / f"{cell}-{seed}", extra)
            runs.append(r)
            print(
                f"[attacks] {cell} seed {seed}: accuracy {r['accuracy']:.3f} loss {r['loss']:.3f} "
                f"(round 1 {r['round1_loss']:.3f}); attackers named {r['attackers_named']}, honest named "
                f"{r['honest_named']}; {r['seconds']:.0f} s",
                flush=True,
            )
            _record(name, extra, runs)  # after every run, so a benchmark stopped early keeps its runs
    summary = _record(name, extra, runs)  # also when no run is new: the recorded runs, summarised again
    _plot(summary, name)
    return summary


def _record(name: str, extra: list[str], runs: list[dict]) -> dict:
    """Write the runs and their summary to benchmarks/results/<name>.json; return the summary."""
    summary = summarise(runs)
    write(
        name,
        {
            "task": "fedlora simulate's embedded default (MiniLM, fortunes, 10 clients, "
            "Dirichlet 0.5, FedIT, 3 rounds); in-process engine",
            "overrides": extra,
            "cells": CELLS,
            "overrides_by_cell": OVERRIDES,
            "runs": runs,
            "summary": summary,
        },
    )
    return summary


def _plot(summary: dict, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [c for c in summary if c != "criteria"]
    fig, ax = plt.subplots(figsize=(max(8, 0.45 * len(cells)), 4.4))
    ax.bar(
        range(len(cells)),
        [summary[c]["accuracy_mean"] for c in cells],
        yerr=[summary[c]["accuracy_spread"] / 2 for c in cells],
        color="tab:blue",
    )
    if "honest" in summary:
        ax.axhline(summary["honest"]["accuracy_mean"] - 0.05, color="grey", ls="--", lw=1, label="honest - 5 points")
        ax.legend()
    ax.set_xticks(range(len(cells)), cells, rotation=40, ha="right", fontsize=8)
    ax.set_ylabel("final server accuracy (mean, bar: spread / 2)")
    ax.set_title("attacks inside the default bounds: the defaults and each opt-in defence (cell name)")
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    setup_env()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", default=",".join(CELLS))
    ap.add_argument("--seeds", type=int, default=3, help="seeds of the opt-in defences' cells (42, 43, ...)")
    ap.add_argument(
        "--criteria-seeds", type=int, default=5, help="seeds of the cells the criteria and their baselines read"
    )
    ap.add_argument("--set", action="append", default=[], help="a config override on every run (repeatable)")
    ap.add_argument("--name", default="attacks", help="results file: benchmarks/results/<name>.json and .png")
    a = ap.parse_args()
    summary = run(
        [c for c in a.cells.split(",") if c],
        [42 + i for i in range(a.seeds)],
        a.set,
        a.name,
        [42 + i for i in range(a.criteria_seeds)],
    )
    print(json.dumps(summary, indent=2))
