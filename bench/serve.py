"""serve's own cost around a generation, on the embedded queue (SQLite, one box) and on the shared queue (Redis):
per-request overhead, the worker's idle gap between requests, and throughput of one worker process against two
(issue 34 item 5). Tiny random-weight models on the CPU: the generation is short, so serve's own time shows.

1. Overhead: one request at a time over HTTP, as a client does (submit, status every 2 ms until COMPLETED, result);
   the generation's own time (the worker's call of the pipeline, timed in the server) is taken off the client's
   submit-to-result time. Both servers run in this process, their rounds interleaved. Target: median under 50 ms.
2. Idle gap: ``--burst`` requests queued at once; the worker's gap between the end of one generation and the start
   of the next (storing a result, taking the next request, reading its inputs). Target: median under 20 ms.
3. Throughput: ``--requests`` requests through one ``serve`` worker process, then through two on the same Redis
   (each process one CPU thread); prints the ratio (two against one; no target: it depends on the cores free).

Run:   .venv/bin/python bench/serve.py                 (needs redis-server and the redis extra; about 3 minutes)
       .venv/bin/python bench/serve.py --repeat 21     (more rounds)
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import _common as C

from sdxl_controlnet_img2img.pipeline.endpoint import ENDPOINT as APP

OVERHEAD_TARGET_S = 0.050
GAP_TARGET_S = 0.020
KEY = "bench-serve-key"


def body(seed: int, size: int) -> bytes:
    from PIL import Image

    def uri(s):
        buf = io.BytesIO()
        Image.fromarray(C.synthetic_photo(size, size, s)).save(buf, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

    return json.dumps({"prompt": "a red fortress", "image_url": uri(1), "control_image_url": uri(2), "seed": seed,
                       "num_inference_steps": 2, "strength": 1.0, "guidance_scale": 1.0}).encode()


def http(method: str, url: str, data: bytes | None = None) -> dict:
    req = urllib.request.Request(url, data=data, method=method, headers={"Authorization": f"Key {KEY}",
                                                                         "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def run_one(base: str, data: bytes) -> float:
    """Submit, poll every 2 ms, fetch the result: the client's seconds."""
    t = time.perf_counter()
    sub = http("POST", f"{base}/{APP}", data)
    while http("GET", sub["status_url"])["status"] != "COMPLETED":
        time.sleep(0.002)
    http("GET", sub["response_url"])
    return time.perf_counter() - t


class Timed:
    """The pipeline call, timed: (start, end) of each generation, in this process's perf_counter."""

    def __init__(self):
        from sdxl_controlnet_img2img.pipeline.local.generate import generate

        self.generate, self.spans, self.lock = generate, [], threading.Lock()

    def __call__(self, pipe, request, **kwargs):
        t = time.perf_counter()
        try:
            return self.generate(pipe, request, **kwargs)
        finally:
            with self.lock:
                self.spans.append((t, time.perf_counter()))


def embedded(folder: Path, pipe, timed: Timed):
    from sdxl_controlnet_img2img.pipeline.serve.app import ServeApp
    from sdxl_controlnet_img2img.pipeline.serve.server import StandaloneServer
    from sdxl_controlnet_img2img.pipeline.serve.store import Store
    from sdxl_controlnet_img2img.pipeline.serve.worker import LocalWorkers

    store = Store(folder)
    workers = LocalWorkers(store, {"cpu": pipe}, generate=timed)
    server = StandaloneServer(ServeApp(store, workers, key=KEY)).start()
    workers.start()
    return server, lambda: (server.stop(), workers.stop(), store.close())


def shared(url: str, folder: Path, pipe, timed: Timed):
    from sdxl_controlnet_img2img.pipeline.serve.app import ServeApp
    from sdxl_controlnet_img2img.pipeline.serve.redis_store import RedisStore
    from sdxl_controlnet_img2img.pipeline.serve.redis_worker import RedisWorkers
    from sdxl_controlnet_img2img.pipeline.serve.server import StandaloneServer

    store = RedisStore(url, folder)
    workers = RedisWorkers(store, {"cpu": pipe}, generate=timed)
    server = StandaloneServer(ServeApp(store, workers, key=KEY)).start()
    workers.start()
    return server, lambda: (server.stop(), workers.stop(), store.close())


def overheads(bases: dict, timed: dict, repeat: int, size: int) -> dict:
    """Per name: the overheads of ``repeat`` single requests, the names' rounds interleaved (a busy spell hits all)."""
    out = {name: [] for name in bases}
    for i in range(repeat):
        for name in (list(bases) if i % 2 == 0 else list(bases)[::-1]):
            before = len(timed[name].spans)
            wall = run_one(bases[name], body(100 + i, size))
            start, end = timed[name].spans[before]
            out[name].append(wall - (end - start))
    return out


