"""The shared queue's store and workers in this process, on a real ``redis-server`` (tests/helpers/redis_server.py): what two
nodes see of one queue (positions, cancel, timeouts), one result per request when a worker thought dead comes back,
results that expire, and a queue that holds JSON only and never runs a pickle.
"""

from __future__ import annotations

import json
import pickle
import time
import zlib

from comfyui_harness import wait_until
from redis_server import redis_server  # noqa: F401 - the fixture
from test_serve import APP, KEY, call, fal_input


def node(redis_server, folder, pipes=None, generate=None, **store_options):  # noqa: F811
    """(store, workers, server): one node of the queue in this process, its workers started when ``pipes``
    (``generate``: the local pipeline's, or one wrapping it)."""
    from sdxl_controlnet_img2img.pipeline.serve.app import ServeApp
    from sdxl_controlnet_img2img.pipeline.serve.redis_store import RedisStore
    from sdxl_controlnet_img2img.pipeline.serve.redis_worker import RedisWorkers
    from sdxl_controlnet_img2img.pipeline.serve.server import StandaloneServer

    store = RedisStore(redis_server.url, folder, **store_options)
    workers = RedisWorkers(store, pipes or {}, generate=generate)
    server = StandaloneServer(ServeApp(store, workers, key=KEY)).start()
    if pipes:
        workers.start()

    def stop():
        server.stop()
        workers.stop()
        store.close()

    server.stop_all = stop
    return store, workers, server


def add(store, priority=0, deadline=None):
    return store.add({"prompt": "p", "seed": 1}, {"image_url": b"png", "control_image_url": b"png"},
                     priority=priority, deadline=deadline)


def test_two_nodes_see_one_queue_positions_cancel_and_timeouts(redis_server, tmp_path):  # noqa: F811
    from sdxl_controlnet_img2img.pipeline.serve.redis_store import RedisStore

    a, b = RedisStore(redis_server.url, tmp_path / "a"), RedisStore(redis_server.url, tmp_path / "b")
    first, second, low, third = add(a), add(a), add(a, priority=-1), add(b)
    assert [b.position(j) for j in (first, second, third, low)] == [0, 1, 2, 3]  # low runs after every normal
    assert b.waiting() == 4
    assert b.cancel(second.id) == "cancelled"  # through the other node
    assert [a.position(j) for j in (first, third, low)] == [0, 1, 2]
    gone = a.get(second.id)
    assert (gone.state, gone.error_type, gone.error_status) == ("COMPLETED", "request_cancelled", 400)
    assert second.id not in [i for q in a.queues.values() for i in q.get_job_ids()]  # RQ will never run it
    assert not a.has_input(second.id, "image_url")  # its images went with it
    assert a.cancel(second.id) == "done"
    late = add(a, deadline=time.time() - 1)  # x-fal-request-timeout already passed: ended when next looked at
    assert b.expire_waiting() == [late.id]
    ended = a.get(late.id)
    assert (ended.error_type, ended.error_status) == ("request_timeout", 504)
    assert a.begin(late.id, "run") is None  # a worker taking it finds it ended


def test_one_result_when_a_worker_thought_dead_comes_back(redis_server, tmp_path):  # noqa: F811
    """Run 1 stops renewing its lease (a frozen worker); run 2 takes the request over; run 1 comes back and finishes
    first: its result is not stored, run 2's is, once."""
    from sdxl_controlnet_img2img.pipeline.serve.redis_store import RedisStore

    a = RedisStore(redis_server.url, tmp_path / "a", lease_s=1)
    b = RedisStore(redis_server.url, tmp_path / "b", lease_s=1)
    job = add(a)
    assert a.begin(job.id, "run-1") is not None
    assert b.begin(job.id, "run-2") is None  # run 1 holds it while its lease lives
    again = wait_until(lambda: b.begin(job.id, "run-2"), "run 2 taking the request over", deadline_s=10, every_s=0.2)
    assert again.state == "IN_PROGRESS"
    assert any("stopped answering" in line["message"] for line in b.get(job.id).logs)
    assert not a.renew(job.id, "run-1")  # its heartbeat finds it lost
    with a.acting("run-1"):
        a.complete(job.id, {"images": [{"width": 1, "height": 1}], "seed": 1}, [b"one"])
    assert a.get(job.id).state == "IN_PROGRESS"
    with b.acting("run-2"):
        b.complete(job.id, {"images": [{"width": 2, "height": 2}], "seed": 2}, [b"two"])
        b.complete(job.id, {"images": [{"width": 3, "height": 3}], "seed": 3}, [b"three"])
    done = a.get(job.id)
    assert done.state == "COMPLETED" and done.result["seed"] == 2
    assert a.image_path(job.id, 0).read_bytes() == b"two"


