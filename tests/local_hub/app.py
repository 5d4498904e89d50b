"""The front server's Starlette application: the Hub's write API, and every read forwarded to olah.

It answers what `create_repo`, `create_commit`, `upload_folder`, `whoami`, `ModelCard.push_to_hub` and transformers'
`push_to_hub` call (repo creation, preupload, NDJSON commit, LFS batch and upload), committing into the git
repositories olah serves, and forwards GET, HEAD and `paths-info` requests to olah, replacing olah's errors for a
missing revision or file by the Hub's. Anything else gets 501.

Handlers block (git, the forwarded request): they run in Starlette's thread pool, and an error of any kind reaches
the client as a Hub-style JSON error answer rather than a dropped connection.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import json
import re
import urllib.parse
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.convertors import Convertor, register_url_convertor
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .store import OID, REPO_TYPES, HubError, check_path_in_repo, wants_lfs

if TYPE_CHECKING:
    from .server import LocalHub

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}
_ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"]
# Olah's read API, matched on the raw (still percent-encoded) path of a forwarded request.
_API = r"/api/(?P<type>models|datasets|spaces)/(?P<repo>[^/]+/[^/]+)"
_RESOLVE = re.compile(r"^/(?:(?P<type>datasets|spaces)/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_REPO_INFO = re.compile(rf"^{_API}$")
_READ_API = re.compile(rf"^{_API}/(?P<kind>revision|tree|paths-info)/(?P<rev>[^/]+)(?:/(?P<path>.*))?$")


class _Choice(Convertor[str]):
    """A path parameter that matches `regex` and stays a string."""

    def __init__(self, regex: str):
        self.regex = regex

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


# `/api/{type}s/...` takes the three repo types; URLs without `/api` name datasets and spaces only (models have no
# prefix there).
register_url_convertor("hub_api_type", _Choice("models|datasets|spaces"))
register_url_convertor("hub_url_type", _Choice("datasets|spaces"))
register_url_convertor("hub_oid", _Choice("[0-9a-f]{64}"))

Handler = Callable[["LocalHub", Request, bytes], Response]


def _send(status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> Response:
    return Response(body, status, {"Content-Type": "application/json", **(headers or {})})


def _send_json(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return _send(status, json.dumps(payload).encode(), headers)


def _error_response(error: HubError) -> Response:
    headers = {"X-Error-Message": error.header_message}
    if error.code:
        headers["X-Error-Code"] = error.code
    return _send_json({"error": error.message}, error.status, headers)


def _target(request: Request) -> str:
    """The request target as the client sent it: raw path, then the query string if any."""
    target = request.scope["raw_path"].decode("latin-1")
    query = request.scope["query_string"].decode("latin-1")
    return f"{target}?{query}" if query else target


def _endpoint(handler: Handler) -> Callable[[Request], Any]:
    """Wraps `handler`: reads the body, runs it in the thread pool, turns errors into Hub answers, logs the request."""

    async def endpoint(request: Request) -> Response:
        hub: LocalHub = request.app.state.hub
        try:
            body = await request.body()
            response = await run_in_threadpool(handler, hub, request, body)
        except HubError as error:
            hub.logger.info("%s %s -> %s %s", request.method, _target(request), error.status, error.message)
            response = _error_response(error)
        except Exception as error:  # a bug here must reach the client as a 500, not a dropped connection
            hub.logger.exception("%s %s failed", request.method, _target(request))
            response = _error_response(HubError(500, f"LocalHub internal error: {error!r}"))
        client = request.client.host if request.client else "-"
        hub.logger.info('%s "%s %s" %s', client, request.method, _target(request), response.status_code)
        return response

    return endpoint


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError as error:
        raise HubError(400, f"Request body is not JSON: {error}") from error


def _authorize(hub: LocalHub, request: Request) -> str:
    header = request.headers.get("Authorization", "")
    if not header.startswith("Bearer ") or not header[len("Bearer ") :].strip():
        raise HubError(
            401,
            "Missing token: send `Authorization: Bearer <token>` (set HF_TOKEN or pass token=...).",
            header_message="Invalid credentials in Authorization header",
        )
    token = header[len("Bearer ") :].strip()
    if hub.token is not None and token != hub.token:
        raise HubError(401, "Invalid credentials in Authorization header")
    return token


def _repo(hub: LocalHub, type_segment: str | None, repo: str) -> tuple[str, str, Path]:
    """Repo type, id and git folder of an existing repo; `type_segment` is the URL's `models`, `datasets`, ..."""
    repo_type = REPO_TYPES[type_segment or "models"]
    return repo_type, repo, hub.store.existing_repo_dir(repo_type, repo)


