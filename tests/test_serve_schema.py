"""The whole schema and exactly fal's output on the stand-alone ``serve`` (issue 33 items 1 and 3), read through fal's
own Python client (``fal_client``, over HTTPS) and compared by pixels with the local pipeline's run of the same
request (``pipeline.local.generate`` on the same tiny models).

- The result holds exactly the generated images (``num_images``, in order), the seed used (the drawn one when the
  request had none), ``has_nsfw_concepts`` and fal's image fields; ``sync_mode`` gives them as data URIs.
- ``loras[].path`` by name in ``--loras-dir`` changes the picture as the local run with that LoRA does; by https URL
  (``--lora-urls``) it is downloaded once, after the submit answered, under the server's outbound rules; anything
  else is refused with 422 naming ``loras[i].path`` and the option that would allow it.
- ``enable_safety_checker`` and ``expand_prompt`` run the models given with ``--safety-checker`` and
  ``--prompt-expansion`` (tiny random-weight ones: the checker flags everything).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import shutil
import ssl
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from fal_python_client import FalPythonClient
from pictures import make_test_image
from test_serve import KEY, call, fal_input
from test_serve_cli import make_cert

LORA = "tiny-sdxl-lora.safetensors"


class FileHost:
    """An HTTPS host on 127.0.0.1 serving ``files`` (path -> bytes); ``/held/...`` answers only once ``release`` is
    set. ``hits`` lists the paths asked for."""

    def __init__(self, cert, key, files: dict):
        self.release = threading.Event()
        self.hits = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                owner.hits.append(self.path)
                if self.path.startswith("/held/"):
                    owner.release.wait(120)
                data = files.get(self.path.removeprefix("/held"))
                self.send_response(404 if data is None else 200)
                self.send_header("Content-Length", str(len(data or b"")))
                self.end_headers()
                self.wfile.write(data or b"")

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(cert), str(key))
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def serve_args(*options):
    from sdxl_controlnet_img2img.pipeline.serve.cli import add_serve_parser

    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers())
    return parser.parse_args(["serve", "--checkpoint", "c", "--controlnet", "n", *map(str, options)])


@contextlib.contextmanager
def serving(pipe, data, *options, tls=None, start_workers=True):
    """``serve`` with ``options`` in this process (the real options parsed by serve's own parser), on ``pipe``."""
    from sdxl_controlnet_img2img.pipeline.serve.extras import from_args
    from sdxl_controlnet_img2img.pipeline.serve.cli import StandaloneServer, build_app
    from sdxl_controlnet_img2img.pipeline.serve.store import Store
    from sdxl_controlnet_img2img.pipeline.serve.worker import LocalWorkers

    args = serve_args("--data-dir", data, *options)
    store = Store(data)
    workers = LocalWorkers(store, {"cpu": pipe}, extras=from_args(args))
    server = StandaloneServer(build_app(store, workers, args, KEY), tls_cert=tls and tls[0], tls_key=tls and tls[1])
    server.start()
    if start_workers:
        workers.start()
    try:
        yield server
    finally:
        server.stop()
        if start_workers:
            workers.stop()
        store.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_models, tiny_pipe):
    """serve over HTTPS with a LoRA folder, LoRA URLs (127.0.0.1 allowed: the LoRA host is here), a safety checker
    and a prompt-expansion model; fal's Python client pointed at it; an HTTPS host serving LoRA files."""
    from sdxl_controlnet_img2img.pipeline.local.tiny_models import build_tiny_prompt_expander, build_tiny_safety_checker

    root = tmp_path_factory.mktemp("schema")
    cert, key = make_cert(root)
    loras = root / "loras"
    (loras / "styles").mkdir(parents=True)
    shutil.copy(tiny_models["lora"], loras / LORA)
    shutil.copy(tiny_models["lora"], loras / "styles" / "again.safetensors")
    (loras / "notes.safetensors").write_bytes(b"<html>not a LoRA</html>")
    lora_bytes = tiny_models["lora"].read_bytes()
    host = FileHost(cert, key, {"/x/lora.safetensors": lora_bytes, "/x/weights.bin": b"PK\x03\x04 a zip pickle",
                                "/x/a.safetensors": lora_bytes, "/x/b.safetensors": lora_bytes})
    checker = build_tiny_safety_checker(root / "checker", flag_everything=True)
    expander = build_tiny_prompt_expander(root / "expander")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SSL_CERT_FILE", str(cert))  # the server's own downloads trust the LoRA host's certificate
        with serving(tiny_pipe, root / "data", "--loras-dir", loras, "--lora-urls", "--allow-internal-urls",
                     "127.0.0.1", "--safety-checker", checker, "--prompt-expansion", expander,
                     tls=(cert, key)) as server:
            client = FalPythonClient(f"127.0.0.1:{server.port}", cert, KEY)
            try:
                yield {"server": server, "client": client, "host": host, "cert": cert, "checker": checker,
                       "expander": expander, "lora": tiny_models["lora"], "pipe": tiny_pipe, "root": root}
            finally:
                client.close()
                host.close()


