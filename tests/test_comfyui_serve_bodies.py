"""ComfyUI's route (``nodes/serve_routes.py``) runs the same adapter as ``serve`` (issue 31, item 1; the break-it
review): on a real ComfyUI 0.8.0, a call under ``/sdxlcn/fal`` that takes no body but declares one (a key-less
``/ready``, ``/health``, a result file, any OPTIONS; a keyed status) is answered 413 at once and its connection
closed, while the client has sent only the body's first bytes (``test_serve_unread_bodies`` for the stand-alone
server)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from comfyui_harness import SKIP_REASON, comfyui_dir, running_comfyui
from test_serve import APP, KEY
from test_serve_unread_bodies import BODIES, REQUEST, answer_to_unfinished_body

pytestmark = pytest.mark.skipif(comfyui_dir() is None, reason=SKIP_REASON)
PREFIX = "/sdxlcn/fal"


@pytest.mark.parametrize("key", [KEY, None], ids=["keyed", "no key"])
def test_comfyuis_route_refuses_a_body_on_a_call_that_takes_none_unread(tmp_path, key):
    calls = [("GET", "/ready", None), ("GET", "/health", None), ("GET", "/files/" + "0" * 32 + "/0.png", None),
             ("OPTIONS", f"/{APP}", None), ("GET", f"{REQUEST}/status", key)]
    with running_comfyui(tmp_path, env={"SDXLCN_SERVE_KEY": key}) as comfy:
        cases = [(m, PREFIX + p, k, body) for m, p, k in calls for body in BODIES]
        with ThreadPoolExecutor(len(cases)) as pool:  # each waits up to 20 s for its answer, so all at once
            answers = list(pool.map(lambda case: answer_to_unfinished_body(comfy.port, *case), cases))
    for case, (status, detail, closed) in zip(cases, answers):
        assert (status, closed) == (413, True), (case, status, detail)
        assert "takes no request body" in detail, detail
