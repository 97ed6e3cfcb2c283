"""Client ids read back from files: they become path components, so only plain names pass."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: A client id that is safe as one path component: no separator, no `.`/`..`, no leading dot or dash.
CLIENT_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: the message names the file(s) and what is wrong with them."""


def check_client_id(client_id: Any, source: str) -> str:
    """Return `client_id` if it is a plain name usable as one path component ([`CLIENT_ID_PATTERN`]).

    Args:
        client_id (`Any`): the id read from a file.
        source (`str`): where it was read (a file and field), named in the error.

    Raises:
        [`CheckpointError`]: naming `source` and the id, when it is not a string matching `CLIENT_ID_PATTERN`.
    """
    if not isinstance(client_id, str) or not CLIENT_ID_PATTERN.fullmatch(client_id):
        raise CheckpointError(
            f"{source}: invalid client id {client_id!r} (expected a plain name matching {CLIENT_ID_PATTERN.pattern})."
        )
    return client_id


def client_problems(state: Mapping[str, Any], state_path: Path) -> list[str]:
    """What is wrong with the clients' bookkeeping of a checkpoint's `state.json` (plain ids, round numbers >= 1,
    finite update scales), one message per fault naming `state_path`; empty when nothing is."""
    problems = []
    for field_name, valid in (("last_update_round", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1),
                              ("update_scales", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                               and math.isfinite(v))):
        entries = state.get(field_name, {})
        if not isinstance(entries, dict):
            problems.append(f"{state_path}: {field_name} is not a JSON object")
            continue
        for client_id, value in entries.items():
            try:
                check_client_id(client_id, f"{state_path}: {field_name}")
            except CheckpointError as err:
                problems.append(str(err).rstrip("."))
            if not valid(value):
                problems.append(f"{state_path}: {field_name}[{client_id!r}] = {value!r} is not valid")
    return problems