def finish(client, request_id, deadline_s=180) -> dict:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        status = client.status(request_id)
        if status.get("kind") == "Completed":
            out = client.result(request_id)  # what fal_client.result returned, or the HTTP error it raised
            return out.get("result", out)
        time.sleep(0.05)
    raise AssertionError(f"{request_id} not done within {deadline_s} s")


def run(served, **changes) -> dict:
    sub = served["client"].submit(fal_input(**changes))
    assert "request_id" in sub, sub
    return finish(served["client"], sub["request_id"])


def pictures(served, result) -> list:
    """The pixels of each served image: downloaded from its URL (over HTTPS), or decoded from its data URI."""
    ctx = ssl.create_default_context(cafile=str(served["cert"]))
    out = []
    for image in result["images"]:
        if image["url"].startswith("data:"):
            data = base64.b64decode(image["url"].split(",", 1)[1])
        else:
            with urllib.request.urlopen(image["url"], timeout=30, context=ctx) as r:
                data = r.read()
        out.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    return out


def local(served, loras=(), **changes):
    """The local pipeline's run of the same request (the images as arrays, and the result)."""
    from sdxl_controlnet_img2img.pipeline.local.generate import generate
    from sdxl_controlnet_img2img.pipeline.request import GenerationRequest, LoraSpec

    req = GenerationRequest.from_dict({**fal_input(**changes), "image_url": make_test_image(64, 64, 1),
                                       "control_image_url": make_test_image(64, 64, 2),
                                       "loras": [LoraSpec(str(p), s) for p, s in loras]})
    hooks = {}
    if req.enable_safety_checker:
        from sdxl_controlnet_img2img.pipeline.local.request_models.safety import load_safety_checker

        hooks["safety_checker"] = load_safety_checker(served["checker"], device="cpu", dtype=served["pipe"].dtype)
    if req.expand_prompt:
        from sdxl_controlnet_img2img.pipeline.local.request_models.prompt_expansion import load_prompt_expander

        hooks["prompt_expander"] = load_prompt_expander(served["expander"], device="cpu", dtype=served["pipe"].dtype)
    result = generate(served["pipe"], req, **hooks)
    return [np.asarray(img) for img in result.images], result


def test_the_result_is_exactly_the_generated_images_with_the_seed_drawn(served):
    """num_images 2 and no seed: two images, in order, each the local run's for the seed the result reports (image i
    uses seed + i); fal's fields and no others; the same request with sync_mode gives the same pixels as data URIs."""
    result = run(served, num_images=2, seed=None)
    assert set(result) == {"images", "seed", "has_nsfw_concepts", "prompt", "timings"}, result
    assert isinstance(result["seed"], int) and result["has_nsfw_concepts"] == [False, False], result
    for image in result["images"]:
        assert set(image) == {"url", "width", "height", "content_type"}, image
        assert (image["width"], image["height"], image["content_type"]) == (64, 64, "image/png"), image
        assert image["url"].startswith(f"{served['server'].url}/files/"), image
    got = pictures(served, result)
    want, _ = local(served, num_images=2, seed=result["seed"])
    assert len(got) == 2 and all(np.array_equal(g, w) for g, w in zip(got, want))
    assert not np.array_equal(got[0], got[1])
    synced = run(served, num_images=2, seed=result["seed"], sync_mode=True)
    assert [i["url"][:22] for i in synced["images"]] == ["data:image/png;base64,"] * 2, synced["images"][0]["url"][:40]
    assert all(np.array_equal(g, w) for g, w in zip(pictures(served, synced), want))


