// The whole schema and exactly fal's output, read through fal's own JS client (@fal-ai/client) from the pack's `serve`
// started with a LoRA folder (--loras-dir), a safety checker and a prompt-expansion model (tiny random-weight ones):
// each served image's pixels are compared with the local pipeline's run of the same request (tests/helpers/local_pixels.py,
// pipeline.local.generate on the same tiny models). Issue 33, items 1 and 3.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { APP, PYTHON, ROOT, falClient, pngDataUri, startServe, tinyModels } from "./serve_helpers.mjs";

const KEY = "js-schema-test-key-0123456789";
const { fal } = await falClient();
const input = {
  prompt: "Ice fortress, aurora skies", image_url: pngDataUri(64, 40), control_image_url: pngDataUri(64, 200),
  num_inference_steps: 2, strength: 1.0, guidance_scale: 1.0,
};
const LORA = "tiny-sdxl-lora.safetensors";
const OFFLINE = { ...process.env, HF_HUB_OFFLINE: "1", TRANSFORMERS_OFFLINE: "1" };
let serve, models, work, checker, expander;

before(async () => {
  models = tinyModels();
  work = fs.mkdtempSync(path.join(os.tmpdir(), "sdxlcn-js-schema-"));
  checker = path.join(work, "checker");
  expander = path.join(work, "expander");
  const build = ["import sys", "from sdxl_controlnet_img2img.pipeline.local.tiny_models import " +
    "build_tiny_prompt_expander, build_tiny_safety_checker",
  "build_tiny_safety_checker(sys.argv[1], flag_everything=True)", "build_tiny_prompt_expander(sys.argv[2])"];
  execFileSync(PYTHON, ["-c", build.join("\n"), checker, expander],
    { cwd: ROOT, env: OFFLINE, stdio: ["ignore", "ignore", "pipe"] });
  serve = await startServe(KEY, {}, ["--loras-dir", path.dirname(models.lora), "--safety-checker", checker,
    "--prompt-expansion", expander]);
  fal.config({ credentials: KEY, proxyUrl: { url: `http://127.0.0.1:${serve.port}/proxy`, when: "always" } });
});

after(() => {
  serve?.stop();
  if (work) fs.rmSync(work, { recursive: true, force: true });
});

// the served images as files: downloaded from their URLs, or decoded from their data URIs
async function saved(result, tag) {
  const files = [];
  for (const [i, image] of result.data.images.entries()) {
    const file = path.join(work, `${tag}-${i}.png`);
    const bytes = image.url.startsWith("data:") ? Buffer.from(image.url.split(",", 2)[1], "base64")
      : Buffer.from(await (await fetch(image.url)).arrayBuffer());
    fs.writeFileSync(file, bytes);
    files.push(file);
  }
  return files;
}

// the local run of `request` compared with the served image files: {same: [bool per image], prompt, has_nsfw_concepts}
function localRun(request, files, ...options) {
  const file = path.join(work, `request-${files.length}-${Date.now()}.json`);
  fs.writeFileSync(file, JSON.stringify(request));
  const out = execFileSync(PYTHON, [path.join(ROOT, "tests", "helpers", "local_pixels.py"), "--checkpoint", models.checkpoint,
    "--controlnet", models.controlnet, "--request", file, ...options, ...files],
  { cwd: ROOT, env: OFFLINE, stdio: ["ignore", "pipe", "pipe"] });
  return JSON.parse(out.toString().trim().split("\n").at(-1));
}

test("num_images 2 without a seed: exactly the two generated images, the seed drawn, fal's fields only", async () => {
  const result = await fal.subscribe(APP, { input: { ...input, num_images: 2 }, pollInterval: 100 });
  assert.deepEqual(Object.keys(result.data).sort(), ["has_nsfw_concepts", "images", "prompt", "seed", "timings"]);
  assert.ok(Number.isInteger(result.data.seed), String(result.data.seed));
  assert.deepEqual(result.data.has_nsfw_concepts, [false, false]);
  for (const image of result.data.images) {
    assert.deepEqual(Object.keys(image).sort(), ["content_type", "height", "url", "width"]);
    assert.deepEqual([image.width, image.height, image.content_type], [64, 64, "image/png"]);
  }
  const files = await saved(result, "two");
  const local = localRun({ ...input, num_images: 2, seed: result.data.seed }, files);
  assert.deepEqual(local.same, [true, true]);
  const synced = await fal.subscribe(APP, { input: { ...input, num_images: 2, seed: result.data.seed, sync_mode: true },
    pollInterval: 100 });
  assert.ok(synced.data.images.every((i) => i.url.startsWith("data:image/png;base64,")));
  assert.deepEqual(localRun({ ...input, num_images: 2, seed: result.data.seed }, await saved(synced, "sync")).same,
    [true, true]);
});

test("a LoRA by name changes the picture as the local run with that LoRA does", async () => {
  const request = { ...input, seed: 11, loras: [{ path: LORA, scale: 0.8 }] };
  const result = await fal.subscribe(APP, { input: request, pollInterval: 100 });
  const files = await saved(result, "lora");
  assert.deepEqual(localRun(request, files, "--lora", models.lora).same, [true]);
  assert.deepEqual(localRun({ ...input, seed: 11 }, files).same, [false], "the LoRA changed nothing");
});

test("the safety checker and prompt expansion run the operator's models", async () => {
  const request = { ...input, seed: 5, prompt: "a castle", enable_safety_checker: true, expand_prompt: true };
  const result = await fal.subscribe(APP, { input: request, pollInterval: 100 });
  const local = localRun(request, await saved(result, "hooks"), "--safety-checker", checker,
    "--prompt-expansion", expander);
  assert.deepEqual(result.data.has_nsfw_concepts, [true]);
  assert.deepEqual(local.has_nsfw_concepts, [true]);
  assert.equal(result.data.prompt, local.prompt);
  assert.ok(result.data.prompt.startsWith("a castle,"), result.data.prompt);
  assert.deepEqual(local.same, [true]);
});

test("a LoRA this server cannot load is refused with 422 naming loras[i].path and the option", async () => {
  for (const [loras, index, words] of [[[{ path: "https://example.com/x.safetensors" }], 0, "--lora-urls"],
    [[{ path: LORA }, { path: "missing.safetensors" }], 1, "--loras-dir"],
    [[{ path: "style.pt" }], 0, "safetensors"]]) {
    await assert.rejects(fal.queue.submit(APP, { input: { ...input, loras } }), (err) => {
      assert.equal(err.status, 422);
      assert.deepEqual(err.body.detail[0].loc, ["body", "loras", index, "path"]);
      assert.ok(err.body.detail[0].msg.includes(words), err.body.detail[0].msg);
      return true;
    });
  }
});
