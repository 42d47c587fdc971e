/* Export's int4 kernels (soup_export/native.py builds and calls them).

   fuse_q4: fuse S + sum_j A[m, j] E_j for every mix m of a batch (the sum first, then S, as
   soup_math.combine adds S to the product) and block-quantize the result (4 bits, blocks of 32
   along a row, symmetric: MLAS's convention, as quantize_nbits does) while it is still in
   registers or L1, so no fp32 fused tensor is ever written to memory.
   quantize_q4: the same quantization of already fused values.

   shared: (rows * cols) fp32; bank: (n, rows * cols) fp32, or bf16 (bf16 != 0: 16-bit words, each
   value widened to fp32 exactly as it is read, so a bf16 bank gives the bytes of its values stored
   in fp32, reading half as many); A: (M, n) fp32, the mixes' alphas;
   q: (M, rows, cols / 32, 16) bytes (low nibble first); scales: (M, rows, cols / 32) fp32;
   in_place: several mixes' tiles read the bank in place (1) or a copy of each chunk (0): the same
   bytes; which is faster depends on the processor (native.py measures it once per machine).
   cols % 32 == 0. Both share the rows out to `threads` POSIX threads (the caller's thread is one
   of them) in small pieces taken as threads become free: starting threads here costs
   microseconds, where a Python thread pool cost a millisecond a call.

   The code is written once for the machine's vector width W (16 floats with AVX-512, 8 with AVX,
   4 otherwise) and its register count: a tile of TILE mixes x TCOLS columns keeps its TILE x TCOLS
   sums in registers (AVX-512: 8 x 32 in 16 of 32 registers; AVX2: 6 x 16 in 12 of 16; a tile
   that does not fit the register file spills every sum to the stack on each expert, 20x slower).

   Each mix's sum is the same chain of fused multiply-adds over j = 0..n-1 whichever tile of
   mixes (of width 1 to TILE) and whichever path (one mix, several) it falls in, so a mix's bytes do not
   depend on the batch it is exported in. The quantization step of a block is the same fp32
   arithmetic as quantize_nbits: scale = signed extreme / -8 (1 where that is 0), level =
   round-half-even(w / scale) + 8 clamped to [0, 15]. fuse_q4's sums are accumulated in another
   order than torch's matrix product, so they can differ in their last bit (and a level at a
   rounding tie can differ by one). */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#if defined(__AVX512F__)
#define W 16
#define TILE 8
#define TCOLS 32
#elif defined(__AVX__)
#define W 8
#define TILE 6
#define TCOLS 16
#elif defined(__aarch64__)
#define W 4
#define TILE 6
#define TCOLS 16
#else
#define W 4
#define TILE 2
#define TCOLS 16
#endif
#define G (TCOLS / W)  /* vectors per tile row */
#define VB (32 / W)    /* vectors per block */

typedef float vf __attribute__((vector_size(4 * W)));
typedef float vfu __attribute__((vector_size(4 * W), aligned(4)));
typedef int vi __attribute__((vector_size(4 * W)));
typedef unsigned char vb __attribute__((vector_size(W)));
typedef unsigned short vh __attribute__((vector_size(2 * W)));
typedef unsigned short vhu __attribute__((vector_size(2 * W), aligned(2)));
typedef unsigned int vu __attribute__((vector_size(4 * W)));

/* W bf16 values widened to fp32: the 16 bits become the high half of each float (exact). */
static inline vf widen(vhu h) { return (vf)(__builtin_convertvector((vh)h, vu) << 16); }

#if defined(__AVX512F__)
#include <immintrin.h>
/* MINPS/MAXPS are a < b ? a : b and a > b ? a : b exactly (the second operand for equal values,
   zeros of either sign and NaN), the generic definitions below, in one instruction */
