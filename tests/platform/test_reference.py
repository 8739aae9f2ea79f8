"""docs/configuration.md is the generator's output: regenerate it with
`dspark config reference --out docs/configuration.md` after changing a schema."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_committed_reference_equals_the_generated_one():
    from dspark.platform.reference import render_reference

    committed = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert committed == render_reference(), "docs/configuration.md is stale: run `dspark config reference --out docs/configuration.md`"


def test_every_field_of_every_file_schema_has_a_row():
    from dspark.platform.reference import FILES, _load, render_schema

    for name, path, title, where in FILES:
        text = render_schema(name, path, title, where)
        model = _load(path)
        for field, info in model.model_fields.items():
            assert f"| `{field}` |" in text, f"{name}: {field}"
            assert info.description is None or " ".join(info.description.split())[:30].replace("|", "\\|") in text


def test_defaults_come_from_the_parent_section():
    from dspark.platform.reference import FILES, render_schema

    serve = next(f for f in FILES if f[0] == "serve")
    text = render_schema(*serve)
    # ServeConfig builds its ingress deployment with num_cpus 0.1, not the class default of 1.0
    assert "| `ingress_deployment.num_cpus` | float (≥ 0) | `0.1` |" in text
    assert "#### `name: async`: `AsyncPolicyConfig`" in text


def test_cli_prints_the_reference(tmp_path):
    from click.testing import CliRunner

    from dspark.platform.cli import cli
    from dspark.platform.reference import render_reference

    out = tmp_path / "ref.md"
    r = CliRunner().invoke(cli, ["config", "reference", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert out.read_text(encoding="utf-8") == render_reference()


def test_readme_lists_every_command():
    from dspark.platform.reference import render_cli_tree

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("<!-- cli:begin -->\n", 1)[1].split("<!-- cli:end -->", 1)[0]
    assert block == render_cli_tree(), (
        "README.md's command table is stale: replace the lines between <!-- cli:begin --> and <!-- cli:end --> "
        "with the output of `python -c 'from dspark.platform.reference import render_cli_tree as r; print(r(), end=\"\")'`")
