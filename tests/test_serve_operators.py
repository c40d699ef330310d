"""What operators expect of the endpoint (issue 33, item 4), read by the standard tools of each format against a real
server on 127.0.0.1:

- ``/metrics`` parsed by ``prometheus_client``'s own text parser: the counts move with real requests on the tiny
  models (queued, completed, failed by error type, the queue-wait and generation-time histograms, the queue depth);
- ``/openapi.json`` validated by ``openapi-spec-validator``; its input schema's defaults and ranges are fal's
  documented ones (fal's API page for fast-sdxl-controlnet-canny/image-to-image), and a real result validates
  against its output schema (``jsonschema``);
- ``/health`` and ``/ready`` without a key; ``/ready`` 503 while the models load and when the queue is full;
  ``/metrics`` needs the key when the server has one;
- one log line per state change naming the id, the time in the queue, the generation time and the outcome, never
  the prompt or the key.
"""

from __future__ import annotations

import logging
import time

from test_serve import APP, KEY, Paused, call, fal_input, start, wait_done

# fal's documented input schema for fal-ai/fast-sdxl-controlnet-canny/image-to-image (its API page): default, range
FAL_DOCUMENTED = {
    "controlnet_conditioning_scale": (0.5, "[", 0.0, 1.0),
    "num_inference_steps": (25, "[", 1, 50),
    "guidance_scale": (7.5, "[", 0.0, 20.0),
    "strength": (0.95, "(", 0.0, 1.0),
    "num_images": (1, "[", 1, 8),
}


