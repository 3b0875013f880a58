// The demo page in a real browser: serves web/demo on 127.0.0.1, drives headless Chromium (WebGPU on
// SwiftShader) with playwright-core, loads the bundled tiny model, adds the fixture documents, asks
// the fixture questions, and checks the routed documents and tokens against the native engine's
// answers. Then a launch without WebGPU must show a clear message. Screenshots go to OUT_DIR.
//
// usage: MSA_WEB_TOOLS=DIR node web/demo/e2e.cjs DEMO_DIR NATIVE_ANSWERS.json OUT_DIR
// (DIR holds node_modules/playwright-core; `cargo xtask test` sets all of this up.)

const fs = require("node:fs");
const http = require("node:http");
const os = require("node:os");
const path = require("node:path");
const { chromium } = require(path.resolve(process.env.MSA_WEB_TOOLS, "node_modules", "playwright-core"));

const [demoDir, expectedPath, outDir] = process.argv.slice(2);
const TYPES = {
  ".html": "text/html; charset=utf-8",
  ".js": "text/javascript; charset=utf-8",
  ".css": "text/css; charset=utf-8",
  ".json": "application/json",
  ".wasm": "application/wasm",
};
const BASE_FLAGS = [
  "--no-sandbox",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];
const WEBGPU_FLAGS = ["--enable-unsafe-webgpu", "--use-webgpu-adapter=swiftshader"];
const MINUTES = 60_000;

function serve(root) {
  const server = http.createServer((request, response) => {
    const url = new URL(request.url, "http://127.0.0.1");
    const file = path.join(root, decodeURIComponent(url.pathname));
    if (!file.startsWith(root + path.sep) || !fs.existsSync(file) || fs.statSync(file).isDirectory()) {
      response.writeHead(404).end("not found");
      return;
    }
    const body = fs.readFileSync(file);
    response.writeHead(200, {
      "Content-Type": TYPES[path.extname(file)] ?? "application/octet-stream",
      "Content-Length": body.length,
    });
    response.end(body);
  });
  return new Promise((resolve) => server.listen(0, "127.0.0.1", () => resolve(server)));
}

async function session(flags, work) {
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), "msa-e2e-"));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: "/usr/bin/chromium",
    headless: true,
    args: [...BASE_FLAGS, ...flags],
    viewport: { width: 1000, height: 900 },
  });
  try {
    const page = context.pages()[0] ?? (await context.newPage());
    page.on("console", (message) => {
      if (message.type() === "error") console.log(`  page console: ${message.text()}`);
    });
    await work(page);
  } finally {
    await context.close();
    fs.rmSync(profile, { recursive: true, force: true });
  }
}

/** Waits until the page reaches one of `states`; a page error fails with its message. */
async function settle(page, states, what) {
  await page.waitForFunction((s) => s.includes(window.msaDemo?.state) || window.msaDemo?.state === "error",
    states, { timeout: 10 * MINUTES });
  const demo = await page.evaluate(() => ({ state: window.msaDemo.state, error: window.msaDemo.error }));
  if (!states.includes(demo.state)) throw new Error(`${what}: the page says: ${demo.error}`);
}

