/**
 * Incremental generation with the KV cache: a batch of prompts, left-padded, streamed through an
 * async iterator (soup_run/generate.py, step for step). A row stops at EOS, at a stop string (cut
 * from its text) or after maxNewTokens; the context length is never exceeded. Padded positions have
 * attention_mask 0 and position ids count real tokens only, so a padded row computes what it would alone.
 */
import { RunError } from "./errors.js";
import { Rng } from "./rng.js";
import { choose, sampling } from "./sampling.js";

/**
 * @typedef {object} GenerationConfig
 * @property {number} [maxNewTokens]  64 by default
 * @property {import("./sampling.js").Sampling} [sampling]  greedy by default
 * @property {string[]} [stop]  stop strings
 * @property {number} [seed]  0 by default; the same draws as soup-run's --seed
 * @property {boolean} [stopAtEos]  true by default
 * @property {AbortSignal} [signal]  aborting ends the generation with the signal's reason
 */

/**
 * @typedef {object} Event
 * @property {number} row
 * @property {number} token  -1 for the flush of held-back text at the end
 * @property {string} text  newly printable text of this row
 */

/**
 * @typedef {object} Decoder  what generation needs from a model (Specialist is one)
 * @property {import("./contract.js").Contract} contract
 * @property {(text: string) => number[]} encode
 * @property {(ids: number[]) => string} decode
 * @property {(batch: number, capacity?: number) => any} emptyPast  a cache for `batch` rows of up to `capacity` tokens
 * @property {(ids: number[][], mask: number[][], positions: number[][], past: any) => Promise<[Float32Array[], any]>} step
 */

/**
 * ids, mask and position ids (B, S) for left-padded prompts.
 * @param {number[][]} rows
 * @param {number} pad
 */
export function leftPad(rows, pad) {
  const width = Math.max(...rows.map((r) => r.length));
  const ids = rows.map((r) => [...Array(width - r.length).fill(pad), ...r]);
  const mask = rows.map((r) => [...Array(width - r.length).fill(0), ...Array(r.length).fill(1)]);
  const positions = mask.map((m) => { let n = 0; return m.map((v) => Math.max((n += v) - 1, 0)); });
  return { ids, mask, positions };
}

/**
 * Characters at the end of text that could still grow into a stop string.
 * @param {string} text
 * @param {string[]} stop
 */
function heldBack(text, stop) {
  let keep = 0;
  for (const word of stop) {
    for (let n = Math.min(word.length - 1, text.length); n > keep; n--) {
      if (text.endsWith(word.slice(0, n))) { keep = n; break; }
    }
  }
  return keep;
}

/**
 * The part of the row's decoded output that is safe to print now (held back: a possible stop
 * string's start, an incomplete UTF-8 sequence); `final` flushes what is left.
 * @param {Decoder} model
 * @param {{out: number[], printed: string, done: boolean}} row
 * @param {string[]} stop
 * @param {boolean} [final]
 */
function newText(model, row, stop, final = false) {
  let text = model.decode(row.out);
  const hits = stop.filter((w) => w && text.includes(w)).map((w) => text.indexOf(w));
  if (hits.length) {
    text = text.slice(0, Math.min(...hits));
    row.done = true;
  } else if (!final) {
    if (text.endsWith("\ufffd")) return "";
    text = text.slice(0, text.length - heldBack(text, stop));
  }
  const fresh = text.length > row.printed.length ? text.slice(row.printed.length) : "";
  if (text.length > row.printed.length) row.printed = text;
  return fresh;
}

/**
 * Events as tokens are produced; prompts are strings or token id lists.
 * @param {Decoder} model
 * @param {(string|number[])[]} prompts
 * @param {GenerationConfig} [config]
 * @returns {AsyncGenerator<Event>}
 */
export async function* stream(model, prompts, config = {}) {
  const { maxNewTokens = 64, stop = [], seed = 0, stopAtEos = true, signal } = config;
  const s = sampling(config.sampling);
  const c = model.contract;
  if (!Number.isInteger(maxNewTokens) || maxNewTokens < 1) throw new RunError("maxNewTokens must be an integer >= 1");
  const rows = prompts.map((p) => ({ prompt: Array.isArray(p) ? [...p] : model.encode(p), out: [], printed: "", done: false }));
  if (!rows.length || rows.some((r) => !r.prompt.length)) throw new RunError("a prompt encodes to no tokens; give non-empty prompts");
  const longest = Math.max(...rows.map((r) => r.prompt.length));
  if (longest >= c.context) throw new RunError(`a prompt has ${longest} tokens, the model's context is ${c.context}; shorten it`);
  const budget = Math.min(maxNewTokens, c.context - longest);
  const rng = new Rng(seed);
  let { ids, mask, positions } = leftPad(rows.map((r) => r.prompt), c.pad);
  const seen = rows.map((r) => { const v = new Uint8Array(c.vocab); for (const t of r.prompt) v[t] = 1; return v; });
  signal?.throwIfAborted();
  let [logits, past] = await model.step(ids, mask, positions, model.emptyPast(rows.length, longest + budget));
  for (let n = 0; n < budget; n++) {
    signal?.throwIfAborted();
    const tokens = rows.map(() => c.pad);
    for (const [i, r] of rows.entries()) {
      if (r.done) continue;
      const token = choose(logits[i], seen[i], s, rng);
      tokens[i] = token;
      seen[i][token] = 1;
      if (stopAtEos && token === c.eos) {
        r.done = true;
        yield { row: i, token, text: newText(model, r, stop, true) };
        continue;
      }
      r.out.push(token);
      yield { row: i, token, text: newText(model, r, stop) };
    }
    if (rows.every((r) => r.done)) return;
    if (n === budget - 1) break;  // the last token chosen: no forward for a token that will not be drawn
    signal?.throwIfAborted();
    mask = mask.map((m) => [...m, 1]);
    positions = positions.map((p) => [p[p.length - 1] + 1]);
    [logits, past] = await model.step(tokens.map((t) => [t]), mask, positions, past);
  }
  for (const [i, r] of rows.entries()) {  // the token budget ran out: print what was held back
    if (r.done) continue;
    const rest = newText(model, r, stop, true);
    if (rest) yield { row: i, token: -1, text: rest };
  }
}

/**
 * The final strings, one per prompt.
 * @param {Decoder} model
 * @param {string[]} prompts
 * @param {GenerationConfig} [config]
 */
export async function generate(model, prompts, config = {}) {
  const texts = prompts.map(() => "");
  for await (const e of stream(model, prompts, config)) texts[e.row] += e.text;
  return texts;
}

/**
 * The token ids generated for one prompt given as ids (cross-runtime comparisons).
 * @param {Decoder} model
 * @param {number[]} prompt
 * @param {GenerationConfig} [config]
 */
export async function generateIds(model, prompt, config = {}) {
  const out = [];
  for await (const e of stream(model, [prompt], config)) if (e.token >= 0) out.push(e.token);
  return out;
}