def _request_repo(hub: LocalHub, request: Request) -> tuple[str, str, Path]:
    params = request.path_params
    return _repo(hub, params.get("type"), f"{params['org']}/{params['name']}")


def _main_only(request: Request) -> None:
    revision = request.path_params["rev"]
    if revision != "main":
        raise HubError(404, f"LocalHub only commits to main, not {revision!r}.", code="RevisionNotFound")
    if "create_pr=1" in request.url.query:
        raise HubError(400, "LocalHub does not support create_pr.")


def _repo_url(hub: LocalHub, repo_type: str, repo_id: str) -> str:
    prefix = "" if repo_type == "model" else f"{repo_type}s/"
    return f"{hub.url}/{prefix}{repo_id}"


def _create_repo(hub: LocalHub, request: Request, body: bytes) -> Response:
    _authorize(hub, request)
    payload = _json(body)
    repo_type = payload.get("type") or "model"
    name = payload.get("name")
    if not isinstance(name, str) or not name:
        raise HubError(400, "Missing repo name.")
    repo_id = f"{payload.get('organization') or hub.user}/{name}"
    url = _repo_url(hub, repo_type, repo_id)
    if not hub.store.create(repo_type, repo_id):
        return _send_json({"error": f"You already created this {repo_type} repo", "url": url}, 409)
    return _send_json({"url": url, "name": repo_id, "id": repo_id})


def _whoami(hub: LocalHub, request: Request, body: bytes) -> Response:
    _authorize(hub, request)
    return _send_json(
        {
            "type": "user",
            "id": "0" * 24,
            "name": hub.user,
            "fullname": "hf_aace local tester",
            "email": "tester@localhost",
            "emailVerified": True,
            "isPro": False,
            "canPay": False,
            "orgs": [],
            "auth": {"type": "access_token", "accessToken": {"displayName": "local", "role": "write"}},
        }
    )


def _validate_yaml(hub: LocalHub, request: Request, body: bytes) -> Response:
    content = _json(body).get("content", "")
    found = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, flags=re.S)
    errors = []
    if found:
        try:
            metadata = yaml.safe_load(found.group(1))
        except yaml.YAMLError as error:
            errors.append({"message": f"Invalid YAML in the metadata block: {error}"})
        else:
            if metadata is not None and not isinstance(metadata, dict):
                errors.append({"message": "The metadata block must be a YAML mapping."})
    return _send_json({"errors": errors, "warnings": []}, 400 if errors else 200)


def _preupload(hub: LocalHub, request: Request, body: bytes) -> Response:
    _authorize(hub, request)
    _, _, repo_dir = _request_repo(hub, request)
    _main_only(request)
    files = _json(body).get("files", [])
    remote = hub.store.remote_oids(repo_dir, (entry["path"] for entry in files))
    answer = []
    for entry in files:
        sample = base64.b64decode(entry.get("sample", ""))
        mode = "lfs" if wants_lfs(entry["path"], int(entry.get("size", 0)), sample) else "regular"
        answer.append(
            {"path": entry["path"], "uploadMode": mode, "shouldIgnore": False, "oid": remote.get(entry["path"])}
        )
    return _send_json({"files": answer, "commitOid": hub.store.head(repo_dir)})