def test_a_lora_by_name_changes_the_picture_as_the_local_run_with_it(served):
    plain = pictures(served, run(served, seed=11))[0]
    result = run(served, seed=11, loras=[{"path": LORA, "scale": 0.8}])
    styled = pictures(served, result)[0]
    want, _ = local(served, loras=[(served["lora"], 0.8)], seed=11)
    assert not np.array_equal(styled, plain), "the LoRA changed nothing"
    assert np.array_equal(styled, want[0])
    again = pictures(served, run(served, seed=11, loras=[{"path": "styles/again.safetensors", "scale": 0.8}]))[0]
    assert np.array_equal(again, want[0])  # a name in a subfolder, the same file's content
    assert np.array_equal(pictures(served, run(served, seed=11))[0], plain)  # no LoRA: the base model again
    out = run(served, loras=[{"path": "notes.safetensors"}])  # in the folder, but no LoRA: refused when it runs
    assert out["http_error"] == 422 and out["message"][0]["loc"] == ["body", "loras", 0, "path"], out
    assert "notes.safetensors" in out["message"][0]["msg"] and str(served["root"]) not in str(out), out


def test_the_safety_checker_and_prompt_expansion_run_the_operators_models(served):
    result = run(served, seed=5, enable_safety_checker=True)
    want, mine = local(served, seed=5, enable_safety_checker=True)
    assert result["has_nsfw_concepts"] == mine.has_nsfw_concepts == [True], result
    assert np.array_equal(pictures(served, result)[0], want[0])
    result = run(served, seed=5, expand_prompt=True, prompt="a castle")
    want, mine = local(served, seed=5, expand_prompt=True, prompt="a castle")
    assert result["prompt"] == mine.prompt and result["prompt"].startswith("a castle,"), result["prompt"]
    assert np.array_equal(pictures(served, result)[0], want[0])


def test_a_lora_url_is_downloaded_once_after_the_submit_answered(served):
    """The submit answers while the LoRA host has sent nothing; the request then runs with the downloaded LoRA (the
    by-name LoRA's pixels); a second request with the same URL downloads nothing. A file that is not safetensors
    ends its request with 422 naming loras[0].path, and is not kept."""
    host, client = served["host"], served["client"]
    url = f"{host.url}/held/x/lora.safetensors"
    sub = client.submit(fal_input(seed=11, loras=[{"path": url, "scale": 0.8}]))
    assert "request_id" in sub and host.release.is_set() is False, sub
    host.release.set()
    first = pictures(served, finish(client, sub["request_id"]))[0]
    want, _ = local(served, loras=[(served["lora"], 0.8)], seed=11)
    assert np.array_equal(first, want[0])
    assert np.array_equal(pictures(served, run(served, seed=11, loras=[{"path": url, "scale": 0.8}]))[0], want[0])
    assert host.hits.count("/held/x/lora.safetensors") == 1, host.hits
    bad = client.submit(fal_input(loras=[{"path": f"{host.url}/x/weights.bin"}]))
    out = finish(client, bad["request_id"])
    assert out["http_error"] == 422, out
    assert out["message"][0]["loc"] == ["body", "loras", 0, "path"] and "safetensors" in out["message"][0]["msg"], out
    cached = list((served["root"] / "data" / "lora-cache").iterdir())
    assert [p.name.endswith("lora.safetensors") for p in cached] == [True], cached


