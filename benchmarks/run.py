"""Run fedlora's performance benchmarks and write benchmarks/results/*.json, plots and a summary.

    .venv/bin/python -m benchmarks                 # everything, about 4 minutes on 2 CPU cores
    .venv/bin/python -m benchmarks wire,aggregation
    .venv/bin/python -m benchmarks throughput --device cuda
    .venv/bin/python -m benchmarks --report        # regenerate summary.md and the table in docs/benchmarks.md only

Each figure is a ratio to a limit or to a baseline measured in the same run (machines are noisy).
"""

from __future__ import annotations

import argparse
import json
import time

from benchmarks.common import RESULTS, ROOT, setup_env

ALL = ["wire", "aggregation", "robust", "privacy", "hetlora_coverage", "throughput", "overhead", "scale"]
# deploy: real processes, ~7 minutes; causal: decoder LMs, ~5 minutes; server_scale: 7B-shaped rounds of up to
# 1,000 replies, ~20 minutes; cohort: 10,000 virtual clients, ~15 minutes (--only NAME)
EXTRA = ["deploy", "causal", "server_scale", "cohort", "dp_cohorts"]
START, END = "<!-- benchmarks:start -->", "<!-- benchmarks:end -->"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(ALL), help=f"comma-separated subset of {ALL}")
    ap.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    ap.add_argument("--device", default="cpu", help="device for the throughput and causal benchmarks (cpu or cuda)")
    ap.add_argument("--report", action="store_true", help="only regenerate the summary from existing JSON")
    args = ap.parse_args()
    setup_env()
    if not args.report:
        for name in [n.strip() for n in args.only.split(",") if n.strip()]:
            if name not in ALL + EXTRA:
                raise SystemExit(f"unknown benchmark {name!r}; choose from {ALL + EXTRA}")
            t0 = time.perf_counter()
            print(f"[benchmark] {name} ...", flush=True)
            module = __import__(f"benchmarks.{name}", fromlist=["run"])
            if name in ("throughput", "causal"):
                module.run(quick=args.quick, device=args.device)
            else:
                module.run(quick=args.quick)
            print(f"[benchmark] {name} done in {time.perf_counter() - t0:.0f}s", flush=True)
    text = report()
    print(text)


