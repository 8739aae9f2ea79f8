"""Reference documentation generated from the code: the configuration reference
(``docs/configuration.md``, from the pydantic schemas) and the command tree of the README (from
the click commands).

``dspark config reference --out docs/configuration.md`` writes it; a test keeps the committed file
equal to :func:`render_reference`'s output, so the reference cannot drift from the schemas. Every
config file a user writes has one section: a table with one row per field, the field named by the
dotted path ``--set`` takes (nested sections flattened), its type with its range, its default and
its description. Lists of models (``sources``) and the ``policy`` mapping of the Serve args get a
table per variant. Nothing here is written by hand but the short introductions of ``FILES``.
"""

from __future__ import annotations

import json
import types
import typing
from typing import Any, Iterator

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined, to_jsonable_python

__all__ = ["FILES", "render_reference", "render_schema", "render_cli_tree"]

#: (schema name of `dspark config schema`, class path, title, where the file is read)
FILES = [
    ("demo", "dspark.platform.config:DemoConfig", "Demo and engine commands",
     "`dspark demo`, `generate`, `target build-demo`, `bench engine`, `bench policies` (`--config`); "
     "sample: `clusters/demo.yaml`."),
    ("serve", "dspark.platform.serving.config:ServeConfig", "Serving (the Serve application's `args`)",
     "`dspark serve`, `serve deploy`, `dspark bench serve` and `dspark demo` (`serve.config`) as the `args` of "
     "the application in a Ray Serve YAML; samples: `clusters/serve-local.yaml`, `clusters/serve-gpu.yaml`."),
    ("train", "dspark.platform.training.train_config:TrainConfig", "Drafter training",
     "`dspark train CONFIG.yaml`, `dspark bench train`, the demo's `train.recipe`; samples: "
     "`clusters/train-demo.yaml`, `clusters/train-gpu-cluster.yaml`."),
    ("data", "dspark.platform.training.data_config:DataConfig", "Training data",
     "`dspark data generate CONFIG.yaml` and a training config's `data.generate_config`; sample: "
     "`clusters/data-demo.yaml`."),
    ("eval", "dspark.platform.training.evaluate:EvalConfig", "Evaluation and calibration",
     "`dspark eval` and `dspark calibrate` (`--config`)."),
]

#: ServeConfig.policy is a mapping validated by one of these, chosen by its `name`
POLICIES = "dspark.scheduler.registry:PolicyConfig"


def _load(path: str) -> Any:
    import importlib

    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def _is_model(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, BaseModel)


def _strip_annotated(t: Any) -> Any:
    while typing.get_origin(t) is typing.Annotated:
        t = typing.get_args(t)[0]
    return t


def _union_args(t: Any) -> tuple[Any, ...] | None:
    t = _strip_annotated(t)
    if typing.get_origin(t) in (typing.Union, types.UnionType):
        return typing.get_args(t)
    return None


def _type_name(t: Any) -> str:
    """A short, readable type: ``int``, ``"a" | "b"``, ``list of int``, ``TargetConfig or null``."""
    t = _strip_annotated(t)
    args = _union_args(t)
    if args is not None:
        rest = [a for a in args if a is not type(None)]
        name = " | ".join(_type_name(a) for a in rest)
        return f"{name} or null" if len(rest) < len(args) else name
    origin = typing.get_origin(t)
    if origin is typing.Literal:
        return " | ".join(f"`{json.dumps(a) if not isinstance(a, str) else a}`" for a in typing.get_args(t))
    if origin in (list, tuple):
        a = typing.get_args(t)
        if origin is tuple and a and a[-1] is not Ellipsis:
            return f"[{', '.join(_type_name(x) for x in a)}]"
        return f"list of {_type_name(a[0])}" if a else "list"
    if origin is dict:
        k, v = typing.get_args(t) or (str, Any)
        return f"mapping of {_type_name(k)} to {_type_name(v)}"
    if t is Any:
        return "any"
    return getattr(t, "__name__", str(t))


def _constraints(f: FieldInfo) -> str:
    """Ranges and lengths of a field, e.g. ``≥ 1, ≤ 64``."""
    out = []
    for m in f.metadata:
        for attr, sym in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            v = getattr(m, attr, None)
            if v is not None:
                out.append(f"{sym} {v:g}" if isinstance(v, float) else f"{sym} {v}")
        if getattr(m, "min_length", None):
            out.append(f"length ≥ {m.min_length}")
        if getattr(m, "max_length", None):
            out.append(f"length ≤ {m.max_length}")
        if getattr(m, "pattern", None):
            out.append(f"matches `{m.pattern}`")
    return ", ".join(out)


def _default(f: FieldInfo) -> tuple[bool, Any]:
    """(has a default, the default value)."""
    if f.default is not PydanticUndefined:
        return True, f.default
    if f.default_factory is not None:
        return True, f.default_factory()
    return False, None


def _fmt_value(v: Any) -> str:
    v = to_jsonable_python(v)
    if isinstance(v, dict) and not v:
        return "`{}`"
    return "`" + json.dumps(v, ensure_ascii=False).replace("|", "\\|") + "`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _doc(obj: Any) -> str:
    """A class's docstring as one paragraph of markdown (reStructuredText ``code`` -> `code`)."""
    return _cell((obj.__doc__ or "").strip().split("\n\n")[0]).replace("``", "`")


