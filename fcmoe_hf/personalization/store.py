"""Where a federation keeps its clients' PFL-MoE personal adapters and gates on disk, round by round, for resume.

`<root>/<client_id>/personal/round_NNNN/` holds the state a client's round `NNNN` produced: a plain peft adapter
directory (`adapter_model.safetensors`, `adapter_config.json`) with the personal adapter, and `gate.safetensors`.
A directory appears complete or not at all (written aside, then renamed). A round reads the newest state from an
earlier round, so a round that is run again after an interruption starts from what the interrupted one started from;
saving keeps that state and the new one, and removes older ones.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Optional, Union

from peft import PeftConfig
from safetensors.torch import load_file, save_file

from ..hub import save_adapter
from .pfl_moe import PersonalState

_ROUND = re.compile(r"^round_(\d{4,})$")


class PersonalStateStore:
    """The PFL-MoE personal states of a federation's clients under `root` (the run's `clients/` directory).

    Args:
        root (`str` or `Path`): the directory holding one directory per client.
    """

    def __init__(self, root: Union[str, Path]):
        self.root = Path(root)

    def directory(self, client_id: str, round_index: int) -> Path:
        """Where round `round_index`'s personal state of `client_id` is (or would be) stored."""
        return self.root / client_id / "personal" / f"round_{round_index:04d}"

    def rounds(self, client_id: str) -> list[int]:
        """The rounds with a stored (complete) state of `client_id`, in increasing order."""
        parent = self.root / client_id / "personal"
        found = (_ROUND.match(p.name) for p in parent.iterdir() if p.is_dir()) if parent.is_dir() else ()
        return sorted(int(m.group(1)) for m in found if m is not None)

    def load(self, client_id: str, before_round: Optional[int] = None) -> Optional[tuple[int, PersonalState]]:
        """`(round, state)` of the newest stored state of `client_id` from a round before `before_round` (any round
        when `None`), or `None` when there is none (the client has not trained its personal adapter yet)."""
        rounds = [r for r in self.rounds(client_id) if before_round is None or r < before_round]
        if not rounds:
            return None
        directory = self.directory(client_id, rounds[-1])
        state = PersonalState(
            adapter=load_file(str(directory / "adapter_model.safetensors")), gate=load_file(str(directory / "gate.safetensors"))
        )
        return rounds[-1], state

    def save(self, client_id: str, round_index: int, state: PersonalState, peft_config: PeftConfig) -> Path:
        """Store round `round_index`'s `state` of `client_id` (its adapter with `peft_config`); keep the newest earlier
        state (the start of this round, should it run again) and remove the others."""
        directory = self.directory(client_id, round_index)
        tmp = directory.with_name(directory.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        save_adapter(tmp, state.adapter, peft_config)
        save_file({k: v.contiguous() for k, v in state.gate.items()}, str(tmp / "gate.safetensors"))
        shutil.rmtree(directory, ignore_errors=True)
        tmp.rename(directory)
        stored = self.rounds(client_id)
        keep = {round_index, max((r for r in stored if r < round_index), default=round_index)}
        for r in stored:
            if r not in keep:
                shutil.rmtree(self.directory(client_id, r), ignore_errors=True)
        return directory
