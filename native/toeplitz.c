/*
 * Toeplitz hashing for privacy amplification: an n_out x n_in binary Toeplitz matrix, given by
 * an (n_in + n_out - 1)-bit seed, times an n_in-bit vector, for n_in up to 10^8 and beyond.
 *
 * docs/native.md derives all of this; in short:
 *
 * 1. Output bit j = XOR_i seed(j - i + n - 1) & data(i) is coefficient n - 1 + j of the
 *    carry-less product seed(x) * data(x) of the two bit strings read as polynomials over GF(2)
 *    (bit k = coefficient of x^k). Only the m "middle" coefficients n-1 .. n+m-2 are needed.
 *
 * 2. Both polynomials are cut into 32-bit chunks, each chunk an element of GF(2^64) in the
 *    polynomial basis. A product of two chunks has degree <= 62 < 64, so the field's reduction
 *    never acts on it: the polynomial product over GF(2^64) of the chunk sequences gives, in each
 *    coefficient, the exact carry-less sum of chunk products, which are added back together 32
 *    bits apart (overlapping by 31 bits).
 *
 * 3. That product over GF(2^64) is computed with the additive FFT of Lin, Chung and Han ("Novel
 *    polynomial basis and its application to Reed-Solomon erasure codes", FOCS 2014) on the
 *    Cantor basis v_0 = 1, v_i^2 + v_i = v_(i-1): evaluate both at the 2^k points of the
 *    subspace V_k spanned by v_0..v_(k-1), multiply pointwise, interpolate. O(L log L) field
 *    multiplications for length L = 2^k, against O(n^1.58) for Karatsuba, which is what keeps
 *    the time within n log n from 10^5 to 10^7 bits. The transform wants its input in the
 *    "novel" basis X_i = prod_(bit j of i) s_j(y), where s_j is the vanishing polynomial of V_j;
 *    for the Cantor basis s_j(y) = sum over the bit-subsets t of j of y^(2^t), with coefficients
 *    in GF(2), so converting from and to the monomial basis takes only XORs (novel_basis.h).
 *
 * 4. Interpolation gives the product modulo s_k(y) = y^L + sum_(t subset of k, t != k) y^(2^t):
 *    a coefficient L + u of the true product folds onto u + 2^t. When the highest such 2^t is
 *    small (k = 16: s_16 = y^65536 + y), the folded terms land below the middle coefficients we
 *    need, so a transform only as long as the seed suffices, not seed + data.
 *
 * 5. Long inputs are cut into square blocks of the matrix (each a smaller Toeplitz matrix whose
 *    seed is a 2*beta - 1 bit window of the seed), so the transforms stay small enough for the
 *    cache; transforms of the data blocks and of the seed windows (one per block diagonal) are
 *    computed once and combined by pointwise multiply-accumulate. A cost model picks between
 *    one transform and blocks, and the transform length.
 *
 * Everything is data-oblivious: the control flow and memory accesses depend on n_in and n_out
 * only. The portable kernels and the PCLMULQDQ / AVX-512 ones (toeplitz_x86.c) compute the same
 * field operations, so results are bit-for-bit identical.
 */
#include <stdlib.h>
#include <string.h>

#include "qkdnative.h"
#include "clmul.h"
#include "gf64.h"

#define CHUNK_BITS 32 /* input bits per GF(2^64) element: chunk products stay below y^64 */
#define KMAX 24       /* longest transform: 2^24 elements, 128 MiB */

/*
 * The work arrays hold transforms of the (secret) input; they are cleared before being freed.
 * memset through a volatile pointer, so the compiler cannot drop it as a dead store.
 */
static void *(*const volatile wipe)(void *, int, size_t) = memset;

/*
 * The Cantor basis of GF(2^64) for y^64 + y^4 + y^3 + y + 1: v_0 = 1 and v_i the root of
 * v^2 + v = v_(i-1) whose constant coefficient is 0 (the other root is v_i + 1). Computed once
 * by solving these GF(2)-linear equations (docs/native.md has the script); tests check the
 * defining relation through qkd_gf64_cantor.
 */
