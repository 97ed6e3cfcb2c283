"""Publishing a federation's adapters to the Hugging Face Hub.

Layout: the global adapter at the root of `repo_id` (with its model card and plots), every pushed round tagged
`round-<N>`; the clients' personalized adapters in a separate repository (`<repo_id>-clients`, private by default), one
subfolder per client. Only the files a user loads are pushed (adapter config, weights, cards, plots): never the
clients' raw updates, their data, optimizer state or tokens.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, TypeVar

import httpx
from huggingface_hub import CommitOperationAdd, HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError

from .cards import hub_cards

logger = logging.getLogger(__name__)

#: Written by [`~fcmoe_hf.simulation.outputs.write_outputs`] next to the adapters: which round they hold.
OUTPUTS_FILE = "outputs.json"
#: The files of an adapter directory that are published (nothing else in it ever is).
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md")
#: The plots published beside the global card.
PLOT_FILES = ("metrics.png", "conflict_heatmap.png")
#: Strategies of `TrainingArguments.hub_strategy` that push every round (the others push the final round only).
EVERY_ROUND_STRATEGIES = ("every_save", "checkpoint", "all_checkpoints")

T = TypeVar("T")


def round_tag(round_index: int) -> str:
    """The tag of a pushed round: `round-<N>`."""
    return f"round-{round_index}"


def clients_repo_for(repo_id: str) -> str:
    """The default clients repository of `repo_id`: `<repo_id>-clients`."""
    return f"{repo_id}-clients"


def is_transient(error: BaseException) -> bool:
    """Whether a failed Hub request is worth retrying: a 5xx or 429 answer, a dropped connection, a timeout."""
    if isinstance(error, HfHubHTTPError):
        status = error.response.status_code if error.response is not None else None
        return status is None or status >= 500 or status == 429
    return isinstance(error, (httpx.TransportError, ConnectionError, TimeoutError))


def with_retries(what: str, fn: Callable[[], T], max_retries: int = 4, backoff: float = 1.0) -> T:
    """Call `fn`, retrying transient failures ([`is_transient`]) up to `max_retries` times with exponential backoff
    (`backoff`, `2 x backoff`, ... seconds, at most 60). Other errors (authentication, permissions) raise at once."""
    for attempt in range(max_retries + 1):
        try:
            return fn()
        except Exception as err:
            if not is_transient(err) or attempt == max_retries:
                raise
            wait = min(backoff * 2**attempt, 60.0)
            logger.warning(f"{what} failed ({type(err).__name__}: {err}); retry {attempt + 1}/{max_retries} in {wait:.1f}s")
            time.sleep(wait)
    raise AssertionError("unreachable")


def check_hub_access(repo_id: str, token: Optional[str] = None, api: Optional[HfApi] = None) -> str:
    """Check, before any training, that `repo_id` can be pushed to; returns the full `namespace/name` id.

    A missing or invalid token, or a namespace that is neither the token's user nor one of its organizations (a repo
    owned by someone else), raises a `ValueError` naming the fix. A bare `name` is put under the token's user, as the
    Trainer does with `hub_model_id`.
    """
    api = api or HfApi()
    token = token or get_token()
    if not token:
        raise ValueError(
            "push_to_hub needs a Hugging Face token with write access: pass --hub_token, set HF_TOKEN or run "
            "`hf auth login`."
        )
    try:
        me = with_retries("whoami", lambda: api.whoami(token=token))
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        if status in (401, 403):
            raise ValueError(f"The Hugging Face token was refused by {api.endpoint} ({status}): check --hub_token / HF_TOKEN.") from err
        raise
    user = me["name"]
    namespaces = {user} | {org["name"] for org in me.get("orgs", []) if "name" in org}
    namespace, _, name = repo_id.rpartition("/")
    if not namespace:
        return f"{user}/{name}"
    if namespace not in namespaces:
        raise ValueError(
            f"Cannot push to {repo_id}: it is in namespace {namespace!r}, owned by someone else (the token belongs to "
            f"{user!r}, organizations: {sorted(namespaces - {user}) or 'none'}). Choose a hub_model_id under your namespace."
        )
    return repo_id


def read_outputs(run_dir: Path) -> dict[str, Any]:
    """The run's `outputs.json` (which round its adapters hold); a `FileNotFoundError` says how to get one."""
    path = Path(run_dir) / OUTPUTS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {run_dir} holds no finished (or checkpointed and published) round. Finish or resume the "
            "run (its adapters are written at the end, and after every round with --push_to_hub --hub_strategy every_save), "
            "or push its latest checkpoint with `push_federated_adapters`."
        )
    return json.loads(path.read_text())