static inline vf vmin(vf a, vf b) { return (vf)_mm512_min_ps((__m512)a, (__m512)b); }
static inline vf vmax(vf a, vf b) { return (vf)_mm512_max_ps((__m512)a, (__m512)b); }
#elif defined(__AVX__)
#include <immintrin.h>
static inline vf vmin(vf a, vf b) { return (vf)_mm256_min_ps((__m256)a, (__m256)b); }
static inline vf vmax(vf a, vf b) { return (vf)_mm256_max_ps((__m256)a, (__m256)b); }
#else
static inline vf vsel(vi m, vf a, vf b) { return (vf)(((vi)a & m) | ((vi)b & ~m)); }
static inline vf vmin(vf a, vf b) { return vsel(a < b, a, b); }
static inline vf vmax(vf a, vf b) { return vsel(a > b, a, b); }
#endif

/* lane permutations: halves, quarters, ... swapped (the horizontal reduction), and the even and
   odd lanes of two vectors (the nibble pairs) */
#if W == 16
static const vi SWAPS[4] = {{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7},
                            {4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11},
                            {2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13},
                            {1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14}};
#define EVEN {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30}
#define ODD {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31}
#elif W == 8
static const vi SWAPS[3] = {{4, 5, 6, 7, 0, 1, 2, 3}, {2, 3, 0, 1, 6, 7, 4, 5}, {1, 0, 3, 2, 5, 4, 7, 6}};
#define EVEN {0, 2, 4, 6, 8, 10, 12, 14}
#define ODD {1, 3, 5, 7, 9, 11, 13, 15}
#else
static const vi SWAPS[2] = {{2, 3, 0, 1}, {1, 0, 3, 2}};
#define EVEN {0, 2, 4, 6}
#define ODD {1, 3, 5, 7}
#endif
#define NSWAPS (sizeof(SWAPS) / sizeof(SWAPS[0]))

static inline float reduce_min(vf v) {
    for (unsigned k = 0; k < NSWAPS; k++) v = vmin(v, __builtin_shuffle(v, SWAPS[k]));
    return v[0];
}
static inline float reduce_max(vf v) {
    for (unsigned k = 0; k < NSWAPS; k++) v = vmax(v, __builtin_shuffle(v, SWAPS[k]));
    return v[0];
}

/* pairs(l0, l1): the 2 W levels of two vectors as W byte values, level 2 i + 16 x level 2 i + 1;
   store_bytes: the 16 byte values of a block (VB / 2 vectors of pairs()) as bytes, in order. With
   AVX the pairs are taken within 128-bit lanes (one instruction each), in the order
   0 1 4 5 2 3 6 7 of each vector's 8 bytes, which store_bytes' packing puts back in order. */
#if W == 8 && defined(__AVX2__)
static inline vf pairs(vf l0, vf l1) {
    __m256 even = _mm256_shuffle_ps((__m256)l0, (__m256)l1, 0x88), odd = _mm256_shuffle_ps((__m256)l0, (__m256)l1, 0xdd);
    return (vf)even + (vf)odd * 16.0f;
}
static inline void store_bytes(const vf *packed, uint8_t *q) {
    __m256i a = _mm256_cvttps_epi32((__m256)packed[0]), b = _mm256_cvttps_epi32((__m256)packed[1]);
    __m256i words = _mm256_packus_epi32(a, b);     /* lane 0: bytes 0 1 4 5 8 9 12 13; lane 1: 2 3 6 7 10 11 14 15 */
    __m256i bytes = _mm256_packus_epi16(words, words);
    __m128i lo = _mm256_castsi256_si128(bytes), hi = _mm256_extracti128_si256(bytes, 1);
    _mm_storeu_si128((__m128i *)q, _mm_unpacklo_epi16(lo, hi));
}
#else
static inline vf pairs(vf l0, vf l1) {
    const vi even = EVEN, odd = ODD;
    return __builtin_shuffle(l0, l1, even) + __builtin_shuffle(l0, l1, odd) * 16.0f;
}
static inline void store_bytes(const vf *packed, uint8_t *q) {
    for (int k = 0; k < VB / 2; k++) {
        vb bytes = __builtin_convertvector(__builtin_convertvector(packed[k], vi), vb);
        memcpy(q + k * W, &bytes, W);
    }
}
#endif

