"""``dspark bench drafters``: τ of several evaluated drafters side by side, with DSpark's ratios.

Reads the ``eval.json`` files written by ``dspark eval`` (one per drafter, same data sets and
temperatures) and tabulates τ per (data set, temperature), plus τ_DSpark / τ_other for every
other drafter — the paper's headline comparison (its targets: ≥ 1.3 over EAGLE-3, ≥ 1.2 over
DFlash).
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["load_evals", "render_markdown"]


def load_evals(paths: list[Path]) -> dict[str, dict]:
    """label -> eval dict; the label is the run name (the directory above ``eval.json``)."""
    out = {}
    for p in paths:
        p = Path(p)
        f = p / "eval.json" if p.is_dir() else p
        if not f.is_file():
            raise FileNotFoundError(f"{f} does not exist (run `dspark eval` first)")
        out[f.parent.name] = json.loads(f.read_text())
    return out


def _tau(ev: dict) -> dict[tuple[str, float], float]:
    return {(r["data"], float(r["temperature"])): r["tau"] for r in ev["runs"]}


def render_markdown(evals: dict[str, dict], reference_kind: str = "dspark") -> str:
    from dspark.platform.bench.report import markdown_table

    keys = sorted({k for ev in evals.values() for k in _tau(ev)})
    headers = ["drafter", "kind", "γ"] + [f"τ {d} T={t:g}" for d, t in keys]
    rows = [[name, ev["kind"], ev["gamma"]] + [f"{_tau(ev).get(k, float('nan')):.3f}" for k in keys]
            for name, ev in evals.items()]
    out = markdown_table(headers, rows)
    refs = [(n, ev) for n, ev in evals.items() if ev["kind"] == reference_kind]
    if refs:
        ref_name, ref = refs[0]
        ratio_rows = []
        for name, ev in evals.items():
            if name == ref_name:
                continue
            ratio_rows.append([f"{ref_name} / {name}"] + [
                f"{_tau(ref)[k] / _tau(ev)[k]:.3f}" if k in _tau(ref) and k in _tau(ev) and _tau(ev)[k] else "—" for k in keys
            ])
        out += "\n\n" + markdown_table(["τ ratio"] + [f"{d} T={t:g}" for d, t in keys], ratio_rows)
    return out