def _load(name: str) -> dict | None:
    p = RESULTS / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def report() -> str:
    lines = []
    wire = _load("wire")
    if wire:
        m = wire["machine"]
        lines.append(
            f"Measured {m['date']} on {m['cpus']} CPU cores ({m['platform']}), torch {m['torch']}, "
            f"flwr {m.get('flwr', '?')}, by `python -m benchmarks`.\n"
        )
        worst = max(r["ratio-up"] for r in wire["rows"])
        lines.append("| figure | measured | goal |")
        lines.append("|---|---|---|")
        lines.append(
            f"| wire: message bytes / raw factor bytes, upload, worst of {len(wire['rows'])} strategy x dtype cells "
            f"({wire['model']}) | {worst:.4f} | <= {wire['goal']} |"
        )
        fedit = next(r for r in wire["rows"] if r["strategy"] == "fedit" and r["dtype"] == "float32")
        lines.append(
            f"| wire: full-model FedAvg message / FedIT float32 message | {fedit['full-model-over-ours']:.0f}x "
            f"({wire['full_model_fedavg']['message']:,} B vs {fedit['message-up']:,} B) | - |"
        )
    ov = _load("overhead")
    if ov:
        lines.append(
            f"| overhead: `fedlora simulate` round / bare PyTorch+PEFT loop, {ov['clients_per_round']} clients per round "
            f"| {ov['ratio']:.3f} ({ov['sim_steady_round_seconds']:.2f} s vs {ov['bare_mean']:.2f} s) | <= {ov['goal']} |"
        )
    agg = _load("aggregation")
    if agg:
        for key, v in agg["linearity"].items():
            lines.append(
                f"| aggregation: FedIT time at {int(v['clients_ratio'] * 10)} / at 10 clients ({key}) "
                f"| {v['fedit_time_ratio']:.1f}x for {v['clients_ratio']:.0f}x clients | linear |"
            )
    rb = _load("robust")
    if rb:
        for r in rb["rows"]:
            lines.append(
                f"| robust options, server ms per round at {r['clients']} clients (MiniLM r=8): mean / median / "
                f"trimmed mean / norm clip / full reply validation | {1000 * r['mean_s']:.1f} / "
                f"{1000 * r['median_s']:.1f} / {1000 * r['trimmed_mean_s']:.1f} / {1000 * r['norm_clip_s']:.1f} / "
                f"{1000 * r['validate_s']:.1f} | - |"
            )
    pv = _load("privacy")
    if pv:
        st = pv["seconds_per_step"]
        lines.append(
            f"| DP-SGD (Opacus hook on fedlora's training loop) / non-private, seconds per step, MiniLM r=8, "
            f"batch 16, CPU | {pv['dp_sgd_over_plain']:.2f}x ({st['dp-sgd']:.3f} s vs {st['lora']:.3f} s) | "
            f"<= {pv['goal']} |"
        )
        sv = pv["server"]
        lines.append(
            f"| client-level DP release / plain mean, server, {sv['clients']} MiniLM-sized updates | "
            f"{sv['ratio']:.1f}x ({1000 * sv['dp_release_s']:.0f} ms vs {1000 * sv['plain_mean_s']:.0f} ms) | - |"
        )
    dp = _load("deploy")
    if dp:
        sim, res, cold = dp["rows"]
        lines.append(
            f"| deployment / simulation, seconds per round, same config ({dp['clients']} clients, MiniLM, TLS + node "
            f"auth, loopback) | {dp['per_round_deploy_over_sim']:.2f}x ({res['per_round_s']:.1f} s vs "
            f"{sim['per_round_s']:.1f} s); Flower's per-message processes {dp['per_round_cold_over_resident']:.2f}x "
            f"the resident executor; client peak RSS {res['client_peak_rss_mb']:.0f} MB | - |"
        )
    cz = _load("causal")
    if cz:
        for r in cz["local"]:
            lines.append(
                f"| causal LM training step, {r['model']} (random init) LoRA r=16 on every projection, batch "
                f"{r['batch']}, {r['device']} | {r['seconds-per-step']:.3f} s/step, {r['tokens-per-second']:,.0f} "
                f"tokens/s, peak {r['peak-memory-bytes'] / 2**20:,.0f} MiB ({r['peak-memory-kind'].split(' (')[0]}) | - |"
            )
        if cz.get("machine-load"):
            lines.append(f"| (causal rows: {cz['machine-load']}) | | |")
        fed = cz["federation"]
        rows = [r for r in fed["rows"] if r.get("server-loss") is not None]
        lines.append(
            f"| causal LM federation ({fed['config']}): held-out loss round 0 -> {rows[-1]['round']}, "
            f"s/round | {rows[0]['server-loss']:.2f} -> {rows[-1]['server-loss']:.2f}, "
            f"{sum(fed['seconds-per-round']) / len(fed['seconds-per-round']):.0f} s | falls |"
        )
    hc = _load("hetlora-coverage")
    if hc:
        lines.append(
            f"| HetLoRA, 3 of 10 clients (ranks 2-8) sampled per round, {hc['rounds']} rounds: dead rank components "
            f"(A row and B column both zero) | paper formula {hc['dead_components_paper_formula'][-1]}/"
            f"{hc['components_total']}, keep_uncovered {hc['dead_components_keep_uncovered'][-1]}/"
            f"{hc['components_total']} | 0 |"
        )
    sc = _load("scale")
    if sc:
        a, b = sc["rows"]
        lines.append(
            f"| scale: peak RSS 1000 / 100 virtual clients (10 sampled per round) | {sc['rss_ratio_1000_over_100']:.3f} "
            f"({b['peak_rss_mb']:.0f} MB vs {a['peak_rss_mb']:.0f} MB) | flat (~1.0) |"
        )
        lines.append(
            f"| scale: seconds per round 1000 / 100 clients | {sc['round_time_ratio_1000_over_100']:.3f} "
            f"({b['seconds_per_round']:.2f} s vs {a['seconds_per_round']:.2f} s) | - |"
        )
    ss = _load("server_scale")
    if ss:
        fedit = {r["clients"]: r for r in ss["rows"] if r["strategy"] == "fedit"}
        if 10 in fedit and 1000 in fedit:
            a, b = fedit[10], fedit[1000]
            lines.append(
                f"| server at scale: peak RSS, 1,000 / 10 distinct 7B-shaped FedIT replies (r=16, q,v, 32 layers), "
                f"real strategy path | {b['peak_rss_mb'] / a['peak_rss_mb']:.3f} ({b['peak_rss_mb']:.0f} MB vs "
                f"{a['peak_rss_mb']:.0f} MB; +{b['increase_mb']:.0f} MB over the idle server) | <= 1.2; <= 1 GB |"
            )
        flex = {
            r["clients"]: r for r in ss["rows"] if r["strategy"] == "flexlora" and not r.get("exact_truncation_error")
        }
        if 31 in flex and 32 in flex:
            a, b = flex[31], flex[32]
            lines.append(
                f"| server at scale: FlexLoRA peak RSS, 31 / 32 7B-shaped replies (either side of "
                f"hetero.sketch_from_clients) | {a['peak_rss_mb'] / b['peak_rss_mb']:.3f} ({a['peak_rss_mb']:.0f} MB "
                f"vs {b['peak_rss_mb']:.0f} MB; {a.get('product_fold')} / {b.get('product_fold')}) | <= 1.2 |"
            )
        if 1000 in flex:
            r = flex[1000]
            lines.append(
                f"| server at scale: FlexLoRA round, 1000 7B-shaped replies of ranks 4-16, {r.get('product_fold')} "
                f"(server seconds, reply generation excluded; peak RSS) | {r['server_seconds']:.1f} s; "
                f"{r['peak_rss_mb']:.0f} MB | - |"
            )
        for r in ss["rows"]:
            if r.get("exact_truncation_error") is not None:
                lines.append(
                    f"| server at scale: FlexLoRA sketch vs exact at {r['clients']} clients: relative error of the "
                    f"rank-16 result against the exact summed update, sketch / exact SVD (estimate) | "
                    f"{r['sketch_error']:.4f} / {r['exact_truncation_error']:.4f} ({r['sketch_error_estimate']:.4f}); "
                    f"sketch vs exact FlexLoRA {r['sketch_vs_exact_flexlora']:.4f} | - |"
                )
    sq = _load("sketch_quality")
    if sq:
        worst = sq["worst_ratio_by_oversampling"]
        lines.append(
            f"| sketch quality: sketch / exact rank-16 truncation error, worst of 3 noise levels x 3 sketch seeds "
            f"({sq['shape']}), by hetero.sketch_oversampling | "
            + ", ".join(f"{k}: {v:.3f}" for k, v in worst.items())
            + f" | <= 1.25 at the default ({sq.get('default_oversampling')}) |"
        )
        rounds = sq.get("default_rounds", [])
        if rounds:
            lines.append(
                f"| sketch quality: the same replies through the round's own fold at the default settings | "
                f"{', '.join(sorted({d['product_fold'] for d in rounds}))}, worst ratio "
                f"{max(d['ratio'] for d in rounds):.3f} | <= 1.25 |"
            )
    at = _load("attacks")
    if at:
        wanted = {c["cell"]: (name, c["met"]) for name, c in at["summary"].get("criteria", {}).items()}
        for cell, v in at["summary"].items():
            if cell == "criteria":
                continue
            name, met = wanted.get(cell, ("", None))
            against = [
                ("honest", v.get("accuracy_vs_honest")),
                (v.get("baseline"), v.get("accuracy_vs_baseline")),
                (v.get("absent"), v.get("accuracy_vs_absent")),
            ]
            versus = "; ".join(f"{d:+.3f} vs {base}" for base, d in against if d is not None) or "-"
            if "max_loss_over_honest_round1" in v:
                versus += f"; worst loss {v['max_loss_over_honest_round1']:.2f}x the honest round 1"
            lines.append(
                f"| attacks inside the default bounds (default task, {v['seeds']} seeds): {cell}, final accuracy "
                f"mean (spread), paired difference | {v['accuracy_mean']:.3f} ({v['accuracy_spread']:.3f}), "
                f"{versus} | " + (f"{name}: {'met' if met else 'NOT met'}" if name else "-") + " |"
            )
    co = _load("cohort")
    if co:
        for r in co["rows"]:
            lines.append(
                f"| simulation cohort: {r['clients']:,} virtual clients, {r['sampled_per_round']:,} per round (MiniLM, "
                f"one step each): peak RSS, s/round, server share | {r['peak_rss_mb']:.0f} MB, "
                f"{r['seconds_per_round']:.1f} s, {100 * r['server_share']:.1f}% | share <= 10% |"
            )
    for dev in ("cpu", "cuda"):
        tp = _load(f"throughput-{dev}")
        if tp:
            cells = ", ".join(
                f"{r['mode']} {r['examples_per_second']:.0f} ({r['relative_to_lora']:.2f}x)" for r in tp["rows"]
            )
            where = (
                tp["machine"].get("gpu", f"{tp['machine']['cpus']} CPU cores")
                if dev == "cuda"
                else f"{tp['threads']} CPU threads"
            )
            lines.append(f"| throughput ({where}), examples/s, batch {tp['batch_size']} | {cells} | - |")
    if agg:
        lines.append("\nAggregation seconds (server, pure functions the strategies call):\n")
        lines.append("| shape | rank | clients | FedIT | FedSA | FLoRA stack | FlexLoRA SVD |")
        lines.append("|---|---|---|---|---|---|---|")
        for c in agg["rows"]:

            def f(v):
                return "skipped" if v is None else f"{v:.4f}"

            lines.append(
                f"| {c['shape']} | {c['rank']} | {c['clients']} | {f(c['fedit_s'])} | {f(c['fedsa_s'])} | "
                f"{f(c['flora_stack_s'])} | {f(c['flexlora_svd_s'])} |"
            )
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "summary.md").write_text(text)
    page = ROOT / "docs" / "benchmarks.md"
    src = page.read_text()
    if START in src and END in src:
        head, rest = src.split(START, 1)
        _, tail = rest.split(END, 1)
        page.write_text(f"{head}{START}\n{text}{END}{tail}")
    return text


if __name__ == "__main__":
    main()
