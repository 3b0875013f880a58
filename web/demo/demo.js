// The msa demo page: load a model, add documents, ask, and see which documents each router layer read.
// `window.msaDemo` holds the page's state for tests (state, answers, timings), and `dispose()`, which
// frees the GPU device as a device loss would.
import { Msa, hasWebGpu } from "./pkg/msa.js";

const $ = (id) => document.getElementById(id);
const TINY = "models/msa-tiny/";
const demo = (window.msaDemo = { state: "starting", answers: [], timings: {}, error: null });
let msa = null;
demo.dispose = () => msa?.dispose();

function setState(state) {
  demo.state = state;
  document.body.dataset.state = state;
}

function fail(error) {
  let message = error instanceof Error ? error.message : String(error);
  if (message.includes("device was lost")) {
    // Nothing on the GPU survives a loss: the model must be loaded again.
    msa = null;
    message += `${message.endsWith(".") ? "" : "."} Press Load to start again.`;
    $("model-status").textContent = "lost with the GPU device";
    $("memory-status").textContent = "the memory was on the lost device: add the documents again";
  }
  demo.error = message;
  $("banner").textContent = message;
  $("banner").hidden = false;
  setState("error");
}

function busy(on) {
  for (const id of ["load", "add", "ask"]) $(id).disabled = on || (id !== "load" && !msa);
}

async function load() {
  $("banner").hidden = true;
  busy(true);
  setState("loading");
  const started = performance.now();
  try {
    let files;
    if (document.querySelector("input[name=model]:checked").value === "tiny") {
      files = { config: TINY + "config.json", weights: TINY + "model.safetensors", tokenizer: TINY + "tokenizer.json" };
    } else {
      const picked = [...$("model-files").files];
      const find = (test, what) => {
        const file = picked.find(test);
        if (!file) throw new Error(`pick ${what} among the model files`);
        return file;
      };
      files = {
        config: find((f) => f.name === "config.json", "config.json"),
        weights: find((f) => f.name.endsWith(".safetensors"), "a .safetensors file"),
        tokenizer: find((f) => f.name === "tokenizer.json", "tokenizer.json"),
      };
    }
    msa = null;
    msa = await Msa.load(files, ({ loaded, total }) => {
      $("load-progress").max = total || 1;
      $("load-progress").value = loaded;
      $("model-status").textContent = `${(loaded / 1e6).toFixed(2)} of ${(total / 1e6).toFixed(2)} MB`;
    });
    demo.timings.loadMs = performance.now() - started;
    const stats = msa.stats();
    $("model-status").textContent = `loaded in ${demo.timings.loadMs.toFixed(0)} ms on ${stats.adapter}`;
    setState("ready");
  } catch (error) {
    fail(error);
  } finally {
    busy(false);
  }
}

/** Documents from the text area: one per non-empty line. */
function documentsFromText() {
  return $("documents").value.split("\n").map((l) => l.trim()).filter((l) => l.length > 0);
}

async function addDocuments() {
  const texts = documentsFromText();
  if (texts.length === 0) return fail(new Error("write or drop at least one document first"));
  $("banner").hidden = true;
  busy(true);
  setState("encoding");
  const started = performance.now();
  let tokens = 0;
  try {
    const count = await msa.addDocuments(texts, (p) => {
      $("add-progress").max = p.tokensTotal || 1;
      $("add-progress").value = p.tokensDone;
      tokens = p.tokensTotal;
    });
    const seconds = (performance.now() - started) / 1000;
    demo.timings.encodeTokensPerSecond = tokens / seconds;
    const stats = msa.stats();
    $("memory-status").textContent =
      `${count} documents, ${stats.chunks} chunks in memory; ${tokens} tokens encoded at ` +
      `${demo.timings.encodeTokensPerSecond.toFixed(0)} tokens/s`;
    $("documents").value = "";
    setState("ready");
  } catch (error) {
    fail(error);
  } finally {
    busy(false);
  }
}