def scrape(url: str, key=KEY) -> dict:
    """{sample name + sorted labels: value} from /metrics, read by prometheus_client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    code, text, headers = call("GET", f"{url}/metrics", key=key, raw=True)
    assert code == 200 and headers["Content-Type"].startswith("text/plain"), (code, text[:300])
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            out[s.name + "".join(f"|{k}={v}" for k, v in sorted(s.labels.items()))] = s.value
    return out


def poll(fn, what: str, deadline_s: float = 60.0):
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        value = fn()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {deadline_s} s")


def test_metrics_count_real_requests_and_each_change_is_one_log_line(tmp_path, tiny_pipe, caplog):
    from jsonschema import Draft202012Validator

    from sdxl_controlnet_img2img.pipeline.serve.app import ServeApp
    from sdxl_controlnet_img2img.pipeline.serve.server import StandaloneServer
    from sdxl_controlnet_img2img.pipeline.serve.store import Store
    from sdxl_controlnet_img2img.pipeline.serve.worker import LocalWorkers

    caplog.set_level(logging.INFO, logger="sdxl_controlnet_img2img.serve")
    store = Store(tmp_path / "data")
    workers = LocalWorkers(store, {"cpu": tiny_pipe})  # started below: first, requests wait
    server = StandaloneServer(ServeApp(store, workers, key=KEY)).start()
    try:
        before = scrape(server.url)
        assert before["sdxlcn_serve_requests_completed_total"] == 0 and before["sdxlcn_serve_queue_depth"] == 0
        assert call("GET", f"{server.url}/metrics", key=None)[0] == 401  # the server has a key: so has /metrics
        # one request that waits past its x-fal-request-timeout (nothing runs yet), one that runs
        code, late, _ = call("POST", f"{server.url}/{APP}", fal_input(prompt="secret-prompt-words"),
                             headers={"x-fal-request-timeout": "0.5"})
        assert code == 200, late
        done = poll(lambda: (lambda st: st if st["status"] == "COMPLETED" else None)(
            call("GET", late["status_url"])[1]), "the timed-out request ends")
        assert done["error_type"] == "request_timeout", done
        code, sub, _ = call("POST", f"{server.url}/{APP}", fal_input(prompt="secret-prompt-words"))
        assert code == 200, sub
        assert scrape(server.url)["sdxlcn_serve_queue_depth"] == 1
        workers.start()
        wait_done(sub["status_url"])
        code, result, _ = call("GET", sub["response_url"])
        assert code == 200, result
        after = scrape(server.url)
        assert after["sdxlcn_serve_requests_queued_total"] == 2
        assert after["sdxlcn_serve_requests_completed_total"] == 1
        assert after["sdxlcn_serve_requests_failed_total|error_type=request_timeout"] == 1
        assert after["sdxlcn_serve_queue_wait_seconds_count"] == 1
        assert after["sdxlcn_serve_generation_seconds_count"] == 1 and after["sdxlcn_serve_generation_seconds_sum"] > 0
        assert after["sdxlcn_serve_generation_seconds_bucket|le=+Inf"] == 1
        assert after["sdxlcn_serve_queue_depth"] == 0 and after["sdxlcn_serve_running"] == 0
        # the served result is what the schema of /openapi.json says it is
        doc = call("GET", f"{server.url}/openapi.json", key=None)[1]
        Draft202012Validator({"$ref": "#/components/schemas/Output", "components": doc["components"]}).validate(result)
    finally:
        server.stop()
        if workers.threads[0].ident is not None:  # started
            workers.stop()
        store.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "sdxl_controlnet_img2img.serve"]
    mine = [ln for ln in lines if sub["request_id"] in ln]
    assert [ln.split(sub["request_id"])[1].split()[0] for ln in mine] == ["queued", "started", "completed"], lines
    assert "s in the queue" in mine[1] and " s (" in mine[2] and "in the queue" in mine[2], mine
    theirs = [ln for ln in lines if late["request_id"] in ln]
    assert len(theirs) == 2 and "failed: request_timeout (HTTP 504)" in theirs[1], theirs
    assert not [ln for ln in lines if "secret-prompt-words" in ln or KEY in ln], lines


def test_openapi_document_is_valid_and_says_fals_defaults_and_ranges(tmp_path):
    from jsonschema import Draft202012Validator
    from openapi_spec_validator import validate

    server = start(tmp_path, backend=Paused())
    try:
        code, doc, _ = call("GET", f"{server.url}/openapi.json", key=None)  # public, as fal's schema pages are
        assert code == 200, doc
    finally:
        server.stop_all()
    validate(doc)  # raises when it is no valid OpenAPI document
    assert f"/{APP}" in doc["paths"] and doc["servers"] == [{"url": server.url}]
    schema = doc["components"]["schemas"]["Input"]
    props = schema["properties"]
    for name, (default, bracket, low, high) in FAL_DOCUMENTED.items():
        p = props[name]
        assert p["default"] == default, (name, p)
        assert p["maximum"] == high and p["exclusiveMinimum" if bracket == "(" else "minimum"] == low, (name, p)
    assert props["strength"].get("minimum") is None
    assert set(schema["required"]) == {"prompt", "image_url", "control_image_url"}
    inputs = Draft202012Validator({"$ref": "#/components/schemas/Input", "components": doc["components"]})
    inputs.validate(fal_input(image_size="square_hd", loras=[]))
    assert not inputs.is_valid(fal_input(strength=0)) and not inputs.is_valid(fal_input(num_images=9))


def test_health_ready_and_who_needs_the_key(tmp_path):
    from sdxl_controlnet_img2img.pipeline.serve.app import ServeApp
    from sdxl_controlnet_img2img.pipeline.serve.ops import Loading
    from sdxl_controlnet_img2img.pipeline.serve.server import StandaloneServer
    from sdxl_controlnet_img2img.pipeline.serve.store import Store

    server = start(tmp_path / "a", backend=Paused(), max_waiting=1)
    try:
        assert call("GET", f"{server.url}/health", key=None)[:2] == (200, {"status": "ok"})
        assert call("GET", f"{server.url}/ready", key=None)[:2] == (200, {"ready": True})
        assert call("POST", f"{server.url}/{APP}", fal_input())[0] == 200
        code, body, headers = call("GET", f"{server.url}/ready", key=None)
        assert code == 503 and "full" in body["detail"] and headers.get("Retry-After"), body
        assert call("GET", f"{server.url}/health", key=None)[0] == 200
        assert call("POST", f"{server.url}/health", key=None)[0] == 405
    finally:
        server.stop_all()
    # serve answers from before its models load: up, not ready, and a submit is refused rather than left waiting
    store = Store(tmp_path / "b")
    loading = Loading()
    server = StandaloneServer(ServeApp(store, loading, key=None)).start()
    try:
        assert call("GET", f"{server.url}/health", key=None)[0] == 200
        code, body, _ = call("GET", f"{server.url}/ready", key=None)
        assert code == 503 and "loading" in body["detail"], body
        code, body, _ = call("POST", f"{server.url}/{APP}", fal_input(), key=None)
        assert code == 503 and "loading" in body["detail"], body
        assert call("GET", f"{server.url}/metrics", key=None, raw=True)[0] == 200  # a key-less server: none needed
        loading.become(Paused())
        assert call("GET", f"{server.url}/ready", key=None)[:2] == (200, {"ready": True})
        assert call("POST", f"{server.url}/{APP}", fal_input(), key=None)[0] == 200
    finally:
        server.stop()
        store.close()
