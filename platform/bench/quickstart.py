"""``python -m dspark.platform.bench.quickstart``: time the README's two commands from a clean clone.

Clones the repository (its committed HEAD) into a temporary directory and runs ``make demo`` and
``make test`` there with an empty ``DSPARK_CACHE``, exactly as a new user would (the virtual
environment is created from scratch, the demo target is built, the drafter trained). Prints and
records the wall time of each command, the demo target's build time and validation loss (from its
manifest), the drafter's data and training times (from its cache record), the demo's served
completions (its ``N tokens in ... tokens/s`` lines) and its sweep's speed-up line, as the
``quickstart`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["main"]


def _run(cmd: list[str], cwd: Path, env: dict, log: Path) -> float:
    t0 = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise SystemExit(f"`{' '.join(cmd)}` failed with status {proc.returncode}:\n{tail}")
    return seconds


def _drafter_figure(cache: Path) -> str:
    """The demo drafter's cache record (``drafters/*/demo_drafter.json``): how it was made."""
    records = sorted(cache.glob("drafters/*/demo_drafter.json"), key=lambda p: p.stat().st_mtime)
    if not records:
        return "—"
    r = json.loads(records[-1].read_text())
    if "adopted_from" in r:
        return f"trained earlier by `dspark train {r['recipe']}` and reused"
    sec = r.get("seconds", {})
    return (f"{r.get('steps', '?')} steps of `{r['recipe']}`: data {sec.get('data', 0) / 60:.1f} min, "
            f"training {sec.get('train', 0) / 60:.1f} min")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", default=".", help="Repository to clone (default: the current directory).")
    ap.add_argument("--output", default="BENCHMARKS.md", help="Benchmarks file to update.")
    ap.add_argument("--keep", action="store_true", help="Keep the clone and its logs.")
    ap.add_argument("--reuse-cache", default=None, metavar="DIR",
                    help="Use this DSPARK_CACHE (an already built demo target) instead of an empty one; the "
                         "report then says so and the build figures are those of the cached build.")
    args = ap.parse_args(argv)

    from dspark.platform.bench.report import markdown_table, write_section

    repo = Path(args.repo).resolve()
    tmp = Path(tempfile.mkdtemp(prefix="dspark-quickstart-"))
    clone, cache = tmp / "clone", tmp / "cache"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=clone, capture_output=True, text=True).stdout.strip()
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    if args.reuse_cache:
        cache = Path(args.reuse_cache).expanduser().resolve()
    env["DSPARK_CACHE"] = str(cache)
    print(f"clean clone of {repo} at {head} in {clone}", file=sys.stderr)
    print("make demo ...", file=sys.stderr)
    demo_s = _run(["make", "demo"], clone, env, tmp / "demo.log")
    print(f"make demo: {demo_s:.0f} s; make test ...", file=sys.stderr)
    test_s = _run(["make", "test"], clone, env, tmp / "test.log")
    manifest_path = next(cache.glob("demo-target-*/dspark_demo.json"))
    manifest = json.loads(manifest_path.read_text())
    built = time.strftime("%Y-%m-%d %H:%M", time.localtime(manifest_path.stat().st_mtime))
    demo_log = (tmp / "demo.log").read_text(errors="replace")
    tps = re.findall(r"^\d+ tokens in .*tokens/s.*$", demo_log, re.M)
    speedup = re.findall(r"^speculative vs plain: .*$", demo_log, re.M)
    passed = re.findall(r"=+ (.*(?:passed|failed).*) in ", (tmp / "test.log").read_text(errors="replace"))
    fresh = not args.reuse_cache
    rows = [
        ["`make demo` (fresh .venv + " + ("demo target build + drafter training" if fresh else "cached target and drafter")
         + " + serving sweep)", f"{demo_s / 60:.1f} min"],
        ["  of which the demo target build" if fresh else "  the cached demo target's own build",
         f"{manifest['seconds']['total'] / 60:.1f} min "
         f"(tokenizer {manifest['seconds']['tokenizer']:.0f} s, training {manifest['seconds']['train']:.0f} s)"],
        ["  demo target validation loss", f"{manifest['validation_loss']:.4f} nats/token (perplexity "
         f"{manifest['validation_perplexity']:.2f}) over {manifest['validation_tokens']:,} tokens"],
        ["  the drafter" if fresh else "  the cached drafter", _drafter_figure(cache)],
        ["  demo completions (served, openai client)", "; ".join(tps) if tps else "—"],
        ["  demo sweep", speedup[-1] if speedup else "—"],
        ["`make test` (reuses .venv; the whole suite)", f"{test_s / 60:.1f} min ({passed[-1] if passed else '?'})"],
    ]
    table = markdown_table(["step", "figure"], rows)
    print(table)
    cache_note = ("an empty `DSPARK_CACHE`" if not args.reuse_cache else
                  f"the demo target reused from a cache (built {built}; its build figures "
                  f"below are that build's) and its drafter cache, so `make demo` here is install + serving sweep")
    body = (f"From a clean clone (commit {head}) with {cache_note}, the README's two commands, run one "
            f"after the other as a new user would.\n\n{table}\n")
    write_section(args.output, "quickstart", "Quick start: the README's two commands", body,
                  command="python -m dspark.platform.bench.quickstart" + (f" --reuse-cache {args.reuse_cache}" if args.reuse_cache else ""))
    if not args.keep:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    else:
        print(f"kept {tmp}", file=sys.stderr)


if __name__ == "__main__":
    main()