static const uint64_t cantor[64] = {
    0x0000000000000001u, 0x19c9369f278adc02u, 0xa181e7d66f5ff794u, 0x5db84357ce785d08u,
    0xb973d466f5c9d0cau, 0x521ac889831a075eu, 0x033ce8beddc8a656u, 0xb5846c4e07b91010u,
    0x4087b8cbb37a32ecu, 0x00d0d3888c0ae17cu, 0xafd5ac70237f2222u, 0xe3f5af99cc3aaaf8u,
    0x5a1db3b16a0b58b8u, 0x09947c54fe7ee248u, 0x0e8eaf0e0068f544u, 0xa2a113500b4b4f5au,
    0xe96f9805d6ce0bb0u, 0x53496f8b5c9edd4cu, 0xad325cb6f4ac2a9eu, 0x4a8dcf8bd7ede826u,
    0xa3e9c552b6434210u, 0x5fa92ad9c9bc7ed0u, 0xa389f910cd7734deu, 0xe916f3dfca4609d8u,
    0xf89578714bd28f96u, 0x564dda59237a3352u, 0xad33bc6cc75aed38u, 0x57a3104fcd0e5f34u,
    0xb0f502e4cd60039au, 0xeb42e79f91f49f8cu, 0x54e5bf3774b3f850u, 0xb66864e6ec14b4d2u,
    0xed57ce778f0d6244u, 0x523aaf9d6148ba24u, 0xa8fcbfaac14940c6u, 0xe503eacfcef77780u,
    0xf3746c7b5183a372u, 0xec50d77d2f416218u, 0xf9cdf54569fe87e6u, 0xe576269915705e2cu,
    0xee2a197148fa8c72u, 0x49e31453575f365au, 0xb86698d88add0bc0u, 0x4f35fb218e7f37c0u,
    0xa306feea8a242832u, 0x5e5f06a9daead6e6u, 0xbe13089ecc784ea0u, 0xfe1a10738739c892u,
    0xe2266ceb0c5bc774u, 0xf490e6ed40d1dd1au, 0xf3f5f515077e92f0u, 0x467c20312e7eb0f0u,
    0xb06caa4295d350c2u, 0x5c5916d98a583c16u, 0xa04de5b4c7a1ceacu, 0x41430183d6e85ec0u,
    0xb361d8dabe3b3632u, 0x4357375d88b88b56u, 0xb057dcc8a19fbc9cu, 0xf26e1791be4b37c2u,
    0xe9f744031bfe63e4u, 0xe50803875e9ab776u, 0x44ee098f4d56753eu, 0x9dc338f8399031b4u,
};

uint64_t qkd_gf64_cantor(unsigned i)
{
    return i < 64 ? cantor[i] : 0;
}

/* ---- portable GF(2^64) kernels ---- */

/*
 * Reduce the 128-bit product hi*y^64 + lo modulo y^64 + y^4 + y^3 + y + 1, i.e. replace y^64 by
 * Q = y^4 + y^3 + y + 1. hi*Q overflows 64 bits by t = the top bits of hi shifted down; t*Q fits
 * in 8 bits, and as the low half of a product by Q is linear, lo + low(hi*Q) + t*Q =
 * lo + low((hi + t)*Q).
 */
static inline uint64_t gf64_reduce(uint64_t hi, uint64_t lo)
{
    uint64_t h = hi ^ (hi >> 63) ^ (hi >> 61) ^ (hi >> 60);
    return lo ^ h ^ (h << 1) ^ (h << 3) ^ (h << 4);
}

uint64_t qkd_gf64_mul(uint64_t a, uint64_t b)
{
    uint64_t hi, lo;
    qkd_clmul64(a, b, &hi, &lo);
    return gf64_reduce(hi, lo);
}

/*
 * Forward transform, layer by layer from the top (Lin-Chung-Han, iterative form). A block of
 * 2*half coefficients starting at index base holds a polynomial to be evaluated on the coset
 * omega(base) + V_(i+1); writing it as P0 + s_i * P1, s_i takes the value s_i(omega(base)) =
 * omega(base >> i) on the first half of the coset and that + 1 on the second, so
 *     a = P0 + s_i(omega(base)) P1,  b = a + P1
 * are the polynomials to evaluate on the two halves. base >> i = 2 * block, hence tw[block].
 * Block 0 has twiddle omega(0) = 0, so its multiplications are skipped.
 */
