/** The JS runner in Node (onnxruntime-node) against soup-run's outputs on the same exports (refs.js). */
import assert from "node:assert/strict";
import { test } from "node:test";
import { generate, generateIds, open, RunError, stream } from "../src/node.js";
import { needsRefs, refs } from "./refs.js";

const LOGIT_TOL = 1e-4;  // fp32: onnxruntime-node vs Python onnxruntime
const models = new Map();
/** @param {string} tier */
async function model(tier) {
  if (!models.has(tier)) models.set(tier, await open(refs.exports[tier]));
  return models.get(tier);
}

for (const tier of ["fp32", "int8", "int4"]) {
  test(`${tier}: greedy 32 tokens equal soup-run's`, needsRefs, async () => {
    const m = await model(tier);
    assert.deepEqual(await generateIds(m, refs.prompt_ids, { maxNewTokens: 32, stopAtEos: false }), refs.greedy[tier]);
  });
}

test("the tokenizer gives the Python tokenizer's ids and text, non-ASCII included", needsRefs, async () => {
  const m = await model("fp32");
  for (const { text, ids, decoded } of refs.tokenizer) {
    assert.deepEqual(m.encode(text), ids, text);
    assert.equal(m.decode(ids), decoded, text);
  }
});

test("fp32 logits at prefill and after 2 decode steps equal Python onnxruntime's within 1e-4", needsRefs, async () => {
  const m = await model("fp32");
  const ids = refs.prompt_ids;
  let [logits, past] = await m.step([ids], [ids.map(() => 1)], [ids.map((_, i) => i)], m.emptyPast(1));
  const got = [logits[0]];
  for (let k = 0; k < 2; k++) {
    const n = ids.length + k + 1;
    const token = got[k].indexOf(Math.max(...got[k]));
    [logits, past] = await m.step([[token]], [Array(n).fill(1)], [[n - 1]], past);
    got.push(logits[0]);
  }
  let worst = 0;
  got.forEach((row, k) => row.forEach((v, j) => { worst = Math.max(worst, Math.abs(v - refs.logits[k][j])); }));
  assert.ok(worst <= LOGIT_TOL, `max |difference| ${worst}`);
});

test("every step of a left-padded stream sees soup-run's logits within 1e-4 (positions, mask, cache)", needsRefs, async () => {
  const m = await model("fp32");
  const { prompts, n, steps } = refs.stream_logits;
  const seen = [];
  const recording = { contract: m.contract, encode: (t) => m.encode(t), decode: (x) => m.decode(x), emptyPast: (b) => m.emptyPast(b),
    step: async (...a) => { const out = await m.step(...a); seen.push(out[0]); return out; } };
  for await (const e of stream(recording, prompts, { maxNewTokens: n, stopAtEos: false })) void e;
  assert.equal(seen.length, steps.length);
  let worst = 0;
  seen.forEach((rows, k) => rows.forEach((row, i) => row.forEach((v, j) => { worst = Math.max(worst, Math.abs(v - steps[k][i][j])); })));
  assert.ok(worst <= LOGIT_TOL, `max |difference| ${worst}`);
});

test("seeded sampling is reproducible, draws what soup-run draws, and differs across seeds", needsRefs, async () => {
  const m = await model("fp32");
  const { seed, sampling, ids } = refs.sampled;
  const config = (s) => ({ maxNewTokens: 24, seed: s, sampling, stopAtEos: false });
  const first = await generateIds(m, refs.prompt_ids, config(seed));
  assert.deepEqual(await generateIds(m, refs.prompt_ids, config(seed)), first);
  assert.deepEqual(first, ids);
  const others = await Promise.all([0, 1, 2].map((s) => generateIds(m, refs.prompt_ids, config(s))));
  assert.ok(new Set([first, ...others].map(String)).size > 1);
});

test("a left-padded batch equals its rows run alone, and soup-run's batch", needsRefs, async () => {
  const m = await model("fp32");
  const config = { maxNewTokens: 12, stopAtEos: false };
  const batched = await generate(m, refs.batch.prompts, config);
  const alone = [];
  for (const p of refs.batch.prompts) alone.push((await generate(m, [p], config))[0]);
  assert.deepEqual(batched, alone);
  assert.deepEqual(batched, refs.batch.texts);
});

test("decode positions advance: a cache fed a stale position computes different logits", needsRefs, async () => {
  const m = await model("fp32");
  const ids = refs.prompt_ids;
  const run = async (position) => {
    const [, past] = await m.step([ids], [ids.map(() => 1)], [ids.map((_, i) => i)], m.emptyPast(1));
    const [logits] = await m.step([[ids[0]]], [Array(ids.length + 1).fill(1)], [[position]], past);
    return logits[0];
  };
  const [right, stale] = [await run(ids.length), await run(ids.length - 1)];
  assert.ok(right.some((v, j) => Math.abs(v - stale[j]) > 1e-3));
});

test("stop strings cut the output; EOS ends a row", needsRefs, async () => {
  const m = await model("fp32");
  const free = (await generate(m, [refs.prompt], { maxNewTokens: 24, stopAtEos: false }))[0];
  const stop = free.slice(3, 5);
  const cut = (await generate(m, [refs.prompt], { maxNewTokens: 24, stop: [stop], stopAtEos: false }))[0];
  assert.ok(!cut.includes(stop) && free.startsWith(cut) && cut.length <= free.indexOf(stop), JSON.stringify({ free, cut }));
  const greedy = refs.greedy.fp32;
  const k = Math.max(0, greedy.findIndex((t, i) => i >= 2 && !greedy.slice(0, i).includes(t)));  // a token's first use
  const eos = { ...m, contract: { ...m.contract, eos: greedy[k] }, decode: (x) => m.decode(x), encode: (x) => m.encode(x),
    emptyPast: (b) => m.emptyPast(b), step: (...a) => m.step(...a) };
  const events = [];
  for await (const e of stream(eos, [refs.prompt_ids], { maxNewTokens: 32 })) events.push(e.token);
  assert.deepEqual(events, greedy.slice(0, k + 1));
});

test("an AbortSignal cancels a generation", needsRefs, async () => {
  const m = await model("fp32");
  const controller = new AbortController();
  const got = [];
  await assert.rejects(async () => {
    for await (const e of stream(m, [refs.prompt_ids], { maxNewTokens: 32, signal: controller.signal, stopAtEos: false })) {
      got.push(e.token);
      if (got.length === 3) controller.abort();
    }
  }, { name: "AbortError" });
  assert.equal(got.length, 3);
});

test("bad input is one RunError naming what to do", needsRefs, async () => {
  const m = await model("fp32");
  await assert.rejects(open("/nonexistent/export"), (e) => e instanceof RunError && /soup-export build/.test(e.message));
  await assert.rejects(generate(m, [""], {}), /non-empty prompts/);
  await assert.rejects(generate(m, ["x"], { maxNewTokens: 0 }), /maxNewTokens/);
  await assert.rejects(generateIds(m, Array(m.contract.context).fill(1), {}), /shorten it/);
});