/* The scale of one block of 32 values (w[k] holding values k W .. k W + W - 1). */
static inline float block_scale(const vf *w) {
    vf lo = w[0], hi = w[0];
    for (int k = 1; k < VB; k++) {
        lo = vmin(lo, w[k]);
        hi = vmax(hi, w[k]);
    }
    float low = reduce_min(lo), high = reduce_max(hi);
    float extreme = high >= -low ? high : low;
    float s = extreme / -8.0f;
    return s == 0.0f ? 1.0f : s; /* an all-zero block (or one that underflows): as quantize_nbits */
}

/* The 16 bytes of one block's levels at scale s. */
static inline void block_levels(const vf *w, float s, uint8_t *q) {
    const vf zero = {0}, fifteen = zero + 15.0f, magic = zero + 12582912.0f, magic8 = magic - 8.0f;
    vf sv = zero + s, packed[VB / 2];
    for (int k = 0; k < VB; k += 2) {
        /* x + 1.5 * 2^23 rounds x half to even, like torch.round, to an integer (|x| < 2^22; here |x| <= 8);
           subtracting 1.5 * 2^23 - 8 then leaves round(x) + 8 exactly */
        vf l0 = (w[k] / sv + magic) - magic8, l1 = (w[k + 1] / sv + magic) - magic8;
        l0 = vmin(vmax(l0, zero), fifteen);
        l1 = vmin(vmax(l1, zero), fifteen);
        packed[k / 2] = pairs(l0, l1);
    }
    store_bytes(packed, q);
}

/* The block at f, plus the block at s unless s is NULL (already fused values are taken as they are). */
static inline void load_block(const float *f, const float *s, vf *w) {
    for (int k = 0; k < VB; k++) w[k] = s ? *(const vfu *)(f + k * W) + *(const vfu *)(s + k * W) : *(const vfu *)(f + k * W);
}

#define GROUP 8 /* blocks whose scales are found before any is encoded */

/* `count` blocks, block b the 32 values at f + b * fs plus those at s + b * ss (s may be NULL),
   quantized to q + b * qs and scales + b * cs. In groups of GROUP blocks: every scale of a group
   first, then every block's levels, so that the blocks' chains (reductions, scale, division)
   are independent work for the processor instead of one chain after another. */
static void quantize_blocks(const float *f, long fs, const float *s, long ss, long count, uint8_t *q, long qs,
                            float *scales, long cs) {
    for (long b0 = 0; b0 < count; b0 += GROUP) {
        long nb = count - b0 < GROUP ? count - b0 : GROUP;
        float sc[GROUP];
        vf w[VB];
        for (long b = b0; b < b0 + nb; b++) {
            load_block(f + b * fs, s ? s + b * ss : NULL, w);
            scales[b * cs] = sc[b - b0] = block_scale(w);
        }
        for (long b = b0; b < b0 + nb; b++) {
            load_block(f + b * fs, s ? s + b * ss : NULL, w);
            block_levels(w, sc[b - b0], q + b * qs);
        }
    }
}

/* T mixes' sums of TCOLS columns over the n experts (expert j's columns at e + j * stride):
   out[i * 32 + c] = sum_j A[i n + j] * expert j's column c, one multiply-add after another in j
   order. Out of line and specialised per T, so that each keeps its T x G sums in registers
   (built with -fno-tree-loop-distribute-patterns: GCC had made the zeroing a memset call). */
