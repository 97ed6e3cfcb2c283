"""YAML config files plus command-line overrides for `HfArgumentParser` (as TRL's `TrlParser` offers)."""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable, Sequence
from typing import Any

import yaml
from transformers import HfArgumentParser


def _to_cli(config: dict[str, Any], source: str) -> list[str]:
    argv: list[str] = []
    for key, value in config.items():
        if not isinstance(key, str):
            raise ValueError(f"{source}: keys must be field names (strings), got {key!r}.")
        flag = f"--{key}"
        if value is None:
            continue
        if isinstance(value, bool):
            argv += [flag, "true" if value else "false"]
        elif isinstance(value, (list, tuple)):
            argv += [flag, *[str(v) for v in value]]
        elif isinstance(value, dict):
            argv += [flag, json.dumps(value)]
        else:
            argv += [flag, str(value)]
    return argv


def _known_fields(parser: HfArgumentParser) -> list[str]:
    return sorted({flag[2:] for flag in parser._option_string_actions if flag.startswith("--")} - {"help"})


def _unknown_error(names: Iterable[str], known: list[str], source: str) -> ValueError:
    described = []
    for name in names:
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
        described.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return ValueError(
        f"{source}: unknown field{'s' if len(described) > 1 else ''} {', '.join(described)}: not a field of any "
        "config dataclass (names are matched exactly, never by prefix)."
    )


def parse_yaml_and_args(parser: HfArgumentParser, argv: Sequence[str]) -> tuple:
    """Parse `--config FILE.yaml` or `--config=FILE.yaml` (optional) and the other arguments of `argv` into `parser`'s dataclasses.

    The YAML file is a flat mapping of field names to values; arguments given on the command line override it. An
    unknown field name, in the file or on the command line, is an error that names it (and the field it is closest
    to); names are matched exactly, never as prefixes (`--num_round` is not `--num_rounds`).
    """
    # argparse would take an unambiguous prefix for the whole name: a misspelled field would silently set another.
    parser.allow_abbrev = False
    known = _known_fields(parser)
    argv = list(argv)
    config_args: list[str] = []
    index = next((i for i, arg in enumerate(argv) if arg == "--config" or arg.startswith("--config=")), None)
    if index is not None:
        if argv[index] == "--config":  # `--config FILE`
            if index + 1 >= len(argv):
                raise ValueError("--config needs a YAML file path.")
            path = argv[index + 1]
            del argv[index : index + 2]
        else:  # `--config=FILE`
            path = argv.pop(index).split("=", 1)[1]
            if not path:
                raise ValueError("--config= needs a YAML file path.")
        with open(path) as f:
            config = yaml.safe_load(f) or {}
        if not isinstance(config, dict):
            raise ValueError(f"{path}: expected a mapping of field names to values, got {type(config).__name__}.")
        unknown = [key for key in config if isinstance(key, str) and key not in known]
        if unknown:
            raise _unknown_error(unknown, known, path)
        config_args = _to_cli(config, path)
    outputs = parser.parse_args_into_dataclasses(args=config_args + argv, return_remaining_strings=True)
    *dataclasses, remaining = outputs
    if remaining:
        flags = [r[2:].split("=", 1)[0] for r in remaining if r.startswith("--")]
        if flags:
            raise _unknown_error(flags, known, "command line")
        raise ValueError(f"command line: unexpected arguments {remaining} (not values of any field).")
    return tuple(dataclasses)
