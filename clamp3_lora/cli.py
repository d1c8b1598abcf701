"""TrainConfig <-> command line: every field of the dataclass is a flag, its help text the field's
docstring in config.py."""
import argparse
import ast
import dataclasses
import inspect
import typing

from .config import SpeedConfig, TrainConfig, demo_overrides


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


def add_flags(group, cls, skip=()):
    """One flag per field of dataclass `cls` on `group` (underscores become dashes; booleans get
    --name / --no-name); the help text is the field's docstring."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        flag = "--" + field.name.replace("_", "-")
        kind = hints[field.name]
        help_text = docs.get(field.name, "").replace("%", "%%")  # argparse formats help with %
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                               help=f"{help_text} (default: {field.default})")
        elif typing.get_origin(kind) is list:
            group.add_argument(flag, action="append", type=typing.get_args(kind)[0], default=None,
                               metavar=field.name.upper(), help=f"{help_text} (default: none)")
        else:
            group.add_argument(flag, type=kind, default=None, metavar=field.name.upper(),
                               help=f"{help_text} (default: {field.default!r})")


def build_parser(description):
    """An argparse parser with one flag per TrainConfig field, then the SpeedConfig fields in a
    group of their own (the settings users need come first)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(parser, TrainConfig, skip=("speed",))
    add_flags(parser.add_argument_group(
        "speed switches", "Speed paths of the training step; each computes the same function as the plain path "
                          "(--plain turns them all off)."), SpeedConfig)
    return parser


def parse_config(argv=None, description="CLaMP 3 LoRA trainer"):
    """Parse the command line into a TrainConfig. --demo applies demo_overrides() first, --plain turns
    every speed switch off; flags given explicitly always win."""
    args = vars(build_parser(description).parse_args(argv))
    given = {name: value for name, value in args.items() if value is not None}
    speed_names = {field.name for field in dataclasses.fields(SpeedConfig)}
    values = {}
    if given.get("demo"):
        values.update(demo_overrides())
    values.update({name: value for name, value in given.items() if name not in speed_names})
    speed = SpeedConfig.plain() if values.get("plain") else SpeedConfig()
    speed = dataclasses.replace(speed, **{name: value for name, value in given.items() if name in speed_names})
    return TrainConfig(**values, speed=speed)
