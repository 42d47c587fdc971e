/**
 * A SmallTalk mixture (soup_run/mixture.py): every router scores the text's first M + 1 tokens
 * (tokens 0..M-1 in, 1..M predicted, mean log-likelihood); the best router's expert runs the text.
 * The member manifests are checked against the mixture's manifest when it opens, routers load at
 * once, and an expert loads (and its files are verified) the first time a text is routed to it.
 */
import { MANIFEST, MIXTURE_KIND } from "./contract.js";
import { RunError } from "./errors.js";
import { Specialist } from "./specialist.js";

/**
 * The mixture manifest of a directory, or null when it is not a mixture.
 * @param {import("./node-files.js").Files} dir
 */
export async function readMixtureManifest(dir) {
  const text = await dir.text(MANIFEST);
  if (text === null) return null;
  try { const m = JSON.parse(text); return m.kind === MIXTURE_KIND ? m : null; } catch { return null; }
}

/**
 * (S,) log-probability of each target under per-position logits, in float64 (soup_run/score.py).
 * @param {Float32Array[]} logits
 * @param {number[]} targets
 */
export function tokenLogProbs(logits, targets) {
  return targets.map((t, i) => {
    const row = logits[i];
    let top = -Infinity;
    for (const v of row) if (v > top) top = v;
    let sum = 0;
    for (const v of row) sum += Math.exp(v - top);
    return row[t] - top - Math.log(sum);
  });
}

export class RoutedMixture {
  /**
   * @param {import("./node-files.js").Files} dir  the directory written by `soup-export mixture`
   * @param {import("./specialist.js").LoadOptions} options
   * @returns {Promise<RoutedMixture>}
   */
  static async load(dir, options) {
    const manifest = await readMixtureManifest(dir);
    if (manifest === null) throw new RunError(`${dir.where} is not a mixture directory; pass one written by \`soup-export mixture\``);
    const mixture = new RoutedMixture(dir, manifest, options);
    if (options.verify !== false) await mixture.verifyMembers();
    mixture.routers = [];
    for (const m of mixture.members("router")) mixture.routers.push(await mixture.open(m));
    return mixture;
  }

  /**
   * @param {import("./node-files.js").Files} dir
   * @param {any} manifest
   * @param {import("./specialist.js").LoadOptions} options
   */
  constructor(dir, manifest, options) {
    this.dir = dir;
    this.manifest = manifest;
    this.prefixLen = Number(manifest.prefix_len);
    this.options = options;
    /** @type {Specialist[]} */
    this.routers = [];
    /** @type {Map<number, Specialist>} */
    this.loaded = new Map();
  }

  /** @param {"router"|"expert"} kind */
  members(kind) {
    const found = (this.manifest.models ?? []).filter((m) => m.kind === kind).sort((a, b) => a.index - b.index);
    if (!found.length) throw new RunError(`${this.dir.name(MANIFEST)} lists no ${kind}; rebuild with \`soup-export mixture\``);
    return found;
  }

  async verifyMembers() {
    const files = this.manifest.files ?? {};
    for (const m of this.manifest.models ?? []) {
      const rel = `${m.path}/${MANIFEST}`;
      const found = await this.dir.digest(rel);
      if (!(rel in files) || found === null || found.sha256 !== files[rel].sha256) {
        throw new RunError(`${this.dir.name(rel)} is missing or does not match the mixture's manifest: the mixture was ` +
          "modified or copied incompletely; copy it again (or pass verify: false)");
      }
    }
  }

  /** @param {{path: string}} member */
  open(member) { return Specialist.load(this.dir.sub(member.path), this.options); }

  get experts() { return this.routers.length; }

  /** @param {string} text */
  encode(text) { return this.routers[0].encode(text); }

  /**
   * (E,) mean prefix log-likelihood of a token sequence under every router.
   * @param {number[]} ids
   */
  async scores(ids) {
    const span = ids.slice(0, this.prefixLen + 1);
    if (span.length < 2) throw new RunError("routing needs a text of at least 2 tokens; give a longer prompt");
    const x = [span.slice(0, -1)];
    const positions = [x[0].map((_, i) => i)];
    const out = [];
    for (const router of this.routers) {
      const [logits] = await router.step(x, x.map((r) => r.map(() => 1)), positions, router.emptyPast(1), true);
      const lp = tokenLogProbs(logits[0], span.slice(1));
      out.push(lp.reduce((a, b) => a + b, 0) / lp.length);
    }
    return out;
  }

  /**
   * The chosen expert and every router's score for a text.
   * @param {string} text
   * @returns {Promise<{expert: number, scores: number[]}>}
   */
  async route(text) {
    const scores = await this.scores(this.encode(text));
    return { expert: scores.indexOf(Math.max(...scores)), scores };
  }

  /**
   * The expert's Specialist, loaded and verified on first use.
   * @param {number} e
   */
  async expert(e) {
    if (!this.loaded.has(e)) this.loaded.set(e, await this.open(this.members("expert")[e]));
    return this.loaded.get(e);
  }

  async release() {
    for (const m of [...this.routers, ...this.loaded.values()]) await m.release();
  }
}
