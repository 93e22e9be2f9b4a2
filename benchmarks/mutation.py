"""Mutation testing of the factor maths, the wire codec and the strategies (mutmut).

mutmut keys mutants by module path, so the strategies must be mutated where they are imported
from: ``fedlora.strategies``. This script lays the source out as the installed package
(``fedlora/strategies/``, ``fedlora/clients/``, ``fedlora/server/``) in a scratch folder, runs
``mutmut run`` there against the tests that check these modules numerically, and records the
score per module in ``benchmarks/results/mutation.json``: one current entry per module, with the
commit and date of the run that produced it (a run of one group, ``--only``, replaces only its
modules' entries), and prints a table.

    python -m benchmarks.mutation              # the working tree (~15 minutes on 2 cores)
    python -m benchmarks.mutation --only robust  # one group: the targets whose path contains it
    python -m benchmarks.mutation --recheck /tmp/fedlora-mutation-XXXX --match lora_math --sample 20
                                                # rerun a sample of an earlier run's timeouts, alone
    python -m benchmarks.mutation --collect /tmp/fedlora-mutation-XXXX
                                                # record a finished run's scratch folder

What is mutated: ``fedlora/aggregation/folds.py``, ``product_sums.py`` and ``share_cap.py`` (the server's folds; their
tests: tests/test_folds.py), ``bound.py`` (the robust layer's round bounds; tests/test_robust.py), ``trust.py`` (the trust scores' stage; the server's own training is a
federation test), the plug-in methods' maths (``fedlora/methods/_*.py``; their tests but
those marked ``federation``), ``fedlora/lora_math.py``, ``fedlora/codec.py``, ``fedlora/robust.py``,
``fedlora/validation.py``, the causal-LM task's token and answer functions (``fedlora/tasks/``;
their dataset and model plumbing is left to tests/test_causal.py, whose simulations cannot run per
mutant, and shows as "no tests") and every strategy file except ``base.py``, whose Grid orchestration
(sampling, messages, setup) is exercised by the Flower simulation tests, which take seconds per
run and so cannot run once per mutant.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MUTMUT = str(Path(sys.executable).with_name("mutmut"))
TARGETS = [
    "fedlora/lora_math.py",
    "fedlora/codec.py",
    "fedlora/robust.py",
    "fedlora/validation.py",
    "fedlora/strategies/fedit.py",
    "fedlora/strategies/fedsa.py",
    "fedlora/strategies/ffa.py",
    "fedlora/strategies/hetlora.py",
    "fedlora/strategies/flora.py",
    "fedlora/strategies/flexlora.py",
    "fedlora/tasks/causal_maths.py",
    "fedlora/tasks/evaluation.py",
    "fedlora/continual/penalties.py",
    "fedlora/continual/metrics.py",
    "fedlora/continual/routing.py",
    "fedlora/aggregation/folds.py",
    "fedlora/aggregation/product_sums.py",
    "fedlora/aggregation/share_cap.py",
    "fedlora/aggregation/trust.py",
    "fedlora/aggregation/bound.py",
    "fedlora/methods/_fedprox.py",
    "fedlora/methods/_ewc.py",
    "fedlora/methods/_lwf.py",
]
TESTS = [
    "tests/test_lora_math.py",
    "tests/test_factors_codec.py",
    "tests/test_strategy_maths.py",
    "tests/test_strategies.py",
    "tests/test_robust.py",
    "tests/test_trust.py",
    "tests/test_validation.py",
    "tests/test_causal_maths.py",
    "tests/test_continual_maths.py",
    "tests/test_folds.py",
    "tests/test_fedprox.py",
    "tests/test_ewc.py",
    "tests/test_lwf.py",
]


def stage(ref: str | None, dest: Path, only: str = "") -> None:
    """The package laid out as installed: fedlora/{clients,server,strategies}, plus tests/."""
    src = dest / "_src"
    if ref:
        src.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", ref], cwd=ROOT, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    else:
        src = ROOT
    shutil.copytree(src / "fedlora", dest / "fedlora", ignore=shutil.ignore_patterns("__pycache__"))
    for sub in ("clients", "server", "strategies"):
        shutil.copytree(src / sub, dest / "fedlora" / sub, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(src / "tests", dest / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    targets = [t for t in TARGETS if (dest / t).exists() and only in t]
    tests = [t for t in TESTS if (dest / t).exists()]
    (dest / "pyproject.toml").write_text(
        "[tool.pytest.ini_options]\n"
        'pythonpath = ["tests"]\naddopts = "-p no:cacheprovider"\n'
        'filterwarnings = ["ignore::DeprecationWarning", "ignore::FutureWarning"]\n\n'
        "[tool.mutmut]\n"
        f"source_paths = {json.dumps(targets)}\n"
        f"pytest_add_cli_args_test_selection = {json.dumps(tests)}\n"
        'also_copy = ["fedlora/"]\n'
        # A test marked `federation` runs a whole (in-process) federation: seconds, too long per mutant.
        'pytest_add_cli_args = ["-q", "-x", "-m", "not federation"]\n'
        # A loaded 2-core machine slows tests several-fold: a tight timeout would count slowness as a kill.
        "timeout_multiplier = 10.0\n"
    )
    if ref:
        shutil.rmtree(src)


def run(ref: str | None, only: str = "") -> tuple[dict, Path]:
    """Mutate the targets (those whose path contains ``only``) at ``ref`` (or the working tree):
    the score per module, and the scratch folder the run left."""
    work = Path(tempfile.mkdtemp(prefix="fedlora-mutation-"))
    stage(ref, work, only)
    (work / REF_FILE).write_text(_commit(ref))  # read back by --collect
    import os

    # The tests read ../shared/data beside the checkout, not beside the scratch folder they run from.
    env = {**os.environ, "FEDLORA_HYPOTHESIS": "mutation", "FEDLORA_SHARED_DATA": str(ROOT.parent / "shared" / "data")}
    subprocess.run([MUTMUT, "run", "--max-children", "2"], cwd=work, check=False, stdout=subprocess.DEVNULL, env=env)
    return scores(work), work


def scores(scratch: Path) -> dict:
    """Per module of a mutmut scratch folder: mutants, killed, score (killed / mutants), the score
    counting timeouts as kills, and the count of every other verdict."""
    out = subprocess.run([MUTMUT, "results", "--all", "true"], cwd=scratch, capture_output=True, text=True).stdout
    per_module: dict[str, Counter] = {}
    for line in out.splitlines():
        m = re.match(r"\s*([\w.]+?)\.x.*__mutmut_\d+: (.+)$", line)
        if m:
            per_module.setdefault(m.group(1), Counter())[m.group(2).strip()] += 1
    report = {}
    for module, c in sorted(per_module.items()):
        total = sum(c.values())
        killed = c.get("killed", 0)
        report[module] = {
            "mutants": total,
            "killed": killed,
            "score": killed / total if total else None,
            "score-counting-timeouts": (killed + c.get("timeout", 0)) / total if total else None,
            **{k: v for k, v in c.items() if k != "killed"},
        }
    return report


RESULT = ROOT / "benchmarks" / "results" / "mutation.json"
REF_FILE = "fedlora-ref.txt"  # in a scratch folder: the commit its run mutated


def record(entries: dict) -> None:
    """Each module's entry in results/mutation.json replaced by ``entries``' (the others kept, but
    for modules that are no longer mutation targets: moved or renamed, their score is history)."""
    current = json.loads(RESULT.read_text()) if RESULT.exists() else {"modules": {}}
    targets = {t.removesuffix(".py").replace("/", ".") for t in TARGETS}
    merged = {**current["modules"], **entries}
    current["modules"] = dict(sorted((k, v) for k, v in merged.items() if k in targets))
    RESULT.write_text(json.dumps(current, indent=1) + "\n")


def _commit(ref: str | None) -> str:
    head = subprocess.run(["git", "rev-parse", "--short", ref or "HEAD"], cwd=ROOT, capture_output=True, text=True)
    staged = ["fedlora", "clients", "server", "strategies", "tests"]  # what stage() copies
    dirty = not ref and subprocess.run(["git", "diff", "--quiet", "--", *staged], cwd=ROOT).returncode
    return head.stdout.strip() + ("+working-tree" if dirty else "")


def recheck_timeouts(scratch: Path, match: str, sample: int, limit: float, seed: int = 0) -> dict:
    """Rerun mutants mutmut marked 'timeout' (or 'survived'), one at a time, with nothing else on
    the machine and ``limit`` seconds each: a mutant whose tests fail is killed (the tests caught it;
    typically hypothesis spent the time shrinking the failing example), one whose tests pass is a
    survivor, one still running after ``limit`` seconds is a hang (also a kill: the suite never passes)."""
    import os
    import random

    out = subprocess.run([MUTMUT, "results", "--all", "true"], cwd=scratch, capture_output=True, text=True).stdout
    names = [
        m.group(1)
        for line in out.splitlines()
        if (m := re.match(r"\s*(\S+__mutmut_\d+): timeout$", line)) and match in m.group(1)
    ]
    chosen = sorted(random.Random(seed).sample(names, min(sample, len(names))))
    tests = re.search(r"pytest_add_cli_args_test_selection = (\[.*\])", (scratch / "pyproject.toml").read_text())
    env = {**os.environ, "FEDLORA_HYPOTHESIS": "mutation"}
    verdicts: dict[str, str] = {}
    for name in chosen:
        try:
            res = subprocess.run(
                [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *json.loads(tests.group(1))],
                cwd=scratch / "mutants",
                capture_output=True,
                env={**env, "MUTANT_UNDER_TEST": name},
                timeout=limit,
            )
            verdicts[name] = "killed" if res.returncode != 0 else "survived"
        except subprocess.TimeoutExpired:
            verdicts[name] = "hang"
        print(f"  {name}: {verdicts[name]}", flush=True)
    return {
        "scratch": str(scratch),
        "match": match,
        "timeouts": len(names),
        "rechecked": len(chosen),
        "limit-seconds": limit,
        "verdicts": verdicts,
        "counts": dict(Counter(verdicts.values())),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recheck", default=None, help="a scratch folder of an earlier run: rerun its timeouts")
    ap.add_argument("--match", default="", help="with --recheck: only mutants whose name contains this")
    ap.add_argument("--sample", type=int, default=20, help="with --recheck: how many timeouts to rerun")
    ap.add_argument("--limit", type=float, default=300.0, help="with --recheck: seconds per mutant")
    ap.add_argument("--ref", default=None, help="a git commit to test instead of the working tree")
    ap.add_argument("--only", default="", help="mutate only the targets whose path contains this, e.g. flora")
    ap.add_argument("--collect", default=None, help="record the scores of a finished run's scratch folder")
    args = ap.parse_args()
    if args.recheck:
        res = recheck_timeouts(Path(args.recheck), args.match, args.sample, args.limit)
        counts = res.pop("counts")
        rechecked = {**counts, "of": res["rechecked"]}
        modules = json.loads(RESULT.read_text())["modules"]
        record({m: {**e, "timeouts-rechecked": rechecked} for m, e in modules.items() if args.match in m})
        print(json.dumps(counts), f"of {res['rechecked']} rechecked ({res['timeouts']} timeouts)")
        return
    if args.collect:
        scratch = Path(args.collect)
        result = scores(scratch)
        ref_file = scratch / REF_FILE
        ref = ref_file.read_text() if ref_file.exists() else "unknown (collected)"
    else:
        result, scratch = run(args.ref, args.only)
        ref = (scratch / REF_FILE).read_text()
    date = datetime.date.today().isoformat()
    record({m: {**r, "ref": ref, "date": date} for m, r in result.items()})
    print(f"mutation score, {ref} (scratch {scratch}):")
    for module, r in result.items():
        score = "-" if r["score"] is None else f"{100 * r['score']:.1f}%"
        print(f"  {module:32s} {r['killed']:4d}/{r['mutants']:4d} killed  {score}  {r}")


if __name__ == "__main__":
    main()