static inline __attribute__((always_inline)) void sums(int T, const float *restrict e, long stride, long n,
                                                      const float *restrict A, float *restrict out) {
    vf acc[8 * G];
    for (int i = 0; i < T * G; i++) acc[i] = (vf){0};
#pragma GCC unroll 2
    for (long j = 0; j < n; j++) {
        const vfu *p = (const vfu *)(e + j * stride);
        vf ev[G];
        for (int g = 0; g < G; g++) ev[g] = p[g];
        for (int i = 0; i < T; i++) {
            float x = A[i * n + j];
            for (int g = 0; g < G; g++) acc[i * G + g] += x * ev[g];
        }
    }
    for (int i = 0; i < T; i++)
        for (int g = 0; g < G; g++) *(vfu *)(out + i * 32 + g * W) = acc[i * G + g];
}
#define SUMS(T) static __attribute__((noinline)) void sums##T(const float *e, long s, long n, const float *A, float *o) { sums(T, e, s, n, A, o); }
SUMS(1) SUMS(2) SUMS(3) SUMS(4) SUMS(5) SUMS(6) SUMS(7) SUMS(8)
typedef void (*sums_fn)(const float *, long, long, const float *, float *);
/* every tile width up to TILE: a batch's last mixes take one tile of their own width */
static const sums_fn SUMS_OF[9] = {NULL, sums1, sums2, sums3, sums4, sums5, sums6, sums7, sums8};

#define MAX_CHUNK_FLOATS (1L << 17) /* 512 KB of bank rows per thread, at most */
#define PAD 16   /* floats after each expert's rows in a chunk: a block's n rows then fall in different cache sets */
/* one mix's values summed four experts at a time (2 KB of sums, in L1). A thread's piece of work
   is 16 spans: measured on the benchmark's single build (an AVX-512 Xeon), pieces of 32768 values
   had left the two threads unevenly loaded at the end of each tensor's job, and one expert per
   sweep of the sums had read the bank in shorter runs; 2048-value spans of one expert at a time
   took 63-64 ms per pass, 512-value spans of four experts 53-54 ms. */
#define SPAN 512

typedef struct {
    const float *shared, *bank, *A, *w;  /* bank: fp32, or (bf16) 16-bit words */
    long n, rows, cols, M;
    int bf16;           /* the bank holds bf16 words (widened as read; several mixes: into the chunk copy) */
    uint8_t *q;
    float *scales;
    int in_place;       /* several mixes: tiles read the bank where it is mapped (no chunk copy) */
    long unit;          /* rows per piece of work */
    long next;          /* the first row no thread has taken yet (atomic) */
    int rc;             /* a failure (2: a thread's chunk buffer could not be allocated; the call then
                           fails as a whole, whatever rows other threads did), 0 if none */
} Job;

/* One mix, rows [r0, r1): span after span of SPAN values, each summed over the experts four at a
   time (four sequential runs of the bank read together; each value is used once), then one at a
   time for the rest. The same multiply-adds in the same order as a tile's, so the same bits. */
/* Vector k of expert values at v: fp32, or bf16 words widened (BF16 is a constant in each caller). */
#define EXPERT(v, k) (BF16 ? widen(((const vhu *)(v))[k]) : ((const vfu *)(v))[k])

static inline __attribute__((always_inline)) void fuse_span(const Job *job, long p0, long len, vf *acc, const int BF16) {
    long n = job->n, P = job->rows * job->cols, es = BF16 ? 2 : 4;
    const char *bank = (const char *)job->bank;
    for (long k = 0; k < len / W; k++) acc[k] = (vf){0};
    long j = 0;
    for (; j + 4 <= n; j += 4) { /* four experts per sweep of the sums: the same multiply-adds, in j order */
        const char *e0 = bank + (j * P + p0) * es, *e1 = e0 + P * es, *e2 = e1 + P * es, *e3 = e2 + P * es;
        float x0 = job->A[j], x1 = job->A[j + 1], x2 = job->A[j + 2], x3 = job->A[j + 3];
        for (long k = 0; k < len / W; k++) {
            vf s = acc[k];
            s += x0 * EXPERT(e0, k);
            s += x1 * EXPERT(e1, k);
            s += x2 * EXPERT(e2, k);
            s += x3 * EXPERT(e3, k);
            acc[k] = s;
        }
    }
    for (; j < n; j++) {
        const char *e = bank + (j * P + p0) * es;
        float x = job->A[j];
        for (long k = 0; k < len / W; k++) acc[k] += x * EXPERT(e, k);
    }
}
static __attribute__((noinline)) void fuse_span32(const Job *job, long p0, long len, vf *acc) { fuse_span(job, p0, len, acc, 0); }
static __attribute__((noinline)) void fuse_span16(const Job *job, long p0, long len, vf *acc) { fuse_span(job, p0, len, acc, 1); }