static void fft_portable(uint64_t *x, unsigned k, const uint64_t *tw)
{
    size_t len = (size_t)1 << k;
    unsigned i;

    for (i = k; i-- > 0;) {
        size_t half = (size_t)1 << i, blk, t;
        for (blk = 0; blk < len >> (i + 1); blk++) {
            uint64_t *a = x + 2 * half * blk, *b = a + half;
            if (blk != 0)
                for (t = 0; t < half; t++)
                    a[t] ^= qkd_gf64_mul(tw[blk], b[t]);
            for (t = 0; t < half; t++)
                b[t] ^= a[t];
        }
    }
}

/* The same butterflies undone in reverse order: P1 = a + b, P0 = a + s * P1. */
static void ifft_portable(uint64_t *x, unsigned k, const uint64_t *tw)
{
    size_t len = (size_t)1 << k;
    unsigned i;

    for (i = 0; i < k; i++) {
        size_t half = (size_t)1 << i, blk, t;
        for (blk = 0; blk < len >> (i + 1); blk++) {
            uint64_t *a = x + 2 * half * blk, *b = a + half;
            for (t = 0; t < half; t++)
                b[t] ^= a[t];
            if (blk != 0)
                for (t = 0; t < half; t++)
                    a[t] ^= qkd_gf64_mul(tw[blk], b[t]);
        }
    }
}

static void mul_portable(uint64_t *x, const uint64_t *y, size_t n)
{
    size_t i;
    for (i = 0; i < n; i++)
        x[i] = qkd_gf64_mul(x[i], y[i]);
}

static void mac_portable(uint64_t *acc, const uint64_t *x, const uint64_t *y, size_t n)
{
    size_t i;
    for (i = 0; i < n; i++)
        acc[i] ^= qkd_gf64_mul(x[i], y[i]);
}

const qkd_gf64_kernels qkd_gf64_portable = {
    fft_portable, ifft_portable, mul_portable, mac_portable,
    qkd_gf64_to_novel_portable, qkd_gf64_from_novel_portable,
};

static const qkd_gf64_kernels *active_kernels(void)
{
    switch (qkd_get_impl()) {
#if QKD_X86_AVX512
    case QKD_IMPL_AVX512:
        return &qkd_gf64_avx512;
#endif
#if QKD_X86_SIMD
    case QKD_IMPL_PCLMUL:
        return &qkd_gf64_pclmul;
#endif
    default:
        return &qkd_gf64_portable;
    }
}

/* ---- transform helpers: twiddles and basis conversion ---- */

/*
 * tw[b] = omega(2b) = sum over the bits j of b of v_(j+1), for b < 2^(k-1): the value of s_i at
 * the start of each block, for every layer i (see fft_portable).
 */
static void make_twiddles(uint64_t *tw, unsigned k)
{
    unsigned j;
    tw[0] = 0;
    for (j = 0; j + 1 < k; j++) {
        size_t step = (size_t)1 << j, b;
        for (b = 0; b < step; b++)
            tw[step + b] = tw[b] ^ cantor[j + 1];
    }
}

static void xor_range(uint64_t *restrict dst, const uint64_t *restrict src, size_t n)
{
    size_t i;
    for (i = 0; i < n; i++)
        dst[i] ^= src[i];
}

/*
 * The change of basis of one group of 16 coefficients: the divisions of the blocks of 16, 8 and
 * 4 by s_3 = y^8 + y^4 + y^2 + y, s_2 = y^4 + y and s_1 = y^2 + y, in registers. f = f0 + s_i * f1
 * with deg f0 < D = 2^i: each quotient coefficient f[c], c from 2D - 1 down to D, is added at
 * c - D + 2^t for the other terms y^(2^t) of s_i. (The base case of novel_basis.h.)
 */
static void novel16_fwd(uint64_t *f)
{
    uint64_t x[16];
    int t, b;
    memcpy(x, f, sizeof x);
    for (t = 15; t >= 8; t--) {
        x[t - 7] ^= x[t];
        x[t - 6] ^= x[t];
        x[t - 4] ^= x[t];
    }
    for (b = 0; b < 16; b += 8) {
        x[b + 4] ^= x[b + 7];
        x[b + 3] ^= x[b + 6];
        x[b + 2] ^= x[b + 5];
        x[b + 1] ^= x[b + 4];
    }
    for (b = 0; b < 16; b += 4) {
        x[b + 2] ^= x[b + 3];
        x[b + 1] ^= x[b + 2];
    }
    memcpy(f, x, sizeof x);
}