def _commit(hub: LocalHub, request: Request, body: bytes) -> Response:
    _authorize(hub, request)
    repo_type, repo_id, repo_dir = _request_repo(hub, request)
    _main_only(request)
    header: dict[str, Any] = {}
    files: dict[str, bytes] = {}
    lfs_files: dict[str, str] = {}
    deletions: list[str] = []
    for line in body.splitlines():
        if not line.strip():
            continue
        item = _json(line)
        key, value = item.get("key"), item.get("value", {})
        if key == "header":
            header = value
        elif key == "file":
            if value.get("encoding", "base64") != "base64":
                raise HubError(400, f"Unsupported encoding {value.get('encoding')!r} for {value.get('path')}.")
            try:
                files[check_path_in_repo(value["path"])] = base64.b64decode(value["content"], validate=True)
            except binascii.Error as error:
                raise HubError(400, f"Invalid base64 content for {value['path']}: {error}") from error
        elif key == "lfsFile":
            if not OID.match(str(value.get("oid", ""))) or value.get("algo", "sha256") != "sha256":
                raise HubError(400, f"Invalid LFS oid for {value.get('path')}.")
            lfs_files[check_path_in_repo(value["path"])] = value["oid"]
        elif key in ("deletedFile", "deletedFolder"):
            deletions.append(value["path"])
        else:
            raise HubError(400, f"LocalHub does not support commit operation {key!r}.")
    if not header.get("summary"):
        raise HubError(400, "The commit header needs a summary.")
    oid = hub.store.commit(
        repo_dir,
        files=files,
        lfs_files=lfs_files,
        deletions=deletions,
        summary=header["summary"],
        description=header.get("description", ""),
        parent=header.get("parentCommit"),
    )
    hub.logger.info("commit %s to %s %s: %s", oid, repo_type, repo_id, sorted({*files, *lfs_files}))
    url = f"{_repo_url(hub, repo_type, repo_id)}/commit/{oid}"
    return _send_json({"success": True, "commitOid": oid, "commitUrl": url, "hookOutput": ""})


def _commits(hub: LocalHub, request: Request, body: bytes) -> Response:
    """The commit list, answered here because olah lists authors as {"name": ...}; huggingface_hub reads "user"."""
    _, _, repo_dir = _request_repo(hub, request)
    revision = request.path_params["rev"]
    commit = hub.store.resolve(repo_dir, revision)
    if commit is None:
        raise HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
    log = hub.store.git(repo_dir, "log", "-z", "--format=%H%x1f%an%x1f%at%x1f%s%x1f%b", commit)
    commits = []
    for record in log.decode().split("\0"):
        if record.strip():
            sha, author, timestamp, title, message = record.split("\x1f")
            date = datetime.fromtimestamp(int(timestamp), timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            authors = [{"user": author, "avatar": None}]
            commits.append({"id": sha, "title": title, "message": message, "authors": authors, "date": date})
    return _send_json(commits)


def _lfs_batch(hub: LocalHub, request: Request, body: bytes) -> Response:
    _authorize(hub, request)
    _request_repo(hub, request)
    payload = _json(body)
    if payload.get("operation") != "upload":
        raise HubError(400, "LocalHub's LFS batch endpoint only handles uploads; downloads go through resolve.")
    objects = []
    for entry in payload.get("objects", []):
        oid, size = str(entry.get("oid", "")), entry.get("size")
        answer: dict[str, Any] = {"oid": oid, "size": size}
        if not OID.match(oid) or not isinstance(size, int):
            answer["error"] = {"code": 422, "message": "Invalid oid or size."}
        elif not hub.store.lfs_path(oid).is_file():
            answer["authenticated"] = True
            answer["actions"] = {"upload": {"href": f"{hub.url}/lfs-upload/{oid}", "header": {}}}
        objects.append(answer)
    return _send_json(
        {"transfer": "basic", "objects": objects}, headers={"Content-Type": "application/vnd.git-lfs+json"}
    )


def _lfs_upload(hub: LocalHub, request: Request, body: bytes) -> Response:
    # Like the Hub's pre-signed storage URLs, this one takes no Authorization header.
    oid = request.path_params["oid"]
    hub.store.put_lfs(oid, body)
    return _send(200, b"", {"ETag": f'"{oid}"'})


def _forward_or_reject(hub: LocalHub, request: Request, body: bytes) -> Response:
    """Forwards reads (GET, HEAD, `paths-info` POSTs) to olah; anything else is not implemented."""
    path = request.scope["raw_path"].decode("latin-1")
    method = request.method
    if not (method in ("GET", "HEAD") or (method == "POST" and "/paths-info/" in path)):
        raise HubError(501, f"LocalHub does not implement {method} {path}.")
    target = _target(request)
    if _REPO_INFO.match(path):
        # Olah asks the (dead) upstream Hub for repo info without a revision; the Hub answers for `main`.
        split = urllib.parse.urlsplit(target)
        target = urllib.parse.urlunsplit(split._replace(path=f"{split.path}/revision/main"))
    headers = {key: value for key, value in request.headers.items() if key.lower() not in _HOP_BY_HOP}
    if body:
        headers["Content-Length"] = str(len(body))
    connection = http.client.HTTPConnection("127.0.0.1", hub.olah_port, timeout=60)
    try:
        connection.request(method, target, body=body or None, headers=headers)
        answer = connection.getresponse()
        data = answer.read()
        status = answer.status
        answer_headers = [(k, v) for k, v in answer.getheaders() if k.lower() not in _HOP_BY_HOP]
    finally:
        connection.close()
    if status >= 400:
        error = _missing_entry_error(hub, path)
        if error is not None:
            hub.logger.info("olah answered %s for %s: %s", status, _target(request), error.message)
            raise error
    length = dict((k.lower(), v) for k, v in answer_headers).get("content-length", "0")
    # The server adds its own Server and Date headers; a HEAD answer keeps olah's length and sends no body.
    kept = [(k, v) for k, v in answer_headers if k.lower() not in ("content-length", "server", "date")]
    kept.append(("Content-Length", length if method == "HEAD" else str(len(data))))
    response = Response(data, status)
    response.raw_headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in kept]
    return response


