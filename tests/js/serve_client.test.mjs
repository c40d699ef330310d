// fal's own JS client (@fal-ai/client from npm) against the pack's `serve` on tiny models: the calls of fal's API
// page for fal-ai/fast-sdxl-controlnet-canny/image-to-image, changed only by `proxyUrl` (in Node it must say
// when: "always", or the client goes to fal itself). Needs `npm ci --prefix tests/js` (scripts/test.sh runs it) and
// the pack's Python environment (.venv, or SDXLCN_PYTHON).
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync, spawn } from "node:child_process";
import fs from "node:fs";
import http from "node:http";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import zlib from "node:zlib";

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..", "..");
const PYTHON = process.env.SDXLCN_PYTHON || path.join(ROOT, ".venv", "bin", "python");
const APP = "fal-ai/fast-sdxl-controlnet-canny/image-to-image";
const KEY = "js-serve-test-key-0123456789";

let fal;
try {
  ({ fal } = await import("@fal-ai/client"));
} catch (err) {
  throw new Error(`@fal-ai/client is not installed: run 'npm ci --prefix tests/js' (scripts/test.sh does) (${err.message})`);
}

// a 64x64 PNG, made here (zlib + CRC) so the test needs nothing else
function crc32(buf) {
  let c, crc = 0xffffffff;
  for (const b of buf) {
    c = (crc ^ b) & 0xff;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    crc = (crc >>> 8) ^ c;
  }
  return (crc ^ 0xffffffff) >>> 0;
}
function chunk(type, data) {
  const len = Buffer.alloc(4); len.writeUInt32BE(data.length);
  const td = Buffer.concat([Buffer.from(type, "ascii"), data]);
  const crc = Buffer.alloc(4); crc.writeUInt32BE(crc32(td));
  return Buffer.concat([len, td, crc]);
}
function pngDataUri(size, shade) {
  const rows = [];
  for (let y = 0; y < size; y++) {
    const row = Buffer.alloc(1 + size * 3);
    for (let x = 0; x < size; x++) row.set([(x * 4) % 256, (y * 4) % 256, shade], 1 + x * 3);
    rows.push(row);
  }
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(size, 0); ihdr.writeUInt32BE(size, 4); ihdr.set([8, 2, 0, 0, 0], 8);
  const png = Buffer.concat([Buffer.from([137, 80, 78, 71, 13, 10, 26, 10]), chunk("IHDR", ihdr),
    chunk("IDAT", zlib.deflateSync(Buffer.concat(rows))), chunk("IEND", Buffer.alloc(0))]);
  return "data:image/png;base64," + png.toString("base64");
}

const input = {
  prompt: "Ice fortress, aurora skies", image_url: pngDataUri(64, 40), control_image_url: pngDataUri(64, 200),
  num_inference_steps: 2, strength: 1.0, guidance_scale: 1.0, seed: 5,
};

function freePort() {
  return new Promise((resolve) => {
    const s = net.createServer().listen(0, "127.0.0.1", () => { const { port } = s.address(); s.close(() => resolve(port)); });
  });
}

function withDeadline(promise, ms, what) {
  let t;
  return Promise.race([promise, new Promise((_, rej) => { t = setTimeout(() => rej(new Error(`${what}: no answer within ${ms} ms`)), ms); })])
    .finally(() => clearTimeout(t));
}

let serve, port, hookServer, hookUrl, serveLog = "";
const hooks = [];
let hookArrived;

before(async () => {
  const models = path.join(os.tmpdir(), "sdxlcn-js-tiny-models"); // reused when already there
  const paths = JSON.parse(execFileSync(PYTHON, ["-m", "sdxl_controlnet_img2img", "make-tiny-models", "--out", models],
    { cwd: ROOT, env: { ...process.env, HF_HUB_OFFLINE: "1" }, stdio: ["ignore", "pipe", "ignore"] }).toString());
  port = await freePort();
  const data = fs.mkdtempSync(path.join(os.tmpdir(), "sdxlcn-js-serve-"));
  serve = spawn(PYTHON, ["-m", "sdxl_controlnet_img2img", "serve", "--checkpoint", paths.checkpoint, "--controlnet",
    paths.controlnet, "--port", String(port), "--device", "cpu", "--dtype", "fp32", "--data-dir", data],
  { cwd: ROOT, env: { ...process.env, HF_HUB_OFFLINE: "1", TRANSFORMERS_OFFLINE: "1", SDXLCN_SERVE_KEY: KEY,
    SDXLCN_SERVE_ALLOW_INTERNAL_URLS: "127.0.0.1" } }); // the webhook receiver is on this machine
  serve.stderr.on("data", (d) => { serveLog += d; });
  await withDeadline(new Promise((resolve, reject) => {
    let out = "";
    serve.stdout.on("data", (d) => { out += d; if (out.includes("READY")) resolve(); });
    serve.on("exit", (code) => reject(new Error(`serve exited (${code}): ${serveLog.slice(-2000)}`)));
  }), 180_000, "serve start");
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
  serve?.kill("SIGINT");
  hookServer?.close();
  assert.ok(!serveLog.includes(KEY), "the key must never reach the server log");
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

test("cancel a queued request; storage uploads and a wrong key are refused clearly", async () => {
  const ahead = await fal.queue.submit(APP, { input: { ...input, seed: 8 } });
  const { request_id: requestId } = await fal.queue.submit(APP, { input: { ...input, seed: 9 } });
  await fal.queue.cancel(APP, { requestId });
  const status = await fal.queue.status(APP, { requestId, logs: false });
  assert.equal(status.status, "COMPLETED");
  assert.equal(status.error_type, "request_cancelled");
  await assert.rejects(fal.queue.result(APP, { requestId }), (err) => err.status === 400);
  await assert.rejects(fal.storage.upload(new Blob([Buffer.from("x")], { type: "image/png" })),
    (err) => /data URI/.test(`${err.message} ${JSON.stringify(err.body)}`));
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
