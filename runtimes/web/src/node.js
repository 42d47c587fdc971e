/**
 * The Node / Electron entry: the same runner on local paths, with onnxruntime-node by default.
 *
 *   import { open } from "soup-run-web/node";
 *   const model = await open("exports/demo/acme");
 */
import { open as openFiles } from "./index.js";
import { nodeFiles } from "./node-files.js";

export * from "./index.js";
export { nodeFiles } from "./node-files.js";

/**
 * Open an export or mixture directory on disk.
 * @param {string} path
 * @param {Partial<import("./specialist.js").LoadOptions>} [options]  `ort` defaults to onnxruntime-node
 */
export async function open(path, options = {}) {
  const ort = options.ort ?? (await import("onnxruntime-node"));
  return openFiles(nodeFiles(path), { ...options, ort });
}
