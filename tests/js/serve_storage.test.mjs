// fal's file storage through fal's own JS client (@fal-ai/client from npm) on the pack's servers: fal.storage.upload
// and the client's auto-upload of Blob inputs (its src/storage.js: an initiate call through the proxy, then a plain
// PUT of the bytes to the upload URL it answered), against `serve` and against a real ComfyUI's /sdxlcn/fal
// (tests/helpers/comfyui_serving.py, as the Python tests start one: needs COMFYUI_DIR; skipped without it, failed instead
// with SDXLCN_REQUIRE_COMFYUI=1). A request whose images are Blobs gives the pixels of the same request sent with
// data URIs. The refusals (no key, too large, not an image, expired) are tests/test_serve_uploads.py's.
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { APP, PYTHON, ROOT, falClient, pngBytes, pngPixels, startServe, tinyModels, withDeadline } from "./serve_helpers.mjs";

const KEY = "js-storage-test-key-0123456789";
const { createFalClient } = await falClient();
const image = pngBytes(64, 40), control = pngBytes(64, 200);
const dataUri = (png) => "data:image/png;base64," + png.toString("base64");
const input = {
  prompt: "Ice fortress, aurora skies", image_url: dataUri(image), control_image_url: dataUri(control),
  num_inference_steps: 2, strength: 1.0, guidance_scale: 1.0, seed: 11,
};

async function resultPixels(result) {
  const got = await fetch(result.data.images[0].url);
  assert.equal(got.status, 200);
  return pngPixels(Buffer.from(await got.arrayBuffer()));
}

// the same tests on each server; base(): the API's base URL once the server runs
function storageTests(base) {
  let fal;
  before(() => {
    fal = createFalClient({ credentials: KEY, proxyUrl: { url: `${base()}/proxy`, when: "always" } });
  });

  test("fal.storage.upload keeps the image on the server and answers its URL there", async () => {
    const url = await fal.storage.upload(new Blob([image], { type: "text/html" })); // a claimed type is not kept
    assert.ok(url.startsWith(`${base()}/storage/files/`), url);
    const got = await fetch(url);
    assert.equal(got.status, 200);
    assert.equal(got.headers.get("content-type"), "image/png");
    assert.equal(got.headers.get("x-content-type-options"), "nosniff");
    assert.ok(Buffer.from(await got.arrayBuffer()).equals(image), "the file served is not the file uploaded");
  });

  test("subscribe with Blob images (auto-upload) gives the pixels of the same request with data URIs", async () => {
    const blobs = { image_url: new Blob([image]), control_image_url: new Blob([control], { type: "image/png" }) };
    const viaBlobs = await fal.subscribe(APP, { input: { ...input, ...blobs }, pollInterval: 100 });
    const viaData = await fal.subscribe(APP, { input, pollInterval: 100 });
    const [got, want] = [await resultPixels(viaBlobs), await resultPixels(viaData)];
    assert.deepEqual([got.width, got.height], [64, 64]);
    assert.ok(got.data.equals(want.data), "the Blob request's pixels differ from the data URI request's");
  });
}

describe("serve", () => {
  let serve;
  before(async () => { serve = await startServe(KEY); });
  after(() => {
    serve?.stop();
    assert.ok(!serve?.log().includes(KEY), "the key must never reach the server log");
  });
  storageTests(() => `http://127.0.0.1:${serve.port}`);
});

const comfyDir = process.env.COMFYUI_DIR;
const noComfy = comfyDir && fs.existsSync(path.join(comfyDir, "main.py")) ? null
  : "set COMFYUI_DIR to a ComfyUI 0.8.0 checkout (and COMFYUI_PYTHON to its interpreter) to run real-ComfyUI tests";
const required = process.env.SDXLCN_REQUIRE_COMFYUI === "1";

describe("a real ComfyUI's /sdxlcn/fal", { skip: noComfy && !required ? noComfy : false }, () => {
  let proc, base, work, stderr = "";
  before(async () => {
    if (noComfy) throw new Error(`SDXLCN_REQUIRE_COMFYUI=1 but ${noComfy}`);
    const paths = tinyModels();
    work = fs.mkdtempSync(path.join(os.tmpdir(), "sdxlcn-js-comfyui-"));
    proc = spawn(PYTHON, [path.join(ROOT, "tests", "helpers", "comfyui_serving.py"), work, paths.checkpoint, paths.controlnet],
      { cwd: ROOT, env: { ...process.env, SDXLCN_SERVE_KEY: KEY } });
    proc.stderr.on("data", (d) => { stderr += d; });
    base = await withDeadline(new Promise((resolve, reject) => {
      let out = "";
      proc.stdout.on("data", (d) => { out += d; const m = out.match(/READY (\S+)/); if (m) resolve(m[1]); });
      proc.on("exit", (code) => reject(new Error(`ComfyUI did not start (${code}): ${stderr.slice(-3000)}`)));
    }), 300_000, "ComfyUI start");
  });
  after(async () => {
    if (!proc) return;
    const exited = new Promise((resolve) => proc.on("exit", resolve));
    proc.stdin.end(); // the helper stops ComfyUI
    await withDeadline(exited, 60_000, "ComfyUI stop");
    const log = fs.readFileSync(path.join(work, "comfyui.log"), "utf8");
    assert.ok(!log.includes(KEY), "the key must never reach ComfyUI's log");
  });
  storageTests(() => base);
});
