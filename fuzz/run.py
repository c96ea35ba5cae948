"""Run fuzz targets and report: ``python -m fuzz.run [--runs N] [--out DIR] [TARGET...]``.

Each target runs as its own libFuzzer process (``-runs=N``, a 10 s per-input timeout for
hangs, a 1 GiB RSS limit), with its corpus and any crashing input kept in ``DIR/TARGET``.
With ``--max-time`` a target may stop short of N. The table shows inputs run, coverage
(libFuzzer's ``cov`` edges and ``ft`` features), RSS at the first status line and at the
end (memory growth), time and the verdict.
Exit status 1 if any target failed.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fuzz.harness import SCRATCH

TARGETS = ["device", "uapi", "discovery_server", "discovery_client", "config", "labrecord",
           "nodeapi", "gate", "segment", "plane"]
REPO = Path(__file__).resolve().parent.parent
_STATUS = re.compile(r"^#(\d+)\s+(\w+)\s+cov: (\d+) ft: (\d+).*?rss: (\d+)Mb")


def run_target(name: str, runs: int, out: Path, max_time: int) -> dict[str, object]:
    """One target's libFuzzer run; its figures and verdict."""
    work = out / name
    corpus = work / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", f"fuzz.{name}", f"-runs={runs}", "-timeout=10",
            "-rss_limit_mb=1024", f"-artifact_prefix={work}/", "-print_final_stats=1",
            f"-max_total_time={max_time}", str(corpus)]
    started = time.monotonic()
    env = {**os.environ, SCRATCH: str(work / "scratch")}
    # atheris prints a Python exception (a property failure) on stdout, libFuzzer on stderr
    done = subprocess.run(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env=env)
    log, code = done.stdout, done.returncode
    (work / "log.txt").write_text(log)
    statuses = [m for line in log.splitlines() if (m := _STATUS.match(line))]
    last = statuses[-1] if statuses else None
    crashes = sorted(p.name for p in work.glob("crash-*")) + sorted(
        p.name for p in work.glob("timeout-*")) + sorted(p.name for p in work.glob("oom-*"))
    return {
        "target": name,
        "inputs": int(last.group(1)) if last else 0,
        "cov": int(last.group(3)) if last else 0,
        "ft": int(last.group(4)) if last else 0,
        "rss_first": int(statuses[0].group(5)) if statuses else 0,
        "rss_last": int(last.group(5)) if last else 0,
        "seconds": round(time.monotonic() - started, 1),
        "ok": code == 0 and not crashes and "Done " in log,
        "crashes": crashes,
        "tail": "\n".join(log.splitlines()[-25:]) if code else "",
    }


def main() -> int:
    parser = argparse.ArgumentParser(prog="fuzz.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("targets", nargs="*", default=TARGETS, metavar="TARGET")
    parser.add_argument("--runs", type=int, default=10_000, help="inputs per target")
    parser.add_argument("--out", type=Path, default=None, help="corpora, crashes and logs")
    parser.add_argument("--max-time", type=int, default=0, metavar="S",
                        help="stop a target after S seconds, short of --runs (0: no limit)")
    args = parser.parse_args()
    unknown = [name for name in args.targets if name not in TARGETS]
    if unknown:  # before any run or temp directory; it failed as "FAIL exit" before
        parser.error(f"unknown target {', '.join(unknown)} (targets: {', '.join(TARGETS)})")
    out = args.out or Path(tempfile.mkdtemp(prefix="uspan-fuzz-run-"))
    failed = False
    print(f"{'target':18} {'inputs':>9} {'cov':>5} {'ft':>5} {'rss MB':>11} {'s':>7}  verdict")
    for name in args.targets:
        r = run_target(name, args.runs, out, args.max_time)
        verdict = "ok" if r["ok"] else f"FAIL {' '.join(r['crashes']) or 'exit'}"  # type: ignore[arg-type]
        print(f"{name:18} {r['inputs']:>9} {r['cov']:>5} {r['ft']:>5} "
              f"{r['rss_first']:>5}->{r['rss_last']:<5} {r['seconds']:>7}  {verdict}",
              flush=True)
        if not r["ok"]:
            failed = True
            print(r["tail"], file=sys.stderr)
    print(f"corpora, crashes and logs: {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
