"""TrainConfig <-> command line: every field of the dataclass is a flag, its help text the field's
docstring in config.py."""
import argparse
import ast
import dataclasses
import inspect
import typing

from config import TrainConfig, demo_overrides


def field_docs(cls):
    """Map each dataclass field to the string literal that follows it in the class body."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant) and isinstance(following.value.value, str)):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def build_parser(description):
    """An argparse parser with one flag per TrainConfig field (underscores become dashes)."""
    parser = argparse.ArgumentParser(description=description)
    docs = field_docs(TrainConfig)
    hints = typing.get_type_hints(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        kind = hints[field.name]
        help_text = docs.get(field.name, "").replace("%", "%%")  # argparse formats help with %
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{help_text} (default: {field.default})")
        else:
            parser.add_argument(flag, type=kind, default=None, metavar=field.name.upper(),
                                help=f"{help_text} (default: {field.default!r})")
    return parser


def parse_config(argv=None, description="CLaMP 3 LoRA trainer"):
    """Parse the command line into a TrainConfig. --demo applies demo_overrides() first; flags given
    explicitly always win."""
    args = vars(build_parser(description).parse_args(argv))
    given = {name: value for name, value in args.items() if value is not None}
    values = {}
    if given.get("demo"):
        values.update(demo_overrides())
    values.update(given)
    return TrainConfig(**values)