static void fuse_one(const Job *job, long r0, long r1) {
    vf acc[SPAN / W];
    for (long p0 = r0 * job->cols; p0 < r1 * job->cols; p0 += SPAN) {
        long len = r1 * job->cols - p0 < SPAN ? r1 * job->cols - p0 : SPAN;
        (job->bf16 ? fuse_span16 : fuse_span32)(job, p0, len, acc);
        long blk = p0 / 32;
        quantize_blocks((const float *)acc, 32, job->shared + p0, 32, len / 32, job->q + blk * 16, 16,
                        job->scales + blk, 1);
    }
}

/* Several mixes, rows [r0, r1) (one chunk of bank). With `buf`, the rows of every expert are
   copied into it first, and every mix's tile then reads them from cache; while it computes, the
   rows [n0, n1) of the thread's next chunk are prefetched, a few lines after each tile, so that
   its copy reads them from cache rather than from memory (a copy from memory had been a third of
   a thread's time). Without, the tiles read the bank in place, each expert's 32 columns once per
   TILE mixes (faster on an Intel Xeon with AVX-512, whose prefetches of the copies stalled on
   the fill buffers; twice as slow on an AMD EPYC Zen 5). */
static void fuse_many(const Job *job, long r0, long r1, float *buf, long n0, long n1) {
    long n = job->n, rows = job->rows, cols = job->cols, M = job->M, P = rows * cols, nb = cols / 32;
    long rn = r1 - r0, stride = buf ? rn * cols + PAD : P;
    const float *base = buf ? buf - r0 * cols : job->bank;  /* expert j's row r at base + j stride + r cols */
    for (long j = 0; buf && j < n; j++) {
        if (!job->bf16) {
            memcpy(buf + j * stride, job->bank + j * P + r0 * cols, sizeof(float) * rn * cols);
            continue;
        }
        const vhu *h = (const vhu *)((const uint16_t *)job->bank + j * P + r0 * cols);
        for (long k = 0; k < rn * cols / W; k++) *(vfu *)(buf + j * stride + k * W) = widen(h[k]);
    }
    float out[TILE * 32];
    long per_expert = buf && n1 > n0 ? (n1 - n0) * cols / 16 : 0, left = n * per_expert, pj = 0, pl = 0;
    long calls = rn * nb * ((M + TILE - 1) / TILE) * (32 / TCOLS), per_block = (left + calls - 1) / calls;
    for (long r = r0; r < r1; r++)
        for (long c0 = 0; c0 < cols; c0 += 32) {
            const float *sp = job->shared + r * cols + c0;
            const float *e = base + r * cols + c0;
            long blk = r * nb + c0 / 32;
            for (long m = 0; m < M;) {
                int T = M - m >= TILE ? TILE : (int)(M - m);
                const float *a = job->A + m * n;
                for (long h = 0; h < 32; h += TCOLS) {
                    SUMS_OF[T](e + h, stride, n, a, out + h);
                    for (long k = 0; k < per_block && left > 0; k++, left--) {
                        __builtin_prefetch((const char *)job->bank + (pj * P + n0 * cols + pl * 16) * (job->bf16 ? 2 : 4), 0, 3);
                        if (++pl == per_expert) pl = 0, pj++;
                    }
                }
                quantize_blocks(out, 32, sp, 0, T, job->q + (m * rows * nb + blk) * 16, rows * nb * 16,
                                job->scales + m * rows * nb + blk, rows * nb);
                m += T;
            }
        }
}

static void quantize_rows(const Job *job, long r0, long r1) {
    long cols = job->cols, nb = cols / 32;
    quantize_blocks(job->w + r0 * cols, 32, NULL, 0, (r1 - r0) * nb, job->q + r0 * nb * 16, 16, job->scales + r0 * nb, 1);
}