def idle_gaps(base: str, timed: Timed, burst: int, size: int) -> list:
    """The worker's gaps between generations while ``burst`` requests queued at once run, in seconds."""
    before = len(timed.spans)
    subs = [http("POST", f"{base}/{APP}", body(500 + i, size)) for i in range(burst)]
    for sub in subs:
        while http("GET", sub["status_url"])["status"] != "COMPLETED":
            time.sleep(0.005)
    spans = sorted(timed.spans[before:])
    return [b[0] - a[1] for a, b in zip(spans, spans[1:])]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(folder: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder),
                             "--appendonly", "yes", "--appendfsync", "everysec", "--save", ""],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    from sdxl_controlnet_img2img.pipeline.serve.redis_conn import connect

    end = time.monotonic() + 30
    while time.monotonic() < end:
        try:
            connect(url).ping()
            return proc, url
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.05)
    raise SystemExit("redis-server did not start")


def worker_process(url: str, folder: Path, paths: dict, name: str) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "SDXLCN_SERVE_KEY": KEY, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "sdxl_controlnet_img2img", "serve", "--queue", url, "--port", "0",
                             "--checkpoint", str(paths["checkpoint"]), "--controlnet", str(paths["controlnet"]),
                             "--device", "cpu", "--dtype", "fp32", "--data-dir", str(folder / name)],
                            stdout=subprocess.PIPE, stderr=open(folder / f"{name}.log", "w"), text=True, env=env,
                            cwd=C.ROOT)
    for line in proc.stdout:
        if line.startswith("READY "):
            return proc, line.split()[1]
    raise SystemExit(f"serve did not start: {(folder / f'{name}.log').read_text()[-2000:]}")


def throughput(url: str, folder: Path, paths: dict, requests: int, size: int) -> tuple[float, float]:
    """Requests per second through one worker process, then two."""
    procs, rates = [], []
    try:
        for n in (1, 2):
            procs.append(worker_process(url, folder, paths, f"worker-{n}"))
            base = procs[0][1]
            run_one(base, body(1, size))  # warm
            t = time.perf_counter()
            subs = [http("POST", f"{base}/{APP}", body(900 + i, size)) for i in range(requests)]
            for sub in subs:
                while http("GET", sub["status_url"])["status"] != "COMPLETED":
                    time.sleep(0.01)
            rates.append(requests / (time.perf_counter() - t))
    finally:
        for proc, _ in procs:
            proc.send_signal(signal.SIGINT)
        for proc, _ in procs:
            proc.wait(60)
    return rates[0], rates[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=15, help="single requests timed on each queue (default 15)")
    ap.add_argument("--burst", type=int, default=12, help="requests queued at once for the idle gap (default 12)")
    ap.add_argument("--requests", type=int, default=16, help="requests per throughput run (default 16)")
    ap.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    ap.add_argument("--models", default=str(C.ROOT / ".tiny-models"), help="where the tiny models are built/reused")
    args = ap.parse_args(argv)
    if shutil.which("redis-server") is None:
        C.die("redis-server is not installed: apt-get install redis-server")
    import torch

    from sdxl_controlnet_img2img.pipeline.local.models.loading import load_pipeline
    from sdxl_controlnet_img2img.pipeline.local.tiny_models import build_tiny_models
    from sdxl_controlnet_img2img.pipeline.serve.redis_conn import require_packages

    require_packages()
    paths = build_tiny_models(args.models)
    pipe = load_pipeline(paths["checkpoint"], paths["controlnet"], device="cpu", dtype=torch.float32)
    print(f"serve on tiny SDXL + ControlNet (random weights), CPU fp32, {args.size}x{args.size}, 2 steps; "
          f"{C.hardware_line()}")
    folder = Path(tempfile.mkdtemp(prefix="sdxlcn-bench-serve-"))
    redis, url = start_redis(folder)
    try:
        timed = {"embedded": Timed(), "redis": Timed()}
        servers = {"embedded": embedded(folder / "embedded", pipe, timed["embedded"]),
                   "redis": shared(url, folder / "redis", pipe, timed["redis"])}
        try:
            bases = {name: server.url for name, (server, _stop) in servers.items()}
            for base in bases.values():
                run_one(base, body(1, args.size))  # warm
            spent = overheads(bases, timed, args.repeat, args.size)
            gaps = {name: idle_gaps(bases[name], timed[name], args.burst, args.size) for name in bases}
        finally:
            for _server, stop in servers.values():
                stop()
        for name in bases:
            v = C.compare(spent[name], OVERHEAD_TARGET_S, 1.0)
            print(f"{name:8s} overhead per request: median {C.fmt_s(C.median(spent[name]))}")
            print("  " + C.check(v, f"{name} overhead under {OVERHEAD_TARGET_S * 1000:g} ms"))
            v = C.compare(gaps[name], GAP_TARGET_S, 1.0)
            print(f"{name:8s} worker idle gap between requests: median {C.fmt_s(C.median(gaps[name]))}")
            print("  " + C.check(v, f"{name} idle gap under {GAP_TARGET_S * 1000:g} ms"))
        one, two = throughput(url, folder, paths, args.requests, args.size)
        print(f"throughput on Redis: 1 worker process {one:.2f} req/s, 2 processes {two:.2f} req/s: "
              f"{two / one:.2f}x (one CPU thread each; {os.cpu_count()} cores here)")
    finally:
        redis.kill()
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
