/** A SmallTalk mixture in the JS runner: soup-run's routes, scores and expert tokens; experts load on first use. */
import assert from "node:assert/strict";
import { cpSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { generateIds, open, RoutedMixture, RunError } from "../src/node.js";
import { needsRefs, refs } from "./refs.js";

const SCORE_TOL = 1e-4;

test("routes, router scores and the expert's greedy tokens equal soup-run's", needsRefs, async () => {
  const mixture = await open(refs.mixture.path);
  assert.ok(mixture instanceof RoutedMixture);
  assert.equal(mixture.loaded.size, 0);  // no expert before a text is routed
  for (const r of refs.mixture.routes) {
    const { expert, scores } = await mixture.route(r.text);
    assert.equal(expert, r.expert);
    scores.forEach((s, i) => assert.ok(Math.abs(s - r.scores[i]) <= SCORE_TOL, `${scores} vs ${r.scores}`));
    const model = await mixture.expert(expert);
    assert.ok(mixture.loaded.has(expert) && model.verified > 0);
    assert.deepEqual(await generateIds(model, r.ids, { maxNewTokens: r.n, stopAtEos: false }), r.greedy);
  }
  await assert.rejects(mixture.route("a"), /at least 2 tokens/);
});

test("a mixture whose member manifest was altered is refused", needsRefs, async () => {
  const scratch = mkdtempSync(join(tmpdir(), "soup-web-mixture-"));
  try {
    cpSync(refs.mixture.path, scratch, { recursive: true });
    const member = JSON.parse(readFileSync(join(scratch, "manifest.json"), "utf8")).models[0].path;
    writeFileSync(join(scratch, member, "manifest.json"), `${readFileSync(join(scratch, member, "manifest.json"), "utf8")} `);
    await assert.rejects(open(scratch), (e) => e instanceof RunError && /does not match the mixture's manifest/.test(e.message));
  } finally {
    rmSync(scratch, { recursive: true, force: true });
  }
});
