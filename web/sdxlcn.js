// The pack's ComfyUI frontend extension: a thin layer over ./lib (pure, unit-tested modules).
// - SDXLCNImg2Img / SDXLCNFalImg2Img: width/height show only when image_size is "custom";
//   the image_size label tells the preset's pixel size ("image_size · 1024×768").
// - SDXLCNFalImg2Img: the remote status (queue position, elapsed, last log line) from the server's
//   "sdxlcn.fal_status" websocket messages is drawn under the node, cleared when the run ends.
// - Nothing runtime is saved: statuses live in memory, labels and secret-named widgets are scrubbed
//   from the serialized node.
// - The Templates browser shows the pack's templates with their titles and descriptions (./templates.json)
//   instead of their file names (see lib/template_titles.js).
// Served by ComfyUI from WEB_DIRECTORY under /extensions/<pack folder>/, hence ../../scripts/.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import {
  IMAGE_SIZE_WIDGET,
  SIZED_NODE_TYPES,
  SIZE_WIDGETS,
  imageSizeLabel,
  sizeWidgetsVisible,
} from "./lib/size_widgets.js";
import { FAL_NODE_TYPE, FAL_STATUS_EVENT, createStatusStore } from "./lib/fal_status.js";
import { sanitizeSerializedNode } from "./lib/sanitize.js";
import { templateLabels, watchTemplateCards } from "./lib/template_titles.js";

/** In-memory fal status per node id (exported for the browser test; never written to a node). */
export const falStatus = createStatusStore();

const applied = new WeakMap(); // node -> image_size value last applied

function widget(node, name) {
  return node.widgets?.find((w) => w.name === name);
}

function setHidden(w, hidden) {
  w.hidden = hidden; // the LiteGraph canvas
  w.options ??= {};
  w.options.hidden = hidden; // Vue nodes and the parameters panel
}

/** Show/hide width and height and relabel image_size for the node's current choice. */
export function applyImageSize(node) {
  const sizeWidget = widget(node, IMAGE_SIZE_WIDGET);
  if (!sizeWidget) return;
  const value = sizeWidget.value;
  const show = sizeWidgetsVisible(value);
  const before = node.computeSize?.()[1];
  let resized = false;
  for (const name of SIZE_WIDGETS) {
    const w = widget(node, name);
    if (w && Boolean(w.hidden) === show) {
      setHidden(w, !show);
      resized = true;
    }
  }
  sizeWidget.label = imageSizeLabel(value, sizeWidget.name);
  applied.set(node, value);
  if (resized && before !== undefined && node.setSize) {
    // Grow/shrink by what appeared/disappeared, keeping any extra room the user gave the node.
    const after = node.computeSize()[1];
    node.setSize([node.size[0], Math.max(after, node.size[1] + (after - before))]);
  }
  node.setDirtyCanvas?.(true, true);
}

function chain(proto, name, fn) {
  const original = proto[name];
  proto[name] = function (...args) {
    const r = original?.apply(this, args);
    fn.apply(this, [r, ...args]);
    return r;
  };
}

function redraw() {
  app.graph?.setDirtyCanvas?.(true, false);
  app.canvas?.setDirty?.(true, false);
  showStatusInVueNodes();
}

/** The newer Vue node renderer draws nodes as DOM, not on the canvas: there the status is a box under the node. */
function showStatusInVueNodes() {
  if (typeof document === "undefined") return;
  for (const box of document.querySelectorAll(".sdxlcn-fal-status")) {
    if (!falStatus.lines(box.dataset.nodeId).length) box.remove();
  }
  for (const node of app.graph?.nodes ?? []) {
    if (node.type !== FAL_NODE_TYPE) continue;
    const lines = falStatus.lines(node.id);
    const element = document.querySelector(`[data-node-id="${node.id}"]`);
    if (!lines.length || !element) continue;
    let box = element.querySelector(":scope > .sdxlcn-fal-status");
    if (!box) {
      box = document.createElement("div");
      box.className = "sdxlcn-fal-status";
      box.dataset.nodeId = String(node.id);
      Object.assign(box.style, {
        position: "absolute", top: "100%", left: "0", right: "0", marginTop: "8px", padding: "6px",
        borderRadius: "6px", border: "1px solid #4a90d9", background: "rgba(20, 24, 32, 0.85)",
        font: "12px sans-serif", color: "#a9b4c2", whiteSpace: "nowrap", overflow: "hidden",
        textOverflow: "ellipsis", pointerEvents: "none",
      });
      element.appendChild(box);
    }
    box.replaceChildren(...lines.map((line, i) => {
      const row = document.createElement("div");
      row.textContent = line;
      if (i === 0) row.style.color = "#e8f1ff";
      return row;
    }));
  }
}

