/* Export's int4 kernels (soup_export/native.py builds and calls them).

   fuse_q4: fuse S + sum_j A[m, j] E_j for every mix m of a batch (the sum first, then S, as
   soup_math.combine adds S to the product) and block-quantize the result (4 bits, blocks of 32
   along a row, symmetric: MLAS's convention, as quantize_nbits does) while it is still in
   registers, so no fp32 fused tensor is ever written to memory.
   quantize_q4: the same quantization of already fused values.

   shared: (rows * cols) fp32; bank: (n, rows * cols) fp32; A: (M, n) fp32, the mixes' alphas;
   q: (M, rows, cols / 32, 16) bytes (low nibble first); scales: (M, rows, cols / 32) fp32.
   Rows [r_begin, r_end) are done, so callers can split the rows between threads. cols % 32 == 0.

   The quantization step of a block is the same fp32 arithmetic as quantize_nbits: scale = signed
   extreme / -8 (1 where that is 0), level = round-half-even(w / scale) + 8 clamped to
   [0, 15]. fuse_q4's sums are accumulated in another order than torch's matrix product, so they
   can differ in their last bit (and a level at a rounding tie can differ by one). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));
typedef int vi16 __attribute__((vector_size(64)));
typedef unsigned char vb16 __attribute__((vector_size(16)));

static inline v16 vsel(vi16 m, v16 a, v16 b) { return (v16)(((vi16)a & m) | ((vi16)b & ~m)); }
static inline v16 vmin(v16 a, v16 b) { return vsel(a < b, a, b); }
static inline v16 vmax(v16 a, v16 b) { return vsel(a > b, a, b); }

static inline float reduce(v16 v, int is_min) {
    const vi16 p8 = {8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7};
    const vi16 p4 = {4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11};
    const vi16 p2 = {2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13};
    const vi16 p1 = {1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14};
    v16 t = __builtin_shuffle(v, p8);
    v = is_min ? vmin(v, t) : vmax(v, t);
    t = __builtin_shuffle(v, p4);
    v = is_min ? vmin(v, t) : vmax(v, t);
    t = __builtin_shuffle(v, p2);
    v = is_min ? vmin(v, t) : vmax(v, t);
    t = __builtin_shuffle(v, p1);
    v = is_min ? vmin(v, t) : vmax(v, t);
    return v[0];
}

/* One block of 32 values (w0: the first 16, w1: the next 16). */
static inline void quantize_block(v16 w0, v16 w1, uint8_t *q, float *scale) {
    float low = reduce(vmin(w0, w1), 1), high = reduce(vmax(w0, w1), 0);
    float extreme = high >= -low ? high : low;
    float s = extreme / -8.0f;
    if (s == 0.0f) s = 1.0f; /* an all-zero block (or one that underflows): as quantize_nbits */
    *scale = s;
    const v16 zero = {0}, eight = zero + 8.0f, fifteen = zero + 15.0f, magic = zero + 12582912.0f;
    v16 sv = zero + s;
    /* (x + 1.5 * 2^23) - 1.5 * 2^23 rounds half to even, like torch.round, for |x| < 2^22 (here |x| <= 8) */
    v16 l0 = ((w0 / sv + magic) - magic) + eight, l1 = ((w1 / sv + magic) - magic) + eight;
    l0 = vmin(vmax(l0, zero), fifteen);
    l1 = vmin(vmax(l1, zero), fifteen);
    const vi16 even = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
    const vi16 odd = {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
    v16 packed = __builtin_shuffle(l0, l1, even) + __builtin_shuffle(l0, l1, odd) * 16.0f;
    vb16 bytes = __builtin_convertvector(__builtin_convertvector(packed, vi16), vb16);
    memcpy(q, &bytes, 16);
}

#define BUFFER_FLOATS (1L << 17) /* 512 KB of bank rows per thread: they stay in L2 while every mix uses them */

int fuse_q4(const float *restrict shared, const float *restrict bank, long n, long rows, long cols,
            const float *restrict A, long M, long r_begin, long r_end, uint8_t *restrict q,
            float *restrict scales) {
    if (cols % 32 != 0) return 1;
    if (n < 1) return 3;
    long P = rows * cols, nb = cols / 32;
    long rb = BUFFER_FLOATS / (n * cols);
    if (rb < 1) rb = 1;
    float *buf = malloc(sizeof(float) * n * rb * cols);
    if (!buf) return 2;
    for (long r0 = r_begin; r0 < r_end; r0 += rb) {
        long rn = r_end - r0 < rb ? r_end - r0 : rb;
        for (long j = 0; j < n; j++) /* the experts' rows r0..r0+rn, contiguous per expert */
            memcpy(buf + j * rn * cols, bank + j * P + r0 * cols, sizeof(float) * rn * cols);
        for (long rr = 0; rr < rn; rr++) {
            long r = r0 + rr;
            for (long c0 = 0; c0 < cols; c0 += 32) {
                const v16u *sp = (const v16u *)(shared + r * cols + c0);
                v16 s0 = sp[0], s1 = sp[1], zero = {0};
                long blk = (r * nb) + c0 / 32;
                long m = 0;
                for (; m + 8 <= M; m += 8) { /* eight mixes at once: each expert row loaded once for eight */
                    v16 acc[16];
                    for (int i = 0; i < 16; i++) acc[i] = zero;
                    for (long j = 0; j < n; j++) {
                        const v16u *e = (const v16u *)(buf + (j * rn + rr) * cols + c0);
                        v16 e0 = e[0], e1 = e[1];
                        for (int i = 0; i < 8; i++) {
                            float x = A[(m + i) * n + j];
                            acc[2 * i] += x * e0;
                            acc[2 * i + 1] += x * e1;
                        }
                    }
                    for (int i = 0; i < 8; i++)
                        quantize_block(acc[2 * i] + s0, acc[2 * i + 1] + s1, q + ((m + i) * rows * nb + blk) * 16,
                                       scales + (m + i) * rows * nb + blk);
                }
                for (; m + 4 <= M; m += 4) { /* four mixes at once: each expert row loaded once for four */
                    v16 a00 = zero, a01 = zero, a10 = zero, a11 = zero, a20 = zero, a21 = zero, a30 = zero, a31 = zero;
                    for (long j = 0; j < n; j++) {
                        const v16u *e = (const v16u *)(buf + (j * rn + rr) * cols + c0);
                        v16 e0 = e[0], e1 = e[1];
                        float x0 = A[m * n + j], x1 = A[(m + 1) * n + j], x2 = A[(m + 2) * n + j], x3 = A[(m + 3) * n + j];
                        a00 += x0 * e0; a01 += x0 * e1; a10 += x1 * e0; a11 += x1 * e1;
                        a20 += x2 * e0; a21 += x2 * e1; a30 += x3 * e0; a31 += x3 * e1;
                    }
                    quantize_block(a00 + s0, a01 + s1, q + (m * rows * nb + blk) * 16, scales + m * rows * nb + blk);
                    quantize_block(a10 + s0, a11 + s1, q + ((m + 1) * rows * nb + blk) * 16, scales + (m + 1) * rows * nb + blk);
                    quantize_block(a20 + s0, a21 + s1, q + ((m + 2) * rows * nb + blk) * 16, scales + (m + 2) * rows * nb + blk);
                    quantize_block(a30 + s0, a31 + s1, q + ((m + 3) * rows * nb + blk) * 16, scales + (m + 3) * rows * nb + blk);
                }
                for (; m < M; m++) {
                    v16 a0 = zero, a1 = zero;
                    for (long j = 0; j < n; j++) {
                        const v16u *e = (const v16u *)(buf + (j * rn + rr) * cols + c0);
                        float x = A[m * n + j];
                        a0 += x * e[0]; a1 += x * e[1];
                    }
                    quantize_block(a0 + s0, a1 + s1, q + (m * rows * nb + blk) * 16, scales + m * rows * nb + blk);
                }
            }
        }
    }
    free(buf);
    return 0;
}

/* Quantize rows [r_begin, r_end) of w (rows, cols), already fused, exactly as fuse_q4 does. */
int quantize_q4(const float *restrict w, long rows, long cols, long r_begin, long r_end, uint8_t *restrict q,
                float *restrict scales) {
    if (cols % 32 != 0) return 1;
    long nb = cols / 32;
    for (long r = r_begin; r < r_end; r++)
        for (long b = 0; b < nb; b++) {
            const v16u *p = (const v16u *)(w + r * cols + b * 32);
            quantize_block(p[0], p[1], q + (r * nb + b) * 16, scales + r * nb + b);
        }
    return 0;
}
