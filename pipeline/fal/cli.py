"""The CLI's fal parts: ``generate --remote fal`` and ``fal-fetch`` (wired into :mod:`.cli`)."""

from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
from pathlib import Path

from ..errors import SDXLCNError
from ..folders import USER_FOLDER, check_output_folder
from .settings import DEFAULT_TIMEOUT_S, ENDPOINT_URL_ENV, FalSettings


def add_remote_arguments(g) -> None:
    """Options of ``generate`` for running on fal."""
    g.add_argument("--remote", choices=["fal"], default=None,
                   help="run on fal's hosted endpoint instead of locally (needs FAL_KEY; fal bills per request; "
                        f"--checkpoint/--controlnet are not needed), or on your own server when {ENDPOINT_URL_ENV} "
                        "names one")
    _add_common(g)


def _add_common(p) -> None:
    p.add_argument("--fal-timeout", type=float, default=DEFAULT_TIMEOUT_S,
                   help=f"seconds to wait for fal before giving up (the request id stays recorded; default "
                        f"{DEFAULT_TIMEOUT_S:g})")
    p.add_argument("--fal-key-file", default=None,
                   help="a file whose first line is the fal key (used when FAL_KEY / FAL_KEY_ID+FAL_KEY_SECRET are unset)")
    p.add_argument("--request-log-dir", default=None,
                   help="folder of fal_requests.jsonl, the record of submitted request ids (default: the --out folder)")


def add_fal_fetch_parser(sub) -> None:
    f = sub.add_parser("fal-fetch", help="fetch the result of an already submitted fal request by its id "
                                         "(nothing is submitted or billed again)")
    f.add_argument("--request-id", required=True, help="the id printed by 'generate --remote fal' / in fal_requests.jsonl")
    f.add_argument("--out", required=True, help="output folder for the images and result.json (an earlier result "
                                                "there is kept: the new one goes to a run_NNN subfolder)")
    f.add_argument("--overwrite", action="store_true", help="replace an earlier result in --out instead")
    f.add_argument("--format", choices=["png", "jpeg"], default="png", help="image file format (default png)")
    f.add_argument("--endpoint", default=None, help="fal endpoint id (default: from the request log, else the SDXL one)")
    _add_common(f)
    f.set_defaults(func=cmd_fal_fetch)
    p = sub.add_parser("fal-pending", help="list submitted fal requests whose result was never fetched (paid, "
                                           "recoverable), and optionally fetch them")
    p.add_argument("--request-log-dir", default=None,
                   help="folder of fal_requests.jsonl: the --out folder of 'generate --remote fal', or ComfyUI's "
                        f"user/{USER_FOLDER} (the default when this pack is run from ComfyUI's "
                        "custom_nodes folder)")
    p.add_argument("--fetch", metavar="OUT", default=None,
                   help="fetch each pending result into OUT/<request id>/ (nothing is submitted or billed again)")
    p.add_argument("--fal-key-file", default=None, help="a file whose first line is the fal key (for --fetch)")
    p.add_argument("--fal-timeout", type=float, default=DEFAULT_TIMEOUT_S,
                   help=f"seconds to wait for each result (default {DEFAULT_TIMEOUT_S:g})")
    p.set_defaults(func=cmd_fal_pending)


def cmd_fal_pending(args) -> int:
    from .. import request_log
    from .client import ENDPOINT, fetch_remote_result

    log_dir = pending_log_dir(args.request_log_dir)
    pending = request_log.pending(log_dir)
    damaged = _say_damage(log_dir)  # a request hidden in a damaged line must not pass for "nothing pending"
    if not pending:
        print(f"no pending fal requests{' could be read' if damaged else ''} in {request_log.log_path(log_dir)}",
              file=sys.stderr)
        return 2 if damaged else 0
    for rec in pending:
        state = rec.get("last_event", "submitted")
        print(f"{rec['request_id']}  {rec.get('time', '?')}  {state:16s}  {rec.get('prompt', '')[:60]!r}")
    if args.fetch is None:
        print(f"{len(pending)} pending; fetch them with --fetch OUT (or one with fal-fetch --request-id ID)",
              file=sys.stderr)
        return 2 if damaged else 0
    check_output_folder(args.fetch, "--fetch")  # before anything is fetched
    from .key import KEY_FILE_NAME

    key_file = args.fal_key_file
    if key_file is None and (log_dir / KEY_FILE_NAME).is_file():  # ComfyUI's key file sits beside its request log
        key_file = log_dir / KEY_FILE_NAME
    failed = 0
    for rec in pending:  # one that fails stays pending, and the others are still fetched
        rid = rec["request_id"]
        endpoint = rec.get("endpoint") or ENDPOINT
        try:
            result = fetch_remote_result(rid, key_file=key_file, endpoint=endpoint, timeout_s=args.fal_timeout,
                                         request_log_dir=log_dir, record_completed=False)
            doc = save_then_complete(result, Path(args.fetch) / rid, log_dir, rid, endpoint,
                                     recovery=f"It stays pending in {request_log.log_path(log_dir)}.")
        except SDXLCNError as exc:
            failed += 1
            print(f"error: {exc}" if rid in str(exc) else f"error: {rid}: {exc}", file=sys.stderr)
            continue
        for img in doc["images"]:
            print(img["url"])
    if failed:
        rerun = (f"`{request_log.cli_command()} fal-pending --request-log-dir {_quoted(log_dir)} --fetch "
                 f"{_quoted(args.fetch)}`")
        it, stays = ("it", "it stays") if failed == 1 else ("them", "they stay")
        print(f"{failed} of {len(pending)} could not be fetched; {stays} pending: once the cause is fixed, rerun "
              f"{rerun} to fetch {it} (nothing is billed again)", file=sys.stderr)
    return 2 if failed or damaged else 0


