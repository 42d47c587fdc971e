/**
 * Next-token choice: greedy, or temperature / top-k / top-p sampling, with a repetition penalty.
 * The order and arithmetic of soup_run/sampling.py: repetition penalty, temperature, top-k, top-p,
 * then one draw from the seeded generator (rng.js, numpy's default_rng), all in float64.
 */
import { RunError } from "./errors.js";
import { pairwiseSum } from "./numeric.js";

/**
 * @typedef {object} Sampling
 * @property {number} [temperature]  0 = greedy (the default)
 * @property {number} [topK]  0 = no limit
 * @property {number} [topP]  nucleus mass, 1 = no limit
 * @property {number} [repetitionPenalty]  > 1 discourages tokens already in the context
 */

/**
 * The options with their defaults, checked.
 * @param {Sampling} [s]
 * @returns {Required<Sampling>}
 */
export function sampling(s = {}) {
  const out = { temperature: 0, topK: 0, topP: 1, repetitionPenalty: 1, ...s };
  if (!(out.temperature >= 0) || !(out.topK >= 0) || !(out.topP > 0 && out.topP <= 1) || !(out.repetitionPenalty > 0)) {
    throw new RunError("sampling options: temperature >= 0, top-k >= 0, 0 < top-p <= 1, repetition penalty > 0");
  }
  return out;
}

/**
 * Divide positive, multiply negative logits of seen tokens (CTRL-style); a new array.
 * @param {ArrayLike<number>} logits
 * @param {Uint8Array} seen  1 for tokens already in the row
 * @param {number} penalty
 * @returns {Float64Array}
 */
export function penalise(logits, seen, penalty) {
  const out = Float64Array.from(logits);
  if (penalty === 1) return out;
  for (let i = 0; i < out.length; i++) {
    if (seen[i]) out[i] = out[i] > 0 ? out[i] / penalty : out[i] * penalty;
  }
  return out;
}

/** @param {ArrayLike<number>} a */
export function argmax(a) {
  let best = 0;
  for (let i = 1; i < a.length; i++) if (a[i] > a[best]) best = i;
  return best;
}

/**
 * Keep the k largest (ties with the k-th kept), the rest to -Infinity, in place.
 * @param {Float64Array} logits
 * @param {number} k
 */
function keepTopK(logits, k) {
  const kth = Float64Array.from(logits).sort()[logits.length - k];
  for (let i = 0; i < logits.length; i++) if (logits[i] < kth) logits[i] = -Infinity;
}

/**
 * Zero all but the smallest set of most likely tokens whose mass reaches p, then renormalise; in place.
 * @param {Float64Array} probs
 * @param {number} p
 */
function keepTopP(probs, p) {
  const order = Array.from(probs.keys()).sort((a, b) => probs[b] - probs[a] || a - b);
  let cumulative = 0;
  let n = order.length;
  for (let i = 0; i < order.length; i++) {
    cumulative += probs[order[i]];
    if (cumulative >= p) { n = i + 1; break; }
  }
  const keep = new Uint8Array(probs.length);
  for (let i = 0; i < n; i++) keep[order[i]] = 1;
  for (let i = 0; i < probs.length; i++) if (!keep[i]) probs[i] = 0;
  const total = pairwiseSum(probs);
  for (let i = 0; i < probs.length; i++) probs[i] /= total;
}

/**
 * The next token of one row.
 * @param {ArrayLike<number>} logits  (V,)
 * @param {Uint8Array} seen  (V,)
 * @param {Required<Sampling>} s
 * @param {{choice: (probs: Float64Array) => number}} rng
 * @returns {number}
 */
export function choose(logits, seen, s, rng) {
  if (s.temperature === 0 && s.repetitionPenalty === 1) return argmax(logits);
  const x = penalise(logits, seen, s.repetitionPenalty);
  if (s.temperature === 0) return argmax(x);
  for (let i = 0; i < x.length; i++) x[i] /= s.temperature;
  if (s.topK && s.topK < x.length) keepTopK(x, s.topK);
  const top = x[argmax(x)];
  for (let i = 0; i < x.length; i++) x[i] = Math.exp(x[i] - top);
  const total = pairwiseSum(x);
  for (let i = 0; i < x.length; i++) x[i] /= total;
  if (s.topP < 1) keepTopP(x, s.topP);
  return rng.choice(x);
}
