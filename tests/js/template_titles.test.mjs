import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { CARD_PREFIX, cardName, rawTexts, relabelCards, templateLabels } from "../../web/lib/template_titles.js";

const INDEX = JSON.parse(readFileSync(new URL("../../web/templates.json", import.meta.url), "utf8"));

/** A card as the Templates browser builds it (only what relabelCards reads). */
function element(tag, text, attrs = {}) {
  return {
    tag,
    textContent: text,
    attrs: { ...attrs },
    hasAttribute(name) { return name in this.attrs; },
    getAttribute(name) { return this.attrs[name] ?? null; },
    setAttribute(name, value) { this.attrs[name] = value; },
  };
}

function card(name, heading = name, description = name.replace(/[-_]/g, " ")) {
  const h3 = element("h3", heading, { title: heading });
  const p = element("p", description, { title: description });
  const root = element("div", "", { "data-testid": CARD_PREFIX + name });
  root.querySelectorAll = (sel) => (sel === "h3" ? [h3] : sel === "p" ? [p] : []);
  return { root, h3, p };
}

function page(cards) {
  return { querySelectorAll: () => cards.map((c) => c.root) };
}

test("labels come from the index.json-shaped list", () => {
  const labels = templateLabels(INDEX);
  assert.ok(Object.keys(labels).length >= 1);
  for (const [name, label] of Object.entries(labels)) {
    assert.notEqual(label.title, name);
    assert.ok(label.description && !label.description.includes("\n"), name);
  }
  assert.deepEqual(templateLabels(null), {});
  assert.deepEqual(templateLabels([{ templates: [{ name: "a" }, null, { name: "b", title: "B" }] }]),
    { b: { title: "B", description: "" } });
});

test("card names and the frontend's raw texts", () => {
  assert.equal(cardName(`${CARD_PREFIX}sdxl_controlnet_img2img_fal`), "sdxl_controlnet_img2img_fal");
  assert.equal(cardName("something-else"), null);
  assert.equal(cardName(null), null);
  assert.deepEqual(rawTexts("sdxl_controlnet_img2img_comfy_models"),
    { title: "sdxl_controlnet_img2img_comfy_models", description: "sdxl controlnet img2img comfy models" });
});

test("our cards get title and description; other cards and relabelled ones stay", () => {
  const labels = { ours: { title: "Our title", description: "What it does." } };
  const ours = card("ours");
  const theirs = card("theirs");
  const otherLayout = card("ours", "A title the frontend gave it");
  assert.equal(relabelCards(page([ours, theirs, otherLayout]), labels), 1);
  assert.equal(ours.h3.textContent, "Our title");
  assert.equal(ours.h3.getAttribute("title"), "Our title");
  assert.equal(ours.p.textContent, "What it does.");
  assert.equal(theirs.h3.textContent, "theirs");
  assert.equal(otherLayout.h3.textContent, "A title the frontend gave it");
  assert.equal(relabelCards(page([ours]), labels), 0); // already ours: nothing to do
});
