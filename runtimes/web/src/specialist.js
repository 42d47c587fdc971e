/**
 * A specialist: verify its files, load its tokenizer and onnxruntime session, and step the decoder
 * with one shared KV buffer per layer and kind (soup_run/model.py; runtimes/README.md's contract).
 *
 * Each layer's key and value cache is one (B, KV, capacity, head) float32 tensor passed as
 * `past_key_values.{i}.*` and, on onnxruntime-node, pre-allocated as the `present.{i}.*` output of
 * every step, so GroupQueryAttention writes each new position into that same tensor. onnxruntime-web
 * does not fill a pre-allocated CPU output: there the present tensor it returns, of the same shape,
 * is the next step's past. The JS backends have no I/O binding: onnxruntime-node copies every output
 * of a run, the pre-allocated present tensors whole, into new JavaScript memory, and onnxruntime-web
 * copies every input into its heap, so a step's time grows with the cache tensors' size (at the
 * context length a decode step of the benchmark's d256 int4 model took 1.9x as long in Node). A
 * generation therefore sizes its cache to what it needs, prompt plus new tokens, where soup-run takes
 * the whole context, and on onnxruntime-node the tensors grow in steps of GROW positions as the
 * sequence does (docs/web-runtime.md has the measurements).
 */
import { ATTENTION_MASK, DATA_FILE, GENAI_CONFIG, INPUT_IDS, LOGITS, MODEL_FILE, ONNX_DIR, POSITION_IDS, readContract } from "./contract.js";
import { RunError } from "./errors.js";
import { stream, generate } from "./generate.js";
import { verify } from "./integrity.js";
import { loadTokenizer } from "./tokenizer.js";

/**
 * @typedef {object} LoadOptions
 * @property {any} ort  the onnxruntime module: onnxruntime-node, onnxruntime-web or onnxruntime-react-native
 * @property {number} [threads]  intra-op threads (0: onnxruntime's default); in a browser, WebAssembly threads
 * @property {boolean} [verify]  check the manifest's SHA-256 and sizes first (default true)
 */

/**
 * The model directory inside an export: its onnx/ or the directory itself.
 * @param {import("./node-files.js").Files} dir
 * @returns {Promise<{exportDir: import("./node-files.js").Files, modelRel: string}>}
 */
export async function findModelDir(dir) {
  if (await dir.text(`${ONNX_DIR}/${GENAI_CONFIG}`) !== null) return { exportDir: dir, modelRel: ONNX_DIR };
  if (await dir.text(GENAI_CONFIG) !== null) {
    const parent = dir.sub("..");
    const inOnnx = /\/onnx\/?$/.test(dir.where) && (await parent.text("manifest.json")) !== null;
    return inOnnx ? { exportDir: parent, modelRel: ONNX_DIR } : { exportDir: dir, modelRel: "" };
  }
  throw new RunError(`no ${GENAI_CONFIG} under ${dir.where}; pass the directory written by \`soup-export build\` (or its ${ONNX_DIR}/)`);
}

/**
 * @param {any} ort
 * @param {number} threads
 */
function sessionOptions(ort, threads) {
  const web = Boolean(ort.env?.versions?.web);  // onnxruntime-web: WebAssembly threads are set globally
  if (threads && web) ort.env.wasm.numThreads = threads;
  const options = { executionProviders: [web ? "wasm" : "cpu"], logSeverityLevel: 3 };
  return threads ? { ...options, intraOpNumThreads: threads, interOpNumThreads: 1 } : options;
}

