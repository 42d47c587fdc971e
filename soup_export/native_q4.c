/* Export's int4 kernels (soup_export/native.py builds and calls them).

   fuse_q4: fuse S + sum_j A[m, j] E_j for every mix m of a batch (the sum first, then S, as
   soup_math.combine adds S to the product) and block-quantize the result (4 bits, blocks of 32
   along a row, symmetric: MLAS's convention, as quantize_nbits does) while it is still in
   registers, so no fp32 fused tensor is ever written to memory.
   quantize_q4: the same quantization of already fused values.

   shared: (rows * cols) fp32; bank: (n, rows * cols) fp32; A: (M, n) fp32, the mixes' alphas;
   q: (M, rows, cols / 32, 16) bytes (low nibble first); scales: (M, rows, cols / 32) fp32.
   cols % 32 == 0. Both share the rows out to `threads` POSIX threads (the caller's thread is one
   of them) in small pieces taken as threads become free: starting threads here costs
   microseconds, where a Python thread pool cost a millisecond a call.

   Each mix's sum is the same chain of fused multiply-adds over j = 0..n-1 whichever tile of
   mixes (8, 4 or 1) it falls in, so a mix's bytes do not depend on the batch it is exported in.
   The quantization step of a block is the same fp32 arithmetic as quantize_nbits: scale = signed
   extreme / -8 (1 where that is 0), level = round-half-even(w / scale) + 8 clamped to [0, 15].
   fuse_q4's sums are accumulated in another order than torch's matrix product, so they can differ
   in their last bit (and a level at a rounding tie can differ by one). */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));
typedef int vi16 __attribute__((vector_size(64)));
typedef unsigned char vb16 __attribute__((vector_size(16)));

#if defined(__AVX512F__)
#include <immintrin.h>
/* MINPS/MAXPS are a < b ? a : b and a > b ? a : b exactly (the second operand for equal values,
   zeros of either sign and NaN), the generic definitions below, in one instruction */
static inline v16 vmin(v16 a, v16 b) { return (v16)_mm512_min_ps((__m512)a, (__m512)b); }
static inline v16 vmax(v16 a, v16 b) { return (v16)_mm512_max_ps((__m512)a, (__m512)b); }
#else
static inline v16 vsel(vi16 m, v16 a, v16 b) { return (v16)(((vi16)a & m) | ((vi16)b & ~m)); }
static inline v16 vmin(v16 a, v16 b) { return vsel(a < b, a, b); }
static inline v16 vmax(v16 a, v16 b) { return vsel(a > b, a, b); }
#endif

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

/* T mixes' sums of one block over the n experts (expert j's 32 values at e + j * stride):
   out[2 i], out[2 i + 1] = sum_j A[i n + j] * expert j's block, one multiply-add after another in
   j order. Out of line and specialised per T, so that each keeps its 2 T sums in registers. */
static inline __attribute__((always_inline)) void sums(int T, const float *restrict e, long stride, long n,
                                                      const float *restrict A, v16 *restrict out) {
    v16 acc[16];
    for (int i = 0; i < 2 * T; i++) acc[i] = (v16){0};
    for (long j = 0; j < n; j++) {
        const v16u *p = (const v16u *)(e + j * stride);
        v16 e0 = p[0], e1 = p[1];
        for (int i = 0; i < T; i++) {
            float x = A[i * n + j];
            acc[2 * i] += x * e0;
            acc[2 * i + 1] += x * e1;
        }
    }
    for (int i = 0; i < 2 * T; i++) out[i] = acc[i];
}
static __attribute__((noinline)) void sums8(const float *e, long s, long n, const float *A, v16 *o) { sums(8, e, s, n, A, o); }
static __attribute__((noinline)) void sums4(const float *e, long s, long n, const float *A, v16 *o) { sums(4, e, s, n, A, o); }
static __attribute__((noinline)) void sums1(const float *e, long s, long n, const float *A, v16 *o) { sums(1, e, s, n, A, o); }

#define CHUNK_FLOATS (1L << 17) /* 512 KB of bank rows per thread: they stay in L2 while every mix uses them */
#define PAD 16 /* floats after each expert's rows in a chunk: a block's n rows then fall in different cache sets */
#define SPAN 2048 /* one mix's values summed expert after expert (8 KB: they stay in L1) */

typedef struct {
    const float *shared, *bank, *A, *w;
    long n, rows, cols, M;
    uint8_t *q;
    float *scales;
    long unit;          /* rows per piece of work */
    long next;          /* the first row no thread has taken yet (atomic) */
    int rc;             /* a failure (2: a thread's chunk buffer could not be allocated; the call then
                           fails as a whole, whatever rows other threads did), 0 if none */
} Job;

/* One mix, rows [r0, r1): expert after expert, each adding its next SPAN values to the span's
   sums, so the bank is read in long sequential runs (each value is used once). The same
   multiply-adds in the same order as a tile's, so the same bits. */
