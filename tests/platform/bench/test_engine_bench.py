"""``dspark bench engine`` end to end on the fixture demo target, and the BENCHMARKS.md writer."""

from __future__ import annotations

from click.testing import CliRunner

from dspark.platform.bench.report import markdown_table, write_section
from dspark.platform.cli import cli


def test_write_section_replaces_in_place(tmp_path):
    f = tmp_path / "B.md"
    write_section(f, "a", "Section A", "first", command="cmd a")
    write_section(f, "b", "Section B", "other", command="cmd b")
    write_section(f, "a", "Section A", "second", command="cmd a2")
    text = f.read_text()
    assert text.count("<!-- bench:a -->") == 1 and "second" in text and "first" not in text
    assert "other" in text and "cmd a2" in text and "- machine:" in text and "- date:" in text
    assert text.index("bench:a") < text.index("bench:b")  # order kept


def test_markdown_table():
    t = markdown_table(["x", "y"], [[1, 2], [3, 4]])
    assert t.splitlines() == ["| x | y |", "|---|---|", "| 1 | 2 |", "| 3 | 4 |"]


def test_bench_engine_cli(tiny_demo_target, tmp_path):
    out, png = tmp_path / "BENCH.md", tmp_path / "engine.png"
    res = CliRunner().invoke(cli, [
        "bench", "engine", "--set", f"target.path={tiny_demo_target.path}", "--set", "drafter.block_size=3",
        "--batch-sizes", "1,3", "--max-tokens", "5", "--prompt-tokens", "12", "--repeats", "1",
        "--drafters", "dspark,mtp1", "--output", str(out), "--plot", str(png),
    ])
    assert res.exit_code == 0, res.output
    text = out.read_text()
    for row in ("| 1 | transformers generate |", "| 1 | plain |", "| 3 | plain |", "| 1 | dspark (untrained) |", "| 3 | mtp1 (untrained) |"):
        assert row in text
    assert png.stat().st_size > 1000
    assert "`dspark bench engine --set" in text and "--batch-sizes 1,3" in text  # the command is recorded


def test_bench_engine_refuses_unknown_drafter(tiny_demo_target):
    res = CliRunner().invoke(cli, ["bench", "engine", "--set", f"target.path={tiny_demo_target.path}",
                                   "--drafters", "nope", "--no-write"])
    assert res.exit_code == 2 and "unknown drafter kind" in res.output