export class Specialist {
  /**
   * Verify (unless told not to), then load an export directory.
   * @param {import("./node-files.js").Files} dir  the export directory (or its onnx/)
   * @param {LoadOptions} options
   * @returns {Promise<Specialist>}
   */
  static async load(dir, { ort, threads = 0, verify: check = true }) {
    if (!ort?.InferenceSession) throw new RunError("pass the onnxruntime module as `ort` (onnxruntime-node or onnxruntime-web)");
    const { exportDir, modelRel } = await findModelDir(dir);
    const modelDir = modelRel ? exportDir.sub(modelRel) : exportDir;
    const verified = check ? await verify(exportDir, modelRel) : 0;
    const contract = readContract(await modelDir.text(GENAI_CONFIG), modelDir.name(GENAI_CONFIG));
    const tokens = await loadTokenizer(modelDir);
    let session;
    try {
      session = await modelDir.session(ort, MODEL_FILE, DATA_FILE, sessionOptions(ort, threads));
    } catch (exc) {
      throw new RunError(`onnxruntime cannot load ${modelDir.name(MODEL_FILE)}: ${String(exc.message ?? exc).split("\n")[0].slice(0, 300)}; ` +
        "the file is corrupt or not a soup-export model");
    }
    return new Specialist(ort, session, contract, tokens, modelDir.where, verified);
  }

  /**
   * @param {any} ort
   * @param {any} session
   * @param {import("./contract.js").Contract} contract
   * @param {import("./tokenizer.js").Tokens} tokens
   * @param {string} where
   * @param {number} verified  files checked against the manifest
   */
  constructor(ort, session, contract, tokens, where, verified) {
    Object.assign(this, { ort, session, contract, tokens, where, verified });
    /** the backend writes into pre-allocated outputs (onnxruntime-node), so past and present share memory */
    this.inPlace = !ort.env?.versions?.web;
  }

  /** @param {string} text */
  encode(text) { return this.tokens.encode(text); }

  /** @param {number[]} ids */
  decode(ids) { return this.tokens.decode(ids); }

  /**
   * A fresh KV cache for `batch` rows of up to `capacity` tokens (the model's context by default).
   * @param {number} batch
   * @param {number} [capacity]
   */
  emptyPast(batch, capacity = this.contract.context) { return new KVCache(this, batch, capacity); }

  /**
   * One forward: ids/positions (B, S), mask (B, P+S), the cache after P tokens.
   * @param {number[][]} ids
   * @param {number[][]} mask
   * @param {number[][]} positions
   * @param {KVCache} past  updated in place
   * @param {boolean} [allLogits]
   * @returns {Promise<[Float32Array[] | Float32Array[][], KVCache]>}  per row the last position's logits (V,),
   *   or with allLogits per row and position
   */
  async step(ids, mask, positions, past, allLogits = false) {
    const logits = await past.run(ids, mask, positions);
    const [b, s, v] = [ids.length, ids[0].length, this.contract.vocab];
    const row = (i, t) => logits.slice((i * s + t) * v, (i * s + t + 1) * v);
    const out = Array.from({ length: b }, (_, i) => (allLogits ? Array.from({ length: s }, (_, t) => row(i, t)) : row(i, s - 1)));
    return [out, past];
  }

  /** @param {(string|number[])[]} prompts @param {import("./generate.js").GenerationConfig} [config] */
  stream(prompts, config) { return stream(this, prompts, config); }

  /** @param {string[]} prompts @param {import("./generate.js").GenerationConfig} [config] */
  generate(prompts, config) { return generate(this, prompts, config); }

  /** Release onnxruntime's session. */
  async release() { await this.session.release?.(); }
}

/**
 * @param {number[][]} rows
 * @returns {BigInt64Array}
 */
function int64(rows) {
  const out = new BigInt64Array(rows.length * rows[0].length);
  let k = 0;
  for (const r of rows) for (const v of r) out[k++] = BigInt(v);
  return out;
}

/** Positions by which an in-place cache grows (see the module comment). */
export const GROW = 16;

