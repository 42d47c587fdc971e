/**
 * The page of `soup-run serve`: lists the served models, streams a generation and shows tokens/s
 * and, for a mixture, the route. `window.soupRun` exposes the runner to scripts (tests, benchmark).
 */
import * as ort from "onnxruntime-web";
import * as runner from "/web/src/index.js";

const $ = (id) => document.getElementById(id);
ort.env.wasm.wasmPaths = "/web/node_modules/onnxruntime-web/dist/";
const asked = Number(new URLSearchParams(location.search).get("threads"));  // ?threads=N, else up to 4
ort.env.wasm.numThreads = crossOriginIsolated ? asked || Math.min(4, navigator.hardwareConcurrency || 1) : 1;

/** @type {Map<string, Promise<any>>} models opened so far, by URL */
const opened = new Map();

/** @param {string} url */
function model(url) {
  if (!opened.has(url)) opened.set(url, runner.open(url, { ort }));
  return opened.get(url);
}

/** @param {string} text */
function status(text) { $("status").textContent = text; }

async function listModels() {
  const rows = await (await fetch("/models.json")).json();
  for (const r of rows) $("model").append(new Option(`${r.name} (${r.kind}, ${r.tier})`, r.url));
  return rows;
}

/**
 * The Specialist to run a prompt on, and the route when the model is a mixture.
 * @param {any} m
 * @param {string} prompt
 */
async function target(m, prompt) {
  if (!(m instanceof runner.RoutedMixture)) return { specialist: m, route: "" };
  const { expert, scores } = await m.route(prompt);
  const listed = scores.map((s, i) => `router ${i} ${s.toFixed(3)}`).join(", ");
  return { specialist: await m.expert(expert), route: ` · routed to expert ${expert} (prefix log-likelihood per token: ${listed})` };
}

let controller = null;

async function run() {
  const prompt = $("prompt").value;
  controller = new AbortController();
  $("run").disabled = true;
  $("stop").disabled = false;
  $("output").textContent = prompt;
  document.body.dataset.state = "running";
  try {
    status("loading and verifying the model…");
    const { specialist, route } = await target(await model($("model").value), prompt);
    const config = { maxNewTokens: Number($("max").value), seed: Number($("seed").value), signal: controller.signal,
      sampling: { temperature: Number($("temperature").value), topP: Number($("top-p").value) } };
    const start = performance.now();
    let tokens = 0;
    for await (const e of specialist.stream([prompt], config)) {
      if (e.token >= 0) tokens += 1;
      $("output").textContent += e.text;
      status(`${tokens} tokens, ${(tokens / ((performance.now() - start) / 1000)).toFixed(1)} tokens/s${route}`);
    }
    document.body.dataset.tokens = String(tokens);
  } catch (exc) {
    status(exc.name === "AbortError" ? `stopped · ${$("status").textContent}` : `error: ${exc.message}`);
  } finally {
    $("run").disabled = false;
    $("stop").disabled = true;
    document.body.dataset.state = "done";
  }
}

$("run").addEventListener("click", run);
$("stop").addEventListener("click", () => controller?.abort());
window.soupRun = { ort, ...runner, model, ready: listModels().then((rows) => {
  status(`${rows.length} model(s); WebAssembly threads: ${ort.env.wasm.numThreads}${crossOriginIsolated ? "" : " (not cross-origin isolated)"}`);
  document.body.dataset.state = "ready";
  return rows;
}) };
