/**
 * What the runner reads from an export: file names, graph I/O names and the decoder's shapes
 * (runtimes/README.md's I/O contract; the same names as runtimes/python/soup_run/contract.py).
 */
import { RunError } from "./errors.js";

export const ONNX_DIR = "onnx";
export const MODEL_FILE = "model.onnx";
export const DATA_FILE = "model.onnx.data";
export const GENAI_CONFIG = "genai_config.json";
export const TOKENIZER = "tokenizer.json";
export const TOKENIZER_CONFIG = "tokenizer_config.json";
export const MANIFEST = "manifest.json";
export const MIXTURE_KIND = "smalltalk-mixture";
export const INPUT_IDS = "input_ids";
export const ATTENTION_MASK = "attention_mask";
export const POSITION_IDS = "position_ids";
export const LOGITS = "logits";

/**
 * @typedef {object} Contract  the decoder's shapes, special tokens and cache names
 * @property {number} layers
 * @property {number} kvHeads
 * @property {number} headSize
 * @property {number} vocab
 * @property {number} context
 * @property {number} eos
 * @property {number} pad
 * @property {string[]} pastNames     past_key_values.{i}.key|value, layer by layer
 * @property {string[]} presentNames  present.{i}.key|value, in the same order
 */

/**
 * The contract of one export from its genai_config.json text.
 * @param {string} text  the file's contents
 * @param {string} where  its path or URL, for messages
 * @returns {Contract}
 */
export function readContract(text, where) {
  try {
    const m = JSON.parse(text).model;
    const d = m.decoder;
    const perLayer = (a, b) => Array.from({ length: d.num_hidden_layers }, (_, i) => [a, b].map((p) => p.replace("%d", String(i)))).flat();
    const need = [d.num_hidden_layers, d.num_key_value_heads, d.head_size, m.vocab_size, m.context_length, m.eos_token_id];
    if (need.some((v) => !Number.isInteger(v))) throw new TypeError("a shape or token id is missing");
    return {
      layers: d.num_hidden_layers, kvHeads: d.num_key_value_heads, headSize: d.head_size, vocab: m.vocab_size,
      context: m.context_length, eos: m.eos_token_id, pad: m.pad_token_id ?? m.eos_token_id,
      pastNames: perLayer(d.inputs.past_key_names, d.inputs.past_value_names),
      presentNames: perLayer(d.outputs.present_key_names, d.outputs.present_value_names),
    };
  } catch (exc) {
    throw new RunError(`${where} is not a soup-export ${GENAI_CONFIG} (${exc.name}: ${exc.message}); rebuild the export`);
  }
}
