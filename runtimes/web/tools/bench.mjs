/**
 * Prefill latency and greedy decode tokens/s of the JS runner in Node (onnxruntime-node), for
 * tools/bench_web.py: node tools/bench.mjs EXPORT_DIR TASK.json  ->  one JSON line.
 * TASK: {"ids": [...], "n": decode steps, "reps": repetitions, "threads": intra-op threads}
 */
import { readFileSync } from "node:fs";
import { argmax, open } from "../src/node.js";

/**
 * One prefill and n greedy decode steps with the KV cache.
 * @param {import("../src/specialist.js").Specialist} m
 * @param {number[]} ids
 * @param {number} n
 */
export async function once(m, ids, n) {
  const t0 = performance.now();
  const [logits, past] = await m.step([ids], [ids.map(() => 1)], [ids.map((_, i) => i)], m.emptyPast(1, ids.length + n));  // sized as stream sizes it
  const prefillMs = performance.now() - t0;
  let token = argmax(logits[0]);
  const mask = [ids.map(() => 1)];
  const t1 = performance.now();
  for (let k = 0; k < n; k++) {
    mask[0].push(1);
    const [next] = await m.step([[token]], mask, [[ids.length + k]], past);
    token = argmax(next[0]);
  }
  return { prefillMs, decodeTokensPerS: n / ((performance.now() - t1) / 1000) };
}

async function main() {
  const [dir, taskFile] = process.argv.slice(2);
  const { ids, n, reps, threads } = JSON.parse(readFileSync(taskFile, "utf8"));
  const m = await open(dir, { threads });
  await once(m, ids, n);  // warm-up
  const runs = [];
  for (let r = 0; r < reps; r++) runs.push(await once(m, ids, n));
  process.stdout.write(`${JSON.stringify(runs)}\n`);
}

if (import.meta.url === `file://${process.argv[1]}`) main().catch((e) => { process.stderr.write(`bench.mjs: ${e.message}\n`); process.exit(1); });
