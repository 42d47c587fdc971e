/** The export's tokenizer.json through @huggingface/tokenizers: the same ids as the Python `tokenizers`. */
import { Tokenizer } from "@huggingface/tokenizers";
import { TOKENIZER, TOKENIZER_CONFIG } from "./contract.js";
import { RunError } from "./errors.js";

/**
 * @typedef {object} Tokens
 * @property {(text: string) => number[]} encode
 * @property {(ids: number[]) => string} decode  special tokens skipped
 */

/**
 * @param {import("./node-files.js").Files} modelDir
 * @returns {Promise<Tokens>}
 */
export async function loadTokenizer(modelDir) {
  const json = await modelDir.text(TOKENIZER);
  if (json === null) throw new RunError(`${modelDir.name(TOKENIZER)} is missing; copy the whole export directory`);
  const config = await modelDir.text(TOKENIZER_CONFIG);
  const tokenizer = new Tokenizer(JSON.parse(json), config === null ? {} : JSON.parse(config));
  return {
    encode: (text) => tokenizer.encode(text).ids,
    decode: (ids) => (ids.length ? tokenizer.decode(ids, { skip_special_tokens: true }) : ""),  // it refuses []
  };
}
