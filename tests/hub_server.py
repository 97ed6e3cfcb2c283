"""A Hub-protocol server on 127.0.0.1 for the tests: the subset of the Hugging Face Hub HTTP API that `huggingface_hub`
uses to create repos, commit files, tag revisions and download them. Standard library only.

Repos are model repos `namespace/name`; every commit is a content-addressed snapshot (`{path: blob sha1}` plus parent
and message, named by the sha1 of its JSON) so branches, tags and commit ids all resolve. Blobs are stored in a
temporary directory. `tokens` maps tokens to user names: writes need the namespace's owner, private repos are
`RepositoryNotFound` (401) to anyone else. Preupload answers `"regular"` for every file, so files travel base64 inside
the NDJSON commit (no LFS, no Xet), and returns the remote blob oid so unchanged files are skipped by the client.
[`HubServer.fail_next`] makes the next requests fail (a 5xx status, or a dropped connection).
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Optional
from urllib.parse import unquote, urlsplit

import yaml


def git_blob_oid(data: bytes) -> str:
    """The git blob sha1 of `data` (what `huggingface_hub` compares unchanged files with)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _metadata_errors(metadata: dict) -> list[dict[str, str]]:
    """What the Hub refuses in a model card's metadata (the checks the cards here need)."""
    from huggingface_hub.repocard_data import model_index_to_eval_results

    errors = []
    for key, kind in (("library_name", str), ("license", str), ("base_model", str), ("tags", list), ("datasets", list)):
        if key in metadata and not isinstance(metadata[key], kind):
            errors.append({"message": f"{key} must be a {kind.__name__}"})
    if "model-index" in metadata:
        try:
            model_index_to_eval_results(metadata["model-index"])
        except (KeyError, TypeError, ValueError) as err:
            errors.append({"message": f"invalid model-index: {err!r}"})
    return errors


