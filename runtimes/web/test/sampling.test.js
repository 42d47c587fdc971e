/** The sampling rules on hand-made logits (tests/test_runtime_truth.py's, held to the JS runner), and numpy's RNG. */
import assert from "node:assert/strict";
import { test } from "node:test";
import { choose, penalise, sampling } from "../src/sampling.js";
import { Rng } from "../src/rng.js";
import { pairwiseSum } from "../src/numeric.js";

/**
 * How often each token is drawn, as a share of n seeded draws.
 * @param {number[]} logits
 * @param {import("../src/sampling.js").Sampling} s
 */
function draws(logits, s, n = 20000, seen = new Uint8Array(logits.length)) {
  const rng = new Rng(0);
  const counts = new Array(logits.length).fill(0);
  const checked = sampling(s);
  for (let i = 0; i < n; i++) counts[choose(Float32Array.from(logits), seen, checked, rng)] += 1;
  return counts.map((c) => c / n);
}

const close = (got, want, tol) => got.forEach((g, i) => assert.ok(Math.abs(g - want[i]) <= tol, `${got} vs ${want}`));

test("the repetition penalty pushes seen tokens down whatever their sign", () => {
  assert.deepEqual(Array.from(penalise([2, -2, 1, 0.5], Uint8Array.from([1, 1, 0, 0]), 2)), [1, -4, 1, 0.5]);
  const greedy = sampling({ repetitionPenalty: 2 });
  assert.equal(choose([3, 2], Uint8Array.from([1, 0]), greedy, new Rng(0)), 1);
  assert.equal(choose([-1, -1.5], Uint8Array.from([1, 0]), greedy, new Rng(0)), 1);
  assert.equal(choose([3, 2], Uint8Array.from([0, 0]), greedy, new Rng(0)), 0);
});

test("temperature scales the softmax; 0 is greedy", () => {
  const logits = [0, Math.log(3)];  // softmax 1/4, 3/4
  close(draws(logits, { temperature: 1 }), [0.25, 0.75], 0.015);
  close(draws(logits, { temperature: 0.5 }), [0.1, 0.9], 0.015);
  close(draws(logits, { temperature: 100 }), [0.5, 0.5], 0.02);
  assert.equal(choose(logits, new Uint8Array(2), sampling({}), new Rng(0)), 1);
});

test("top-k keeps the k most likely and their relative mass", () => {
  const shares = draws([0.1, 0.4, 0.2, 0.3].map(Math.log), { temperature: 1, topK: 2 });
  assert.equal(shares[0], 0);
  assert.equal(shares[2], 0);
  close([shares[1], shares[3]], [4 / 7, 3 / 7], 0.015);
});

test("top-p keeps the smallest set with that mass", () => {
  const logits = [0.5, 0.3, 0.15, 0.05].map(Math.log);
  let shares = draws(logits, { temperature: 1, topP: 0.8 });
  assert.equal(shares[2] + shares[3], 0);
  close(shares.slice(0, 2), [0.625, 0.375], 0.015);
  shares = draws(logits, { temperature: 1, topP: 0.85 });
  assert.equal(shares[3], 0);
  close(shares.slice(0, 3), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95], 0.015);
});

test("bad sampling options are refused with the rule", () => {
  for (const bad of [{ topP: 0 }, { temperature: -1 }, { topK: -1 }, { repetitionPenalty: 0 }, { topP: 1.5 }]) {
    assert.throws(() => sampling(bad), /0 < top-p <= 1/);
  }
});

test("the generator is numpy's default_rng: the same doubles for a seed", () => {
  // numpy 2: [np.random.default_rng(s).random() for s in (0, 7, 123456789012)]
  assert.equal(new Rng(0).random(), 0.6369616873214543);
  assert.equal(new Rng(7).random(), 0.625095466604667);
  assert.equal(new Rng(123456789012).random(), 0.5660646750946614);
  const r = new Rng(0);
  r.random();
  assert.equal(r.random(), 0.2697867137638703);
  assert.throws(() => new Rng(-1), /non-negative/);
});

test("sums are numpy's pairwise sums", () => {
  // '%.17g' % (np.sin(np.arange(4096) * 0.37) ** 2 / 3).sum()
  const a = Float64Array.from({ length: 4096 }, (_, i) => Math.sin(i * 0.37) ** 2 / 3);
  assert.equal(pairwiseSum(a), 682.39364392498919);
});
