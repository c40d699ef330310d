// Safe sharing: what the extension lets into a saved/exported workflow. The extension keeps its own
// runtime state (fal status, labels) off the serialized node, blanks any widget that would hold a
// secret, and `findLeaks` checks a whole workflow for keys, absolute paths and server state.
// Pure; unit-tested under Node (tests/js/sanitize.test.mjs) and used by the browser test.

import { isDecoratedLabel } from "./size_widgets.js";

/** Widget names whose values must never be saved (the pack's nodes take no key widget; this is a guard). */
export const SECRET_NAME = /(^|[_-])(api[_-]?key|fal[_-]?key|key[_-]?secret|secret|access[_-]?token|auth[_-]?token|password|credentials?)$/i;

/** Node property names the extension may use at runtime; never saved. */
export const RUNTIME_PROPERTY_PREFIX = "sdxlcn_runtime";

const FAL_KEY = /[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}:[0-9a-f]{16,}/i;
const KEY_HEADER = /\bKey\s+[A-Za-z0-9_-]{8,}:[A-Za-z0-9_-]{8,}/;
const ABSOLUTE_PATH = /(^|[\s"'=(])(\/(home|root|Users|tmp|var|etc|opt|mnt|media|srv|work|private)\/|[A-Za-z]:[\\/][^\s]|\\\\[A-Za-z0-9])/;
// Keys of ComfyUI server state that belong in a run's history, not in a workflow.
// (The fal node's `request_id` widget is a user input, for re-fetching a paid result, so it is not listed.)
const SERVER_STATE_KEYS = new Set(["client_id", "prompt_id", "status_url", "response_url", "cancel_url"]);

/** True for text shaped like a fal key ("<uuid>:<hex>") or an Authorization "Key id:secret" header value. */
export function looksLikeSecret(text) {
  return typeof text === "string" && (FAL_KEY.test(text) || KEY_HEADER.test(text));
}

/** True for text holding an absolute filesystem path (POSIX home/system folders, a Windows drive, a UNC share). */
export function looksLikeAbsolutePath(text) {
  return typeof text === "string" && ABSOLUTE_PATH.test(text);
}

/**
 * Clean one serialized node in place (as LGraphNode.onSerialize receives it) and return it:
 * widget values under secret-looking names are blanked, input labels the extension decorated are
 * dropped, and runtime properties are removed. `widgetNames[i]` is the name of widgets_values[i].
 */
export function sanitizeSerializedNode(data, widgetNames = []) {
  if (!data || typeof data !== "object") return data;
  if (Array.isArray(data.widgets_values)) {
    widgetNames.forEach((name, i) => {
      if (typeof name === "string" && SECRET_NAME.test(name) && i < data.widgets_values.length) {
        data.widgets_values[i] = "";
      }
    });
  }
  if (Array.isArray(data.inputs)) {
    for (const input of data.inputs) {
      if (input && isDecoratedLabel(input.label, input.name)) delete input.label;
    }
  }
  if (data.properties && typeof data.properties === "object") {
    for (const key of Object.keys(data.properties)) {
      if (key.startsWith(RUNTIME_PROPERTY_PREFIX)) delete data.properties[key];
    }
  }
  return data;
}

/**
 * Everything in a workflow (UI or API format, any JSON value) that should not be shared:
 * secret-looking strings, absolute paths, server-state keys, and any of `knownSecrets` verbatim.
 * Returns [{path, reason}] with JSON-path-like locations; [] when clean.
 */
export function findLeaks(value, knownSecrets = []) {
  const secrets = knownSecrets.filter((s) => typeof s === "string" && s.length >= 6);
  const leaks = [];
  const walk = (v, path) => {
    if (typeof v === "string") {
      if (looksLikeSecret(v) || secrets.some((s) => v.includes(s))) leaks.push({ path, reason: "secret" });
      else if (looksLikeAbsolutePath(v)) leaks.push({ path, reason: "absolute path" });
    } else if (Array.isArray(v)) {
      v.forEach((item, i) => walk(item, `${path}[${i}]`));
    } else if (v && typeof v === "object") {
      for (const [k, item] of Object.entries(v)) {
        const p = `${path}.${k}`;
        if (SERVER_STATE_KEYS.has(k)) leaks.push({ path: p, reason: "server state" });
        else if (k.startsWith(RUNTIME_PROPERTY_PREFIX)) leaks.push({ path: p, reason: "runtime state" });
        else if (SECRET_NAME.test(k) && typeof item === "string" && item !== "") leaks.push({ path: p, reason: "secret" });
        else walk(item, p);
      }
    }
  };
  walk(value, "$");
  return leaks;
}
