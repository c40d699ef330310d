// Titles and one-line descriptions for the pack's templates in ComfyUI's Templates browser.
//
// ComfyUI's convention for a custom node's templates (docs.comfy.org/custom-nodes/workflow_templates) is a workflow
// JSON with a same-named .jpg thumbnail beside it; the frontend ComfyUI 0.8.0 ships (1.35) shows such a template's
// file name as its title and again, with "_" and "-" as spaces, as its description. A titled index.json for custom
// nodes, as the core templates have, is only proposed (ComfyUI_frontend pull request 9284). Until then the pack's
// titles and descriptions (../templates.json, in the core index.json's shape) replace the file names on the pack's
// cards: a card is recognised by its data-testid ("template-workflow-<name>") and by showing that raw name, and
// anything else is left alone, so a frontend that lays cards out otherwise (or titles them itself) keeps its own.

export const CARD_PREFIX = "template-workflow-";

/** {name: {title, description}} from the index.json-shaped list of categories. */
export function templateLabels(index) {
  const labels = {};
  for (const category of Array.isArray(index) ? index : []) {
    for (const t of category?.templates ?? []) {
      if (t && typeof t.name === "string" && typeof t.title === "string") {
        labels[t.name] = { title: t.title, description: typeof t.description === "string" ? t.description : "" };
      }
    }
  }
  return labels;
}

/** The template name a card's data-testid names, or null. */
export function cardName(testId) {
  return typeof testId === "string" && testId.startsWith(CARD_PREFIX) ? testId.slice(CARD_PREFIX.length) : null;
}

/** What the frontend writes for a name: the title as is, the description with "_"/"-" as spaces. */
export function rawTexts(name) {
  return { title: name, description: name.replace(/[-_]/g, " ").trim() };
}

function setText(el, text) {
  if (!el) return;
  el.textContent = text;
  if (el.hasAttribute?.("title")) el.setAttribute("title", text);
}

/** Put our title and description on every card of ours under ``root`` that still shows its raw name. */
export function relabelCards(root, labels) {
  let changed = 0;
  for (const card of root.querySelectorAll(`[data-testid^="${CARD_PREFIX}"]`)) {
    const name = cardName(card.getAttribute("data-testid"));
    const label = name && labels[name];
    if (!label) continue;
    const raw = rawTexts(name);
    const heading = [...card.querySelectorAll("h3")].find((h) => h.textContent.trim() === raw.title);
    if (!heading) continue; // already ours, or a card laid out otherwise
    setText(heading, label.title);
    const text = [...card.querySelectorAll("p")].find((p) => p.textContent.trim() === raw.description);
    setText(text, label.description);
    changed += 1;
  }
  return changed;
}

/** Keep relabelling while the page lives (the browser builds cards each time it opens or filters). */
export function watchTemplateCards(doc, labels) {
  let queued = false;
  const run = () => {
    queued = false;
    relabelCards(doc, labels);
  };
  const observer = new MutationObserver(() => {
    if (!queued) {
      queued = true;
      requestAnimationFrame(run);
    }
  });
  observer.observe(doc.body, { childList: true, subtree: true, characterData: true });
  run();
  return observer;
}
