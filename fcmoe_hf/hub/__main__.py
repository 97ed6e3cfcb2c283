"""Command line: publish an existing run directory's adapters to the Hub.

    python -m fcmoe_hf.hub push outputs/demo --repo-id user/name [--clients-repo-id user/name-clients]
        [--no-clients] [--public-clients] [--round N] [--token hf_...] [--revision main] [--message "..."]
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional

from .push import push_federated_adapters


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fcmoe_hf.hub", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    push = commands.add_parser("push", help="push a run directory's global and per-client adapters")
    push.add_argument("run_dir", help="the run directory (the recipe's --output_dir)")
    push.add_argument("--repo-id", required=True, help="the global adapter's repository, user/name")
    push.add_argument("--clients-repo-id", default=None, help="the clients' repository (default: <repo-id>-clients)")
    push.add_argument("--no-clients", action="store_true", help="push the global adapter only")
    push.add_argument("--public-clients", action="store_true",
                      help="allow a public clients' repository (personalized adapters carry information about client data)")
    push.add_argument("--private", action="store_true", help="create the global repository private")
    push.add_argument("--round", type=int, default=None, help="the round expected in run_dir (an error otherwise)")
    push.add_argument("--token", default=None, help="a write token (default: HF_TOKEN or the saved login)")
    push.add_argument("--revision", default=None, help="branch to push to (default: main)")
    push.add_argument("--message", default=None, help="commit message")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    result = push_federated_adapters(
        args.run_dir, args.repo_id, clients_repo_id=args.clients_repo_id, push_clients=not args.no_clients,
        private_clients=not args.public_clients, round=args.round, token=args.token, commit_message=args.message,
        private=True if args.private else None, revision=args.revision,
    )
    print(f"Pushed round {result.round}: {result.repo_id}@{result.commit} (tag round-{result.round})")
    if result.clients_repo_id:
        print(f"Client adapters: {result.clients_repo_id}@{result.clients_commit}")


if __name__ == "__main__":
    main(sys.argv[1:])
