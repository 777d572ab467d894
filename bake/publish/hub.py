"""Publish an export folder to the Hugging Face Hub, then prove the upload arrived intact.

This is the only module in ``bake/`` that calls the Hub (:mod:`bake.publish.hub_errors` turns the
calls' failures into messages and retries them).  Steps:

1. :func:`plan_push` (offline): list the folder without following symlinks, hash every
   regular file (sha256 and git blob sha1), compare them with the integrity record of the
   folder's provenance file (:func:`check_export`) and check the repo id.  A folder that is not the
   intact export is refused (:class:`HubIntegrityError`, exit 2), naming the files: provenance
   missing or malformed, files changed, missing or added, symlinks, dotfiles, special files.  With
   ``force`` it is uploaded anyway, but never its dotfiles, symlinks and special files, and, when the
   uploaded files differ from what the bake wrote, with every ``README.md``'s verification section
   replaced by "not verified" (:func:`bake.publish.card.unverified_card`).
   ``--dry-run`` stops here and prints :func:`format_plan` (or the refusal).
2. :func:`push`: ``create_repo(exist_ok=True)``, ``create_branch(exist_ok=True)``
   for a non-default ``--revision``, one ``create_commit`` adding exactly the planned files.
3. Verify: list the remote tree *at the new commit* and compare every local file
   by size and content hash: the LFS oid (sha256) for LFS files (Xet-stored
   ones included), the Xet hash for a file listed with nothing else, the git
   blob sha1 for regular files.  All are content hashes, so a match means the
   bytes on the Hub are the bytes on disk.

Errors are mapped to messages a user can act on (401/403: token, 404: repo or
namespace); 5xx, 429 and connection errors are retried with exponential backoff
(:class:`bake.publish.hub_errors.RetryPolicy`), then reported.  Every failure message names the local
export, which is never modified, so ``lineas-bake push DIR OWNER/NAME`` can be
run again.

The token comes from ``token=`` or, by default, from huggingface_hub's own
lookup (``HF_TOKEN``, then the cached ``hf auth login`` token).  It is never
printed, logged or written by this module; messages are scrubbed of it anyway.

Endpoint: huggingface_hub reads ``HF_ENDPOINT`` once, at import time, and some
of its helpers (e.g. ``CommitInfo``) parse URLs against that value only.  So
the endpoint is taken from ``huggingface_hub.constants.ENDPOINT``; an explicit
``endpoint=`` that disagrees with it is refused up front rather than failing
after the commit has been made.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from bake.publish.card import PROVENANCE_FILE, unverified_card
from bake.publish.hub_errors import (
    HubAuthError,
    HubError,
    HubInputError,
    HubIntegrityError,
    HubVerificationError,
    RetryPolicy,
    Scrubber,
    with_retries,
)
from bake.publish.integrity import compare, recorded_files, scan_folder
from lineas.io import human_size

log = logging.getLogger(__name__)

CHUNK = 8 * 1024 * 1024
MODEL_CARD = "README.md"
DEFAULT_RETRY = RetryPolicy()


# ----------------------------------------------------------------------------- data
@dataclass(frozen=True)
class LocalFile:
    path: str  # posix path relative to the folder = path in the repo
    size: int
    sha256: str  # what the Hub reports as the LFS oid
    git_sha1: str  # what the Hub reports as the blob oid of a regular (non-LFS) file


@dataclass(frozen=True)
class PushPlan:
    folder: Path
    repo_id: str
    revision: str
    private: bool
    commit_message: str
    endpoint: str
    files: tuple[LocalFile, ...]
    problems: tuple[str, ...] = ()  # why the uploaded files are not the intact export (only with force)
    skipped: tuple[str, ...] = ()  # "path: why" of what is never uploaded (only with force)
    replaced: dict[str, bytes] = field(default_factory=dict)  # uploaded instead of the file (the cards)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def repo_url(self) -> str:
        return f"{self.endpoint}/{self.repo_id}"

    def retry_hint(self) -> str:
        return (f"The local export is unchanged at {self.folder}; push it again with:\n"
                f"  lineas-bake push {self.folder} {self.repo_id}"
                + (f" --revision {self.revision}" if self.revision != "main" else ""))


@dataclass(frozen=True)
class PushResult:
    repo_id: str
    revision: str
    commit_oid: str
    commit_url: str
    files: tuple[LocalFile, ...]
    remote_extra: tuple[str, ...] = field(default=())  # files at the commit that are not in the folder
    notes: tuple[str, ...] = field(default=())  # what --force changed

    def summary(self) -> str:
        lines = [(f"pushed {len(self.files)} files to {self.repo_id}@{self.revision}, verified "
                  "(size + sha256/git-sha1 of every file at the new commit)"),
                 f"commit: {self.commit_url}", *self.notes]
        if self.remote_extra:
            lines.append(f"note: the repo also holds {len(self.remote_extra)} file(s) not in this export: "
                         + ", ".join(self.remote_extra))
        return "\n".join(lines)


# ----------------------------------------------------------------------------- offline part
def hash_file(path: Path) -> tuple[int, str, str]:
    """(size, sha256, git blob sha1) in one pass over the file, opened without following a symlink."""
    with os.fdopen(os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)), "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        sha256 = hashlib.sha256()
        sha1 = hashlib.sha1(b"blob %d\0" % size)
        while chunk := fh.read(CHUNK):
            sha256.update(chunk)
            sha1.update(chunk)
    return size, sha256.hexdigest(), sha1.hexdigest()


def hash_bytes(data: bytes) -> tuple[int, str, str]:
    return len(data), hashlib.sha256(data).hexdigest(), hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def check_export(folder: Path, regular: list[str]) -> tuple[tuple[LocalFile, ...], tuple[str, ...]]:
    """Hash ``regular`` (from :func:`scan_folder`) and compare with the provenance's integrity record:
    (the files, ``"path: why"`` for each one changed, missing or not written by the bake)."""
    try:
        recorded = recorded_files(folder)
    except ValueError as e:
        recorded, problems = None, [f"{PROVENANCE_FILE}: {e}"]
    files = tuple(LocalFile(rel, *hash_file(folder / rel)) for rel in regular)
    if recorded is not None:
        problems = compare(recorded, {f.path: (f.size, f.sha256) for f in files if f.path != PROVENANCE_FILE})
    return files, tuple(problems)


def integrity_lines(plan: PushPlan) -> list[str]:
    """What the plan says about the folder being the intact export (dry run, and before a --force upload)."""
    if not plan.problems and not plan.skipped:
        return [f"  intact export: every file matches the sha256 recorded in {PROVENANCE_FILE}"]
    lines = []
    if plan.problems:
        lines += ["  --force: NOT the intact export; uploaded as not verified (the verification section of "
                  f"{', '.join(plan.replaced) or 'the card'} is replaced by 'not verified'):"]
        lines += [f"    {p}" for p in plan.problems]
    if plan.skipped:
        lines += ["  --force: skipped, never uploaded:"] + [f"    {p}" for p in plan.skipped]
    return lines


def _refusal(folder: Path, problems: list[str]) -> str:
    return (f"{folder} is not the intact export lineas-bake wrote, so it is not pushed:\n  "
            + "\n  ".join(problems) + "\nPush the folder exactly as lineas-bake wrote it (or bake again); --force "
            "uploads it anyway, without its dotfiles and symlinks, and with the card's verification claim "
            "replaced by 'not verified' when files changed")


def check_online() -> None:
    """Fail at once when huggingface_hub is in offline mode (it would otherwise retry for many seconds)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "")
    if constants.HF_HUB_OFFLINE or env.strip().upper() in {"1", "ON", "YES", "TRUE"}:
        raise HubInputError(f"offline mode is on (HF_HUB_OFFLINE={env or '1'}): nothing can be pushed to the Hub; "
                            "unset HF_HUB_OFFLINE to publish")