@dataclass
class PushResult:
    """What [`push_federated_adapters`] published: the round, and per repository the commit its tag points to."""

    round: int
    repo_id: str
    commit: str
    clients_repo_id: Optional[str] = None
    clients_commit: Optional[str] = None
    tags: list[str] = field(default_factory=list)


def _operations(files: dict[str, Path | bytes]) -> list[CommitOperationAdd]:
    # Fresh objects on every attempt: huggingface_hub mutates (and may free) an operation once it is uploaded.
    return [CommitOperationAdd(path_in_repo=p, path_or_fileobj=f if isinstance(f, bytes) else str(f))
            for p, f in sorted(files.items())]


def _publish(
    api: HfApi, repo_id: str, files: dict[str, Path], *, private: Optional[bool], revision: Optional[str], round_index: int,
    message: str, retries: dict[str, Any],
) -> str:
    with_retries(f"create_repo {repo_id}", lambda: api.create_repo(repo_id, private=private, exist_ok=True), **retries)
    if revision not in (None, "main"):
        with_retries(f"create_branch {revision}", lambda: api.create_branch(repo_id, branch=revision, exist_ok=True), **retries)
    # Unchanged files are skipped by huggingface_hub (the Hub returns their blob ids): pushing a round twice makes no
    # second commit.
    info = with_retries(
        f"commit to {repo_id}",
        lambda: api.create_commit(repo_id, _operations(files), commit_message=message, revision=revision),
        **retries,
    )
    with_retries(
        f"tag {round_tag(round_index)} on {repo_id}",
        lambda: api.create_tag(repo_id, tag=round_tag(round_index), revision=info.oid, exist_ok=True),
        **retries,
    )
    return info.oid