def _rows(model: type[BaseModel], prefix: str = "", inst: BaseModel | None = None) -> Iterator[tuple[str, str, str, str]]:
    """(dotted field, type, default, description) for every field, nested models flattened;
    a nested model's own row comes first and names its class. ``inst`` is the section's default
    value in its parent (a parent's default_factory may set other defaults than the class's)."""
    for name, f in model.model_fields.items():
        path = f"{prefix}{name}"
        has, default = (True, getattr(inst, name)) if inst is not None else _default(f)
        desc = _cell(f.description or "").replace("``", "`")
        t = _strip_annotated(f.annotation)
        args = _union_args(t) or (t,)
        models = [a for a in args if _is_model(a)]
        if len(models) == 1 and len(args) <= 2:  # a section (optionally null)
            sub = models[0]
            optional = type(None) in args
            dflt = "`null`" if optional and has and default is None else "section"
            yield f"`{path}`", f"{sub.__name__}{' or null' if optional else ''}", dflt, " ".join(x for x in (desc, _doc(sub)) if x)
            yield from _rows(sub, f"{path}.", default if isinstance(default, BaseModel) else None)
            continue
        typ = _type_name(t)
        c = _constraints(f)
        yield f"`{path}`", typ + (f" ({c})" if c else ""), (_fmt_value(default) if has else "**required**"), desc


def _table(rows: list[tuple[str, str, str, str]]) -> str:
    lines = ["| field | type | default | description |", "|---|---|---|---|"]
    lines += [f"| {a} | {_cell(b)} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines)


def _variants(model: type[BaseModel]) -> Iterator[tuple[str, list[type[BaseModel]]]]:
    """Fields holding a list of (a union of) models: their item classes."""
    for name, f in model.model_fields.items():
        t = _strip_annotated(f.annotation)
        if typing.get_origin(t) in (list, tuple):
            (item,) = typing.get_args(t)[:1]
            items = [a for a in (_union_args(item) or (_strip_annotated(item),)) if _is_model(a)]
            if items:
                yield name, items
        elif _is_model(t):
            for sub_name, items in _variants(t):
                yield f"{name}.{sub_name}", items


def render_schema(name: str, cls_path: str, title: str, where: str) -> str:
    model = _load(cls_path)
    parts = [f"## {title}: `{model.__name__}`", "", f"Schema `{name}` (`dspark config schema {name}`). Used by {where}",
             "", _doc(model), "", _table(list(_rows(model)))]
    for field_name, items in _variants(model):
        for item in items:
            tag = item.model_fields.get("kind")
            label = f" with `kind: {tag.default}`" if tag is not None else ""
            parts += ["", f"### `{field_name}` items{label}: `{item.__name__}`", "",
                      _doc(item), "", _table(list(_rows(item)))]
    if "policy" in model.model_fields:
        parts += ["", "### `policy`: one of, chosen by `name`", ""]
        for item in _union_args(_load(POLICIES)) or ():
            parts += [f"#### `name: {item.model_fields['name'].default}`: `{item.__name__}`", "",
                      _doc(item), "", _table(list(_rows(item))), ""]
    return "\n".join(parts).rstrip() + "\n"


def render_reference() -> str:
    head = [
        "<!-- Generated by `dspark config reference --out docs/configuration.md` from the pydantic schemas; "
        "do not edit (a test compares this file with the generator's output). -->",
        "",
        "# Configuration reference",
        "",
        "Every config is YAML validated by one strict pydantic schema: unknown keys, wrong types and out-of-range "
        "values are errors naming the field. Fields are named here by the dotted path that `--set` takes "
        "(`--set engine.max_batch_size=8`; the value is parsed as YAML). A row whose type is a schema class "
        "is a section: its fields follow it. `dspark config schema NAME` prints the JSON schema and "
        "`dspark config check FILE --schema NAME` validates a file.",
        "",
    ]
    head += [f"- [{title}](#{_anchor(title, _load(path).__name__)}): `{name}`" for name, path, title, _ in FILES]
    body = [render_schema(*f) for f in FILES]
    return "\n".join(head) + "\n\n" + "\n".join(body)


def _anchor(title: str, cls: str) -> str:
    """GitHub's anchor of the heading ``## {title}: `{cls}```."""
    text = f"{title}: {cls}".lower()
    return "".join(ch for ch in text.replace(" ", "-") if ch.isalnum() or ch in "-_")


def render_cli_tree() -> str:
    """Every ``dspark`` command with its arguments and the first sentence of its help, as a
    markdown table (the README's command list; options: ``dspark COMMAND --help``)."""
    import click

    from dspark.platform.cli import cli

    def walk(cmd: click.Command, path: list[str]) -> Iterator[tuple[str, str]]:
        if isinstance(cmd, click.Group):
            for name in sorted(cmd.commands):
                yield from walk(cmd.commands[name], [*path, name])
            return
        ctx = click.Context(cmd, info_name=" ".join(path))
        args = [p.make_metavar(ctx) for p in cmd.params if isinstance(p, click.Argument)]
        short = " ".join((cmd.help or "").split("\n\n")[0].split())
        yield " ".join([*path, *args]), short.split(". ")[0].rstrip(".")

    rows = ["| command | what it does |", "|---|---|"]
    rows += [f"| `{_cell(usage)}` | {_cell(short)} |" for usage, short in walk(cli, ["dspark"])]
    return "\n".join(rows) + "\n"
