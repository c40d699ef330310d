// What the Node tests of fal's JS client against the pack's servers share: a PNG made here, a free port, a deadline,
// the tiny models, and a running `serve` (the pack's Python environment: .venv, or SDXLCN_PYTHON).
import { execFileSync, spawn } from "node:child_process";
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import zlib from "node:zlib";

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..", "..");
export const PYTHON = process.env.SDXLCN_PYTHON || path.join(ROOT, ".venv", "bin", "python");
export const APP = "fal-ai/fast-sdxl-controlnet-canny/image-to-image";

// the @fal-ai/client module ({fal, createFalClient, ...})
export async function falClient() {
  try {
    return await import("@fal-ai/client");
  } catch (err) {
    throw new Error(`@fal-ai/client is not installed: run 'npm ci --prefix tests/js' (scripts/test.sh does) (${err.message})`);
  }
}

// a size x size PNG, made here (zlib + CRC) so the tests need nothing else
function crc32(buf) {
  let c, crc = 0xffffffff;
  for (const b of buf) {
    c = (crc ^ b) & 0xff;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    crc = (crc >>> 8) ^ c;
  }
  return (crc ^ 0xffffffff) >>> 0;
}
function chunk(type, data) {
  const len = Buffer.alloc(4); len.writeUInt32BE(data.length);
  const td = Buffer.concat([Buffer.from(type, "ascii"), data]);
  const crc = Buffer.alloc(4); crc.writeUInt32BE(crc32(td));
  return Buffer.concat([len, td, crc]);
}
export function pngBytes(size, shade) {
  const rows = [];
  for (let y = 0; y < size; y++) {
    const row = Buffer.alloc(1 + size * 3);
    for (let x = 0; x < size; x++) row.set([(x * 4) % 256, (y * 4) % 256, shade], 1 + x * 3);
    rows.push(row);
  }
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(size, 0); ihdr.writeUInt32BE(size, 4); ihdr.set([8, 2, 0, 0, 0], 8);
  return Buffer.concat([Buffer.from([137, 80, 78, 71, 13, 10, 26, 10]), chunk("IHDR", ihdr),
    chunk("IDAT", zlib.deflateSync(Buffer.concat(rows))), chunk("IEND", Buffer.alloc(0))]);
}
export function pngDataUri(size, shade) {
  return "data:image/png;base64," + pngBytes(size, shade).toString("base64");
}

// {width, height, channels, data}: the pixels of an 8-bit RGB/RGBA/gray PNG (not interlaced), decoded here (zlib and
// PNG's five row filters), so that results can be compared as pixels whatever metadata chunks their files carry
export function pngPixels(png) {
  const idat = [];
  let width, height, channels;
  for (let at = 8; at < png.length;) {
    const len = png.readUInt32BE(at), type = png.toString("ascii", at + 4, at + 8), data = png.subarray(at + 8, at + 8 + len);
    if (type === "IHDR") {
      width = data.readUInt32BE(0); height = data.readUInt32BE(4);
      if (data[8] !== 8 || data[12] !== 0) throw new Error(`not an 8-bit non-interlaced PNG (depth ${data[8]})`);
      channels = { 0: 1, 2: 3, 4: 2, 6: 4 }[data[9]];
      if (!channels) throw new Error(`PNG color type ${data[9]} is not decoded here`);
    } else if (type === "IDAT") idat.push(data);
    at += 12 + len;
  }
  const raw = zlib.inflateSync(Buffer.concat(idat)), stride = width * channels, out = Buffer.alloc(stride * height);
  for (let y = 0; y < height; y++) {
    const filter = raw[y * (stride + 1)], row = raw.subarray(y * (stride + 1) + 1, (y + 1) * (stride + 1));
    for (let x = 0; x < stride; x++) {
      const a = x >= channels ? out[y * stride + x - channels] : 0, b = y ? out[(y - 1) * stride + x] : 0;
      const c = x >= channels && y ? out[(y - 1) * stride + x - channels] : 0;
      const p = a + b - c, pa = Math.abs(p - a), pb = Math.abs(p - b), pc = Math.abs(p - c);
      const pred = [0, a, b, (a + b) >> 1, pa <= pb && pa <= pc ? a : pb <= pc ? b : c][filter];
      out[y * stride + x] = (row[x] + pred) & 0xff;
    }
  }
  return { width, height, channels, data: out };
}

export function freePort() {
  return new Promise((resolve) => {
    const s = net.createServer().listen(0, "127.0.0.1", () => { const { port } = s.address(); s.close(() => resolve(port)); });
  });
}

export function withDeadline(promise, ms, what) {
  let t;
  return Promise.race([promise, new Promise((_, rej) => { t = setTimeout(() => rej(new Error(`${what}: no answer within ${ms} ms`)), ms); })])
    .finally(() => clearTimeout(t));
}

// {checkpoint, controlnet, lora}: the tiny random-weight models, written once into the temp folder
export function tinyModels() {
  const models = path.join(os.tmpdir(), "sdxlcn-js-tiny-models"); // reused when already there
  return JSON.parse(execFileSync(PYTHON, ["-m", "sdxl_controlnet_img2img", "make-tiny-models", "--out", models],
    { cwd: ROOT, env: { ...process.env, HF_HUB_OFFLINE: "1" }, stdio: ["ignore", "pipe", "ignore"] }).toString());
}

// `serve` on the tiny models on a free port (and `args`: more of its options), once it printed READY: {port, log(), stop()}
export async function startServe(key, env = {}, args = []) {
  const paths = tinyModels();
  const port = await freePort();
  const data = fs.mkdtempSync(path.join(os.tmpdir(), "sdxlcn-js-serve-"));
  const proc = spawn(PYTHON, ["-m", "sdxl_controlnet_img2img", "serve", "--checkpoint", paths.checkpoint, "--controlnet",
    paths.controlnet, "--port", String(port), "--device", "cpu", "--dtype", "fp32", "--data-dir", data, ...args],
  { cwd: ROOT, env: { ...process.env, HF_HUB_OFFLINE: "1", TRANSFORMERS_OFFLINE: "1", SDXLCN_SERVE_KEY: key, ...env } });
  let log = "";
  proc.stderr.on("data", (d) => { log += d; });
  await withDeadline(new Promise((resolve, reject) => {
    let out = "";
    proc.stdout.on("data", (d) => { out += d; if (out.includes("READY")) resolve(); });
    proc.on("exit", (code) => reject(new Error(`serve exited (${code}): ${log.slice(-2000)}`)));
  }), 180_000, "serve start");
  return { port, log: () => log, stop: () => proc.kill("SIGINT") };
}
