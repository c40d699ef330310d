// fal's own JS client (@fal-ai/client) against two nodes of one shared queue (run by tests/test_serve_redis.py, not by
// `node --test`): it submits through the first node and reads status, logs, result and the image through the second,
// each client with its own proxyUrl and no affinity. Prints one line, RESULT {...}.
//   node tests/js/serve_two_nodes.mjs https://127.0.0.1:PORT_A https://127.0.0.1:PORT_B KEY
import { APP, falClient, pngDataUri, withDeadline } from "./serve_helpers.mjs";

const [submitBase, readBase, key] = process.argv.slice(2);
const { createFalClient } = await falClient();
const through = (base) => createFalClient({ credentials: key, proxyUrl: { url: `${base}/proxy`, when: "always" } });
const [submitter, reader] = [through(submitBase), through(readBase)];

const input = {
  prompt: "Ice fortress, aurora skies", image_url: pngDataUri(64, 40), control_image_url: pngDataUri(64, 200),
  num_inference_steps: 2, strength: 1.0, guidance_scale: 1.0, seed: 5,
};
const { request_id: requestId } = await submitter.queue.submit(APP, { input });
const statuses = [];
let logs = [];
await withDeadline((async () => {
  for (;;) {
    const status = await reader.queue.status(APP, { requestId, logs: true });
    statuses.push(status.status);
    if (status.status === "COMPLETED") { logs = status.logs.map((l) => l.message); return; }
    await new Promise((r) => setTimeout(r, 100));
  }
})(), 180_000, "COMPLETED");
const result = await reader.queue.result(APP, { requestId });
const image = result.data.images[0];
const png = await fetch(image.url);
const bytes = Buffer.from(await png.arrayBuffer());
console.log("RESULT " + JSON.stringify({
  requestId, resultRequestId: result.requestId, seed: result.data.seed, url: image.url, width: image.width,
  height: image.height, contentType: png.headers.get("content-type"), png: bytes.subarray(1, 4).toString("ascii"),
  statuses, logs,
}));
