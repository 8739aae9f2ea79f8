"""A real Prometheus for the integration test, found or fetched without root.

Order: ``prometheus`` (and ``promtool``) on PATH; else a copy cached under
``$DSPARK_CACHE/prometheus`` (default ``~/.cache/dspark/prometheus``); else Debian's package,
fetched with ``apt-get download`` (no root needed: it only writes the .deb into the working
directory) and unpacked with ``dpkg-deb -x``, its two binaries copied into the cache. If none of
that works the tests that need it are skipped, with the reason.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class PrometheusBinaries:
    prometheus: Path
    promtool: Path | None
    source: str  # "PATH", "cache" or "apt-get download"


def _cache_dir() -> Path:
    env = os.environ.get("DSPARK_CACHE")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "dspark") / "prometheus"


def _works(path: Path) -> bool:
    try:
        return subprocess.run([str(path), "--version"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _from_cache(bin_dir: Path) -> PrometheusBinaries | None:
    prom, tool = bin_dir / "prometheus", bin_dir / "promtool"
    if prom.is_file() and _works(prom):
        return PrometheusBinaries(prom, tool if tool.is_file() else None, "cache")
    return None


def _fetch_debian_package(cache: Path) -> tuple[PrometheusBinaries | None, str]:
    """Download and unpack Debian's prometheus package into ``cache/bin`` (under a file lock, so
    concurrent test runs fetch once). Returns (binaries, "") or (None, why not)."""
    if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
        return None, "no prometheus on PATH and no apt-get/dpkg-deb to fetch Debian's package"
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = _from_cache(cache / "bin")  # another run may have fetched it meanwhile
        if found is not None:
            return found, ""
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            try:
                dl = subprocess.run(["apt-get", "download", "prometheus"], cwd=tmp, capture_output=True, text=True,
                                    timeout=300)
            except subprocess.TimeoutExpired:
                return None, "apt-get download prometheus timed out"
            debs = sorted(Path(tmp).glob("prometheus_*.deb"))
            if dl.returncode != 0 or not debs:
                why = (dl.stderr.strip().splitlines() or ["no .deb"])[-1]
                return None, f"apt-get download prometheus failed ({why}); install prometheus or run apt-get update"
            out = Path(tmp) / "x"
            ex = subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(out)], capture_output=True, text=True, timeout=300)
            if ex.returncode != 0:
                return None, f"dpkg-deb -x failed: {ex.stderr.strip()[-200:]}"
            staged = Path(tmp) / "bin"
            staged.mkdir()
            for name in ("prometheus", "promtool"):
                src = out / "usr" / "bin" / name
                if src.is_file():
                    shutil.copy2(src, staged / name)
            if (cache / "bin").exists():
                shutil.rmtree(cache / "bin")
            staged.rename(cache / "bin")  # atomic: a half-copied bin/ is never visible
        found = _from_cache(cache / "bin")
        if found is None:
            return None, "the prometheus binary from Debian's package does not run here"
        return PrometheusBinaries(found.prometheus, found.promtool, "apt-get download"), ""


def find_prometheus() -> tuple[PrometheusBinaries | None, str]:
    on_path = shutil.which("prometheus")
    if on_path and _works(Path(on_path)):
        tool = shutil.which("promtool")
        return PrometheusBinaries(Path(on_path), Path(tool) if tool else None, "PATH"), ""
    cache = _cache_dir()
    found = _from_cache(cache / "bin")
    if found is not None:
        return found, ""
    return _fetch_debian_package(cache)


@pytest.fixture(scope="session")
def prometheus_binaries() -> PrometheusBinaries:
    found, why = find_prometheus()
    if found is None:
        pytest.skip(f"no Prometheus available: {why}")
    return found