async function ask() {
  const question = $("question").value.trim();
  if (!question) return fail(new Error("write a question first"));
  $("banner").hidden = true;
  busy(true);
  setState("answering");
  $("answer").textContent = "";
  const options = { maxTokens: Number($("max-tokens").value) || 16, interleave: $("interleave").checked };
  let first = null;
  let count = 0;
  let round = 0;
  try {
    for await (const event of msa.ask(question, options)) {
      if (event.type === "routing") drawRouting(event.round, event.layers, round !== event.round);
      if (event.type === "routing") round = event.round;
      if (event.type === "token") {
        first ??= performance.now();
        count += 1;
        $("answer").append(event.text);
      }
      if (event.type === "named") $("answer").append(`\n  (round ${event.round} named ${event.ids.map((i) => `[${i}]`).join(" ")})\n`);
      if (event.type === "retrievalEnded") $("answer").append(`\n  (retrieval ended: ${event.reason})\n`);
      if (event.type === "done") {
        const seconds = (performance.now() - (first ?? performance.now())) / 1000;
        demo.timings.decodeTokensPerSecond = count > 1 ? (count - 1) / seconds : 0;
        demo.answers.push(event.answer);
        $("answer-status").textContent =
          `${count} tokens (${event.answer.finishReason}); ` +
          `${demo.timings.decodeTokensPerSecond.toFixed(1)} tokens/s after the first`;
      }
    }
    setState("answered");
  } catch (error) {
    fail(error);
  } finally {
    busy(false);
  }
}

/**
 * A heat map: one row per router layer, one cell per document, colored by score (every document's
 * when the engine reports them, the selected ones' otherwise); selected cells are outlined.
 */
function drawRouting(round, layers, fresh) {
  const documents = msa.stats().documents;
  const container = $("routing");
  if (fresh) container.textContent = "";
  const scores = layers.flatMap((l) => l.scores ?? l.documents.map((d) => d.score));
  const [low, high] = [Math.min(...scores), Math.max(...scores)];
  const color = (score) => {
    const t = high > low ? (score - low) / (high - low) : 1;
    return `hsl(${220 - 200 * t} 70% ${48 - 10 * t}%)`;
  };
  let table = container.querySelector("table");
  if (!table) {
    table = document.createElement("table");
    table.className = "heat";
    const head = table.insertRow();
    head.insertCell().outerHTML = `<th>round ${round}</th>`;
    for (let id = 0; id < documents; id++) head.insertCell().outerHTML = `<th>[${id}]</th>`;
    container.append(table);
  }
  for (const layer of layers) {
    const row = table.insertRow();
    row.insertCell().outerHTML = `<th>layer ${layer.layer}</th>`;
    const cells = [];
    for (let id = 0; id < documents; id++) cells.push(row.insertCell());
    (layer.scores ?? []).forEach((score, id) => {
      cells[id].style.background = color(score);
      cells[id].textContent = score.toFixed(2);
      cells[id].title = `document ${id}: score ${score}`;
    });
    for (const { id, score } of layer.documents) {
      const cell = cells[id];
      cell.className = "selected";
      cell.style.background = color(score);
      cell.textContent = score.toFixed(2);
      cell.title = `document ${id}: score ${score} (selected)`;
    }
  }
}

/** Dropped files become documents: a .txt file is one, a .json list or a .jsonl file many. */
async function dropFiles(event) {
  event.preventDefault();
  const lines = [];
  for (const file of event.dataTransfer.files) {
    const text = await file.text();
    const textOf = (d) => (typeof d === "string" ? d : d.text);
    if (file.name.endsWith(".json")) lines.push(...JSON.parse(text).map(textOf));
    else if (file.name.endsWith(".jsonl")) lines.push(...text.split("\n").filter((l) => l.trim()).map((l) => textOf(JSON.parse(l))));
    else lines.push(text);
  }
  const existing = $("documents").value.trim();
  $("documents").value = [existing, ...lines.map((l) => l.replaceAll("\n", " "))].filter((l) => l).join("\n");
}

async function start() {
  $("load").onclick = load;
  $("add").onclick = addDocuments;
  $("ask").onclick = ask;
  $("documents").addEventListener("dragover", (e) => e.preventDefault());
  $("documents").addEventListener("drop", dropFiles);
  if (!hasWebGpu()) {
    busy(true);
    return fail(new Error(
      "WebGPU unavailable: this browser has no navigator.gpu, and msa runs on WebGPU. Use a recent " +
      "Chrome, Edge, Firefox or Safari, on an https or localhost page."));
  }
  // The bundled model's example documents and question, ready to add and ask.
  const [documents, queries] = await Promise.all(
    ["memory.json", "queries.json"].map((f) => fetch(TINY + f).then((r) => r.json())));
  $("documents").value = documents.join("\n");
  $("question").value = queries[0];
  await load();
}

start();
