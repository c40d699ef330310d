// The fal node's remote status (queue position, elapsed time, last log line): parsing the server's
// websocket message and formatting it for the node. Pure; unit-tested under Node (tests/js/fal_status.test.mjs).
//
// Server side: PromptServer.instance.send_sync("sdxlcn.fal_status",
//   {node, queue_position, elapsed, log, state}).

export const FAL_STATUS_EVENT = "sdxlcn.fal_status";
export const FAL_NODE_TYPE = "SDXLCNFalImg2Img";

const TERMINAL_STATES = new Set(["COMPLETED", "DONE", "FAILED", "ERROR", "CANCELLED", "CANCELED", "INTERRUPTED"]);
const STATE_TEXT = {
  SUBMITTING: "submitting",
  SUBMITTED: "submitted",
  IN_QUEUE: "in queue",
  IN_PROGRESS: "running",
  DOWNLOADING: "downloading result",
  UPLOADING: "uploading images",
};

export const MAX_LOG_CHARS = 80;

/** The node id a message is about, as the key the graph uses ("12"; a subgraph path "5:12" keeps its last part). */
export function nodeKey(node) {
  if (node === null || node === undefined || node === "") return null;
  const s = String(node);
  const parts = s.split(":");
  return parts[parts.length - 1];
}

/** True when the state means the remote request is over (status should be cleared). */
export function isTerminal(state) {
  return typeof state === "string" && TERMINAL_STATES.has(state.toUpperCase());
}

/** Seconds as "0.4 s", "12 s", "2 min 05 s"; "" for anything that is not a finite number >= 0. */
export function formatElapsed(seconds) {
  const n = Number(seconds);
  if (seconds === null || seconds === undefined || seconds === "" || !Number.isFinite(n) || n < 0) return "";
  if (n < 10) return `${n.toFixed(1)} s`;
  if (n < 60) return `${Math.floor(n)} s`;
  const m = Math.floor(n / 60);
  const s = Math.floor(n % 60);
  return `${m} min ${String(s).padStart(2, "0")} s`;
}

/** The last non-empty line of a log (a string, a list of strings, or fal's [{message}] records), shortened. */
export function lastLogLine(log, maxChars = MAX_LOG_CHARS) {
  let lines = [];
  if (typeof log === "string") lines = log.split(/\r?\n/);
  else if (Array.isArray(log)) {
    for (const entry of log) {
      if (typeof entry === "string") lines.push(...entry.split(/\r?\n/));
      else if (entry && typeof entry.message === "string") lines.push(...entry.message.split(/\r?\n/));
    }
  }
  const last = lines.map((l) => l.trim()).filter(Boolean).pop() ?? "";
  // Control characters would draw as boxes on the canvas.
  const clean = last.replace(/[\u0000-\u001f\u007f]/g, " ");
  return clean.length > maxChars ? `${clean.slice(0, maxChars - 1)}…` : clean;
}

/** The lines to draw on the node for one status message (empty when there is nothing to show). */
export function statusLines(data) {
  if (!data || typeof data !== "object" || isTerminal(data.state)) return [];
  const head = [];
  const state = typeof data.state === "string" ? data.state.toUpperCase() : "";
  head.push(`fal: ${STATE_TEXT[state] ?? (state ? state.toLowerCase().replace(/_/g, " ") : "waiting")}`);
  const pos = Number(data.queue_position);
  if (data.queue_position !== null && data.queue_position !== undefined && Number.isInteger(pos) && pos >= 0) {
    head.push(`queue position ${pos}`);
  }
  const elapsed = formatElapsed(data.elapsed);
  if (elapsed) head.push(elapsed);
  const lines = [head.join(" · ")];
  const log = lastLogLine(data.log);
  if (log) lines.push(log);
  return lines;
}

/** The index of a request within a node's run (the node sends several at once for batches). */
function requestIndex(data) {
  const i = Number(data?.index);
  return Number.isInteger(i) && i >= 0 ? i : 0;
}

/**
 * Per-node status kept in memory only (never on the node, so never in a saved workflow).
 * A node may have several requests in flight (batches); each is tracked by its `index` and
 * dropped when it reaches an end state. A message without log lines keeps the last one shown.
 */
export function createStatusStore() {
  const byNode = new Map(); // node key -> Map(index -> {data, order})
  let counter = 0;
  return {
    /** Apply one websocket message; returns the node key it touched (or null when it names no node). */
    update(data) {
      const key = nodeKey(data?.node);
      if (key === null) return null;
      const requests = byNode.get(key) ?? new Map();
      const index = requestIndex(data);
      if (isTerminal(data.state)) requests.delete(index);
      else {
        const previous = requests.get(index)?.data;
        const merged = { ...data };
        if (!lastLogLine(data.log) && previous && lastLogLine(previous.log)) merged.log = previous.log;
        requests.set(index, { data: merged, order: ++counter });
      }
      if (requests.size) byNode.set(key, requests);
      else byNode.delete(key);
      return key;
    },
    /** Lines for a node id ([] when none): the latest request's status, with a count when several are active. */
    lines(node) {
      const requests = byNode.get(nodeKey(node));
      if (!requests || !requests.size) return [];
      const entries = [...requests.entries()];
      const [index, latest] = entries.reduce((a, b) => (b[1].order > a[1].order ? b : a));
      const lines = statusLines(latest.data);
      if (entries.length > 1 && lines.length) {
        const queued = entries.filter(([, e]) => String(e.data.state).toUpperCase() === "IN_QUEUE").length;
        lines.unshift(`fal: ${entries.length} requests active${queued ? ` (${queued} in queue)` : ""}`);
        lines[1] = `#${index + 1} ${lines[1].replace(/^fal: /, "")}`;
      }
      return lines;
    },
    clear(node) {
      const key = nodeKey(node);
      return key !== null && byNode.delete(key);
    },
    clearAll() {
      const keys = [...byNode.keys()];
      byNode.clear();
      return keys;
    },
    /** Number of nodes with a status. */
    get size() {
      return byNode.size;
    },
  };
}