/** The past = present buffers of one batch of sequences (see the module comment). */
export class KVCache {
  /**
   * @param {Specialist} model
   * @param {number} batch
   * @param {number} capacity  tokens per row, at most the model's context
   */
  constructor(model, batch, capacity) {
    const c = model.contract;
    this.capacity = Math.min(Math.max(1, capacity), c.context);
    this.model = model;
    this.batch = batch;
    this.length = 0;
    /** positions the tensors hold: all of `capacity` at once, or on onnxruntime-node as many as needed, by GROW */
    this.allocated = 0;
    this.buffers = [];
    if (!model.inPlace) this.reserve(this.capacity);
    // a decode step's (B, 1) ids and positions, rewritten in place, and its (B, 1, V) logits when the backend fills them
    this.stepIds = new model.ort.Tensor("int64", new BigInt64Array(batch), [batch, 1]);
    this.stepPositions = new model.ort.Tensor("int64", new BigInt64Array(batch), [batch, 1]);
    this.stepLogits = model.inPlace ? new model.ort.Tensor("float32", new Float32Array(batch * c.vocab), [batch, 1, c.vocab]) : null;
  }

  /**
   * Make the tensors hold `positions` (at most the capacity), keeping the first `length` positions of every row and head.
   * @param {number} positions
   */
  reserve(positions) {
    if (positions <= this.allocated) return;
    const { ort, contract: c } = this.model;
    const [rows, head, from, to] = [this.batch * c.kvHeads, c.headSize, this.allocated, positions];
    this.buffers = c.pastNames.map((_, i) => {
      const data = new Float32Array(rows * to * head);
      const old = this.buffers[i]?.data;
      for (let r = 0; old && r < rows; r++) data.set(old.subarray(r * from * head, (r * from + this.length) * head), r * to * head);
      return new ort.Tensor("float32", data, [this.batch, c.kvHeads, to, head]);
    });
    this.allocated = to;
  }

  /**
   * A (B, S) int64 tensor; a decode step's ids and positions reuse their tensors.
   * @param {number[][]} rows
   * @param {any} reuse  the step tensor to overwrite when S is 1
   */
  int64(rows, reuse) {
    if (rows[0].length !== 1) return new this.model.ort.Tensor("int64", int64(rows), [rows.length, rows[0].length]);
    rows.forEach((r, i) => { reuse.data[i] = BigInt(r[0]); });
    return reuse;
  }

  /**
   * The (B, S, V) logits, flat; the new positions' keys and values land in the buffers.
   * @param {number[][]} ids
   * @param {number[][]} mask
   * @param {number[][]} positions
   * @returns {Promise<Float32Array>}
   */
  async run(ids, mask, positions) {
    const { ort, session, contract: c } = this.model;
    const [b, s, total] = [ids.length, ids[0].length, mask[0].length];
    if (b !== this.batch || total !== this.length + s) {
      throw new RunError(`cache holds ${this.batch} rows of ${this.length} tokens; got ${b} rows, ${s} new tokens and a mask of ${total}`);
    }
    if (total > this.capacity) {
      throw new RunError(`${total} tokens exceed ${total > c.context ? `the model's context of ${c.context}` : `this cache's ${this.capacity}`}`);
    }
    if (total > this.allocated) this.reserve(Math.min(this.capacity, (Math.floor(total / GROW) + 1) * GROW));
    const feeds = {
      [INPUT_IDS]: this.int64(ids, this.stepIds),
      [ATTENTION_MASK]: new ort.Tensor("int64", int64(mask), [b, total]),
      [POSITION_IDS]: this.int64(positions, this.stepPositions),
    };
    const fetches = { [LOGITS]: s === 1 ? this.stepLogits : null };
    c.pastNames.forEach((name, i) => { feeds[name] = this.buffers[i]; });
    c.presentNames.forEach((name, i) => { fetches[name] = this.model.inPlace ? this.buffers[i] : null; });
    const out = await session.run(feeds, fetches);
    c.presentNames.forEach((name, i) => { this.buffers[i] = out[name]; });
    this.length = total;
    return out[LOGITS].data;
  }
}