def test_the_lora_cache_keeps_to_its_size_and_drops_the_least_recently_used(served, tmp_path):
    """Room for one LoRA: the second download drops the first; a LoRA larger than the whole cache is refused."""
    from sdxl_controlnet_img2img.pipeline.serve.fetch import Policy
    from sdxl_controlnet_img2img.pipeline.serve.loras import LoraRules

    size = served["lora"].stat().st_size
    rules = LoraRules(urls=True, cache_dir=tmp_path / "cache", cache_bytes=int(size * 1.5))
    policy = Policy.parse("127.0.0.1")
    a = rules.local_file(0, f"{served['host'].url}/x/a.safetensors", policy)
    assert rules.local_file(0, f"{served['host'].url}/x/a.safetensors", policy) == a  # cached: not downloaded again
    b = rules.local_file(1, f"{served['host'].url}/x/b.safetensors", policy)
    assert b.is_file() and not a.exists() and list((tmp_path / "cache").iterdir()) == [b]
    assert served["host"].hits.count("/x/a.safetensors") == 1, served["host"].hits
    small = LoraRules(urls=True, cache_dir=tmp_path / "small", cache_bytes=size // 2)
    with pytest.raises(Exception, match=r"loras\[0\]\.path: .*over .*limit"):
        small.local_file(0, f"{served['host'].url}/x/a.safetensors", policy)


def test_what_a_server_cannot_load_is_refused_naming_the_field_and_the_option(served, tmp_path, tiny_pipe):
    """Each refusal is a 422 at the submit with loc loras[i].path, naming the option that would allow it."""
    url = served["server"].url
    for loras, words in (([{"path": "../loras/x.safetensors"}], "never a path"),
                         ([{"path": "/etc/passwd"}], "never a path"),
                         ([{"path": "missing.safetensors"}], "--loras-dir"),
                         ([{"path": LORA}, {"path": "style.pt"}], "safetensors form only"),
                         ([{"path": "http://example.com/x.safetensors"}], "https only"),
                         ([{"path": "https://10.0.0.7/x.safetensors"}], "inside the network")):
        code, body, _ = call_tls(served, "POST", f"{url}/fal-ai/fast-sdxl-controlnet-canny/image-to-image",
                                 fal_input(loras=loras))
        index = len(loras) - 1
        assert code == 422, (loras, body)
        assert body["detail"][0]["loc"] == ["body", "loras", index, "path"], (loras, body)
        assert words in body["detail"][0]["msg"], (loras, body)
    with serving(tiny_pipe, tmp_path / "data-a", start_workers=False) as bare:  # no option: each field refused
        for field, option in (("loras", "--loras-dir"), ("enable_safety_checker", "--safety-checker"),
                              ("expand_prompt", "--prompt-expansion")):
            value = [{"path": LORA}] if field == "loras" else True
            code, body, _ = call("POST", f"{bare.url}/fal-ai/fast-sdxl-controlnet-canny/image-to-image",
                                 fal_input(**{field: value}))
            assert code == 422 and body["detail"][0]["loc"][:2] == ["body", field], body
            assert option in body["detail"][0]["msg"], body
    with serving(tiny_pipe, tmp_path / "data-b", "--loras-dir", tmp_path, start_workers=False) as named:
        code, body, _ = call("POST", f"{named.url}/fal-ai/fast-sdxl-controlnet-canny/image-to-image",
                             fal_input(loras=[{"path": "https://huggingface.co/x/y/resolve/main/z.safetensors"}]))
        assert code == 422 and "--lora-urls" in body["detail"][0]["msg"], body
    with serving(tiny_pipe, tmp_path / "data-c", "--lora-urls", "--lora-url-host", "huggingface.co",
                 start_workers=False) as hosts:
        code, body, _ = call("POST", f"{hosts.url}/fal-ai/fast-sdxl-controlnet-canny/image-to-image",
                             fal_input(loras=[{"path": "https://example.com/z.safetensors"}]))
        assert code == 422 and "--lora-url-host" in body["detail"][0]["msg"], body
        code, body, _ = call("POST", f"{hosts.url}/fal-ai/fast-sdxl-controlnet-canny/image-to-image",
                             fal_input(loras=[{"path": "https://cdn.huggingface.co/z.safetensors"}]))
        assert code == 200, body  # below a listed host: accepted (nothing runs here)


def call_tls(served, method, url, body):
    """``call`` over HTTPS trusting the test certificate."""
    import json
    import urllib.error

    ctx = ssl.create_default_context(cafile=str(served["cert"]))
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method=method,
                                 headers={"Content-Type": "application/json", "Authorization": f"Key {KEY}"})
    try:
        with urllib.request.urlopen(req, timeout=30, context=ctx) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


@pytest.mark.parametrize("options, words", [
    (["--loras-dir", "{tmp}/absent"], "--loras-dir {tmp}/absent: not a folder"),
    (["--lora-url-host", "huggingface.co"], "--lora-url-host needs --lora-urls"),
    (["--lora-urls", "--lora-url-host", "https://hf.co/x"], "--lora-url-host https://hf.co/x: not a host"),
    (["--safety-checker", "{tmp}"], "--safety-checker {tmp}: safety checker: {tmp} has no config.json"),
    (["--prompt-expansion", "{tmp}"], "--prompt-expansion {tmp}: prompt expansion: {tmp} has no config.json"),
])
def test_a_bad_option_is_one_line_naming_it_before_anything_loads(tmp_path, capsys, options, words):
    from sdxl_controlnet_img2img.pipeline.cli import main

    code = main(["serve", "--checkpoint", str(tmp_path / "none"), "--controlnet", str(tmp_path / "none"),
                 "--data-dir", str(tmp_path / "data"), *[o.format(tmp=tmp_path) for o in options]])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: " + words.format(tmp=tmp_path)), err
    assert not (tmp_path / "data").exists()  # refused before the data folder was opened
