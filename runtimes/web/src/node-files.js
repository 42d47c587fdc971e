/** Export files on a local disk (Node, Electron): read with node:fs, hashed with node:crypto. */
import { createHash } from "node:crypto";
import { createReadStream } from "node:fs";
import { readFile, stat } from "node:fs/promises";
import { join } from "node:path";

/**
 * @typedef {object} Files  one directory of an export, local or remote (see url-files.js)
 * @property {string} where  its path or URL, for messages
 * @property {(rel: string) => string} name  a file's path or URL, for messages
 * @property {(rel: string) => Promise<string|null>} text  UTF-8 contents, null when missing
 * @property {(rel: string) => Promise<{bytes: number, sha256: string}|null>} digest  null when missing
 * @property {(rel: string) => Files} sub  a sub-directory
 * @property {(ort: any, rel: string, dataRel: string, options: object) => Promise<any>} session
 *   an onnxruntime InferenceSession of a graph and its external data file
 */

/**
 * @param {string} dir
 * @returns {Files}
 */
export function nodeFiles(dir) {
  const name = (rel) => (rel ? join(dir, rel) : dir);
  return {
    where: dir,
    name,
    async text(rel) {
      try { return await readFile(name(rel), "utf8"); } catch (exc) { if (exc.code === "ENOENT" || exc.code === "EISDIR") return null; throw exc; }
    },
    async digest(rel) {
      let info;
      try { info = await stat(name(rel)); } catch (exc) { if (exc.code === "ENOENT") return null; throw exc; }
      if (!info.isFile()) return null;
      const hash = createHash("sha256");
      for await (const chunk of createReadStream(name(rel))) hash.update(chunk);
      return { bytes: info.size, sha256: hash.digest("hex") };
    },
    sub: (rel) => nodeFiles(join(dir, rel)),
    async session(ort, rel, dataRel, options) {
      if (!ort.env?.versions?.web) return ort.InferenceSession.create(name(rel), options);  // native: reads the files itself
      const data = await readFile(name(dataRel)).catch(() => null);  // WebAssembly: the bytes, external data named
      return ort.InferenceSession.create(await readFile(name(rel)), { ...options, externalData: data ? [{ path: dataRel, data }] : [] });
    },
  };
}
