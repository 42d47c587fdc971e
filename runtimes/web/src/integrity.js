/**
 * Verify a specialist against its manifest before loading it (SHA-256 and size of every file), as
 * soup_run/integrity.py: the manifest sits in the export directory, one level above onnx/; every
 * file of the model directory that its `files` table lists is checked.
 */
import { MANIFEST } from "./contract.js";
import { RunError } from "./errors.js";

/**
 * Check every file of the model directory listed in the export's manifest.
 * @param {import("./node-files.js").Files} exportDir  the directory holding manifest.json
 * @param {string} modelRel  the model directory inside it ("onnx"), or "" when they are the same
 * @returns {Promise<number>} how many files were checked
 */
export async function verify(exportDir, modelRel) {
  const text = await exportDir.text(MANIFEST);
  if (text === null) {
    throw new RunError(`no ${MANIFEST} in ${exportDir.where}, so the model cannot be verified; pass the directory ` +
      "written by `soup-export build`, or verify: false to run it unverified");
  }
  let files;
  try { files = JSON.parse(text).files; if (typeof files !== "object" || files === null) throw new Error("no files table"); }
  catch (exc) { throw new RunError(`${exportDir.name(MANIFEST)} is not a soup-export manifest (${exc.message}); rebuild the export`); }
  const prefix = modelRel ? `${modelRel}/` : "";
  const listed = Object.keys(files).filter((rel) => rel.startsWith(prefix) && (prefix || !rel.includes("/"))).sort();
  if (!listed.length) throw new RunError(`${exportDir.name(MANIFEST)} lists no file of ${modelRel || "the model"}; pass the export directory itself`);
  for (const rel of listed) await check(exportDir, rel, files[rel]);
  return listed.length;
}

/**
 * @param {import("./node-files.js").Files} dir
 * @param {string} rel
 * @param {{bytes: number, sha256: string}} entry
 */
async function check(dir, rel, entry) {
  const found = await dir.digest(rel);
  const target = dir.name(rel);
  if (found === null) throw new RunError(`${target} is missing (the manifest lists it); the model is incomplete: copy it again`);
  if (found.bytes !== entry.bytes) {
    throw new RunError(`${target} has ${found.bytes} bytes, the manifest says ${entry.bytes}: the file is truncated or ` +
      "was modified; copy the model again");
  }
  if (found.sha256 !== entry.sha256) {
    throw new RunError(`${target} does not match its SHA-256 in the manifest: the model was modified or corrupted; ` +
      "copy it again (or pass verify: false if you changed it on purpose)");
  }
}