def _quoted(path) -> str:
    return shlex.quote(os.path.abspath(path))


def _say_damage(log_dir) -> bool:
    """Warn about each damaged line of the request log (its number, and the ids still read from it); True when one
    may hide a request (a line whose id or event could not be read)."""
    from .. import request_log

    path = request_log.log_path(log_dir)
    hidden = False
    for d in request_log.read_checked(log_dir)[1]:
        ids = ", ".join(d.ids)
        if d.complete:
            what = f"its request {ids} was" if len(d.ids) == 1 else f"its requests {ids} were"
            print(f"warning: {path}, line {d.line} is damaged (cut off), but {what} read from it", file=sys.stderr)
            continue
        hidden = True
        if d.ids:
            fetch = "; ".join(request_log.fetch_command(rid, log_dir) for rid in d.ids)
            said = f"request id {ids} was read from it, but not its state: if it is still to be fetched: {fetch}"
        elif d.id_start:
            said = f"only the start of a request id could be read from it: {d.id_start}..."
        else:
            said = "no request id could be read from it"
        print(f"warning: {path}, line {d.line} could not be read (cut off or damaged, as a full disk leaves it): "
              f"{said}", file=sys.stderr)
    if hidden:
        print(f"warning: {path} is damaged, so a paid request may be missing from this list: compare with "
              "https://fal.ai/dashboard/requests, then delete the damaged lines", file=sys.stderr)
    return hidden


def save_then_complete(result, out: Path, log_dir, request_id: str, endpoint: str, fmt: str = "png",
                       recovery: str | None = None) -> dict:
    """Write ``result`` into ``out``, and only then record ``request_id`` as completed: a write that fails (a folder
    that cannot be written) is a :class:`~.errors.FalResultNotSaved` naming the folder and saying how to fetch it
    again (``recovery``; by default as the request log has it: pending there, or only by its id)."""
    from .. import request_log
    from ..result import write_result
    from .errors import FalResultNotSaved

    try:
        doc = write_result(result, out, fmt=fmt, extra={"request_id": request_id, "endpoint": endpoint})
    except OSError as exc:
        raise FalResultNotSaved(request_id, out, exc, recovery or request_log.recovery(request_id, log_dir)) from None
    request_log.record(log_dir, "completed", request_id, endpoint=endpoint)
    return doc


def pending_log_dir(given) -> Path:
    """The request log folder ``fal-pending`` reads: ``given``, else the pack's folder in ComfyUI's ``user/`` when
    this pack sits in ComfyUI's ``custom_nodes``. A folder or log that does not exist is an error, never "nothing
    pending" (a typo must not look like nothing to recover)."""
    from .. import request_log

    where = (f"the --out folder of 'generate --remote fal', or ComfyUI's user/{USER_FOLDER} "
             "(user/ beside ComfyUI's main.py unless ComfyUI runs with --user-directory)")
    if given is None:
        pack = Path(__file__).resolve().parents[2]
        if pack.parent.name != "custom_nodes":
            raise SDXLCNError(f"--request-log-dir is required here: {where}")
        given = pack.parent.parent / "user" / USER_FOLDER
        print(f"request log folder: {given} (ComfyUI's; another one with --request-log-dir)", file=sys.stderr)
    log_dir = Path(given).expanduser()
    if log_dir.exists() and not log_dir.is_dir():
        which = "the folder that holds it" if log_dir.name == request_log.LOG_FILE_NAME else f"a folder: {where}"
        raise SDXLCNError(f"--request-log-dir: {log_dir} is a file, not a folder; give {which}")
    if not log_dir.is_dir():
        raise SDXLCNError(f"--request-log-dir: the folder {log_dir} does not exist (a typo?); it should be {where}")
    if not request_log.log_path(log_dir).is_file():
        raise SDXLCNError(f"--request-log-dir: {log_dir} holds no request log ({request_log.LOG_FILE_NAME}): no fal "
                          f"request was ever recorded there; it should be {where}")
    return log_dir


