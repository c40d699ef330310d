// fal's own JS client (@fal-ai/client from npm) against the pack's `serve` on tiny models: the calls of fal's API
// page for fal-ai/fast-sdxl-controlnet-canny/image-to-image, changed only by `proxyUrl` (in Node it must say
// when: "always", or the client goes to fal itself). Needs `npm ci --prefix tests/js` (scripts/test.sh runs it) and
// the pack's Python environment (.venv, or SDXLCN_PYTHON).
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import http from "node:http";
import { APP, falClient, pngDataUri, startServe, withDeadline } from "./serve_helpers.mjs";

const KEY = "js-serve-test-key-0123456789";
const { fal } = await falClient();

const input = {
  prompt: "Ice fortress, aurora skies", image_url: pngDataUri(64, 40), control_image_url: pngDataUri(64, 200),
  num_inference_steps: 2, strength: 1.0, guidance_scale: 1.0, seed: 5,
};

let serve, port, hookServer, hookUrl;
const hooks = [];
let hookArrived;

before(async () => {
  serve = await startServe(KEY, { SDXLCN_SERVE_ALLOW_INTERNAL_URLS: "127.0.0.1" }); // the webhook receiver is here
  port = serve.port;
  hookServer = http.createServer((req, res) => {
    let body = "";
    req.on("data", (d) => { body += d; });
    req.on("end", () => { hooks.push(JSON.parse(body)); res.end("ok"); hookArrived?.(); });
  });
  await new Promise((r) => hookServer.listen(0, "127.0.0.1", r));
  hookUrl = `http://127.0.0.1:${hookServer.address().port}/fal-webhook`;
  fal.config({ credentials: KEY, proxyUrl: { url: `http://127.0.0.1:${port}/proxy`, when: "always" } });
});

after(async () => {
  serve?.stop();
  hookServer?.close();
  assert.ok(!serve?.log().includes(KEY), "the key must never reach the server log");
});

test("subscribe with logs and queue updates, as on fal's API page", async () => {
  const updates = [];
  const result = await fal.subscribe(APP, {
    input, logs: true, pollInterval: 100, onQueueUpdate: (update) => updates.push(update),
  });
  assert.match(result.requestId, /^[0-9a-f-]{36}$/);
  const image = result.data.images[0];
  assert.deepEqual([image.width, image.height, image.content_type], [64, 64, "image/png"]);
  assert.equal(result.data.seed, 5);
  assert.ok(image.url.startsWith(`http://127.0.0.1:${port}/files/`), image.url);
  const png = await fetch(image.url);
  assert.equal(png.headers.get("content-type"), "image/png");
  const statuses = updates.map((u) => u.status);
  assert.ok(statuses.includes("IN_QUEUE") || statuses.includes("IN_PROGRESS"), statuses.join());
  assert.equal(statuses.at(-1), "COMPLETED");
  const messages = updates.flatMap((u) => (u.logs || []).map((l) => l.message));
  assert.ok(messages.includes("step 2/2"), messages.join("|"));
});

test("queue.submit with a webhook, then status with logs, result, and a webhook as fal sends it", async () => {
  const arrived = new Promise((resolve) => { hookArrived = resolve; });
  const { request_id: requestId } = await fal.queue.submit(APP, { input: { ...input, seed: 6 }, webhookUrl: hookUrl });
  await withDeadline(arrived, 120_000, "webhook");
  const hook = hooks.find((h) => h.request_id === requestId);
  assert.equal(hook.status, "OK");
  assert.equal(hook.gateway_request_id, requestId);
  const status = await fal.queue.status(APP, { requestId, logs: true });
  assert.equal(status.status, "COMPLETED");
  assert.ok(status.logs.some((l) => l.message === "step 1/2"));
  const result = await fal.queue.result(APP, { requestId });
  assert.equal(result.requestId, requestId);
  assert.deepEqual(result.data, hook.payload);
  assert.equal(result.data.seed, 6);
});

test("cancel a queued request; another endpoint and a wrong key are refused clearly", async () => {
  const ahead = await fal.queue.submit(APP, { input: { ...input, seed: 8 } });
  const { request_id: requestId } = await fal.queue.submit(APP, { input: { ...input, seed: 9 } });
  await fal.queue.cancel(APP, { requestId });
  const status = await fal.queue.status(APP, { requestId, logs: false });
  assert.equal(status.status, "COMPLETED");
  assert.equal(status.error_type, "request_cancelled");
  await assert.rejects(fal.queue.result(APP, { requestId }), (err) => err.status === 400);
  await assert.rejects(fal.queue.submit("fal-ai/flux/dev", { input: { prompt: "x" } }), (err) => err.status === 404);
  await assert.rejects(fal.queue.submit(APP, { input: { ...input, strength: 7 } }),
    (err) => err.status === 422 && err.body.detail[0].loc.join(".") === "body.strength");
  fal.config({ credentials: "not-the-key", proxyUrl: { url: `http://127.0.0.1:${port}/proxy`, when: "always" } });
  try {
    await assert.rejects(fal.queue.submit(APP, { input }), (err) => err.status === 401);
  } finally {
    fal.config({ credentials: KEY, proxyUrl: { url: `http://127.0.0.1:${port}/proxy`, when: "always" } });
  }
  const done = await fal.queue.subscribeToStatus(APP, { requestId: ahead.request_id, pollInterval: 100 });
  assert.equal(done.status, "COMPLETED");
});