def push_federated_adapters(
    run_dir: str | Path,
    repo_id: str,
    *,
    clients_repo_id: Optional[str] = None,
    push_clients: bool = True,
    private_clients: bool = True,
    round: Optional[int] = None,
    token: Optional[str] = None,
    commit_message: Optional[str] = None,
    private: Optional[bool] = None,
    revision: Optional[str] = None,
    max_retries: int = 4,
    backoff: float = 1.0,
) -> PushResult:
    """Push the adapters of a run directory's latest round to the Hub, and tag it `round-<N>`.

    The latest round is that of the adapters the run wrote (`outputs.json`, at the end or after every round with
    `hub_strategy="every_save"`), or that of its latest checkpoint when it is newer (a run killed after round `N` with
    `hub_strategy="end"`): its adapters are then exported from the checkpoint
    ([`~fcmoe_hf.simulation.export.export_checkpoint`]) into a temporary directory and pushed from there.

    Args:
        run_dir (`str` or `Path`): a run directory of [`~fcmoe_hf.simulation.FederatedSimulation`] (or the recipe).
        repo_id (`str`): the global adapter's repository (`user/name`, or `name` under the token's user).
        clients_repo_id (`str`, *optional*): the clients' repository; `<repo_id>-clients` by default.
        push_clients (`bool`, *optional*, defaults to `True`): push the clients' personalized adapters.
        private_clients (`bool`, *optional*, defaults to `True`): create the clients' repository private, and refuse to
            push personalized adapters (which carry information about their clients' data) into a public one.
        round (`int`, *optional*): the round to push: that of the written adapters or of the latest checkpoint (a
            `ValueError` naming the available rounds otherwise); the newest of the two by default.
        token (`str`, *optional*): a token with write access (default: `HF_TOKEN` or the saved login).
        commit_message (`str`, *optional*): defaults to `"Round <N> ..."`.
        private (`bool`, *optional*): visibility of the global repository when it is created.
        revision (`str`, *optional*): branch to push to (created from `main` if missing); `main` by default.
        max_retries (`int`, *optional*, defaults to 4) and `backoff` (`float`, *optional*, defaults to 1.0): transient
            failures (5xx, dropped connections, timeouts) are retried with exponential backoff.

    Returns:
        [`PushResult`]: the round and the commits tagged `round-<N>`.
    """
    run_dir = Path(run_dir)
    written = int(read_outputs(run_dir)["round"]) if (run_dir / OUTPUTS_FILE).is_file() else None
    from ..simulation.export import export_checkpoint, latest_checkpoint_round  # (the simulation imports this module)

    checkpointed = latest_checkpoint_round(run_dir)
    newest = max(r for r in (written, checkpointed, -1) if r is not None)
    if newest < 0:
        read_outputs(run_dir)  # raises: neither written adapters nor a checkpoint
    wanted = newest if round is None else round
    if wanted not in (written, checkpointed):
        available = sorted({r for r in (written, checkpointed) if r is not None})
        raise ValueError(
            f"{run_dir} holds round(s) {available} (written adapters: {written}, latest checkpoint: {checkpointed}), "
            f"not round {round}: earlier rounds that were pushed are on the Hub as tags {round_tag(round)}."
        )
    kwargs = dict(
        clients_repo_id=clients_repo_id, push_clients=push_clients, private_clients=private_clients, token=token,
        commit_message=commit_message, private=private, revision=revision, max_retries=max_retries, backoff=backoff,
    )
    if wanted == written:
        return _push_written(run_dir, repo_id, **kwargs)
    # The latest checkpoint is newer than any written adapters (a killed run, hub_strategy="end"): export its round.
    logger.info(f"{run_dir}: exporting round {wanted} from its latest checkpoint (no adapters written for it)")
    with tempfile.TemporaryDirectory(prefix="fcmoe-export-") as exported:
        export_checkpoint(run_dir, exported, round=wanted, clients=push_clients)
        return _push_written(Path(exported), repo_id, **kwargs)


def _push_written(
    run_dir: Path, repo_id: str, *, clients_repo_id: Optional[str], push_clients: bool, private_clients: bool, token: Optional[str],
    commit_message: Optional[str], private: Optional[bool], revision: Optional[str], max_retries: int, backoff: float,
) -> PushResult:
    # The adapters of a directory laid out as a finished run's (outputs.json, global_adapter/, clients/, plots/).
    outputs = read_outputs(run_dir)
    pushed_round = int(outputs["round"])
    api = HfApi(token=token)
    retries = {"max_retries": max_retries, "backoff": backoff}
    repo_id = check_hub_access(repo_id, token, api)
    clients_repo_id = check_hub_access(clients_repo_id or clients_repo_for(repo_id), token, api)

    # The cards as published: repo ids in the how-to-load snippets, links between the global card and the clients'.
    with_clients = push_clients and bool(outputs.get("clients"))
    cards = hub_cards(outputs, repo_id, clients_repo_id if with_clients else None, api.endpoint)
    global_dir = run_dir / "global_adapter"
    files: dict[str, Path | bytes] = {n: global_dir / n for n in ADAPTER_FILES[:2] if (global_dir / n).is_file()}
    files["README.md"] = cards["README.md"]
    files.update({f"plots/{name}": run_dir / "plots" / name for name in PLOT_FILES if (run_dir / "plots" / name).is_file()})
    if "adapter_model.safetensors" not in files:
        raise FileNotFoundError(f"{global_dir} holds no adapter.")
    message = commit_message or f"Round {pushed_round} global adapter"
    commit = _publish(api, repo_id, files, private=private, revision=revision, round_index=pushed_round, message=message,
                      retries=retries)
    result = PushResult(round=pushed_round, repo_id=repo_id, commit=commit, tags=[round_tag(pushed_round)])
    logger.info(f"Pushed round {pushed_round}'s global adapter to {repo_id} ({commit[:8]}, tag {round_tag(pushed_round)})")

    clients = outputs.get("clients") or []
    if with_clients:
        if private_clients:
            _refuse_public(api, clients_repo_id, retries)
        files = {"README.md": cards["clients:README.md"]}
        for client_id in clients:
            adapter = run_dir / "clients" / client_id / "adapter"
            files.update({f"{client_id}/{n}": adapter / n for n in ADAPTER_FILES[:2] if (adapter / n).is_file()})
            files[f"{client_id}/README.md"] = cards[f"{client_id}/README.md"]
        message = commit_message or f"Round {pushed_round} personalized client adapters"
        result.clients_repo_id = clients_repo_id
        result.clients_commit = _publish(
            api, clients_repo_id, files, private=private_clients, revision=revision, round_index=pushed_round,
            message=message, retries=retries,
        )
        logger.info(f"Pushed round {pushed_round}'s {len(clients)} client adapters to {clients_repo_id}")
    return result


