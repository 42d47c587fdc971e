/**
 * soup-run's outputs on the test exports, written by tests/test_web_runtime.py (`make test` runs
 * these tests through it) and named by SOUP_WEB_REFS. Without it the tests that need an export skip
 * with that reason; the pytest wrapper fails on any skip.
 */
import { readFileSync } from "node:fs";

const path = process.env.SOUP_WEB_REFS;

/** @type {any} */
export const refs = path ? JSON.parse(readFileSync(path, "utf8")) : null;

/** node:test options: skip, saying why, when there are no references */
export const needsRefs = refs ? {} : { skip: "no SOUP_WEB_REFS: run through tests/test_web_runtime.py (make test)" };
