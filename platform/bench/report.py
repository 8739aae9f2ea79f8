"""BENCHMARKS.md: one section per benchmark, rewritten in place each time it runs.

A section sits between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->`` and always states
the command that produced it, the machine and the date, so a figure is never separated from
how it was measured. Other sections (and any hand-written text outside the markers) are kept.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import shlex
import sys
from pathlib import Path

__all__ = ["machine_description", "invocation", "write_section", "markdown_table"]


def machine_description() -> str:
    """E.g. ``2 CPU cores (x86_64), 23.4 GiB RAM, no GPU; torch 2.13.0+cpu, Python 3.11.9``."""
    import torch

    mem = ""
    try:
        with open("/proc/meminfo") as f:
            kb = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
        mem = f", {kb / 2**20:.1f} GiB RAM"
    except (OSError, StopIteration, ValueError):
        pass
    if torch.cuda.is_available():
        gpu = f"{torch.cuda.device_count()}× {torch.cuda.get_device_name(0)}"
    else:
        gpu = "no GPU"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (
        f"{cores} CPU cores ({platform.machine()}){mem}, {gpu}; "
        f"torch {torch.__version__}, Python {platform.python_version()}"
    )


def invocation() -> str:
    """The command line as typed (``dspark ...``), for the report."""
    prog = Path(sys.argv[0]).name
    return " ".join([prog, *map(shlex.quote, sys.argv[1:])])


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def write_section(path: str | Path, name: str, title: str, body: str, command: str | None = None) -> Path:
    """Create or replace section ``name`` of the benchmarks file at ``path``."""
    path = Path(path)
    date = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    block = (
        f"<!-- bench:{name} -->\n## {title}\n\n"
        f"- command: `{command or invocation()}`\n- machine: {machine_description()}\n- date: {date}\n\n"
        f"{body.strip()}\n<!-- /bench:{name} -->"
    )
    text = path.read_text() if path.exists() else "# Benchmarks\n\nFigures written by the benchmark commands; each section says how it was produced.\n"
    pattern = re.compile(rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _m: block, text)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
    return path
