import { test } from "node:test";
import assert from "node:assert/strict";
import {
  FAL_STATUS_EVENT,
  createStatusStore,
  formatElapsed,
  isTerminal,
  lastLogLine,
  nodeKey,
  statusLines,
} from "../../web/lib/fal_status.js";

test("event name matches the server's", () => {
  assert.equal(FAL_STATUS_EVENT, "sdxlcn.fal_status");
});

test("elapsed formatting", () => {
  assert.equal(formatElapsed(0), "0.0 s");
  assert.equal(formatElapsed(3.14159), "3.1 s");
  assert.equal(formatElapsed(12.9), "12 s");
  assert.equal(formatElapsed(125), "2 min 05 s");
  assert.equal(formatElapsed("7.25"), "7.3 s");
  for (const bad of [null, undefined, "", "abc", -1, NaN, Infinity]) assert.equal(formatElapsed(bad), "", String(bad));
});

test("last log line from strings, lists and fal log records", () => {
  assert.equal(lastLogLine("a\nb\n\n"), "b");
  assert.equal(lastLogLine(["one", "two\nthree", "  "]), "three");
  assert.equal(lastLogLine([{ message: "Loading model" }, { message: "Step 3/25", level: "INFO" }]), "Step 3/25");
  assert.equal(lastLogLine(null), "");
  assert.equal(lastLogLine([{}, 3]), "");
  assert.equal(lastLogLine("tab\there"), "tab here");
  const long = "x".repeat(200);
  const cut = lastLogLine(long, 20);
  assert.equal(cut.length, 20);
  assert.ok(cut.endsWith("…"));
});

test("status lines for queue, progress and end states", () => {
  assert.deepEqual(statusLines({ node: "7", state: "IN_QUEUE", queue_position: 3, elapsed: 1.2 }), [
    "fal: in queue · queue position 3 · 1.2 s",
  ]);
  assert.deepEqual(statusLines({ node: "7", state: "IN_PROGRESS", elapsed: 14, log: [{ message: "Step 5/25" }] }), [
    "fal: running · 14 s",
    "Step 5/25",
  ]);
  assert.deepEqual(statusLines({ node: "7", queue_position: 0 }), ["fal: waiting · queue position 0"]);
  assert.deepEqual(statusLines({ node: "7", state: "some_new_state" }), ["fal: some new state"]);
  assert.deepEqual(statusLines({ node: "7", queue_position: "x", elapsed: null }), ["fal: waiting"]);
  for (const end of ["COMPLETED", "FAILED", "error", "cancelled", "done"]) {
    assert.equal(isTerminal(end), true, end);
    assert.deepEqual(statusLines({ node: "7", state: end, elapsed: 3 }), []);
  }
  assert.equal(isTerminal("IN_QUEUE"), false);
  assert.deepEqual(statusLines(null), []);
});

test("node keys: numbers, strings, subgraph paths", () => {
  assert.equal(nodeKey(12), "12");
  assert.equal(nodeKey("12"), "12");
  assert.equal(nodeKey("5:12"), "12");
  assert.equal(nodeKey(null), null);
  assert.equal(nodeKey(""), null);
});

test("store: set, replace, clear on end state, clear on demand", () => {
  const s = createStatusStore();
  assert.equal(s.update({ state: "IN_QUEUE" }), null); // no node: ignored
  assert.equal(s.size, 0);
  assert.equal(s.update({ node: "4", state: "IN_QUEUE", queue_position: 2 }), "4");
  assert.deepEqual(s.lines(4), ["fal: in queue · queue position 2"]);
  s.update({ node: 4, state: "IN_PROGRESS", elapsed: 2, log: "hello" });
  assert.deepEqual(s.lines("4"), ["fal: running · 2.0 s", "hello"]);
  s.update({ node: "9", state: "IN_QUEUE" });
  assert.equal(s.size, 2);
  s.update({ node: "4", state: "COMPLETED" });
  assert.deepEqual(s.lines("4"), []);
  assert.equal(s.clear("9"), true);
  assert.equal(s.clear("9"), false);
  s.update({ node: "1", state: "IN_QUEUE" });
  assert.deepEqual(s.clearAll(), ["1"]);
  assert.equal(s.size, 0);
});

test("store: several requests of one node (batches), log kept between polls", () => {
  const s = createStatusStore();
  s.update({ node: "4", index: 0, state: "IN_PROGRESS", elapsed: 3, log: "Step 1/25" });
  s.update({ node: "4", index: 0, state: "IN_PROGRESS", elapsed: 4, log: "" });
  assert.deepEqual(s.lines("4"), ["fal: running · 4.0 s", "Step 1/25"]);
  s.update({ node: "4", index: 1, state: "IN_QUEUE", queue_position: 1, elapsed: 0.5 });
  assert.deepEqual(s.lines("4"), [
    "fal: 2 requests active (1 in queue)",
    "#2 in queue · queue position 1 · 0.5 s",
  ]);
  s.update({ node: "4", index: 1, state: "COMPLETED" });
  assert.deepEqual(s.lines("4"), ["fal: running · 4.0 s", "Step 1/25"]);
  s.update({ node: "4", index: 0, state: "COMPLETED" });
  assert.deepEqual(s.lines("4"), []);
  assert.equal(s.size, 0);
});

test("the server sends the documented event and fields (nodes/fal_node.py)", async () => {
  const { readFileSync, existsSync } = await import("node:fs");
  const path = new URL("../../nodes/fal_node.py", import.meta.url);
  if (!existsSync(path)) return;
  const src = readFileSync(path, "utf8");
  assert.match(src, new RegExp(`"${FAL_STATUS_EVENT.replace(".", "\\.")}"`));
  for (const field of ["node", "state", "queue_position", "elapsed", "log"]) {
    assert.match(src, new RegExp(`"${field}":`), field);
  }
});