def default_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT.rstrip("/")


def check_repo_id(repo_id: str) -> str:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(repo_id, str) or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise HubInputError(f"repository {repo_id!r} must be OWNER/NAME (a user or organisation, then the repo name)")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise HubInputError(f"repository {repo_id!r} is not a valid Hub repo id: {e}") from None
    return repo_id


def plan_push(folder: str | os.PathLike, repo_id: str, *, revision: str | None = None, private: bool = False,
              commit_message: str | None = None, endpoint: str | None = None, force: bool = False) -> PushPlan:
    """Check the inputs, hash the files to upload and check they are the intact export (:func:`check_export`;
    :class:`HubIntegrityError` unless ``force``); no network."""
    folder = Path(folder).expanduser().resolve()
    check_repo_id(repo_id)
    if not folder.is_dir():
        raise HubInputError(f"export folder {str(folder)!r} does not exist or is not a directory")
    configured = default_endpoint()
    if endpoint is not None and endpoint.rstrip("/") != configured:
        raise HubInputError(f"endpoint {endpoint!r} differs from huggingface_hub's configured endpoint {configured!r}; "
                            "set HF_ENDPOINT in the environment before starting instead")
    revision = revision or "main"
    if not revision.strip() or any(c in revision for c in " \t\n~^:?*[\\"):
        raise HubInputError(f"revision {revision!r} is not a valid branch name")
    try:
        regular, skipped = scan_folder(folder)
    except OSError as e:
        raise HubInputError(f"cannot list {folder}: {e.strerror} ({e.filename})") from None
    if MODEL_CARD not in regular:
        raise HubInputError(f"{folder} has no {MODEL_CARD} (model card); the card is part of every upload. "
                            "Push a folder written by lineas-bake, or add a card")
    try:
        files, problems = check_export(folder, regular)
    except OSError as e:
        raise HubInputError(f"cannot read {e.filename}: {e.strerror}") from None
    if (problems or skipped) and not force:
        raise HubIntegrityError(_refusal(folder, [*problems, *skipped]))
    replaced = {}
    if problems:  # what is uploaded is not what the bake wrote and checked: no card may say it is verified
        for f in files:
            if PurePosixPath(f.path).name == MODEL_CARD:
                text = (folder / f.path).read_text(encoding="utf-8", errors="replace")
                replaced[f.path] = unverified_card(text, problems).encode("utf-8")
        files = tuple(LocalFile(f.path, *hash_bytes(replaced[f.path])) if f.path in replaced else f for f in files)
    message = commit_message or (f"Upload steered model baked with lineas-bake ({folder.name})"
                                 + (" -- not the intact export, pushed with --force, not verified" if problems else ""))
    return PushPlan(folder, repo_id, revision, bool(private), message, configured, files, problems, tuple(skipped),
                    replaced)