def _refuse_public(api: HfApi, repo_id: str, retries: dict[str, Any]) -> None:
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        info = with_retries(f"repo_info {repo_id}", lambda: api.repo_info(repo_id), **retries)
    except RepositoryNotFoundError:
        return  # created private below
    if not info.private:
        raise ValueError(
            f"{repo_id} is public: personalized client adapters carry information about their clients' data and are "
            "pushed to private repositories only. Make it private, or pass private_clients=False (--public_clients)."
        )


@dataclass
class HubPublisher:
    """The federation's pushes, configured from `TrainingArguments`' hub fields (`push_to_hub`, `hub_model_id`,
    `hub_strategy`, `hub_private_repo`, `hub_token`, `hub_revision`) and validated when built, before any training.

    [`push`] never raises: a push that finally fails is logged, the local outputs stay, and the next push carries the
    missing state.
    """

    repo_id: str
    clients_repo_id: str
    every_round: bool
    token: Optional[str] = None
    private: Optional[bool] = None
    revision: Optional[str] = None
    max_retries: int = 4
    backoff: float = 1.0
    failures: list[tuple[int, str]] = field(default_factory=list)

    @classmethod
    def from_training_args(cls, args: Any, run_dir: Path) -> Optional[HubPublisher]:
        """`None` without `push_to_hub`; otherwise a publisher whose repositories were checked (token, owner)."""
        if not getattr(args, "push_to_hub", False):
            return None
        repo_id = check_hub_access(args.hub_model_id or Path(run_dir).absolute().name, args.hub_token)
        strategy = getattr(args.hub_strategy, "value", args.hub_strategy)
        return cls(
            repo_id=repo_id, clients_repo_id=check_hub_access(clients_repo_for(repo_id), args.hub_token),
            every_round=strategy in EVERY_ROUND_STRATEGIES, token=args.hub_token, private=args.hub_private_repo,
            revision=args.hub_revision,
        )

    def push(self, run_dir: Path) -> Optional[PushResult]:
        """Push `run_dir`'s latest written round; `None` (logged) when it fails."""
        try:
            return push_federated_adapters(
                run_dir, self.repo_id, clients_repo_id=self.clients_repo_id, token=self.token, private=self.private,
                revision=self.revision, max_retries=self.max_retries, backoff=self.backoff,
            )
        except Exception as err:  # a failed push never stops the federation
            round_index = read_outputs(run_dir).get("round", -1) if (Path(run_dir) / OUTPUTS_FILE).is_file() else -1
            self.failures.append((int(round_index), f"{type(err).__name__}: {err}"))
            logger.error(
                f"Pushing round {round_index} to {self.repo_id} failed ({type(err).__name__}: {err}). The local outputs "
                f"in {run_dir} are intact; the next round's push carries them, or run "
                f"`python -m fcmoe_hf.hub push {run_dir} --repo-id {self.repo_id}`."
            )
            return None
