"""Command-line side of publishing: ``lineas-bake push DIR OWNER/NAME`` and ``--push-to-hub``.

Parsing, printing and exit codes only; every network call is in :mod:`bake.publish.hub`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from bake.publish.hub import check_online, format_plan, integrity_lines, plan_push, push
from bake.publish.hub_errors import HubError
from lineas.io import ExitCode, fail

PROG = "lineas-bake push"
EXIT_OK, EXIT_HUB, EXIT_BAD_INPUT = ExitCode.OK, ExitCode.FAIL, ExitCode.BAD_INPUT

PUBLISH_HELP = """\
Only an intact export is uploaded: every file must match the sha256 that the
bake recorded in lineas_provenance.json (no file changed, missing or added), with
no symlink, dotfile or special file in the folder; anything else is refused
(exit 2, naming the files) unless --force.  Upload uses huggingface_hub
(create_repo, create_commit), then lists the files at the new commit and checks
every size and content hash (LFS sha256 / git blob sha1) against the local files
before printing the commit URL.  The token comes
from HF_TOKEN or the cached `hf auth login`; it is never printed or written.
HF_ENDPOINT selects another Hub endpoint.  If the upload fails, the local export
stays where it is and the message says how to push it again.
"""

PUSH_EPILOG = """\
exit codes:
  0  uploaded and verified (or --dry-run printed the plan)
  1  the Hub refused or failed: token rejected (401), no permission (403),
     repo/namespace not found (404), unavailable after retries (5xx, connection),
     or the files at the new commit do not match the local files
  2  bad input: no such folder, no README.md model card, invalid OWNER/NAME,
     offline mode on (HF_HUB_OFFLINE=1), or a folder that is not the intact
     export (provenance missing or malformed, files changed, missing or added,
     symlinks, dotfiles), unless --force

examples:
  lineas-bake push smollm2-positive me/smollm2-positive --dry-run
  lineas-bake push smollm2-positive me/smollm2-positive --private
  lineas-bake push smollm2-positive my-org/smollm2-positive --revision lambda-0.8 --commit-message "λ=0.8"
"""


def add_publish_arguments(group: argparse._ArgumentGroup, *, with_repo: bool) -> None:
    """The shared options; ``with_repo`` adds ``--push-to-hub`` (the bake command)."""
    if with_repo:
        group.add_argument("--push-to-hub", metavar="OWNER/NAME",
                           help="after a successful, verified export, upload the output folder to this Hub repo "
                                "(created if missing) and verify the upload")
    group.add_argument("--private", action="store_true", help="create the repo as private (ignored if it exists)")
    group.add_argument("--revision", "--branch", dest="revision", metavar="BRANCH", default=None,
                       help="branch to commit to (created from main if missing; default: main)")
    group.add_argument("--commit-message", metavar="MSG", default=None,
                       help="commit message (default: 'Upload steered model baked with lineas-bake (<folder>)')")


def build_push_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Upload an existing lineas-bake export folder to the "
                                "Hugging Face Hub and verify the upload.\n\n" + PUBLISH_HELP,
                                epilog=PUSH_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", metavar="DIR", help="export folder written by lineas-bake (must contain README.md)")
    p.add_argument("repo_id", metavar="OWNER/NAME", help="Hub repository (user or organisation / name)")
    net = p.add_argument_group("publishing (talks to the Hub)")
    add_publish_arguments(net, with_repo=False)
    p.add_argument("--dry-run", action="store_true",
                   help="list what would be uploaded, and where, or why the folder is refused; no network")
    p.add_argument("--force", action="store_true",
                   help="upload a folder that is not the intact export anyway: its dotfiles, symlinks and special "
                        "files are skipped (never uploaded), and when files changed, went missing or were added, "
                        "the card's verification section is replaced by 'not verified'; says what it skips")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    return p


def run_push(folder: str | Path, repo_id: str, *, revision: str | None = None, private: bool = False,
             commit_message: str | None = None, dry_run: bool = False, force: bool = False, prog: str = PROG) -> int:
    """Plan (and unless ``dry_run``) push; prints the outcome, returns the exit code.  A folder that is not the
    intact export is refused (exit 2) unless ``force``."""
    try:
        if not dry_run:
            check_online()  # before hashing the files: offline mode can only fail
        plan = plan_push(folder, repo_id, revision=revision, private=private, commit_message=commit_message,
                         force=force)
        if dry_run:
            print(format_plan(plan))
            return EXIT_OK
        if plan.problems or plan.skipped:  # only with --force: say what it skips and what it changes
            print(f"{prog}: warning: {plan.folder} is not the intact export\n" + "\n".join(integrity_lines(plan)),
                  file=sys.stderr)
        print(f"uploading {len(plan.files)} files from {plan.folder} to {plan.repo_url} (branch {plan.revision}) ...",
              file=sys.stderr)
        result = push(plan)
    except HubError as e:
        return fail(prog, str(e), e.exit_code)
    print(result.summary())
    return EXIT_OK


def push_main(argv: Sequence[str]) -> int:
    args = build_push_parser().parse_args(list(argv))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="lineas-bake: %(levelname)s: %(message)s")
    return run_push(args.folder, args.repo_id, revision=args.revision, private=args.private,
                    commit_message=args.commit_message, dry_run=args.dry_run, force=args.force)


def describe_push_after_export(out: str | Path, args) -> str:
    """What ``lineas-bake ... --push-to-hub X --dry-run`` adds to the fold plan (nothing is written yet)."""
    from bake.publish.hub import check_repo_id, default_endpoint

    check_repo_id(args.push_to_hub)
    return (f"would then upload the export folder {out} (all its files, README.md model card included) to "
            f"{default_endpoint()}/{args.push_to_hub} (branch {args.revision or 'main'}, "
            f"{'private' if args.private else 'public'} if created), and verify the upload")
