/**
 * soup-run for JavaScript: run soup-export specialists and SmallTalk mixtures with onnxruntime in a
 * browser (onnxruntime-web), Node or Electron (onnxruntime-node) or React Native
 * (onnxruntime-react-native). One code path; the onnxruntime module is passed in.
 *
 *   import * as ort from "onnxruntime-web";
 *   import { open } from "soup-run-web";
 *   const model = await open("/models/acme/", { ort });
 *   for await (const e of model.stream(["Dear customer,"], { maxNewTokens: 48 })) out.append(e.text);
 */
import { RunError } from "./errors.js";
import { readMixtureManifest, RoutedMixture } from "./mixture.js";
import { Specialist } from "./specialist.js";
import { urlFiles } from "./url-files.js";

export { RunError } from "./errors.js";
export { Specialist, KVCache } from "./specialist.js";
export { RoutedMixture, tokenLogProbs } from "./mixture.js";
export { stream, generate, generateIds, leftPad } from "./generate.js";
export { argmax, choose, penalise, sampling } from "./sampling.js";
export { Rng } from "./rng.js";
export { verify } from "./integrity.js";
export { urlFiles } from "./url-files.js";

/**
 * Open an export directory or a mixture directory: a Specialist, or a RoutedMixture.
 * @param {string | import("./node-files.js").Files} where  a URL (resolved against the page), or Files
 * @param {import("./specialist.js").LoadOptions} options
 * @returns {Promise<Specialist | RoutedMixture>}
 */
export async function open(where, options) {
  if (!options?.ort) throw new RunError("pass the onnxruntime module as `ort` (onnxruntime-node or onnxruntime-web)");
  const base = globalThis.location ? new URL(String(where), globalThis.location.href).href : String(where);
  const dir = typeof where === "string" ? urlFiles(base) : where;
  return (await readMixtureManifest(dir)) ? RoutedMixture.load(dir, options) : Specialist.load(dir, options);
}