static void fuse_one(const Job *job, long r0, long r1) {
    long n = job->n, P = job->rows * job->cols;
    v16 acc[SPAN / 16];
    for (long p0 = r0 * job->cols; p0 < r1 * job->cols; p0 += SPAN) {
        long len = r1 * job->cols - p0 < SPAN ? r1 * job->cols - p0 : SPAN;
        for (long k = 0; k < len / 16; k++) acc[k] = (v16){0};
        for (long j = 0; j < n; j++) {
            const v16u *e = (const v16u *)(job->bank + j * P + p0);
            float x = job->A[j];
            for (long k = 0; k < len / 16; k++) acc[k] += x * e[k];
        }
        for (long k = 0; k < len / 16; k += 2) {
            const v16u *sp = (const v16u *)(job->shared + p0 + 16 * k);
            long blk = (p0 + 16 * k) / 32;
            quantize_block(acc[k] + sp[0], acc[k + 1] + sp[1], job->q + blk * 16, job->scales + blk);
        }
    }
}

/* Several mixes, rows [r0, r1) (at most CHUNK_FLOATS of bank): the rows of every expert are
   copied into buf first, and every mix's tile then reads them from cache. */
static void fuse_many(const Job *job, long r0, long r1, float *buf) {
    long n = job->n, rows = job->rows, cols = job->cols, M = job->M, P = rows * cols, nb = cols / 32;
    long rn = r1 - r0, stride = rn * cols + PAD;
    for (long j = 0; j < n; j++)
        memcpy(buf + j * stride, job->bank + j * P + r0 * cols, sizeof(float) * rn * cols);
    v16 out[16];
    for (long r = r0; r < r1; r++)
        for (long c0 = 0; c0 < cols; c0 += 32) {
            const v16u *sp = (const v16u *)(job->shared + r * cols + c0);
            v16 s0 = sp[0], s1 = sp[1];
            const float *e = buf + (r - r0) * cols + c0;
            long blk = r * nb + c0 / 32;
            for (long m = 0; m < M;) {
                int T = M - m >= 8 ? 8 : M - m >= 4 ? 4 : 1;
                const float *a = job->A + m * n;
                if (T == 8) sums8(e, stride, n, a, out);
                else if (T == 4) sums4(e, stride, n, a, out);
                else sums1(e, stride, n, a, out);
                for (int i = 0; i < T; i++)
                    quantize_block(out[2 * i] + s0, out[2 * i + 1] + s1, job->q + ((m + i) * rows * nb + blk) * 16,
                                   job->scales + (m + i) * rows * nb + blk);
                m += T;
            }
        }
}

static void quantize_rows(const Job *job, long r0, long r1) {
    long cols = job->cols, nb = cols / 32;
    for (long r = r0; r < r1; r++)
        for (long b = 0; b < nb; b++) {
            const v16u *p = (const v16u *)(job->w + r * cols + b * 32);
            quantize_block(p[0], p[1], job->q + (r * nb + b) * 16, job->scales + r * nb + b);
        }
}

/* A thread's share: pieces of `unit` rows, taken one at a time until none is left, so a thread
   that the system slows down (another process, export's file writer) simply takes fewer. */
static void *work(void *arg) {
    Job *job = arg;
    float *buf = NULL;
    if (job->bank && job->M > 1 && !(buf = malloc(sizeof(float) * job->n * (job->unit * job->cols + PAD)))) {
        __atomic_store_n(&job->rc, 2, __ATOMIC_RELAXED);
        return NULL;
    }
    for (;;) {
        long r0 = __atomic_fetch_add(&job->next, job->unit, __ATOMIC_RELAXED);
        if (r0 >= job->rows) break;
        long r1 = r0 + job->unit < job->rows ? r0 + job->unit : job->rows;
        if (!job->bank) quantize_rows(job, r0, r1);
        else if (buf) fuse_many(job, r0, r1, buf);
        else fuse_one(job, r0, r1);
    }
    free(buf);
    return NULL;
}

#define MAX_THREADS 64

/* `threads` threads (this one among them) work through the job's rows. */
static int run_job(Job *job, long threads) {
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    long pieces = (job->rows + job->unit - 1) / job->unit;
    if (threads > pieces) threads = pieces;
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (long t = 1; t < threads; t++)
        started[t] = pthread_create(&ids[t], NULL, work, job) == 0; /* none to be had: the others do more */
    work(job);
    for (long t = 1; t < threads; t++)
        if (started[t]) pthread_join(ids[t], NULL);
    return job->rc;
}

static long rows_per_piece(long cols, long floats) { return floats / cols > 1 ? floats / cols : 1; }

int fuse_q4(const float *shared, const float *bank, long n, long rows, long cols, const float *A, long M,
            long threads, uint8_t *q, float *scales) {
    if (cols % 32 != 0) return 1;
    if (n < 1) return 3;
    if (M < 1) return M ? 4 : 0; /* no mix: nothing to write */
    /* several mixes: a piece is a chunk of every expert's rows; one: 16 spans of every expert */
    long unit = M > 1 ? rows_per_piece(n * cols, CHUNK_FLOATS) : rows_per_piece(cols, 16 * SPAN);
    Job job = {shared, bank, A, NULL, n, rows, cols, M, q, scales, unit, 0, 0};
    return run_job(&job, threads);
}

/* The quantization of w (rows, cols), already fused, exactly as fuse_q4 does it. */
int quantize_q4(const float *w, long rows, long cols, long threads, uint8_t *q, float *scales) {
    if (cols % 32 != 0) return 1;
    Job job = {NULL, NULL, NULL, w, 0, rows, cols, 1, q, scales, rows_per_piece(cols, 16 * SPAN), 0, 0};
    return run_job(&job, threads);
}