/* novel16_fwd undone: the same XORs in reverse order. */
static void novel16_inv(uint64_t *f)
{
    uint64_t x[16];
    int t, b;
    memcpy(x, f, sizeof x);
    for (b = 0; b < 16; b += 4) {
        x[b + 1] ^= x[b + 2];
        x[b + 2] ^= x[b + 3];
    }
    for (b = 0; b < 16; b += 8) {
        x[b + 1] ^= x[b + 4];
        x[b + 2] ^= x[b + 5];
        x[b + 3] ^= x[b + 6];
        x[b + 4] ^= x[b + 7];
    }
    for (t = 8; t < 16; t++) {
        x[t - 4] ^= x[t];
        x[t - 6] ^= x[t];
        x[t - 7] ^= x[t];
    }
    memcpy(f, x, sizeof x);
}

static void low16_fwd(uint64_t *x, size_t n)
{
    size_t g;
    for (g = 0; g < n; g += 16)
        novel16_fwd(x + g);
}

static void low16_inv(uint64_t *x, size_t n)
{
    size_t g;
    for (g = 0; g < n; g += 16)
        novel16_inv(x + g);
}

/* The basis conversions, from the template (novel_basis.h explains the algorithm). */
#define NB_FN(name) name##_portable
#define NB_TARGET
#define NB_XOR(dst, src, n) xor_range((dst), (src), (n))
#define NB_LOW16_FWD(x, n) low16_fwd((x), (n))
#define NB_LOW16_INV(x, n) low16_inv((x), (n))
#include "novel_basis.h"

void qkd_gf64_to_novel_portable(uint64_t *x, unsigned k)
{
    to_novel_portable(x, k);
}

void qkd_gf64_from_novel_portable(uint64_t *x, unsigned k)
{
    from_novel_portable(x, k);
}

/* ---- bits in and out ---- */

static unsigned bit_at(const uint8_t *buf, uint64_t pos)
{
    return (buf[pos >> 3] >> (pos & 7)) & 1u;
}

/* The chunk of bits lo .. lo + 31 of src, bit by bit, keeping those in [0, end). */
static uint64_t chunk_slow(const uint8_t *src, int64_t lo, int64_t end)
{
    uint64_t v = 0;
    int64_t p = lo < 0 ? 0 : lo;
    for (; p < lo + CHUNK_BITS && p < end; p++)
        v |= (uint64_t)bit_at(src, (uint64_t)p) << (p - lo);
    return v;
}

/*
 * Chunk a (a < ceil(len / 32)) is bits start + 32a .. start + 32a + 31 of src (which holds nbits
 * bits), keeping the bits in the window [start, start + len) and in [0, nbits), 0 elsewhere.
 * start may be negative (a seed window reaching before the seed). With high = 0 the chunks are
 * stored in dst[a] and the rest of dst, up to len_dst, is cleared; with high = 1 they are added
 * as the high 32 bits of dst[a], so that one basis conversion treats two arrays at once (see
 * split_pair). All but the few chunks at the edges take one unaligned 8-byte load; which path a
 * chunk takes depends on positions only.
 */