def format_plan(plan: PushPlan) -> str:
    """What ``--dry-run`` prints: destination, then one line per file."""
    lines = [f"would upload {len(plan.files)} files ({human_size(plan.total_bytes)}) from {plan.folder}",
             f"  to {plan.repo_url} (branch {plan.revision}, {'private' if plan.private else 'public'} if created)",
             f"  commit message: {plan.commit_message!r}"]
    lines += integrity_lines(plan)
    width = max(len(f.path) for f in plan.files)
    lines += [f"  {f.path.ljust(width)}  {human_size(f.size):>9}  sha256 {f.sha256[:12]}"
              + ("  (rewritten: not verified)" if f.path in plan.replaced else "") for f in plan.files]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- network part
def make_api(plan: PushPlan, token: str | None = None):
    """An ``HfApi`` bound to the plan's endpoint; the token defaults to HF_TOKEN / the cached login."""
    from huggingface_hub import HfApi, get_token

    token = token if token is not None else get_token()
    if not token:
        raise HubAuthError("no Hugging Face token found: set HF_TOKEN or run `hf auth login` "
                           "(the token needs write access to " + plan.repo_id.split("/")[0] + ").")
    return HfApi(endpoint=plan.endpoint, token=token, library_name="lineas-bake"), token


def _xet_hashes(folder: Path, paths: list[str]) -> dict[str, str]:
    """Local Xet hashes (the merkle hash the Hub reports as ``xetHash``), computed by ``hf_xet`` itself."""
    if not paths:
        return {}
    try:
        import hf_xet
    except ImportError:
        raise HubVerificationError(f"the Hub reports only a Xet hash for {', '.join(paths)}; computing the local one "
                                   "needs the package hf_xet (pip install hf_xet)") from None
    infos = hf_xet.hash_files([str(folder / p) for p in paths])
    return {p: info.hash for p, info in zip(paths, infos)}