class _Interrupt:
    """Ctrl-C while waiting goes to ``cancel_check`` instead of abandoning a paid request silently: our submission
    is cancelled on fal, a fetch by id only stops waiting (the request stays pending)."""

    def __init__(self):
        self.flag = threading.Event()
        self.previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, lambda *_: self.flag.set())
        return self.flag.is_set

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def _printer(settings):
    last = {}
    who = settings.target

    def on_status(st):
        stream = sys.stderr
        if st.state == "STOPPING":  # a stop during the submit: we wait for fal's answer, then cancel
            for line in st.logs:
                print(line, file=stream)
            return
        if st.state == "SUBMITTED":
            print(f"submitted request {st.request_id} to {who}", file=stream)
        elif st.state == "IN_QUEUE" and last.get("pos") != st.queue_position:
            print(f"in {settings.queue}, position {st.queue_position}  ({st.elapsed:.1f}s)", file=stream)
            last["pos"] = st.queue_position
        elif st.state != last.get("state") and st.state != "IN_QUEUE":
            print(f"{st.state.lower().replace('_', ' ')}  ({st.elapsed:.1f}s)", file=stream)
        for line in st.logs:
            print(f"  {who}: {line}", file=stream)
        last["state"] = st.state

    return on_status


def _folders(args) -> tuple[Path, Path]:
    """The result folder (``--out``, or its next ``run_NNN``) and the request log folder, checked before anything is
    sent to fal: a file in the way is refused now, not after a paid request."""
    from ..result import result_dir

    out = check_output_folder(result_dir(args.out, args.overwrite), "--out")
    if args.request_log_dir:
        return out, check_output_folder(args.request_log_dir, "--request-log-dir")
    return out, Path(args.out)


def _write(result, args, out: Path, request_id, endpoint, log_dir) -> int:
    doc = save_then_complete(result, out, log_dir, request_id, endpoint, fmt=args.format)
    for img in doc["images"]:
        print(img["url"])
    print(f"seed {doc['seed']}; result written to {out / 'result.json'}", file=sys.stderr)
    return 0


def cmd_generate_remote(args, request) -> int:
    from .client import ENDPOINT, run_remote
    from .files import check_request
    from .key import resolve_key

    settings = FalSettings()  # SDXLCN_FAL_URL: a self-hosted server instead of fal
    check_request(request, settings.target)  # every refusal comes before the billing line: nothing is sent then
    key = resolve_key(None, args.fal_key_file, settings.server)
    out, log_dir = _folders(args)
    on_status = _printer(settings)
    print(f"running on {settings.target} ({ENDPOINT}){settings.billing('; fal bills this request')}. Its id will be "
          f"recorded in {log_dir / 'fal_requests.jsonl'}", file=sys.stderr)
    with _Interrupt() as cancelled:
        result = run_remote(request, key=key, on_status=on_status, cancel_check=cancelled, timeout_s=args.fal_timeout,
                            request_log_dir=log_dir, settings=settings, record_completed=False)
    return _write(result, args, out, result.request_id, ENDPOINT, log_dir)


def cmd_fal_fetch(args) -> int:
    from .. import request_log
    from .client import ENDPOINT, fetch_remote_result

    out, log_dir = _folders(args)
    endpoint = args.endpoint
    if endpoint is None:
        rec = request_log.find(log_dir, args.request_id)
        endpoint = (rec or {}).get("endpoint") or ENDPOINT
    settings = FalSettings()  # SDXLCN_FAL_URL: a self-hosted server instead of fal
    with _Interrupt() as cancelled:
        result = fetch_remote_result(args.request_id, key_file=args.fal_key_file, endpoint=endpoint,
                                     on_status=_printer(settings), cancel_check=cancelled, timeout_s=args.fal_timeout,
                                     request_log_dir=log_dir, settings=settings, record_completed=False)
    return _write(result, args, out, result.request_id, endpoint, log_dir)
