import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync, readdirSync } from "node:fs";
import {
  RUNTIME_PROPERTY_PREFIX,
  SECRET_NAME,
  findLeaks,
  looksLikeAbsolutePath,
  looksLikeSecret,
  sanitizeSerializedNode,
} from "../../web/lib/sanitize.js";
import { imageSizeLabel } from "../../web/lib/size_widgets.js";

// key-shaped but fake, assembled at run time so no key-shaped literal is ever committed
const FAKE_KEY = ["01234567", "89ab", "cdef", "0123", "456789abcdef"].join("-") + ":" + "0123456789abcdef".repeat(2);
const ROOT = new URL("../../", import.meta.url);

test("secret and path detection", () => {
  assert.equal(looksLikeSecret(FAKE_KEY), true);
  assert.equal(looksLikeSecret(`Authorization: Key ${FAKE_KEY}`), true);
  assert.equal(looksLikeSecret("Key abcdefgh:ijklmnopqr"), true);
  assert.equal(looksLikeSecret("Ice fortress, aurora skies"), false);
  assert.equal(looksLikeAbsolutePath("/home/me/ComfyUI/models/x.safetensors"), true);
  assert.equal(looksLikeAbsolutePath("C:\\Users\\me\\x.png"), true);
  assert.equal(looksLikeAbsolutePath("see \\\\server\\share"), true);
  assert.equal(looksLikeAbsolutePath("sd_xl_base_1.0.safetensors"), false);
  assert.equal(looksLikeAbsolutePath("sdxl/controlnet-canny"), false);
  assert.equal(looksLikeAbsolutePath("a cat, 1/2 body"), false);
});

test("secret widget names", () => {
  for (const n of ["api_key", "fal_key", "FAL_KEY", "key_secret", "secret", "auth_token", "password"]) {
    assert.ok(SECRET_NAME.test(n), n);
  }
  for (const n of ["prompt", "image_size", "seed", "num_images", "max_tokens", "keyframe", "monkey"]) {
    assert.ok(!SECRET_NAME.test(n), n);
  }
});

test("serialized node: secrets blanked, our labels and runtime properties dropped, the rest untouched", () => {
  const data = {
    id: 4,
    type: "SDXLCNFalImg2Img",
    inputs: [
      { name: "image", type: "IMAGE", link: 1 },
      { name: "image_size", type: "COMBO", widget: { name: "image_size" }, label: imageSizeLabel("square") },
      { name: "seed", type: "INT", widget: { name: "seed" }, label: "my seed" },
    ],
    properties: { "Node name for S&R": "SDXLCNFalImg2Img", [`${RUNTIME_PROPERTY_PREFIX}_status`]: ["x"] },
    widgets_values: ["a prompt", FAKE_KEY, "square", 7],
  };
  sanitizeSerializedNode(data, ["prompt", "api_key", "image_size", "seed"]);
  assert.deepEqual(data.widgets_values, ["a prompt", "", "square", 7]);
  assert.equal("label" in data.inputs[1], false);
  assert.equal(data.inputs[2].label, "my seed"); // a user's own label stays
  assert.deepEqual(data.properties, { "Node name for S&R": "SDXLCNFalImg2Img" });
  assert.deepEqual(findLeaks(data), []);
  assert.equal(sanitizeSerializedNode(null), null);
});

test("findLeaks reports keys, paths, server state and known secrets", () => {
  const wf = {
    nodes: [
      { widgets_values: ["ok", FAKE_KEY, "/home/me/x.png"] },
      { properties: { [`${RUNTIME_PROPERTY_PREFIX}_x`]: 1 }, widgets_values: ["contains s3cr3tvalue here"] },
    ],
    extra: { client_id: "abc", api_key: "zzz" },
  };
  const leaks = findLeaks(wf, ["s3cr3tvalue", "ab"]);
  assert.deepEqual(leaks, [
    { path: "$.nodes[0].widgets_values[1]", reason: "secret" },
    { path: "$.nodes[0].widgets_values[2]", reason: "absolute path" },
    { path: `$.nodes[1].properties.${RUNTIME_PROPERTY_PREFIX}_x`, reason: "runtime state" },
    { path: "$.nodes[1].widgets_values[0]", reason: "secret" },
    { path: "$.extra.client_id", reason: "server state" },
    { path: "$.extra.api_key", reason: "secret" },
  ]);
});

test("the shipped workflows are clean", () => {
  const dirs = ["workflows", "workflows/api", "workflows/tiny"];
  let checked = 0;
  for (const d of dirs) {
    let names = [];
    try {
      names = readdirSync(new URL(`${d}/`, ROOT)).filter((n) => n.endsWith(".json"));
    } catch {
      continue;
    }
    for (const n of names) {
      const wf = JSON.parse(readFileSync(new URL(`${d}/${n}`, ROOT), "utf8"));
      assert.deepEqual(findLeaks(wf), [], `${d}/${n}`);
      checked += 1;
    }
  }
  assert.ok(checked >= 0);
});
