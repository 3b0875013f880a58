// Types of msa.js: Memory Sparse Attention in the browser.

/** A model file: a URL to fetch, a picked File or Blob, or its bytes. */
export type Source = string | URL | Blob | ArrayBuffer | Uint8Array;

export interface LoadProgress {
  /** Bytes received so far, all files together. */
  loaded: number;
  /** Bytes expected (known once each response's Content-Length is). */
  total: number;
}

export interface EncodeProgress {
  documentsDone: number;
  documentsTotal: number;
  tokensDone: number;
  tokensTotal: number;
}

export interface AskOptions {
  /** Most tokens of the answer (default 256). */
  maxTokens?: number;
  /** 0 (the default) is greedy. */
  temperature?: number;
  topP?: number;
  seed?: number;
  /** Memory Interleave: rounds of naming documents and reading them before the answer. */
  interleave?: boolean;
  /** Retrieval rounds at most with `interleave` (default 4). */
  maxRounds?: number;
  /** Text taken as the model's first generated tokens (replays, tests). */
  forceOutput?: string;
}

export interface RoutedDocument {
  id: number;
  score: number;
}

export interface LayerRouting {
  layer: number;
  chunks: number;
  /** The selected documents, highest score first. */
  documents: RoutedDocument[];
  /** Every document's score, by position in the memory (the document id, for a memory built by
   *  `addDocuments`). */
  scores?: number[];
}

export interface Answer {
  tokens: number[];
  /** The generated answer text (with `interleave`, the text after retrieval). */
  text: string;
  /** With `interleave`, the text after `The answer to the question is:`, or null. */
  answer: string | null;
  /** The routing of the (last) prefill, per router layer. */
  routing: LayerRouting[];
  finishReason: string;
  rounds: number;
  roundsRouting?: LayerRouting[][];
  transcript?: string;
}

export type AskEvent =
  | { type: "round"; round: number; promptTokens: number; routingTokens: number }
  | { type: "routing"; round: number; layers: LayerRouting[] }
  | { type: "token"; phase: number | "answer"; id: number; text: string }
  | { type: "named"; round: number; ids: number[] }
  | { type: "injected"; round: number; ids: number[]; tokens: number }
  | { type: "retrievalEnded"; round: number; reason: "marker" | "characterCap" }
  | { type: "done"; answer: Answer };

/** Buffer limits in bytes, as WebGPU names them. */
export interface Limits {
  maxBufferSize?: number;
  maxStorageBufferBindingSize?: number;
}

export interface Stats {
  documents: number;
  chunks: number;
  /** The WebGPU adapter, as the browser names it (vendor, architecture, description). */
  adapter: string;
  /** The limits the engine works within (the adapter's, or the caps given to `load`). */
  limits: Required<Limits>;
  /** The kernel variants chosen for the adapter (GPU ones for a GPU maker's vendor). */
  variants: string;
}

/** Whether the page has WebGPU at all (`navigator.gpu`). */
export function hasWebGpu(): boolean;

export class Msa {
  /**
   * Loads a model onto the browser's GPU. Weights larger than a buffer are split across buffers;
   * `limits` caps the adapter's limits (to check a model against WebGPU's defaults, 256 MiB and
   * 128 MiB). Rejects with "WebGPU unavailable: …" without WebGPU, "… exceeds this device's buffer
   * limits …" naming the limit when a weight row cannot be bound, and the engine's message for a bad
   * config, checkpoint or tokenizer.
   */
  static load(
    files: { config: Source; weights: Source; tokenizer: Source; limits?: Limits },
    onProgress?: (progress: LoadProgress) => void,
  ): Promise<Msa>;
  /** Encodes documents into the memory; resolves to the number of documents it holds. */
  addDocuments(texts: string[], onProgress?: (progress: EncodeProgress) => void): Promise<number>;
  /** Answers a question as a stream of events ending with `done`. */
  ask(question: string, options?: AskOptions): AsyncGenerator<AskEvent, void, void>;
  stats(): Stats;
  /**
   * Frees the GPU memory now. The engine is then as after a device loss: `addDocuments` and `ask`
   * reject with "… the GPU device was lost …"; load a model again to go on.
   */
  dispose(): void;
}