def test_results_expire_and_a_due_webhook_keeps_them(redis_server, tmp_path):  # noqa: F811
    from sdxl_controlnet_img2img.pipeline.serve.redis_store import RedisStore

    store = RedisStore(redis_server.url, tmp_path / "a", keep_results_s=2)
    plain = add(store)
    hooked = store.add({"prompt": "p"}, {"image_url": b"x"}, webhook='{"url": "https://example.com/h", "base": "b"}')
    for job in (plain, hooked):
        store.begin(job.id, "run")
        with store.acting("run"):
            store.complete(job.id, {"images": [{"width": 1, "height": 1}]}, [b"png"])
        assert not store.has_input(job.id, "image_url")  # inputs go when a request ends
    assert [j.id for j in store.webhooks_due()] == [hooked.id]
    wait_until(lambda: store.get(plain.id) is None and store.by_token(plain.token) is None, "the result expiring",
               deadline_s=15, every_s=0.2)
    time.sleep(2.5)
    assert store.get(hooked.id) is not None and store.image_path(hooked.id, 0).read_bytes() == b"png"
    store.webhook_delivered(hooked.id)
    assert store.webhooks_due() == []
    wait_until(lambda: store.get(hooked.id) is None, "the delivered one expiring", deadline_s=15, every_s=0.2)


def test_the_queue_holds_json_and_never_runs_a_pickle(redis_server, tmp_path, tiny_pipe):  # noqa: F811
    """Whoever can write to the queue cannot make a worker run code: a job whose data is a pickle (one that would
    run a command when unpickled) fails without being unpickled, and the worker goes on with the next request."""
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os

            return os.system, (f"touch {marker}",)

    store, _workers, server = node(redis_server, tmp_path / "w", {"cpu": tiny_pipe})
    try:
        r = store.r
        r.hset("rq:job:evil-job", mapping={"data": zlib.compress(pickle.dumps(Evil())), "status": "queued",
                                            "origin": "sdxlcn", "created_at": "2026-01-01T00:00:00.000000Z"})
        r.rpush("rq:queue:sdxlcn", "evil-job")
        code, sub, _ = call("POST", f"{server.url}/{APP}", fal_input())
        assert code == 200, sub
        data = zlib.decompress(r.hget(f"rq:job:{sub['request_id']}", "data"))
        assert json.loads(data)[2] == [sub["request_id"]]  # RQ's job: a name and the request id, as JSON
        done = wait_until(lambda: (lambda j: j if j.state == "COMPLETED" else None)(store.get(sub["request_id"])),
                          "the request after the pickle", deadline_s=120)
        assert done.error is None, done.error
        assert not marker.exists()
    finally:
        server.stop_all()


def test_a_stopped_worker_queues_its_running_request_again_at_the_front(redis_server, tmp_path, tiny_pipe):  # noqa: F811
    """Ctrl-C or SIGTERM on a worker node: its running request stops at its next step and waits again, ahead of the
    others, saying why; another worker runs it to its end."""
    store, workers, server = node(redis_server, tmp_path / "w1", {"cpu": tiny_pipe})
    try:
        code, long, _ = call("POST", f"{server.url}/{APP}", fal_input(seed=51, num_inference_steps=30,
                                                                          image_size={"width": 128, "height": 128}))
        assert code == 200, long
        code, behind, _ = call("POST", f"{server.url}/{APP}", fal_input(seed=52))
        assert code == 200, behind
        wait_until(lambda: any(x["message"].startswith("step ") for x in store.get(long["request_id"]).logs),
                   "the long request running", deadline_s=120, every_s=0.02)
        workers.stop()
        again = store.get(long["request_id"])
        assert again.state == "IN_QUEUE" and store.position(again) == 0, again.state
        assert "the server running this request stopped; it is queued again" in [x["message"] for x in again.logs]
    finally:
        server.stop_all()
    store2, _w2, server2 = node(redis_server, tmp_path / "w2", {"cpu": tiny_pipe})
    try:
        for sub in (long, behind):
            done = wait_until(lambda sub=sub: (lambda j: j if j.state == "COMPLETED" else None)(
                store2.get(sub["request_id"])), "the requests completing on the other worker", deadline_s=180)
            assert done.error is None, done.error
        assert store2.get(long["request_id"]).finished < store2.get(behind["request_id"]).finished  # front first
    finally:
        server2.stop_all()