async function main() {
  fs.mkdirSync(outDir, { recursive: true });
  const expected = JSON.parse(fs.readFileSync(expectedPath, "utf8"));
  const documents = JSON.parse(fs.readFileSync(path.join(demoDir, "models/msa-tiny/memory.json"), "utf8"));
  const server = await serve(path.resolve(demoDir));
  const url = `http://127.0.0.1:${server.address().port}/index.html`;
  const failures = [];

  await session(WEBGPU_FLAGS, async (page) => {
    const started = Date.now();
    await page.goto(url);
    await settle(page, ["ready"], "loading the tiny model");
    console.log(`  model loaded in ${Date.now() - started} ms`);
    await page.fill("#documents", documents.join("\n"));
    await page.click("#add");
    await settle(page, ["ready"], "adding the documents");
    for (const [q, want] of expected.entries()) {
      await page.fill("#question", want.question);
      await page.fill("#max-tokens", String(want.tokens.length));
      await page.click("#ask");
      await settle(page, ["answered"], `question ${q}`);
      const got = await page.evaluate(() => window.msaDemo.answers.at(-1));
      const routed = got.routing.map((layer) => ({ layer: layer.layer, documents: layer.documents.map((d) => d.id) }));
      const wantRouted = want.routing.map((layer) => ({ layer: layer.layer, documents: layer.documents }));
      if (JSON.stringify(routed) !== JSON.stringify(wantRouted)) {
        failures.push(`question ${q}: routed ${JSON.stringify(routed)}, native ${JSON.stringify(wantRouted)}`);
      }
      if (JSON.stringify(got.tokens) !== JSON.stringify(want.tokens)) {
        failures.push(`question ${q}: tokens ${JSON.stringify(got.tokens)}, native ${JSON.stringify(want.tokens)}`);
      }
      console.log(`  question ${q}: routed ${JSON.stringify(routed.map((l) => l.documents))}, tokens ${JSON.stringify(got.tokens)}`);
      // The heat map: a row per router layer, every document's cell colored by its score, the
      // selected ones outlined.
      const heat = await page.evaluate(() =>
        [...document.querySelectorAll("#routing table.heat tr")].slice(1).map((row) =>
          [...row.querySelectorAll("td")].map((td) => ({
            colored: td.style.background !== "",
            selected: td.classList.contains("selected"),
          }))));
      const heatOk = heat.length === want.routing.length && heat.every((cells, i) =>
        cells.length === documents.length && cells.every((c) => c.colored) &&
        cells.filter((c) => c.selected).length === want.routing[i].documents.length);
      if (!heatOk) failures.push(`question ${q}: heat map ${JSON.stringify(heat)}`);
    }
    const timings = await page.evaluate(() => window.msaDemo.timings);
    const stats = await page.evaluate(() => document.getElementById("model-status").textContent);
    console.log(`  ${stats}; encoding ${timings.encodeTokensPerSecond.toFixed(0)} tokens/s; ` +
      `decoding ${timings.decodeTokensPerSecond.toFixed(1)} tokens/s`);
    await page.screenshot({ path: path.join(outDir, "web-demo.png"), fullPage: true });

    // A lost GPU device: the page says so, and Load brings the model back.
    await page.evaluate(() => window.msaDemo.dispose());
    await page.click("#ask");
    await settle(page, ["error"], "asking on a lost device");
    const lost = await page.evaluate(() => document.getElementById("banner").textContent);
    if (!lost.includes("device was lost") || !lost.includes("Press Load")) {
      failures.push(`after a device loss the banner says: ${JSON.stringify(lost)}`);
    }
    console.log(`  device lost: ${lost}`);
    await page.screenshot({ path: path.join(outDir, "web-demo-device-lost.png"), fullPage: true });
    await page.click("#load");
    await settle(page, ["ready"], "loading again after the loss");
    await page.fill("#documents", documents.join("\n"));
    await page.click("#add");
    await settle(page, ["ready"], "adding the documents again");
    await page.fill("#question", expected[0].question);
    await page.fill("#max-tokens", String(expected[0].tokens.length));
    await page.click("#ask");
    await settle(page, ["answered"], "asking again after the loss");
    const again = await page.evaluate(() => window.msaDemo.answers.at(-1).tokens);
    if (JSON.stringify(again) !== JSON.stringify(expected[0].tokens)) {
      failures.push(`after reloading: tokens ${JSON.stringify(again)}, native ${JSON.stringify(expected[0].tokens)}`);
    }
  });

  await session([], async (page) => {
    await page.goto(url);
    await page.waitForFunction(() => window.msaDemo?.state === "error", null, { timeout: 2 * MINUTES });
    const banner = await page.evaluate(() => document.getElementById("banner").textContent);
    const visible = await page.isVisible("#banner");
    if (!visible || !banner.includes("WebGPU unavailable")) {
      failures.push(`without WebGPU the page should say so; its banner says: ${JSON.stringify(banner)}`);
    }
    console.log(`  without WebGPU: ${banner}`);
    await page.screenshot({ path: path.join(outDir, "web-demo-no-webgpu.png"), fullPage: true });
  });

  server.close();
  if (failures.length > 0) {
    console.error(`browser test failed:\n  ${failures.join("\n  ")}`);
    process.exit(1);
  }
  console.log(`browser test passed; screenshots in ${outDir}`);
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