static void pack_chunks(uint64_t *dst, size_t len_dst, const uint8_t *src, uint64_t nbits,
                        int64_t start, uint64_t len, int high)
{
    int64_t nbytes = (int64_t)((nbits + 7) / 8);
    int64_t end = start + (int64_t)len; /* window end, exclusive */
    size_t count = (size_t)((len + CHUNK_BITS - 1) / CHUNK_BITS), a, first, last;
    unsigned shift = high ? 32 : 0;

    if (end > (int64_t)nbits)
        end = (int64_t)nbits;
    /*
     * Chunks first .. last-1 start at or after bit 0, end by the window's end and leave 8 bytes
     * to read from their first byte; every chunk's first bit has the same offset within its byte
     * (chunks are 4 bytes apart), so those take one load and one shift each.
     */
    first = start >= 0 ? 0 : (size_t)((-start + CHUNK_BITS - 1) / CHUNK_BITS);
    last = first;
    if (end - start >= CHUNK_BITS && nbytes >= 8) {
        int64_t room = 8 * (nbytes - 8) + 7 - start; /* chunk a may start up to room / 8 bytes in */
        int64_t by_end = (end - CHUNK_BITS - start) / CHUNK_BITS + 1;
        int64_t by_bytes = room < 0 ? 0 : room / CHUNK_BITS + 1;
        int64_t lim = by_end < by_bytes ? by_end : by_bytes;
        if (lim > (int64_t)count)
            lim = (int64_t)count;
        if (lim > (int64_t)first)
            last = (size_t)lim;
    }
    for (a = 0; a < count; a++) {
        int64_t lo = start + (int64_t)(CHUNK_BITS * a);
        uint64_t v;
        if (a == first && first < last) { /* the fast run */
            const uint8_t *p = src + (lo >> 3);
            unsigned sh = (unsigned)(lo & 7);
            for (; a < last; a++, p += CHUNK_BITS / 8) {
                v = (qkd_load_le64(p) >> sh) & 0xffffffffu;
                if (high)
                    dst[a] |= v << shift;
                else
                    dst[a] = v;
            }
            if (a == count)
                break;
            lo = start + (int64_t)(CHUNK_BITS * a);
        }
        v = chunk_slow(src, lo, end);
        if (high)
            dst[a] |= v << shift;
        else
            dst[a] = v;
    }
    if (!high)
        for (a = count; a < len_dst; a++)
            dst[a] = 0;
}

/*
 * The basis conversion is GF(2)-linear and acts on every bit of the elements alike, and chunks
 * have 32 bits, so two chunk arrays converted as the low and high halves of one array come out
 * as the halves of the result: this splits them into lo and hi.
 */
static void split_pair(uint64_t *lo, uint64_t *hi, size_t n)
{
    size_t i;
    for (i = 0; i < n; i++) {
        hi[i] = lo[i] >> 32;
        lo[i] &= 0xffffffffu;
    }
}

/*
 * Word c (32 bits at bit 32c) of the product whose chunk-product coefficients are C[0..len):
 * coefficient c contributes its low 32 bits there and coefficient c - 1 its high 31 bits.
 */
static uint64_t product_word(const uint64_t *C, size_t len, uint64_t c)
{
    uint64_t w = 0;
    if (c < len)
        w = C[c] & 0xffffffffu;
    if (c >= 1 && c - 1 < len)
        w ^= C[c - 1] >> 32;
    return w;
}

/*
 * Output bits bit0 .. bit0 + bout - 1 (cut at m; bit0 a multiple of 32) are product bits
 * bin - 1 .. bin + bout - 2 of the block whose coefficients are C. Writes whole bytes up to
 * out_bytes; the caller clears the bits beyond m in the last byte.
 */
static void extract_bits(uint8_t *out, size_t out_bytes, uint64_t bit0, uint64_t m,
                         const uint64_t *C, size_t len, uint64_t bin, uint64_t bout)
{
    uint64_t nbits = m - bit0 < bout ? m - bit0 : bout;
    uint64_t c0 = (bin - 1) / 32, words = (nbits + 31) / 32, u;
    unsigned sh = (unsigned)((bin - 1) % 32);
    uint8_t *dst = out + bit0 / 8;
    size_t room = out_bytes - (size_t)(bit0 / 8);

    for (u = 0; u < words; u++) {
        uint64_t w = product_word(C, len, c0 + u) >> sh;
        size_t nb = room - 4 * u < 4 ? room - 4 * u : 4, b;
        if (sh)
            w |= product_word(C, len, c0 + u + 1) << (32 - sh);
        for (b = 0; b < nb; b++)
            dst[4 * u + b] = (uint8_t)(w >> (8 * b));
    }
}

/* ---- planning ---- */

typedef struct {
    unsigned k;          /* transform length 2^k */
    int blocked;         /* 0: the whole matrix at once; 1: square blocks */
    uint64_t bin, bout;  /* block size: input bits, output bits */
    uint64_t P, Q;       /* number of blocks along the input and along the output */
    double cost;
    uint64_t bytes;      /* heap at the peak, 0 if it overflows */
} plan_t;