function drawStatus(node, ctx) {
  const lines = falStatus.lines(node.id);
  if (!lines.length || node.flags?.collapsed) return;
  const pad = 6;
  const lineHeight = 15;
  const width = node.size[0];
  const top = node.size[1] + 8;
  const height = pad * 2 + lineHeight * lines.length;
  ctx.save();
  ctx.fillStyle = "rgba(20, 24, 32, 0.85)";
  ctx.strokeStyle = "#4a90d9";
  ctx.beginPath();
  if (ctx.roundRect) ctx.roundRect(0, top, width, height, 6);
  else ctx.rect(0, top, width, height);
  ctx.fill();
  ctx.stroke();
  ctx.font = "12px sans-serif";
  ctx.textBaseline = "top";
  lines.forEach((line, i) => {
    ctx.fillStyle = i === 0 ? "#e8f1ff" : "#a9b4c2";
    let text = line;
    while (text.length > 1 && ctx.measureText(text).width > width - pad * 2) text = `${text.slice(0, -2)}…`;
    ctx.fillText(text, pad, top + pad + i * lineHeight);
  });
  ctx.restore();
}

app.registerExtension({
  name: "sdxlcn.frontend",

  async setup() {
    api.addEventListener(FAL_STATUS_EVENT, ({ detail }) => {
      if (falStatus.update(detail) !== null) redraw();
    });
    const clearAll = () => {
      if (falStatus.clearAll().length) redraw();
    };
    for (const event of ["execution_start", "execution_success", "execution_error", "execution_interrupted"]) {
      api.addEventListener(event, clearAll);
    }
    api.addEventListener("executed", ({ detail }) => {
      if (falStatus.clear(detail?.display_node ?? detail?.node)) redraw();
    });
    fetch(new URL("./templates.json", import.meta.url)) // not awaited: the page's start does not wait for it
      .then((r) => r.json())
      .then((index) => watchTemplateCards(document, templateLabels(index)))
      .catch((err) => console.info("sdxlcn: template titles unavailable; Templates shows file names", err));
  },

  async beforeRegisterNodeDef(nodeType, nodeData) {
    const isSized = SIZED_NODE_TYPES.includes(nodeData.name);
    const isOurs = isSized || nodeData.name.startsWith("SDXLCN");
    if (!isOurs) return;
    const proto = nodeType.prototype;

    chain(proto, "onSerialize", function (_r, data) {
      sanitizeSerializedNode(data, (this.widgets ?? []).map((w) => w.name));
    });

    if (isSized) {
      chain(proto, "onNodeCreated", function () {
        const sizeWidget = widget(this, IMAGE_SIZE_WIDGET);
        if (!sizeWidget) return;
        const node = this;
        const callback = sizeWidget.callback;
        sizeWidget.callback = function (...args) {
          const r = callback?.apply(this, args);
          applyImageSize(node);
          return r;
        };
        applyImageSize(this);
      });
      chain(proto, "onConfigure", function () {
        applyImageSize(this);
      });
      // Safety net for values set without the widget callback (e.g. by other extensions).
      chain(proto, "onDrawForeground", function () {
        const sizeWidget = widget(this, IMAGE_SIZE_WIDGET);
        if (sizeWidget && applied.get(this) !== sizeWidget.value) applyImageSize(this);
      });
    }

    if (nodeData.name === FAL_NODE_TYPE) {
      chain(proto, "onDrawForeground", function (_r, ctx) {
        drawStatus(this, ctx);
      });
      chain(proto, "onRemoved", function () {
        falStatus.clear(this.id);
      });
    }
  },
});
