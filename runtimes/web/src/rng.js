/**
 * numpy's `default_rng(seed)` (SeedSequence -> PCG64) and `Generator.choice(n, p=probs)`, so a
 * seeded sampled generation draws what soup-run draws from the same probabilities. BigInt is slow
 * but there is one draw per token.
 */
const M32 = 0xffffffffn;
const M64 = (1n << 64n) - 1n;
const M128 = (1n << 128n) - 1n;
const PCG_MULT = 0x2360ed051fc65da44385df649fccf645n;

/** @param {number} a @param {number} b  32-bit product mod 2^32 */
const mul32 = (a, b) => Math.imul(a, b) >>> 0;

/**
 * numpy SeedSequence(seed).generate_state(4, uint64) for a non-negative integer seed.
 * @param {number} seed
 * @returns {bigint[]}
 */
function seedState(seed) {
  let n = BigInt(seed);
  const entropy = [];
  do { entropy.push(Number(n & M32)); n >>= 32n; } while (n > 0n);
  let hashA = 0x43b0d7e5;
  const hashmix = (value) => {
    value = (value ^ hashA) >>> 0;
    hashA = mul32(hashA, 0x931e8875);
    value = mul32(value, hashA);
    return (value ^ (value >>> 16)) >>> 0;
  };
  const mix = (x, y) => {
    const r = (mul32(0xca01f9dd, x) - mul32(0x4973f715, y)) >>> 0;
    return (r ^ (r >>> 16)) >>> 0;
  };
  const pool = [0, 1, 2, 3].map((i) => hashmix(i < entropy.length ? entropy[i] : 0));
  for (let src = 0; src < 4; src++) for (let dst = 0; dst < 4; dst++) if (src !== dst) pool[dst] = mix(pool[dst], hashmix(pool[src]));
  for (let src = 4; src < entropy.length; src++) for (let dst = 0; dst < 4; dst++) pool[dst] = mix(pool[dst], hashmix(entropy[src]));
  let hashB = 0x8b51f9dd;
  const words = [];
  for (let i = 0; i < 8; i++) {
    let v = (pool[i % 4] ^ hashB) >>> 0;
    hashB = mul32(hashB, 0x58f38ded);
    v = mul32(v, hashB);
    words.push((v ^ (v >>> 16)) >>> 0);
  }
  return [0, 1, 2, 3].map((i) => BigInt(words[2 * i]) | (BigInt(words[2 * i + 1]) << 32n));
}

/** numpy.random.default_rng(seed): random() doubles and choice(probabilities). */
export class Rng {
  /** @param {number} seed  a non-negative integer */
  constructor(seed) {
    if (!Number.isSafeInteger(seed) || seed < 0) throw new RangeError(`seed must be a non-negative integer, got ${seed}`);
    const [s0, s1, i0, i1] = seedState(seed);
    this.inc = ((((i0 << 64n) | i1) << 1n) | 1n) & M128;
    this.state = 0n;
    this.next64();
    this.state = (this.state + ((s0 << 64n) | s1)) & M128;
    this.next64();
  }

  /** PCG64 (XSL-RR): advance, then output 64 bits of the new state. */
  next64() {
    this.state = (this.state * PCG_MULT + this.inc) & M128;
    const x = ((this.state >> 64n) ^ this.state) & M64;
    const rot = this.state >> 122n;
    return ((x >> rot) | (x << ((64n - rot) & 63n))) & M64;
  }

  /** A double in [0, 1), as numpy's Generator.random(). */
  random() {
    return Number(this.next64() >> 11n) / 9007199254740992;
  }

  /**
   * An index drawn with the given probabilities, as numpy's Generator.choice(len(p), p=p).
   * @param {Float64Array} p
   */
  choice(p) {
    const cdf = new Float64Array(p.length);
    let running = 0;
    for (let i = 0; i < p.length; i++) cdf[i] = running += p[i];
    const last = cdf[cdf.length - 1];
    for (let i = 0; i < cdf.length; i++) cdf[i] /= last;
    const u = this.random();
    let lo = 0;
    let hi = cdf.length;
    while (lo < hi) { const mid = (lo + hi) >> 1; if (cdf[mid] <= u) lo = mid + 1; else hi = mid; }
    return lo;
  }
}