/*
 * Can a transform of length 2^k give output bits bin-1 .. bin+bout-2 of the product of a
 * (bin+bout-1)-bit seed and a bin-bit input? Both must fit (A, B <= L), the highest product word
 * needed (c_hi) too, and the folded coefficients (point 4 above), which land at
 * 1 .. A + B - 2 - L + 2^tmax, must stay below the lowest needed, c_lo.
 */
static int block_fits(unsigned k, uint64_t bin, uint64_t bout)
{
    uint64_t len = (uint64_t)1 << k;
    uint64_t A = (bin + bout - 1 + CHUNK_BITS - 1) / CHUNK_BITS;
    uint64_t B = (bin + CHUNK_BITS - 1) / CHUNK_BITS;
    uint64_t c0 = (bin - 1) / 32, sh = (bin - 1) % 32;
    uint64_t c_lo = c0 ? c0 - 1 : 0, c_hi = c0 + (bout + sh + 31) / 32 - 1;

    if (A > len || B > len || c_hi >= len)
        return 0;
    if (A + B - 1 <= len)
        return 1; /* nothing folds */
    return A + B - 2 - len + ((uint64_t)1 << (k & (k - 1))) < c_lo;
}

/*
 * The cost model, in nanoseconds per element of a transform as measured with the AVX-512
 * kernels (docs/performance.md; other kernels scale alike closely enough to choose a plan):
 * a butterfly, an XOR of the basis conversion (plus a fixed part per element), packing and
 * splitting an input, extracting an output, a multiply-accumulate. Transforms larger than the L2
 * cache (1 MiB) and than a typical L3 share (8 MiB) run slower, and so do multiply-accumulates
 * whose arrays do not fit in 16 MiB. Fresh memory beyond glibc's largest mmap threshold (32 MiB)
 * comes from the kernel zeroed page by page on every call. Each transform and each product of
 * two arrays also has a fixed cost (calls, loop set-up), which matters when a very lopsided
 * matrix (10^7 x 64) would otherwise be cut into hundreds of thousands of tiny blocks.
 */
#define NS_BUTTERFLY 0.22
#define NS_CONV_FIXED 0.3
#define NS_CONV_XOR 0.09
#define NS_PACK 0.4
#define NS_EXTRACT 0.1
#define NS_MAC 0.3
#define NS_MAC_OUT_OF_CACHE 0.8
#define NS_FRESH_BYTE 0.33
#define NS_PER_TRANSFORM 60.0
#define NS_PER_MAC_CALL 15.0

/* XORs per element of the basis conversion of 2^k elements (novel_basis.h). */
static double conv_xors(unsigned k)
{
    unsigned h = 1;
    if (k <= 1)
        return 0;
    while (2 * h < k)
        h *= 2;
    return (k - h) / 2.0 + conv_xors(k - h) + conv_xors(h);
}

/* Estimated time of t_fwd forward transforms, t_inv inverse ones and macs products. */
static double plan_ns(unsigned k, double t_fwd, double t_inv, double macs, double mac_bytes,
                      double bytes)
{
    double len = (double)((uint64_t)1 << k);
    double fft = NS_BUTTERFLY * k / 2, conv = NS_CONV_FIXED + NS_CONV_XOR * conv_xors(k);
    double slow = len * 8 <= (1 << 20) ? 1.0 : len * 8 <= (8 << 20) ? 1.9 : 3.5;
    double ns = len * slow * (t_fwd * (fft + conv / 2 + NS_PACK) + t_inv * (fft + conv + NS_EXTRACT));
    ns += len * macs * (mac_bytes <= (16 << 20) ? NS_MAC : NS_MAC_OUT_OF_CACHE);
    ns += (t_fwd + t_inv) * NS_PER_TRANSFORM + macs * NS_PER_MAC_CALL;
    if (bytes > (32 << 20))
        ns += bytes * NS_FRESH_BYTE;
    return ns;
}

/*
 * Heap of a plan in bytes, 0 on overflow: twiddles and transforms of 2^k elements: for one
 * block, the seed's and the input's; for square blocks, two seed windows (converted in pairs),
 * the P input blocks and the Q sums.
 */
static uint64_t plan_bytes(const plan_t *p)
{
    uint64_t len = (uint64_t)1 << p->k, arrays;
    if (!p->blocked)
        arrays = 2;
    else if (p->P > ((uint64_t)1 << 40) || p->Q > ((uint64_t)1 << 40))
        return 0;
    else
        arrays = 2 + p->P + p->Q;
    if (arrays > (uint64_t)SIZE_MAX / 8 / len - 1)
        return 0;
    return (arrays * len + len / 2) * 8;
}

