/**
 * Drive the page of `soup-run serve` in Debian's headless chromium (puppeteer-core, no downloaded
 * browser) and run tasks in it; used by the browser test and tools/bench_web.py.
 *
 *   node tools/browser.mjs URL TASKS.json   ->  one JSON line: the tasks' results, in order
 *
 * Tasks: {"do": "greedy", "model": URL, "ids": [...], "n": 32}  -> generated ids
 *        {"do": "logits", "model": URL, "ids": [...]}           -> every position's logits (base64 float32) and top-1
 *        {"do": "bench", "model": URL, "ids": [...], "n": 64}   -> prefill ms and decode tokens/s
 *        {"do": "ui", "model": URL, "prompt": "...", "n": 16}   -> the page's output text after Generate
 *        {"do": "open", "model": URL}                            -> {ok, verified} or {ok: false, error}
 *        {"do": "threads"}                                       -> WebAssembly threads and cross-origin isolation
 */
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import puppeteer from "puppeteer-core";

const CHROMIUM = process.env.SOUP_CHROMIUM || "/usr/bin/chromium";
const FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
  "--disable-component-update", "--disable-sync"];

/** In-page task bodies; `window.soupRun` is the page's runner (page/app.js). */
const IN_PAGE = {
  async greedy({ model, ids, n }) {
    const m = await window.soupRun.model(model);
    return window.soupRun.generateIds(m, ids, { maxNewTokens: n, stopAtEos: false });
  },
  async logits({ model, ids }) {
    const m = await window.soupRun.model(model);
    const [rows] = await m.step([ids], [ids.map(() => 1)], [ids.map((_, i) => i)], m.emptyPast(1), true);
    const flat = new Float32Array(rows[0].length * rows[0][0].length);
    rows[0].forEach((r, t) => flat.set(r, t * r.length));
    const top1 = rows[0].map((r) => window.soupRun.argmax(r));
    let bin = "";
    const bytes = new Uint8Array(flat.buffer);
    for (let i = 0; i < bytes.length; i += 0x8000) bin += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
    return { top1, logits: btoa(bin) };
  },
  async bench({ model, ids, n }) {
    const m = await window.soupRun.model(model);
    const t0 = performance.now();
    const [logits, past] = await m.step([ids], [ids.map(() => 1)], [ids.map((_, i) => i)], m.emptyPast(1, ids.length + n));  // sized as stream sizes it
    const prefillMs = performance.now() - t0;
    let token = window.soupRun.argmax(logits[0]);
    const mask = [ids.map(() => 1)];
    const t1 = performance.now();
    for (let k = 0; k < n; k++) {
      mask[0].push(1);
      const [next] = await m.step([[token]], mask, [[ids.length + k]], past);
      token = window.soupRun.argmax(next[0]);
    }
    return { prefillMs, decodeTokensPerS: n / ((performance.now() - t1) / 1000) };
  },
  async open({ model }) {
    try {
      const m = await window.soupRun.open(model, { ort: window.soupRun.ort });
      return { ok: true, verified: m.verified ?? null };
    } catch (exc) {
      return { ok: false, error: String(exc.message ?? exc) };
    }
  },
  threads() {
    return { threads: window.soupRun.ort.env.wasm.numThreads, isolated: crossOriginIsolated };
  },
};

/**
 * @param {import("puppeteer-core").Page} page
 * @param {{do: string, model: string, prompt: string, n: number}} task
 */
async function ui(page, task) {
  await page.select("#model", task.model);
  await page.$eval("#prompt", (el, v) => { el.value = v; }, task.prompt);
  await page.$eval("#max", (el, v) => { el.value = String(v); }, task.n);
  await page.click("#run");
  await page.waitForFunction(() => document.body.dataset.state === "done", { timeout: 0 });
  return { output: await page.$eval("#output", (el) => el.textContent), status: await page.$eval("#status", (el) => el.textContent) };
}

async function main() {
  const [url, tasksFile] = process.argv.slice(2);
  if (!url || !tasksFile) throw new Error("usage: node tools/browser.mjs URL TASKS.json");
  const tasks = JSON.parse(readFileSync(tasksFile, "utf8"));
  const profile = mkdtempSync(join(tmpdir(), "soup-chromium-"));
  // no time limits of its own: a slow machine is not a failure (the caller guards against a hang)
  const browser = await puppeteer.launch({ executablePath: CHROMIUM, args: [...FLAGS, `--user-data-dir=${profile}`], headless: true,
    protocolTimeout: 2 ** 31 - 1 });
  try {
    const page = await browser.newPage();
    page.setDefaultTimeout(0);
    const errors = [];
    page.on("pageerror", (e) => errors.push(String(e)));
    await page.goto(url, { waitUntil: "load", timeout: 0 });
    await page.waitForFunction(() => window.soupRun !== undefined, { timeout: 0 });
    await page.evaluate(() => window.soupRun.ready);
    const results = [];
    for (const task of tasks) {
      if (task.do === "ui") results.push(await ui(page, task));
      else results.push(await page.evaluate(`(${IN_PAGE[task.do].toString().replace(/^async (\w+)/, "async function $1").replace(/^(\w+)\(/, "function $1(")})(${JSON.stringify(task)})`));
    }
    if (errors.length) throw new Error(`the page raised: ${errors.join("; ")}`);
    process.stdout.write(`${JSON.stringify(results)}\n`);
  } finally {
    await browser.close();
    rmSync(profile, { recursive: true, force: true });
  }
}

main().catch((exc) => { process.stderr.write(`browser.mjs: ${exc.message ?? exc}\n`); process.exit(1); });