class HubError(Exception):
    def __init__(self, status: int, message: str, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class HubServer:
    """An in-thread Hub on `http://127.0.0.1:<port>`.

    Args:
        root (`Path`): where blobs are stored.
        tokens (`dict[str, str]`): token -> user name.
    """

    def __init__(self, root: Path, tokens: dict[str, str]):
        self.root = Path(root)
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        self.tokens = dict(tokens)
        self.repos: dict[str, dict[str, Any]] = {}
        self.commits: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.RLock()
        self._failures: list[str] = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def start(self) -> HubServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def fail_next(self, count: int, mode: str = "503") -> None:
        """Make the next `count` requests fail: `mode` is an HTTP status (`"500"`, `"503"`...) or `"drop"` (the
        connection is closed without an answer)."""
        with self.lock:
            self._failures.extend([mode] * count)

    # -- storage -----------------------------------------------------------------------------------------------------

    def resolve(self, repo_id: str, revision: str) -> str:
        repo = self.repos[repo_id]
        if revision in repo["branches"]:
            return repo["branches"][revision]
        if revision in repo["tags"]:
            return repo["tags"][revision]
        if revision in self.commits and revision in repo["history"]:
            return revision
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def tree(self, repo_id: str, revision: str) -> dict[str, str]:
        return self.commits[self.resolve(repo_id, revision)]["tree"]

    def blob(self, oid: str) -> bytes:
        return (self.root / "blobs" / oid).read_bytes()

    def commit_count(self, repo_id: str) -> int:
        """Commits in `repo_id` (the initial commit included)."""
        return len(self.repos[repo_id]["history"])

    def _commit(self, repo_id: str, tree: dict[str, str], parent: Optional[str], message: str) -> str:
        record = {"tree": tree, "parent": parent, "message": message, "date": time.time()}
        oid = hashlib.sha1(json.dumps(record, sort_keys=True).encode()).hexdigest()
        self.commits[oid] = record
        self.repos[repo_id]["history"].append(oid)
        return oid

    def create_repo(self, repo_id: str, owner: str, private: bool) -> None:
        self.repos[repo_id] = {"owner": owner, "private": private, "branches": {}, "tags": {}, "history": []}
        readme = b"---\n{}\n---\n"
        oid = git_blob_oid(readme)
        (self.root / "blobs" / oid).write_bytes(readme)
        self.repos[repo_id]["branches"]["main"] = self._commit(repo_id, {".gitattributes": oid}, None, "initial commit")


def _handler(server: HubServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def do_GET(self):
            self._dispatch("GET")

        def do_HEAD(self):
            self._dispatch("HEAD")

        def do_POST(self):
            self._dispatch("POST")

        def do_DELETE(self):
            self._dispatch("DELETE")

        def do_PUT(self):
            self._dispatch("PUT")

        # -- plumbing ------------------------------------------------------------------------------------------------

        def _body(self) -> bytes:
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _user(self) -> Optional[str]:
            auth = self.headers.get("Authorization", "")
            return server.tokens.get(auth[len("Bearer "):]) if auth.startswith("Bearer ") else None

        def _send(self, status: int, body: bytes = b"", headers: Optional[dict] = None, head: bool = False):
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _json(self, payload: Any, status: int = 200):
            self._send(status, json.dumps(payload).encode(), {"Content-Type": "application/json"})

        def _dispatch(self, method: str):
            path = urlsplit(self.path).path
            body = self._body() if method in ("POST", "PUT", "DELETE") else b""
            with server.lock:
                server.requests.append((method, path))
                control = path.startswith("/_control/")
                failure = server._failures.pop(0) if server._failures and not control else None
            if failure == "drop":
                self.close_connection = True
                self.connection.close()
                return
            if failure is not None:
                self._send(int(failure), b'{"error": "injected failure"}', {"Content-Type": "application/json"})
                return
            try:
                with server.lock:
                    self._route(method, path, body)
            except HubError as err:
                headers = {"Content-Type": "application/json", "X-Error-Message": err.message}
                if err.code:
                    headers["X-Error-Code"] = err.code
                self._send(err.status, json.dumps({"error": err.message}).encode(), headers, head=method == "HEAD")

        def _repo(self, repo_id: str, write: bool = False) -> dict[str, Any]:
            user = self._user()
            repo = server.repos.get(repo_id)
            if repo is None or (repo["private"] and user != repo["owner"]):
                raise HubError(401 if user is None else 404, "Repository not found", "RepoNotFound")
            if write and user != repo["owner"]:
                raise HubError(403 if user else 401, f"You don't have the rights to write to {repo_id}")
            return repo

        # -- routes --------------------------------------------------------------------------------------------------

        def _route(self, method: str, path: str, body: bytes):
            parts = [unquote(p) for p in path.strip("/").split("/")]
            if parts[0] == "_control":  # for test code in other processes: POST /_control/fail {count, mode}, /reset
                payload = json.loads(body) if body else {}
                if parts[1] == "fail":
                    server.fail_next(int(payload.get("count", 1)), str(payload.get("mode", "503")))
                else:
                    server._failures.clear()
                return self._json({})
            if parts[:2] == ["api", "whoami-v2"]:
                user = self._user()
                if user is None:
                    raise HubError(401, "Invalid credentials in Authorization header")
                return self._json({"type": "user", "name": user, "orgs": [], "auth": {"accessToken": {"role": "write"}}})
            if parts[:3] == ["api", "repos", "create"] and method == "POST":
                return self._create_repo(json.loads(body))
            if parts[:2] == ["api", "validate-yaml"]:
                return self._validate_yaml(json.loads(body))
            if parts[:2] == ["api", "models"] and len(parts) >= 4:
                return self._api(method, f"{parts[2]}/{parts[3]}", parts[4:], body)
            if len(parts) >= 5 and parts[2] == "resolve":
                return self._resolve(method, f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
            raise HubError(404, f"No route for {method} {path}")

        def _create_repo(self, payload: dict):
            user = self._user()
            if user is None:
                raise HubError(401, "You must be authenticated to create a repo")
            namespace = payload.get("organization") or user
            if namespace != user:
                raise HubError(403, f"You don't have the rights to create a repo under {namespace}")
            repo_id = f"{namespace}/{payload['name']}"
            if repo_id in server.repos:
                # As the Hub does: the 409 carries the repo's url (read by `create_repo(exist_ok=True)`).
                return self._json({"error": "You already created this model repo", "url": f"{server.url}/{repo_id}"}, 409)
            private = payload.get("visibility") == "private" or bool(payload.get("private"))
            server.create_repo(repo_id, user, private)
            return self._json({"url": f"{server.url}/{repo_id}", "name": repo_id, "id": repo_id})

        def _validate_yaml(self, payload: dict):
            content = payload.get("content", "")
            errors = []
            if content.startswith("---"):
                try:
                    metadata = yaml.safe_load(content.split("---", 2)[1]) or {}
                    if not isinstance(metadata, dict):
                        errors.append({"message": "metadata must be a mapping"})
                    else:
                        errors += _metadata_errors(metadata)
                except yaml.YAMLError as err:
                    errors.append({"message": f"invalid YAML: {err}"})
            return self._json({"errors": errors, "warnings": []}, 400 if errors else 200)

        def _api(self, method: str, repo_id: str, rest: list[str], body: bytes):
            if not rest and method == "GET":
                return self._info(repo_id, "main")
            action = rest[0] if rest else ""
            revision = "/".join(rest[1:]) or "main"
            if action == "revision" and method == "GET":
                return self._info(repo_id, revision)
            if action == "refs" and method == "GET":
                repo = self._repo(repo_id)
                refs = {
                    "branches": [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": c} for n, c in repo["branches"].items()],
                    "tags": [{"name": n, "ref": f"refs/tags/{n}", "targetCommit": c} for n, c in repo["tags"].items()],
                    "converts": [],
                }
                return self._json(refs)
            if action == "commits" and method == "GET":
                repo = self._repo(repo_id)
                oid, out = server.resolve(repo_id, revision), []
                while oid is not None:
                    record = server.commits[oid]
                    out.append({"id": oid, "title": record["message"], "message": "", "authors": [],
                                "date": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(record["date"]))})
                    oid = record["parent"]
                return self._json(out)
            if action == "tree" and method == "GET":
                self._repo(repo_id)
                prefix = "/".join(rest[2:])
                tree = server.tree(repo_id, rest[1] if len(rest) > 1 else "main")
                files = [{"type": "file", "path": p, "oid": o, "size": len(server.blob(o))}
                         for p, o in sorted(tree.items()) if not prefix or p.startswith(prefix.rstrip("/") + "/")]
                return self._json(files)
            if action == "preupload" and method == "POST":
                self._repo(repo_id, write=True)
                tree = server.tree(repo_id, revision)
                files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": tree.get(f["path"])}
                         for f in json.loads(body)["files"]]
                return self._json({"files": files, "commitOid": server.resolve(repo_id, revision)})
            if action == "commit" and method == "POST":
                return self._commit(repo_id, revision, body)
            if action in ("branch", "tag"):
                return self._ref(method, repo_id, action, revision, json.loads(body) if body else {})
            raise HubError(404, f"No route for {method} /api/models/{repo_id}/{'/'.join(rest)}")

        def _info(self, repo_id: str, revision: str):
            repo = self._repo(repo_id)
            sha = server.resolve(repo_id, revision)
            siblings = [{"rfilename": p} for p in sorted(server.commits[sha]["tree"])]
            return self._json({"id": repo_id, "modelId": repo_id, "sha": sha, "private": repo["private"],
                               "siblings": siblings, "tags": [], "downloads": 0, "likes": 0})

        def _commit(self, repo_id: str, revision: str, body: bytes):
            self._repo(repo_id, write=True)
            repo = server.repos[repo_id]
            if revision not in repo["branches"]:
                raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            parent = repo["branches"][revision]
            tree = dict(server.commits[parent]["tree"])
            summary = ""
            for line in body.splitlines():
                item = json.loads(line)
                key, value = item["key"], item["value"]
                if key == "header":
                    summary = value.get("summary", "")
                    if value.get("parentCommit") not in (None, parent):
                        raise HubError(412, "parentCommit is not the head of the branch")
                elif key == "file":
                    data = base64.b64decode(value["content"])
                    oid = git_blob_oid(data)
                    (server.root / "blobs" / oid).write_bytes(data)
                    tree[value["path"]] = oid
                elif key == "deletedFile":
                    tree.pop(value["path"], None)
                elif key == "deletedFolder":
                    tree = {p: o for p, o in tree.items() if not p.startswith(value["path"].rstrip("/") + "/")}
                else:
                    raise HubError(400, f"Unsupported commit operation {key} (this server takes regular files only)")
            oid = server._commit(repo_id, tree, parent, summary)
            repo["branches"][revision] = oid
            return self._json({"success": True, "commitOid": oid, "commitUrl": f"{server.url}/{repo_id}/commit/{oid}"})

        def _ref(self, method: str, repo_id: str, kind: str, name: str, payload: dict):
            repo = self._repo(repo_id, write=method != "GET")
            refs = repo["branches" if kind == "branch" else "tags"]
            if method == "DELETE":
                if name not in refs:
                    raise HubError(404, f"{kind} {name} not found", "RevisionNotFound")
                del refs[name]
                return self._json({})
            if method != "POST":
                raise HubError(405, "method not allowed")
            if kind == "branch":
                if name in refs:
                    raise HubError(409, f"Branch {name} already exists")
                refs[name] = server.resolve(repo_id, payload.get("startingPoint") or "main")
            else:
                tag = payload["tag"]
                if tag in refs:
                    raise HubError(409, f"Tag {tag} already exists")
                refs[tag] = server.resolve(repo_id, name)
            return self._json({})

        def _resolve(self, method: str, repo_id: str, revision: str, path: str):
            self._repo(repo_id)
            sha = server.resolve(repo_id, revision)
            oid = server.commits[sha]["tree"].get(path)
            if oid is None:
                raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
            data = server.blob(oid)
            headers = {"X-Repo-Commit": sha, "ETag": f'"{oid}"', "Content-Type": "application/octet-stream"}
            self._send(200, data, headers, head=method == "HEAD")

    return Handler
