"""YAML config files plus command-line overrides for `HfArgumentParser` (as TRL's `TrlParser` offers)."""

from __future__ import annotations

import json
from collections.abc import Sequence
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


def parse_yaml_and_args(parser: HfArgumentParser, argv: Sequence[str]) -> tuple:
    """Parse `--config FILE.yaml` (optional) and the other arguments of `argv` into `parser`'s dataclasses.

    The YAML file is a flat mapping of field names to values; arguments given on the command line override it. An
    unknown field name, in the file or on the command line, is an error that names it.
    """
    argv = list(argv)
    config_args: list[str] = []
    if "--config" in argv:
        index = argv.index("--config")
        if index + 1 >= len(argv):
            raise ValueError("--config needs a YAML file path.")
        path = argv[index + 1]
        del argv[index : index + 2]
        with open(path) as f:
            config = yaml.safe_load(f) or {}
        if not isinstance(config, dict):
            raise ValueError(f"{path}: expected a mapping of field names to values, got {type(config).__name__}.")
        config_args = _to_cli(config, path)
    outputs = parser.parse_args_into_dataclasses(args=config_args + argv, return_remaining_strings=True)
    *dataclasses, remaining = outputs
    if remaining:
        raise ValueError(f"Unknown arguments (not a field of any config dataclass): {remaining}")
    return tuple(dataclasses)
