/** Float64 helpers that reproduce numpy's arithmetic order, so sampled draws match soup-run's. */

/**
 * numpy's pairwise summation of a contiguous float64 array (blocks of 128, eight accumulators).
 * @param {Float64Array} a
 * @param {number} [start]
 * @param {number} [n]
 * @returns {number}
 */
export function pairwiseSum(a, start = 0, n = a.length) {
  if (n < 8) {
    let s = -0.0;
    for (let i = 0; i < n; i++) s += a[start + i];
    return s;
  }
  if (n <= 128) {
    const r = [0, 1, 2, 3, 4, 5, 6, 7].map((j) => a[start + j]);
    let i = 8;
    for (; i < n - (n % 8); i += 8) for (let j = 0; j < 8; j++) r[j] += a[start + i + j];
    let s = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    for (; i < n; i++) s += a[start + i];
    return s;
  }
  let half = Math.floor(n / 2);
  half -= half % 8;
  return pairwiseSum(a, start, half) + pairwiseSum(a, start + half, n - half);
}
