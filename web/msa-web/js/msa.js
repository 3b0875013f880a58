// msa: Memory Sparse Attention in the browser. A thin layer over the WASM engine (msa_web.js, made by
// wasm-bindgen): byte-level load progress, and answers as an async iterator of events.
import init, { MsaEngine } from "./msa_web.js";

let initialised;

const WEBGPU_MISSING =
  "WebGPU unavailable: this browser has no navigator.gpu. Use a browser with WebGPU " +
  "(a recent Chrome, Edge, Firefox or Safari) on a secure (https or localhost) page.";

const NO_ADAPTER =
  "WebGPU unavailable: this browser offers no WebGPU adapter (WebGPU is turned off, or the GPU is " +
  "blocklisted). Use a browser with WebGPU (a recent Chrome, Edge, Firefox or Safari).";

/** Whether this page can run msa at all (the engine still needs an adapter). */
export function hasWebGpu() {
  return typeof navigator !== "undefined" && "gpu" in navigator;
}

/** The bytes of a URL, Blob/File, ArrayBuffer or Uint8Array, reporting (loaded, total) as they come. */
async function bytesOf(source, name, onBytes) {
  if (source instanceof Uint8Array) return source;
  if (source instanceof ArrayBuffer) return new Uint8Array(source);
  if (typeof Blob !== "undefined" && source instanceof Blob) {
    const bytes = new Uint8Array(await source.arrayBuffer());
    onBytes(bytes.length, bytes.length);
    return bytes;
  }
  const response = await fetch(source);
  if (!response.ok) {
    throw new Error(`${name}: ${response.status} ${response.statusText} fetching ${source}`);
  }
  const total = Number(response.headers.get("Content-Length")) || 0;
  const reader = response.body.getReader();
  const chunks = [];
  let loaded = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    chunks.push(value);
    loaded += value.length;
    onBytes(loaded, Math.max(total, loaded));
  }
  const bytes = new Uint8Array(loaded);
  let at = 0;
  for (const chunk of chunks) {
    bytes.set(chunk, at);
    at += chunk.length;
  }
  onBytes(loaded, loaded);
  return bytes;
}

export class Msa {
  #engine;
  #adapter = "";

  constructor(engine) {
    this.#engine = engine;
  }

  /**
   * Loads a model onto the browser's GPU. Each of `config`, `weights` (a .safetensors file) and
   * `tokenizer` is a URL, a File/Blob, an ArrayBuffer or a Uint8Array. `onProgress({loaded, total})`
   * hears the bytes of all three as they arrive. `limits` (optional) caps `maxBufferSize` and
   * `maxStorageBufferBindingSize` below the adapter's; larger weights are split across buffers.
   */
  static async load({ config, weights, tokenizer, limits }, onProgress) {
    if (!hasWebGpu()) throw new Error(WEBGPU_MISSING);
    // Asked before any download: a browser with WebGPU turned off has navigator.gpu but no adapter.
    const adapter = await navigator.gpu.requestAdapter();
    if (!adapter) throw new Error(NO_ADAPTER);
    initialised ??= init();
    await initialised;
    const sizes = { config: [0, 0], weights: [0, 0], tokenizer: [0, 0] };
    const report = (name) => (loaded, total) => {
      sizes[name] = [loaded, total];
      const all = Object.values(sizes);
      onProgress?.({
        loaded: all.reduce((sum, [l]) => sum + l, 0),
        total: all.reduce((sum, [, t]) => sum + t, 0),
      });
    };
    const [configBytes, weightBytes, tokenizerBytes] = await Promise.all([
      bytesOf(config, "config.json", report("config")),
      bytesOf(weights, "weights", report("weights")),
      bytesOf(tokenizer, "tokenizer.json", report("tokenizer")),
    ]);
    const text = (bytes) => new TextDecoder().decode(bytes);
    // wgpu sees little of a browser adapter; WebGPU's own info names it, and its vendor chooses the
    // kernel variants (a GPU maker's get the GPU ones).
    const info = adapter.info;
    const engine = await MsaEngine.load(text(configBytes), weightBytes, text(tokenizerBytes), limits, {
      vendor: info?.vendor ?? "",
      architecture: info?.architecture ?? "",
    });
    const msa = new Msa(engine);
    msa.#adapter = [info?.vendor, info?.architecture, info?.description].filter((s) => s).join(" ");
    return msa;
  }

  /** Encodes documents into the memory; resolves to the number of documents it holds. */
  addDocuments(texts, onProgress) {
    return this.#engine.addDocuments(texts, onProgress ?? null);
  }

  /**
   * Answers a question: an async iterator of events (`routing`, `token`, and with `interleave` also
   * `round`, `named`, `injected`, `retrievalEnded`), ending with `{type: "done", answer}`.
   */
  async *ask(question, options = {}) {
    const queue = [];
    let wake = null;
    let failure = null;
    const push = (event) => {
      queue.push(event);
      wake?.();
    };
    this.#engine.ask(question, options, push).then(
      (answer) => push({ type: "done", answer }),
      (error) => {
        failure = error;
        wake?.();
      },
    );
    for (;;) {
      if (queue.length > 0) {
        const event = queue.shift();
        yield event;
        if (event.type === "done") return;
      } else if (failure) {
        throw failure;
      } else {
        await new Promise((resolve) => (wake = resolve));
        wake = null;
      }
    }
  }

  /**
   * `{documents, chunks, adapter, limits}`: `adapter` as WebGPU names it (vendor, architecture),
   * `limits` the buffer limits the engine works within.
   */
  stats() {
    const stats = this.#engine.stats();
    return { ...stats, adapter: this.#adapter || stats.adapter };
  }

  /**
   * Frees the GPU memory (model, documents) now. `addDocuments` and `ask` then reject, as after a
   * device loss ("the GPU device was lost"); load a model again to go on.
   */
  dispose() {
    this.#engine.destroy();
  }
}
