"""Progress while a round's clients train: a second tqdm bar, one step at a time, under the round bar."""

from __future__ import annotations

from typing import Optional

from tqdm.auto import tqdm
from transformers import TrainerCallback


class ClientProgress:
    """The bar of the clients of one round: `round 2 | client_3 (2/4)` with its training steps and loss.

    Args:
        round_index (`int`): the round.
        num_clients (`int`): clients trained in the round.
        disable (`bool`): no bar (processes other than the main one).
    """

    def __init__(self, round_index: int, num_clients: int, disable: bool = False):
        self.round_index, self.num_clients, self.disable = round_index, num_clients, disable
        self.done = 0
        self.bar: Optional[tqdm] = None
        #: `(client_id, steps, total steps)` of every client trained so far.
        self.finished: list[tuple[str, int, int]] = []

    def callback(self, client_id: str) -> TrainerCallback:
        """A `TrainerCallback` that drives the bar through client `client_id`'s training."""
        return _ClientStepCallback(self, client_id)

    def _start(self, client_id: str, total: int) -> None:
        self.close()
        self._client = client_id
        self.bar = tqdm(
            total=total, desc=f"round {self.round_index} | {client_id} ({self.done + 1}/{self.num_clients})",
            unit="step", leave=False, position=1, disable=self.disable, dynamic_ncols=True,
        )

    def _step(self, loss: Optional[float]) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def _end(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.finished.append((self._client, self.bar.n, self.bar.total))
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class _ClientStepCallback(TrainerCallback):
    def __init__(self, progress: ClientProgress, client_id: str):
        self.progress, self.client_id = progress, client_id
        self._loss: Optional[float] = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.progress._start(self.client_id, state.max_steps)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self._loss = float(logs["loss"])

    def on_step_end(self, args, state, control, **kwargs):
        self.progress._step(self._loss)

    def on_train_end(self, args, state, control, **kwargs):
        self.progress._end()
