import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import {
  IMAGE_SIZE_PRESETS,
  SIZED_NODE_TYPES,
  imageSizeLabel,
  isDecoratedLabel,
  presetSize,
  sizeHint,
  sizeWidgetsVisible,
} from "../../web/lib/size_widgets.js";

const ROOT = new URL("../../", import.meta.url);

test("width/height show only for custom", () => {
  assert.equal(sizeWidgetsVisible("custom"), true);
  for (const v of ["none", ...Object.keys(IMAGE_SIZE_PRESETS), "", undefined, null, "Custom"]) {
    assert.equal(sizeWidgetsVisible(v), false, String(v));
  }
});

test("preset pixel sizes and labels", () => {
  assert.deepEqual(presetSize("landscape_4_3"), [1024, 768]);
  assert.deepEqual(presetSize("portrait_16_9"), [576, 1024]);
  assert.equal(presetSize("none"), null);
  assert.equal(presetSize("custom"), null);
  assert.equal(presetSize("toString"), null); // no prototype lookups
  assert.equal(sizeHint("square"), "512×512");
  assert.equal(sizeHint("none"), "control image size");
  assert.equal(sizeHint("custom"), "");
  assert.equal(imageSizeLabel("square_hd"), "image_size · 1024×1024");
  assert.equal(imageSizeLabel("none"), "image_size · control image size");
  assert.equal(imageSizeLabel("custom"), "image_size");
  assert.equal(imageSizeLabel("custom", "Size"), "Size");
});

test("presetSize returns a copy", () => {
  const s = presetSize("square");
  s[0] = 1;
  assert.deepEqual(IMAGE_SIZE_PRESETS.square, [512, 512]);
});

test("decorated labels are recognised (and only those)", () => {
  assert.equal(isDecoratedLabel(imageSizeLabel("square")), true);
  assert.equal(isDecoratedLabel("image_size"), false);
  assert.equal(isDecoratedLabel(undefined), false);
  assert.equal(isDecoratedLabel("width · 3", "image_size"), false);
});

test("presets equal the Python library's (pipeline/sizes.py)", () => {
  const src = readFileSync(new URL("pipeline/sizes.py", ROOT), "utf8");
  const block = src.slice(src.indexOf("IMAGE_SIZE_PRESETS"), src.indexOf("}", src.indexOf("IMAGE_SIZE_PRESETS")));
  const py = {};
  for (const m of block.matchAll(/"(\w+)":\s*\((\d+),\s*(\d+)\)/g)) py[m[1]] = [Number(m[2]), Number(m[3])];
  assert.ok(Object.keys(py).length >= 6, "parsed the Python presets");
  assert.deepEqual({ ...IMAGE_SIZE_PRESETS }, py);
});

test("the sized node types are the ones using the shared request widgets", () => {
  const sampler = readFileSync(new URL("nodes/sampler.py", ROOT), "utf8");
  assert.match(sampler, /class SDXLCNImg2Img\b/);
  assert.match(sampler, /request_widgets\(\)/);
  assert.deepEqual([...SIZED_NODE_TYPES], ["SDXLCNImg2Img", "SDXLCNFalImg2Img"]);
});
