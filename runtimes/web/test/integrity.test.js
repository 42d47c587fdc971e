/** The manifest check of the JS runner: every listed file, altered in turn, is refused by name. */
import assert from "node:assert/strict";
import { cpSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { nodeFiles, open, RunError, verify } from "../src/node.js";
import { needsRefs, refs } from "./refs.js";

test("every file the manifest lists is checked, the count verified is the count listed", needsRefs, async () => {
  const dir = refs.exports.fp32;
  const listed = Object.keys(JSON.parse(readFileSync(join(dir, "manifest.json"), "utf8")).files).filter((r) => r.startsWith("onnx/")).sort();
  assert.ok(listed.includes("onnx/model.onnx") && listed.includes("onnx/model.onnx.data"));
  assert.equal(await verify(nodeFiles(dir), "onnx"), listed.length);
  assert.equal(listed.length, refs.listed.fp32);
  const scratch = mkdtempSync(join(tmpdir(), "soup-web-tamper-"));
  try {
    for (const rel of listed) {
      const copy = join(scratch, rel.replace("/", "_"));
      cpSync(dir, copy, { recursive: true });
      const data = readFileSync(join(copy, rel));
      data[data.length >> 1] ^= 0x01;
      writeFileSync(join(copy, rel), data);
      await assert.rejects(open(copy), (e) => e instanceof RunError && /does not match its SHA-256/.test(e.message) &&
        e.message.includes(rel.split("/").pop()), rel);
      rmSync(copy, { recursive: true });
    }
    const short = join(scratch, "short");
    cpSync(dir, short, { recursive: true });
    writeFileSync(join(short, "onnx/model.onnx.data"), readFileSync(join(dir, "onnx/model.onnx.data")).subarray(1));
    await assert.rejects(open(short), /model.onnx.data has \d+ bytes, the manifest says/);
    await open(short, { verify: false }).then((m) => m.release(), () => {});  // opting out skips the check (loading may fail)
    rmSync(join(short, "manifest.json"));
    await assert.rejects(open(short), /no manifest.json .* verify: false/);
  } finally {
    rmSync(scratch, { recursive: true, force: true });
  }
});

test("the export's onnx/ opens as the export itself, verified against the manifest above it", needsRefs, async () => {
  const m = await open(join(refs.exports.int4, "onnx"));
  assert.equal(m.verified, refs.listed.int4);
});