/* The whole matrix as one block in a transform of 2^k; 0 if it does not fit. */
static int single_plan(uint64_t n, uint64_t m, unsigned k, plan_t *c)
{
    if (!block_fits(k, n, m))
        return 0;
    c->k = k;
    c->blocked = 0;
    c->bin = n;
    c->bout = m;
    c->P = c->Q = 1;
    c->bytes = plan_bytes(c);
    /* Two inputs converted as a pair, one product, one inverse transform. */
    c->cost = plan_ns(k, 2, 1, 1, 0, (double)c->bytes);
    return c->bytes != 0;
}

/* Square blocks of beta = 32b bits, b as large as a transform of 2^k allows; 0 if none fits. */
static int blocked_plan(uint64_t n, uint64_t m, unsigned k, plan_t *c)
{
    uint64_t lo = 0, hi = (uint64_t)1 << k, beta;
    while (lo < hi) { /* largest b that fits; block_fits is monotone in b */
        uint64_t mid = lo + (hi - lo + 1) / 2;
        if (block_fits(k, 32 * mid, 32 * mid))
            lo = mid;
        else
            hi = mid - 1;
    }
    if (lo == 0)
        return 0;
    beta = 32 * lo;
    c->k = k;
    c->blocked = 1;
    c->bin = c->bout = beta;
    c->P = n / beta + (n % beta != 0);
    c->Q = m / beta + (m % beta != 0);
    c->bytes = plan_bytes(c);
    /* P input blocks and P + Q - 1 seed windows, Q inverse transforms, P * Q products. */
    c->cost = plan_ns(k, (double)(2 * c->P + c->Q - 1), (double)c->Q,
                      (double)c->P * (double)c->Q, (double)(c->P + c->Q) * (double)((uint64_t)8 << k),
                      (double)c->bytes);
    return c->bytes != 0;
}

/* Set by qkd_toeplitz_force_plan (tests only): -1 automatic, 0 one block, 1 square blocks. */
static int forced_blocked = -1;
static unsigned forced_k = 0;

int qkd_toeplitz_force_plan(int blocked, unsigned k)
{
    if (blocked < -1 || blocked > 1 || k > KMAX)
        return -1;
    forced_blocked = blocked;
    forced_k = k;
    return 0;
}

/* 0 and the cheapest plan in *best; -1 if none fits in memory; -2 if the forced one cannot be. */
static int make_plan(uint64_t n, uint64_t m, plan_t *best)
{
    plan_t c;
    unsigned k;
    int found = 0;

    if (forced_blocked == 0 && forced_k != 0)
        return single_plan(n, m, forced_k, best) ? 0 : -2;
    if (forced_blocked == 1)
        return blocked_plan(n, m, forced_k, best) ? 0 : -2;
    for (k = 0; k <= KMAX; k++) { /* the shortest transform for the whole matrix */
        if (block_fits(k, n, m)) {
            found = single_plan(n, m, k, best);
            break;
        }
    }
    if (forced_blocked == 0)
        return found ? 0 : -1;
    for (k = 1; k <= KMAX; k++) {
        if (!blocked_plan(n, m, k, &c))
            continue;
        if (!found || c.cost < best->cost) {
            *best = c;
            found = 1;
        }
        if (c.bin >= n && c.bin >= m)
            break; /* one block covers everything; longer transforms only cost more */
    }
    return found ? 0 : -1;
}

uint64_t qkd_toeplitz_workspace(uint64_t n_in, uint64_t n_out)
{
    plan_t p;
    if (n_in == 0 || n_out == 0)
        return 0;
    if (n_in > ((uint64_t)1 << 60) || n_out > ((uint64_t)1 << 60) || make_plan(n_in, n_out, &p))
        return 0;
    return p.bytes;
}

