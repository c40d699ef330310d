"""The CLI's fal parts: ``generate --remote fal`` and ``fal-fetch`` (wired into :mod:`.cli`)."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

from ..errors import SDXLCNError


def add_remote_arguments(g) -> None:
    """Options of ``generate`` for running on fal."""
    g.add_argument("--remote", choices=["fal"], default=None,
                   help="run on fal's hosted endpoint instead of locally (needs FAL_KEY; fal bills per request; "
                        "--checkpoint/--controlnet are not needed)")
    _add_common(g)


def _add_common(p) -> None:
    p.add_argument("--fal-timeout", type=float, default=600.0,
                   help="seconds to wait for fal before giving up (the request id stays recorded; default 600)")
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
                        "user/sdxl_controlnet_img2img (the default when this pack is run from ComfyUI's "
                        "custom_nodes folder)")
    p.add_argument("--fetch", metavar="OUT", default=None,
                   help="fetch each pending result into OUT/<request id>/ (nothing is submitted or billed again)")
    p.add_argument("--fal-key-file", default=None, help="a file whose first line is the fal key (for --fetch)")
    p.add_argument("--fal-timeout", type=float, default=600.0, help="seconds to wait for each result (default 600)")
    p.set_defaults(func=cmd_fal_pending)


def cmd_fal_pending(args) -> int:
    from .. import request_log
    from .client import ENDPOINT, fetch_remote_result

    log_dir = pending_log_dir(args.request_log_dir)
    pending = request_log.pending(log_dir)
    if not pending:
        print(f"no pending fal requests in {request_log.log_path(log_dir)}", file=sys.stderr)
        return 0
    for rec in pending:
        state = rec.get("last_event", "submitted")
        print(f"{rec['request_id']}  {rec.get('time', '?')}  {state:16s}  {rec.get('prompt', '')[:60]!r}")
    if args.fetch is None:
        print(f"{len(pending)} pending; fetch them with --fetch OUT (or one with fal-fetch --request-id ID)",
              file=sys.stderr)
        return 0
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
            doc = save_then_complete(result, Path(args.fetch) / rid, log_dir, rid, endpoint)
        except SDXLCNError as exc:
            failed += 1
            print(f"error: {exc}" if rid in str(exc) else f"error: {rid}: {exc}", file=sys.stderr)
            continue
        for img in doc["images"]:
            print(img["url"])
    if failed:
        print(f"{failed} of {len(pending)} could not be fetched; they stay pending", file=sys.stderr)
    return 2 if failed else 0


def save_then_complete(result, out: Path, log_dir, request_id: str, endpoint: str, fmt: str = "png") -> dict:
    """Write ``result`` into ``out``, and only then record ``request_id`` as completed: a write that fails (a folder
    that cannot be written) is a :class:`~.errors.FalResultNotSaved` naming the folder, and the id stays pending."""
    from .. import request_log
    from ..result import write_result
    from .errors import FalResultNotSaved

    try:
        doc = write_result(result, out, fmt=fmt, extra={"request_id": request_id, "endpoint": endpoint})
    except OSError as exc:
        raise FalResultNotSaved(request_id, out, exc) from None
    request_log.record(log_dir, "completed", request_id, endpoint=endpoint)
    return doc


def pending_log_dir(given) -> Path:
    """The request log folder ``fal-pending`` reads: ``given``, else ComfyUI's ``user/sdxl_controlnet_img2img`` when
    this pack sits in ComfyUI's ``custom_nodes``. A folder or log that does not exist is an error, never "nothing
    pending" (a typo must not look like nothing to recover)."""
    from .. import request_log
    from .key import KEY_FILE_DIRNAME

    where = ("the --out folder of 'generate --remote fal', or ComfyUI's user/sdxl_controlnet_img2img "
             "(user/ beside ComfyUI's main.py unless ComfyUI runs with --user-directory)")
    if given is None:
        pack = Path(__file__).resolve().parents[2]
        if pack.parent.name != "custom_nodes":
            raise SDXLCNError(f"--request-log-dir is required here: {where}")
        given = pack.parent.parent / "user" / KEY_FILE_DIRNAME
        print(f"request log folder: {given} (ComfyUI's; another one with --request-log-dir)", file=sys.stderr)
    log_dir = Path(given).expanduser()
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


def _printer():
    last = {}

    def on_status(st):
        stream = sys.stderr
        if st.state == "STOPPING":  # a stop during the submit: we wait for fal's answer, then cancel
            for line in st.logs:
                print(line, file=stream)
            return
        if st.state == "SUBMITTED":
            print(f"submitted fal request {st.request_id}", file=stream)
        elif st.state == "IN_QUEUE" and last.get("pos") != st.queue_position:
            print(f"in fal's queue, position {st.queue_position}  ({st.elapsed:.1f}s)", file=stream)
            last["pos"] = st.queue_position
        elif st.state != last.get("state") and st.state != "IN_QUEUE":
            print(f"{st.state.lower().replace('_', ' ')}  ({st.elapsed:.1f}s)", file=stream)
        for line in st.logs:
            print(f"  fal: {line}", file=stream)
        last["state"] = st.state

    return on_status


def _write(result, args, request_id, endpoint, log_dir) -> int:
    from ..result import result_dir

    out = result_dir(args.out, args.overwrite)
    doc = save_then_complete(result, out, log_dir, request_id, endpoint, fmt=args.format)
    for img in doc["images"]:
        print(img["url"])
    print(f"seed {doc['seed']}; result written to {out / 'result.json'}", file=sys.stderr)
    return 0


def cmd_generate_remote(args, request) -> int:
    from .client import ENDPOINT, run_remote
    from .key import resolve_key

    from .files import check_request

    check_request(request)  # every refusal comes before the billing line: nothing is sent when one is refused
    key = resolve_key(None, args.fal_key_file)
    log_dir = Path(args.request_log_dir or args.out)
    on_status = _printer()
    print(f"running on fal ({ENDPOINT}); fal bills this request. Its id will be recorded in "
          f"{log_dir / 'fal_requests.jsonl'}", file=sys.stderr)
    with _Interrupt() as cancelled:
        result = run_remote(request, key=key, on_status=on_status, cancel_check=cancelled,
                            timeout_s=args.fal_timeout, request_log_dir=log_dir, record_completed=False)
    return _write(result, args, result.request_id, ENDPOINT, log_dir)


def cmd_fal_fetch(args) -> int:
    from .. import request_log
    from .client import ENDPOINT, fetch_remote_result

    log_dir = Path(args.request_log_dir or args.out)
    endpoint = args.endpoint
    if endpoint is None:
        rec = request_log.find(log_dir, args.request_id)
        endpoint = (rec or {}).get("endpoint") or ENDPOINT
    on_status = _printer()
    with _Interrupt() as cancelled:
        result = fetch_remote_result(args.request_id, key_file=args.fal_key_file, endpoint=endpoint,
                                     on_status=on_status, cancel_check=cancelled, timeout_s=args.fal_timeout,
                                     request_log_dir=log_dir, record_completed=False)
    return _write(result, args, result.request_id, endpoint, log_dir)


def check_local_arguments(args) -> None:
    missing = [f"--{n}" for n in ("checkpoint", "controlnet") if not getattr(args, n, None)]
    if missing:
        raise SDXLCNError(f"{' and '.join(missing)} required for a local run (or pass --remote fal to run on fal)")
