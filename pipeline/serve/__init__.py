"""A server of fal's queue protocol for the pack's endpoint (:data:`..endpoint.ENDPOINT`), on your own GPU.

The third part beside ``local/`` (generation) and ``fal/`` (the client): it takes the same request and gives the same
result, in fal's shapes, so fal's own clients (the JS ``@fal-ai/client`` through ``proxyUrl``, the Python
``fal_client`` through its host variables) and this pack's fal node work against it unchanged.

- :mod:`.protocol` the URL layout, ids, fal's error and status shapes (no I/O);
- :mod:`.inputs` a submitted body checked before anything is queued, nothing fetched (HTTP 422 otherwise);
  :mod:`.downloads` its image URLs, fetched ahead of its run on threads of their own;
- :mod:`.store` the queue and the results in SQLite and files next to it (a restart loses nothing accepted);
  :mod:`.database` its connections (reads never wait for a write) and its retries; :mod:`.disk` its files synced
  before their rows, readable by this user only, and the free-space floor (HTTP 507);
- :mod:`.app` the HTTP handling, independent of the web framework; :mod:`.access` who may call it from where (Host,
  Origin, CORS, proxies) and the base URL its answers name; :mod:`.web` the aiohttp adapter both servers run;
- :mod:`.worker` one worker per device running the local pipeline; :mod:`.webhook` fal's webhook delivery, signed
  as fal signs (:mod:`.signing`);
- :mod:`.fal_headers` fal's request headers (timeout, priority) and :mod:`.queue_rules` the queue order and
  deadlines they set; :mod:`.ops` ``/health``, ``/ready`` and the other operator calls, :mod:`.metrics`
  (Prometheus), :mod:`.openapi` (the schema from the request's field table), :mod:`.events` a log line per request
  state change;
- :mod:`.uploads` fal's storage calls (``fal.storage.upload``, the JS client's auto-upload): files kept and served
  by the server itself, read from disk when a request names one;
- :mod:`.fetch` what the server itself fetches and posts (image URLs, webhooks): nothing inside the network;
- :mod:`.server` the stand-alone server (bounded connections, deadlines, TLS); :mod:`.cli` ``serve`` on the command
  line; :mod:`.datalock` one server per data folder.

Nothing here imports ComfyUI; ``nodes/serve_routes.py`` mounts the same adapter on ComfyUI's server.
"""