int qkd_toeplitz(uint8_t *out, const uint8_t *seed, const uint8_t *data, uint64_t n_in,
                 uint64_t n_out)
{
    const qkd_gf64_kernels *kern = active_kernels();
    size_t out_bytes = (size_t)((n_out + 7) / 8), len, q;
    uint64_t seed_bits;
    uint64_t *tw = NULL, *work = NULL;
    plan_t p;
    int status;

    if (n_in > ((uint64_t)1 << 60) || n_out > ((uint64_t)1 << 60))
        return -1;
    if (n_in == 0 || n_out == 0) { /* an empty sum, or no output */
        memset(out, 0, out_bytes);
        return 0;
    }
    status = make_plan(n_in, n_out, &p);
    if (status)
        return status;
    len = (size_t)1 << p.k;
    seed_bits = n_in + n_out - 1;
    tw = malloc((len / 2 + 1) * sizeof *tw);
    /* One allocation for the seed transform, the input transforms and the sums. */
    work = malloc((size_t)((p.bytes / 8 - len / 2) * sizeof *work));
    if (tw == NULL || work == NULL) {
        free(tw);
        free(work);
        return -1;
    }
    make_twiddles(tw, p.k);
    memset(out, 0, out_bytes);

    if (!p.blocked) {
        uint64_t *S = work, *D = work + len;
        pack_chunks(S, len, seed, seed_bits, 0, seed_bits, 0);
        pack_chunks(S, len, data, n_in, 0, n_in, 1);
        kern->to_novel(S, p.k);
        split_pair(S, D, len);
        kern->fft(S, p.k, tw);
        kern->fft(D, p.k, tw);
        kern->mul(S, D, len);
        kern->ifft(S, p.k, tw);
        kern->from_novel(S, p.k);
        extract_bits(out, out_bytes, 0, n_out, S, len, n_in, n_out);
    } else {
        uint64_t *S0 = work, *S1 = work + len, *D = work + 2 * len;
        uint64_t *acc = D + (size_t)p.P * len;
        uint64_t beta = p.bin;
        int64_t b, r, P = (int64_t)p.P, Q = (int64_t)p.Q;
        memset(acc, 0, (size_t)p.Q * len * sizeof *acc);
        for (b = 0; b < P; b += 2) { /* input blocks b and b + 1, converted together */
            uint64_t *Db = D + (size_t)b * len;
            pack_chunks(Db, len, data, n_in, b * (int64_t)beta, beta, 0);
            if (b + 1 < P)
                pack_chunks(Db, len, data, n_in, (b + 1) * (int64_t)beta, beta, 1);
            kern->to_novel(Db, p.k);
            if (b + 1 < P)
                split_pair(Db, Db + len, len);
            kern->fft(Db, p.k, tw);
            if (b + 1 < P)
                kern->fft(Db + len, p.k, tw);
        }
        /*
         * Block (q, p) multiplies input block p by the window of the seed starting at
         * (q - p - 1) * beta + n_in: one window per diagonal r = q - p, transformed once (two
         * diagonals per basis conversion) and multiplied into the sums of its blocks.
         */
        for (r = 1 - P; r < Q; r += 2) {
            int64_t d;
            pack_chunks(S0, len, seed, seed_bits, (r - 1) * (int64_t)beta + (int64_t)n_in,
                        2 * beta - 1, 0);
            if (r + 1 < Q)
                pack_chunks(S0, len, seed, seed_bits, r * (int64_t)beta + (int64_t)n_in,
                            2 * beta - 1, 1);
            kern->to_novel(S0, p.k);
            split_pair(S0, S1, len);
            for (d = r; d < r + 2 && d < Q; d++) {
                uint64_t *S = d == r ? S0 : S1;
                int64_t qq = d > 0 ? d : 0, qend = d + P < Q ? d + P : Q;
                kern->fft(S, p.k, tw);
                for (; qq < qend; qq++)
                    kern->mac(acc + (size_t)qq * len, S, D + (size_t)(qq - d) * len, len);
            }
        }
        for (q = 0; q < (size_t)Q; q++) {
            uint64_t *Aq = acc + q * len;
            kern->ifft(Aq, p.k, tw);
            kern->from_novel(Aq, p.k);
            extract_bits(out, out_bytes, (uint64_t)q * beta, n_out, Aq, len, beta, beta);
        }
    }
    if (n_out % 8)
        out[out_bytes - 1] &= (uint8_t)((1u << (n_out % 8)) - 1);
    wipe(work, 0, (size_t)(p.bytes / 8 - len / 2) * sizeof *work);
    free(tw);
    free(work);
    return 0;
}