/* A thread's share: pieces of `unit` rows, taken one at a time until none is left, so a thread
   that the system slows down (another process, export's file writer) simply takes fewer. */
static void *work(void *arg) {
    Job *job = arg;
    float *buf = NULL;
    if (job->bank && job->M > 1 && !job->in_place && !(buf = malloc(sizeof(float) * job->n * (job->unit * job->cols + PAD)))) {
        __atomic_store_n(&job->rc, 2, __ATOMIC_RELAXED);
        return NULL;
    }
    long r0 = __atomic_fetch_add(&job->next, job->unit, __ATOMIC_RELAXED);
    while (r0 < job->rows) {
        long r1 = r0 + job->unit < job->rows ? r0 + job->unit : job->rows;
        long next = __atomic_fetch_add(&job->next, job->unit, __ATOMIC_RELAXED);
        if (!job->bank) quantize_rows(job, r0, r1);
        else if (job->M == 1) fuse_one(job, r0, r1);
        else /* the next piece is taken before this one is computed, so that its rows are fetched meanwhile */
            fuse_many(job, r0, r1, buf, next, next + job->unit < job->rows ? next + job->unit : job->rows);
        r0 = next;
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

/* Bank floats a thread copies per chunk: a quarter of this core's L2 cache (the chunk, the next
   one being prefetched, and room for the outputs), at most MAX_CHUNK_FLOATS. */
static long chunk_floats(void) {
    static long cached;
    long c = __atomic_load_n(&cached, __ATOMIC_RELAXED);
    if (c) return c;
    long l2 = 0;
#ifdef _SC_LEVEL2_CACHE_SIZE
    l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
    c = l2 > 0 ? l2 / 4 / (long)sizeof(float) : MAX_CHUNK_FLOATS;
    if (c > MAX_CHUNK_FLOATS) c = MAX_CHUNK_FLOATS;
    if (c < 1L << 14) c = 1L << 14;
    __atomic_store_n(&cached, c, __ATOMIC_RELAXED);
    return c;
}

int fuse_q4(const float *shared, const void *bank, long n, long rows, long cols, const float *A, long M,
            long threads, uint8_t *q, float *scales, int in_place, int bf16) {
    if (cols % 32 != 0) return 1;
    if (bf16 && in_place && M > 1) return 5; /* a bf16 bank is widened into each chunk's copy */
    if (n < 1) return 3;
    if (M < 1) return M ? 4 : 0; /* no mix: nothing to write */
    if (rows < 1 || cols < 1) return rows < 0 || cols < 0 ? 1 : 0; /* an empty matrix: nothing to write */
    /* several mixes: a piece is a chunk of every expert's rows; one: 16 spans of every expert */
    long unit = M > 1 ? rows_per_piece(n * cols, chunk_floats()) : rows_per_piece(cols, 16 * SPAN);
    Job job = {shared, bank, A, NULL, n, rows, cols, M, bf16 != 0, q, scales, in_place != 0, unit, 0, 0};
    return run_job(&job, threads);
}

/* The quantization of w (rows, cols), already fused, exactly as fuse_q4 does it. */
int quantize_q4(const float *w, long rows, long cols, long threads, uint8_t *q, float *scales) {
    if (cols % 32 != 0 || rows < 0 || cols < 0) return 1;
    if (rows == 0 || cols == 0) return 0; /* an empty matrix: nothing to write */
    Job job = {NULL, NULL, NULL, w, 0, rows, cols, 1, 0, q, scales, 0, rows_per_piece(cols, 16 * SPAN), 0, 0};
    return run_job(&job, threads);
}

/* The bank floats a thread copies per chunk (for the tests, which shape their matrices by it). */
long chunk_size(void) { return chunk_floats(); }

/* The most mixes the kernel fuses together (a batch's last ones take one tile of their own width). */
int tile_width(void) { return TILE; }