def _missing_entry_error(hub: LocalHub, path: str) -> HubError | None:
    """The Hub's answer for a missing revision or file of an existing repo (olah answers 401 or 500 there)."""
    match = _RESOLVE.match(path) or _READ_API.match(path)
    if match is None:
        return None
    try:
        _, _, repo_dir = _repo(hub, match.group("type"), urllib.parse.unquote(match.group("repo")))
    except HubError:
        return None
    revision = urllib.parse.unquote(match.group("rev"))
    commit = hub.store.resolve(repo_dir, revision)
    if commit is None:
        return HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
    entry = match.groupdict().get("path")
    if entry and not hub.store.has_path(repo_dir, commit, urllib.parse.unquote(entry)):
        return HubError(404, "Entry not found", code="EntryNotFound")
    return None


_API_REPO = "/api/{type:hub_api_type}/{org}/{name}"
_LFS_BATCH = "{org}/{name}.git/info/lfs/objects/batch"
# Matched in order on the percent-decoded path: revisions may hold an encoded '/' (`refs%2Fpr%2F1`), hence `:path`.
# The last route takes everything else.
_ROUTES = [
    ("/api/repos/create", ["POST"], _create_repo),
    ("/api/whoami-v2", ["GET"], _whoami),
    ("/api/validate-yaml", ["POST"], _validate_yaml),
    (f"{_API_REPO}/preupload/{{rev:path}}", ["POST"], _preupload),
    (f"{_API_REPO}/commit/{{rev:path}}", ["POST"], _commit),
    (f"/{_LFS_BATCH}", ["POST"], _lfs_batch),
    (f"/{{type:hub_url_type}}/{_LFS_BATCH}", ["POST"], _lfs_batch),
    ("/lfs-upload/{oid:hub_oid}", ["PUT"], _lfs_upload),
    (f"{_API_REPO}/commits/{{rev:path}}", ["GET"], _commits),
    ("/{path:path}", _ALL_METHODS, _forward_or_reject),
]


def create_app(hub: LocalHub) -> Starlette:
    """The front server's application for `hub` (its store, token, user, URL, olah port and logger)."""
    app = Starlette(routes=[Route(path, _endpoint(handler), methods=methods) for path, methods, handler in _ROUTES])
    app.state.hub = hub
    return app
