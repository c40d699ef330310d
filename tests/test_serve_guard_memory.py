"""Memory a submit's checks cost (issue 31, a break-it review of the hardened endpoint):

- the body guard that refuses a body unlike a request before it is parsed (``inputs.refuse_unlike_a_request``) cut
  strings out with a regular expression whose repeated group kept a mark per escape: one 57 MiB body
  ``{"prompt":"\\n\\n..."}`` (30 M escapes) took 5 GB, and each string cut out costs ~170 bytes more (a body of
  ``"",`` repeated). Measured with tracemalloc (Python's own allocations, the regular expression's included);
- an accepted image is decoded once to know it decodes: eight submits at once of a 4096x4096 RGBA PNG (small on the
  wire) took 2 GB (each decode at once, and the alpha path made four full-size copies). Measured as the process's
  peak resident memory (Pillow's pixels are not Python allocations).
"""

from __future__ import annotations

import json
import threading
import tracemalloc

from test_serve import APP, call, fal_input
from test_serve_bounds import huge_png, paused_server, peak_rss_mb, reset_peak_rss
from test_serve_input_bounds import data_uri


def guard_peak(body: bytes):
    """(the guard's answer: None or the HttpError, its peak of Python allocations in bytes)."""
    from sdxl_controlnet_img2img.pipeline.serve.inputs import refuse_unlike_a_request
    from sdxl_controlnet_img2img.pipeline.serve.protocol import HttpError

    tracemalloc.start()
    try:
        refuse_unlike_a_request(body)
        outcome = None
    except HttpError as exc:
        outcome = exc
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return outcome, peak


def test_the_body_guard_costs_memory_in_proportion_to_the_body_whatever_it_holds():
    """8 MiB of escapes in one prompt (a request's shape: let through to the parser), 6 MiB of empty strings and
    6 MiB of escaped quotes: each checked within a few times the body's size."""
    escapes = b'{"prompt":"' + b"\\n" * 4_000_000 + b'"}'
    quotes = b'{"prompt":"' + b'\\\\\\"' * 1_500_000 + b'"}'
    strings = b"{" + b'"",' * 2_000_000 + b"}"
    for body, refused in ((escapes, False), (quotes, False), (strings, True)):
        outcome, peak = guard_peak(body)
        assert peak < 3 * len(body) + 2**20, f"{len(body) >> 20} MiB body: the guard took {peak >> 20} MiB"
        assert (outcome is not None) == refused, outcome
    assert json.loads(escapes)["prompt"] == "\n" * 4_000_000  # what the guard let through is a request's shape
    assert json.loads(quotes)["prompt"] == '\\"' * 1_500_000
    outcome, _ = guard_peak(strings)
    assert outcome.status == 422 and outcome.detail[0]["loc"] == ["body"], outcome.detail
    assert "strings" in outcome.detail[0]["msg"], outcome.detail


def test_the_body_guard_still_counts_what_is_outside_strings():
    """Escapes that would hide a string's end (an escaped backslash before the closing quote, escaped quotes inside)
    do not make structure inside a string count, nor hide structure outside one."""
    from sdxl_controlnet_img2img.pipeline.serve.inputs import MAX_JSON_CONTAINERS

    inside = json.dumps({"prompt": "\\" + "[" * (MAX_JSON_CONTAINERS + 5) + '"\\'}).encode()
    assert guard_peak(inside)[0] is None
    outside = json.dumps({"prompt": 'a\\"b\\', "x": [[]] * (MAX_JSON_CONTAINERS + 5)}).encode()
    outcome, _ = guard_peak(outside)
    assert outcome is not None and "objects/arrays" in outcome.detail[0]["msg"], outcome


def test_eight_submits_of_a_large_transparent_png_at_once_stay_bounded(tmp_path):
    """A 4096x4096 RGBA PNG (the largest taken; 64 MB decoded) as both images of eight submits sent at once: each is
    accepted, and the process grows by a few decodes' worth, not eight times four copies."""
    uri = data_uri(huge_png(4096))
    server = paused_server(tmp_path)
    codes, start = [], threading.Barrier(8)

    def submit():
        start.wait()
        codes.append(call("POST", f"{server.url}/{APP}", fal_input(image_url=uri, control_image_url=uri,
                                                                  image_size={"width": 1024, "height": 1024}))[0])

    try:
        before = reset_peak_rss()
        threads = [threading.Thread(target=submit) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        grew = peak_rss_mb() - before
        assert codes == [200] * 8, codes
        assert grew < 700, f"eight submits of a 4096x4096 RGBA PNG took {grew:.0f} MB"
    finally:
        server.stop_all()
