"""``python -m sdxl_controlnet_img2img serve`` as a user runs it (HTTPS with a self-signed certificate, a key file,
tiny models on the CPU), driven by fal's own Python client ``fal_client`` with only its host variables changed.

fal_client reads its hosts at import, so it runs in a child process with its own environment: submit, status with
logs, result, subscribe with queue updates, cancel, the synchronous run, a wrong key; then the server is stopped and
started again and the earlier results (and a request accepted just before the stop) are fetched.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from test_serve import KEY, fal_input

ROOT = Path(__file__).resolve().parent.parent

CLIENT = r"""
import json, sys, fal_client
APP = "fal-ai/fast-sdxl-controlnet-canny/image-to-image"
inp = json.loads(sys.stdin.read())
out = {}
if sys.argv[1] == "before":
    def on_enqueue(rid):  # while this request waits or runs, one behind it is cancelled in the queue
        out["first"] = rid
        queued = fal_client.submit(APP, {**inp, "seed": 11})
        fal_client.cancel(APP, queued.request_id)
        c = fal_client.status(APP, queued.request_id)
        out["cancelled"] = [type(c).__name__, c.error_type]
    updates = []  # a longer request ahead keeps the subscribed one queued while the client starts listening
    fal_client.submit(APP, {**inp, "seed": 5, "num_inference_steps": 30, "image_size": {"width": 192, "height": 192}})
    res = fal_client.subscribe(APP, inp, with_logs=True, on_enqueue=on_enqueue,
                               on_queue_update=lambda s: updates.append([type(s).__name__, [l["message"] for l in (getattr(s, "logs", None) or [])]]))
    out["subscribe"], out["updates"] = res, updates
    out["result"] = fal_client.result(APP, out["first"])
    st = fal_client.status(APP, out["first"], with_logs=True)
    out["first_status"] = [type(st).__name__, [l["message"] for l in st.logs]]
    out["run"] = fal_client.run(APP, inp)
    try:
        fal_client.SyncClient(key="not-the-key").submit(APP, inp)
        out["wrong_key"] = "accepted"
    except fal_client.client.FalClientHTTPError as exc:
        out["wrong_key"] = [exc.status_code, "not-the-key" in str(exc)]
    out["last"] = fal_client.submit(APP, {**inp, "seed": 12}).request_id  # the server stops right after this
else:
    ids = json.loads(sys.argv[2])
    out["after"] = [fal_client.result(APP, rid) for rid in ids]
print("RESULT " + json.dumps(out))
"""


def make_cert(folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def as_at_a_terminal() -> None:
    """In the child before exec: SIGINT handled by default, as at a terminal (a shell script's background job, as
    CI may run the tests in, starts its children with SIGINT ignored, and Python then keeps it ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_serve(tiny_models, tmp_path: Path, port: int, cert: Path, key: Path, key_file: Path):
    log = open(tmp_path / f"serve-{time.monotonic_ns()}.log", "w")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("SDXLCN_SERVE_KEY", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "sdxl_controlnet_img2img", "serve", "--checkpoint", str(tiny_models["checkpoint"]),
         "--controlnet", str(tiny_models["controlnet"]), "--port", str(port), "--device", "cpu", "--dtype", "fp32",
         "--tls-cert", str(cert), "--tls-key", str(key), "--key-file", str(key_file), "--data-dir",
         str(tmp_path / "data")], stdout=subprocess.PIPE, stderr=log, text=True, env=env, preexec_fn=as_at_a_terminal)
    end = time.monotonic() + 180
    while time.monotonic() < end:  # READY is printed once it listens
        line = proc.stdout.readline()
        if line.startswith("READY"):
            return proc, log.name
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"serve did not start: {Path(log.name).read_text()[-3000:]}")


def stop_serve(proc) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def run_client(args, port: int, cert: Path, body: dict) -> dict:
    env = {**os.environ, "FAL_QUEUE_RUN_HOST": f"127.0.0.1:{port}", "FAL_RUN_HOST": f"127.0.0.1:{port}/run",
           "SSL_CERT_FILE": str(cert), "FAL_KEY": KEY}
    p = subprocess.run([sys.executable, "-c", CLIENT, *args], input=json.dumps(body), capture_output=True, text=True,
                       env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def test_fal_client_against_serve_over_https_and_a_restart(tiny_models, tmp_path):
    from comfyui_harness import free_port

    cert, key = make_cert(tmp_path)
    key_file = tmp_path / "serve_key.txt"
    key_file.write_text(KEY + "\n")
    port = free_port()
    body = fal_input()
    proc, log = start_serve(tiny_models, tmp_path, port, cert, key, key_file)
    try:
        out = run_client(["before"], port, cert, body)
    finally:
        stop_serve(proc)
    assert out["cancelled"] == ["Completed", "request_cancelled"], out
    first_id, first = out["first"], out["result"]
    assert first == out["subscribe"]
    for res in (first, out["run"]):
        assert res["seed"] == 7 and res["images"][0]["width"] == 64
        assert res["images"][0]["url"].startswith(f"https://127.0.0.1:{port}/files/")
    assert out["run"]["images"][0]["url"] != first["images"][0]["url"]  # two requests, two result files
    kinds = [u[0] for u in out["updates"]]
    assert kinds[-1] == "Completed" and "Queued" in kinds, kinds
    assert any("step 2/2" in msgs for _k, msgs in out["updates"]), out["updates"]
    assert out["first_status"][0] == "Completed" and "step 1/2" in out["first_status"][1]
    assert out["wrong_key"] == [401, False]
    assert KEY not in Path(log).read_text()
    assert f"serve: request {first_id} completed in " in Path(log).read_text()  # one line per state change

    proc, log = start_serve(tiny_models, tmp_path, port, cert, key, key_file)  # same data folder
    try:
        after = run_client(["after", json.dumps([first_id, out["last"]])], port, cert, body)["after"]
    finally:
        stop_serve(proc)
    assert after[0]["images"][0]["url"] == first["images"][0]["url"]
    assert after[1]["seed"] == 12 and after[1]["images"][0]["height"] == 64


def test_serve_refuses_other_addresses_without_a_key(tmp_path):
    env = {**os.environ}
    env.pop("SDXLCN_SERVE_KEY", None)
    p = subprocess.run([sys.executable, "-m", "sdxl_controlnet_img2img", "serve", "--checkpoint", "x", "--controlnet",
                        "y", "--host", "0.0.0.0", "--data-dir", str(tmp_path / "d")], capture_output=True, text=True,
                       env=env, timeout=120)
    assert p.returncode == 2
    assert "without a key" in p.stderr and "SDXLCN_SERVE_KEY" in p.stderr
    assert not (tmp_path / "d").exists()