def _remote_mismatch(f: LocalFile, r, xet_local: dict[str, str]) -> str | None:
    """Why the remote file ``r`` (a ``RepoFile``) is not the local file ``f``, or None.

    Which hash the Hub gives (checked against huggingface_hub 2.4's source): a commit names every LFS
    file by its sha256 (``_commit_api.py``, ``_prepare_commit_payload``: ``lfsFile`` with ``algo: sha256``),
    also when the bytes went through Xet, whose upload backfills that sha256 (``_commit_api.py``,
    ``_upload_xet_files``: ``op.upload_info.sha256 = ...xet_info.sha256``); the tree then lists it as
    ``lfs.oid`` (``hf_api.py``, ``RepoFile.__init__``) beside ``xetHash``.  So the sha256 is compared when
    it is there; a file listed with a Xet hash and no LFS entry is compared by Xet hash; a regular file by
    git blob sha1.
    """
    if r.size != f.size:
        return f"remote size {r.size} != local {f.size}"
    xet = getattr(r, "xet_hash", None)  # RepoFile has it since huggingface_hub 0.32
    if r.lfs is not None:
        if r.lfs.sha256 != f.sha256:
            return f"remote LFS sha256 {r.lfs.sha256[:12]} != local {f.sha256[:12]}"
    elif xet:
        if xet != xet_local[f.path]:
            return f"remote Xet hash {xet[:12]} != local {xet_local[f.path][:12]}"
    elif r.blob_id != f.git_sha1:
        return f"remote git blob {r.blob_id[:12]} != local {f.git_sha1[:12]}"
    return None


def verify_remote(api, plan: PushPlan, commit_oid: str) -> tuple[str, ...]:
    """Compare the tree at ``commit_oid`` with the local files; returns remote-only paths."""
    remote = {}
    for entry in api.list_repo_tree(plan.repo_id, recursive=True, revision=commit_oid):
        if hasattr(entry, "size") and hasattr(entry, "blob_id"):  # RepoFile (RepoFolder has tree_id)
            remote[entry.path] = entry
    xet_only = [f.path for f in plan.files if f.path in remote and remote[f.path].lfs is None
                and getattr(remote[f.path], "xet_hash", None) and remote[f.path].size == f.size]
    xet_local = _xet_hashes(plan.folder, xet_only)
    problems = []
    for f in plan.files:
        r = remote.get(f.path)
        why = f"missing at commit {commit_oid[:12]}" if r is None else _remote_mismatch(f, r, xet_local)
        if why is not None:
            problems.append(f"{f.path}: {why}")
    if problems:
        raise HubVerificationError(f"the upload to {plan.repo_id} at commit {commit_oid} does not match the local "
                                   "files:\n  " + "\n  ".join(problems))
    local = {f.path for f in plan.files}
    return tuple(sorted(p for p in remote if p not in local and p != ".gitattributes"))


def push(plan: PushPlan, *, token: str | None = None, api=None, retry: RetryPolicy = DEFAULT_RETRY,
         sleep: Callable[[float], None] = time.sleep) -> PushResult:
    """Create the repo (and branch), upload the folder, verify the commit.  Raises :class:`HubError`."""
    scrub = Scrubber(token)
    if api is None:
        check_online()
    try:
        if api is None:
            api, token = make_api(plan, token)
            scrub = Scrubber(token)
        created = with_retries(lambda: api.create_repo(plan.repo_id, private=plan.private, exist_ok=True),
                                plan, "create repo", retry, sleep)
        log.info("repository ready: %s", created)
        if plan.revision != "main":
            with_retries(lambda: api.create_branch(plan.repo_id, branch=plan.revision, exist_ok=True),
                          plan, f"create branch {plan.revision!r}", retry, sleep)
        info = with_retries(lambda: api.create_commit(repo_id=plan.repo_id, operations=_operations(plan),
                                                       revision=plan.revision, commit_message=plan.commit_message),
                             plan, "upload", retry, sleep)
        extra = with_retries(lambda: verify_remote(api, plan, info.oid), plan, "verify upload", retry, sleep)
    except HubError as e:
        raise type(e)(scrub(f"{e}\n{plan.retry_hint()}")) from e.__cause__
    notes = ((f"note: --force: not the intact export; {', '.join(plan.replaced) or 'no card'} uploaded with "
              "'not verified' in place of the verification section",) if plan.problems else ())
    notes += ((f"note: --force: skipped (not uploaded): {', '.join(s.split(': ')[0] for s in plan.skipped)}",)
              if plan.skipped else ())
    return PushResult(plan.repo_id, plan.revision, info.oid, scrub(info.commit_url), plan.files, extra, notes)


def _operations(plan: PushPlan) -> list:
    """One ``CommitOperationAdd`` per planned file (fresh each try: the client marks them as it uploads)."""
    from huggingface_hub import CommitOperationAdd

    return [CommitOperationAdd(path_in_repo=f.path, path_or_fileobj=plan.replaced[f.path] if f.path in plan.replaced
                               else str(plan.folder / f.path)) for f in plan.files]
