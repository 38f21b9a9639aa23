/*
 * x86-64 kernels of the GF(2^64) additive FFT (see toeplitz.c and gf64.h): PCLMULQDQ on 128-bit
 * registers (two field elements at a time) and VPCLMULQDQ on 512-bit AVX-512 registers (eight).
 *
 * Each function carries a target attribute, so this file compiles into a baseline x86-64 build;
 * cpu.c decides at run time whether they may be called. They compute exactly what the portable
 * kernels compute: a product in GF(2^64) is a 64x64 -> 128-bit carry-less multiplication and the
 * same reduction, y^64 = y^4 + y^3 + y + 1, done with shifts (cheaper here than two more
 * carry-less multiplications).
 */
#include "clmul.h"

#if QKD_X86_SIMD

#include <immintrin.h>

#include "gf64.h"

#define TARGET_CLMUL __attribute__((target("pclmul,sse2")))

/*
 * Products of the two elements of x by the two elements of y. The high halves of the 128-bit
 * products are gathered in hi, the low halves in lo, and hi is folded in as in gf64_reduce.
 */
TARGET_CLMUL static inline __m128i mul2(__m128i x, __m128i y)
{
    __m128i p0 = _mm_clmulepi64_si128(x, y, 0x00);
    __m128i p1 = _mm_clmulepi64_si128(x, y, 0x11);
    __m128i lo = _mm_unpacklo_epi64(p0, p1), hi = _mm_unpackhi_epi64(p0, p1);
    __m128i h = _mm_xor_si128(_mm_xor_si128(hi, _mm_srli_epi64(hi, 63)),
                              _mm_xor_si128(_mm_srli_epi64(hi, 61), _mm_srli_epi64(hi, 60)));
    __m128i r = _mm_xor_si128(_mm_xor_si128(lo, h), _mm_slli_epi64(h, 1));
    return _mm_xor_si128(r, _mm_xor_si128(_mm_slli_epi64(h, 3), _mm_slli_epi64(h, 4)));
}

#define LOAD2(p) _mm_loadu_si128((const __m128i *)(const void *)(p))
#define STORE2(p, v) _mm_storeu_si128((__m128i *)(void *)(p), (v))

/*
 * Layer 0 has one butterfly per block of two elements, each with its own twiddle: four elements
 * at a time, the two a's and the two b's are gathered into one register each, and the two
 * twiddles tw[2g], tw[2g+1] are already adjacent.
 */
TARGET_CLMUL static void layer0_fwd_clmul(uint64_t *x, size_t len, const uint64_t *tw)
{
    size_t g;
    for (g = 0; g < len / 4; g++) {
        __m128i v0 = LOAD2(x + 4 * g), v1 = LOAD2(x + 4 * g + 2);
        __m128i a = _mm_unpacklo_epi64(v0, v1), b = _mm_unpackhi_epi64(v0, v1);
        a = _mm_xor_si128(a, mul2(b, LOAD2(tw + 2 * g)));
        b = _mm_xor_si128(b, a);
        STORE2(x + 4 * g, _mm_unpacklo_epi64(a, b));
        STORE2(x + 4 * g + 2, _mm_unpackhi_epi64(a, b));
    }
}

TARGET_CLMUL static void layer0_inv_clmul(uint64_t *x, size_t len, const uint64_t *tw)
{
    size_t g;
    for (g = 0; g < len / 4; g++) {
        __m128i v0 = LOAD2(x + 4 * g), v1 = LOAD2(x + 4 * g + 2);
        __m128i a = _mm_unpacklo_epi64(v0, v1), b = _mm_unpackhi_epi64(v0, v1);
        b = _mm_xor_si128(b, a);
        a = _mm_xor_si128(a, mul2(b, LOAD2(tw + 2 * g)));
        STORE2(x + 4 * g, _mm_unpacklo_epi64(a, b));
        STORE2(x + 4 * g + 2, _mm_unpackhi_epi64(a, b));
    }
}

/* One layer with half >= 2: a block's butterflies share the twiddle tw[blk]. */
TARGET_CLMUL static void layer_fwd_clmul(uint64_t *x, size_t len, unsigned i, const uint64_t *tw)
{
    size_t half = (size_t)1 << i, blk, t;
    for (blk = 0; blk < len >> (i + 1); blk++) {
        uint64_t *pa = x + 2 * half * blk, *pb = pa + half;
        __m128i c = _mm_set1_epi64x((long long)tw[blk]);
        for (t = 0; t < half; t += 2) {
            __m128i a = LOAD2(pa + t), b = LOAD2(pb + t);
            if (blk != 0) /* twiddle 0 */
                a = _mm_xor_si128(a, mul2(b, c));
            b = _mm_xor_si128(b, a);
            STORE2(pa + t, a);
            STORE2(pb + t, b);
        }
    }
}

TARGET_CLMUL static void layer_inv_clmul(uint64_t *x, size_t len, unsigned i, const uint64_t *tw)
{
    size_t half = (size_t)1 << i, blk, t;
    for (blk = 0; blk < len >> (i + 1); blk++) {
        uint64_t *pa = x + 2 * half * blk, *pb = pa + half;
        __m128i c = _mm_set1_epi64x((long long)tw[blk]);
        for (t = 0; t < half; t += 2) {
            __m128i a = LOAD2(pa + t), b = LOAD2(pb + t);
            b = _mm_xor_si128(b, a);
            if (blk != 0)
                a = _mm_xor_si128(a, mul2(b, c));
            STORE2(pa + t, a);
            STORE2(pb + t, b);
        }
    }
}

static void fft_clmul(uint64_t *x, unsigned k, const uint64_t *tw)
{
    size_t len = (size_t)1 << k;
    unsigned i;
    if (k < 2) { /* fewer than the four elements layer 0 works on */
        qkd_gf64_portable.fft(x, k, tw);
        return;
    }
    for (i = k - 1; i >= 1; i--)
        layer_fwd_clmul(x, len, i, tw);
    layer0_fwd_clmul(x, len, tw);
}

static void ifft_clmul(uint64_t *x, unsigned k, const uint64_t *tw)
{
    size_t len = (size_t)1 << k;
    unsigned i;
    if (k < 2) {
        qkd_gf64_portable.ifft(x, k, tw);
        return;
    }
    layer0_inv_clmul(x, len, tw);
    for (i = 1; i < k; i++)
        layer_inv_clmul(x, len, i, tw);
}

TARGET_CLMUL static void mul_clmul(uint64_t *x, const uint64_t *y, size_t n)
{
    size_t i;
    for (i = 0; i + 2 <= n; i += 2)
        STORE2(x + i, mul2(LOAD2(x + i), LOAD2(y + i)));
    for (; i < n; i++)
        x[i] = qkd_gf64_mul(x[i], y[i]);
}

TARGET_CLMUL static void mac_clmul(uint64_t *acc, const uint64_t *x, const uint64_t *y, size_t n)
{
    size_t i;
    for (i = 0; i + 2 <= n; i += 2)
        STORE2(acc + i, _mm_xor_si128(LOAD2(acc + i), mul2(LOAD2(x + i), LOAD2(y + i))));
    for (; i < n; i++)
        acc[i] ^= qkd_gf64_mul(x[i], y[i]);
}

/* The basis conversions are XORs only; the portable ones already use SSE2 through -O3. */
const qkd_gf64_kernels qkd_gf64_pclmul = {
    fft_clmul, ifft_clmul, mul_clmul, mac_clmul,
    qkd_gf64_to_novel_portable, qkd_gf64_from_novel_portable,
};

#if QKD_X86_AVX512

#define TARGET_512 __attribute__((target("avx512f,vpclmulqdq,pclmul")))

/* Eight products at once, as mul2; ternary logic 0x96 is a three-way XOR. */
TARGET_512 static inline __m512i mul8(__m512i x, __m512i y)
{
    __m512i p0 = _mm512_clmulepi64_epi128(x, y, 0x00);
    __m512i p1 = _mm512_clmulepi64_epi128(x, y, 0x11);
    __m512i lo = _mm512_unpacklo_epi64(p0, p1), hi = _mm512_unpackhi_epi64(p0, p1);
    __m512i h = _mm512_ternarylogic_epi64(hi, _mm512_srli_epi64(hi, 63), _mm512_srli_epi64(hi, 61),
                                          0x96);
    __m512i r;
    h = _mm512_xor_si512(h, _mm512_srli_epi64(hi, 60));
    r = _mm512_ternarylogic_epi64(lo, h, _mm512_slli_epi64(h, 1), 0x96);
    return _mm512_ternarylogic_epi64(r, _mm512_slli_epi64(h, 3), _mm512_slli_epi64(h, 4), 0x96);
}

#define LOAD8(p) _mm512_loadu_si512((const void *)(p))
#define STORE8(p, v) _mm512_storeu_si512((void *)(p), (v))

/* The butterfly of fft_portable on eight pairs, and its inverse. */
TARGET_512 static inline void bfly_fwd(__m512i *a, __m512i *b, __m512i c)
{
    *a = _mm512_xor_si512(*a, mul8(*b, c));
    *b = _mm512_xor_si512(*b, *a);
}

TARGET_512 static inline void bfly_inv(__m512i *a, __m512i *b, __m512i c)
{
    *b = _mm512_xor_si512(*b, *a);
    *a = _mm512_xor_si512(*a, mul8(*b, c));
}

/* One layer with half >= 8: a block's butterflies share the twiddle tw[blk]. */
TARGET_512 static void layer_512(uint64_t *x, size_t len, unsigned i, const uint64_t *tw,
                                 int inverse)
{
    size_t half = (size_t)1 << i, blk, t;
    for (blk = 0; blk < len >> (i + 1); blk++) {
        uint64_t *pa = x + 2 * half * blk, *pb = pa + half;
        __m512i c = _mm512_set1_epi64((long long)tw[blk]);
        for (t = 0; t < half; t += 8) {
            __m512i a = LOAD8(pa + t), b = LOAD8(pb + t);
            if (inverse)
                bfly_inv(&a, &b, c);
            else
                bfly_fwd(&a, &b, c);
            STORE8(pa + t, a);
            STORE8(pb + t, b);
        }
    }
}

/*
 * Layers with half = 4, 2, 1 have blocks smaller than a register. Sixteen consecutive elements
 * (whole blocks) are permuted into a register of the eight a's and one of the eight b's, with a
 * register of their eight twiddles, and permuted back after the butterflies.
 */
typedef struct {
    __m512i a, b;         /* from the 16 elements (two registers) to the a's and the b's */
    __m512i back0, back1; /* from (a's, b's) back to the two registers of elements */
    __m512i tw;           /* from 8 consecutive twiddles to those of the eight a's */
    size_t tw_step;       /* twiddles per 16 elements */
} small_layer;

TARGET_512 static small_layer small_layer_perm(unsigned half)
{
    long long ia[8], ib[8], back[16], itw[8];
    small_layer s;
    unsigned e, l = 0;
    /* a-elements are those in the first half of their block; b = a + half. */
    for (e = 0; e < 16; e++) {
        if (!(e & half)) {
            ia[l] = e;
            ib[l] = e + half;
            itw[l] = e / (2 * half);
            back[e] = l;
            back[e + half] = 8 + l;
            l++;
        }
    }
    s.a = _mm512_loadu_si512((const void *)ia);
    s.b = _mm512_loadu_si512((const void *)ib);
    s.back0 = _mm512_loadu_si512((const void *)back);
    s.back1 = _mm512_loadu_si512((const void *)(back + 8));
    s.tw = _mm512_loadu_si512((const void *)itw);
    s.tw_step = 8 / half;
    return s;
}

/* One small layer on the group (v0, v1) number g. */
TARGET_512 static inline void small_bfly(__m512i *v0, __m512i *v1, const small_layer *s,
                                         const uint64_t *tw, size_t g, int inverse)
{
    __m512i a = _mm512_permutex2var_epi64(*v0, s->a, *v1);
    __m512i b = _mm512_permutex2var_epi64(*v0, s->b, *v1);
    /* At most 8 twiddles from tw + g * tw_step, all within the 2^(k-1) of the table. */
    __m512i c = _mm512_permutexvar_epi64(s->tw, LOAD8(tw + g * s->tw_step));
    if (inverse)
        bfly_inv(&a, &b, c);
    else
        bfly_fwd(&a, &b, c);
    *v0 = _mm512_permutex2var_epi64(a, s->back0, b);
    *v1 = _mm512_permutex2var_epi64(a, s->back1, b);
}

/* One layer with half = 4, 2 or 1 over all groups of 16. */
TARGET_512 static void small_layer_512(uint64_t *x, size_t len, unsigned half, const uint64_t *tw,
                                       int inverse)
{
    small_layer s = small_layer_perm(half);
    size_t g;
    for (g = 0; g < len / 16; g++) {
        __m512i v0 = LOAD8(x + 16 * g), v1 = LOAD8(x + 16 * g + 8);
        small_bfly(&v0, &v1, &s, tw, g, inverse);
        STORE8(x + 16 * g, v0);
        STORE8(x + 16 * g + 8, v1);
    }
}

/*
 * Layer by layer. (Doing two or four layers per pass over memory, to save loads and stores,
 * measured slower: the transform is bound by the carry-less multiplications and shifts, and the
 * longer dependency chains only delay them.)
 */
static void fft_512(uint64_t *x, unsigned k, const uint64_t *tw)
{
    size_t len = (size_t)1 << k;
    unsigned i;
    if (k < 4) { /* fewer than the 16 elements of small_layer_512 */
        fft_clmul(x, k, tw);
        return;
    }
    for (i = k - 1; i >= 3; i--)
        layer_512(x, len, i, tw, 0);
    small_layer_512(x, len, 4, tw, 0);
    small_layer_512(x, len, 2, tw, 0);
    small_layer_512(x, len, 1, tw, 0);
}

static void ifft_512(uint64_t *x, unsigned k, const uint64_t *tw)
{
    size_t len = (size_t)1 << k;
    unsigned i;
    if (k < 4) {
        ifft_clmul(x, k, tw);
        return;
    }
    small_layer_512(x, len, 1, tw, 1);
    small_layer_512(x, len, 2, tw, 1);
    small_layer_512(x, len, 4, tw, 1);
    for (i = 3; i < k; i++)
        layer_512(x, len, i, tw, 1);
}

TARGET_512 static void mul_512(uint64_t *x, const uint64_t *y, size_t n)
{
    size_t i;
    for (i = 0; i + 8 <= n; i += 8)
        STORE8(x + i, mul8(LOAD8(x + i), LOAD8(y + i)));
    for (; i < n; i++)
        x[i] = qkd_gf64_mul(x[i], y[i]);
}

TARGET_512 static void mac_512(uint64_t *acc, const uint64_t *x, const uint64_t *y, size_t n)
{
    size_t i;
    for (i = 0; i + 8 <= n; i += 8)
        STORE8(acc + i, _mm512_xor_si512(LOAD8(acc + i), mul8(LOAD8(x + i), LOAD8(y + i))));
    for (; i < n; i++)
        acc[i] ^= qkd_gf64_mul(x[i], y[i]);
}

/* ---- basis conversion (toeplitz.c explains the algorithm; this is the same, vectorised) ---- */

/* dst[i] ^= src[i] for i < n (non-overlapping), the last partial register under a mask. */
TARGET_512 static inline void xor_range_512(uint64_t *dst, const uint64_t *src, size_t n)
{
    size_t i;
    for (i = 0; i + 8 <= n; i += 8)
        STORE8(dst + i, _mm512_xor_si512(LOAD8(dst + i), LOAD8(src + i)));
    if (i < n) {
        __mmask8 m = (__mmask8)((1u << (n - i)) - 1);
        __m512i d = _mm512_maskz_loadu_epi64(m, dst + i), v = _mm512_maskz_loadu_epi64(m, src + i);
        _mm512_mask_storeu_epi64(dst + i, m, _mm512_xor_si512(d, v));
    }
}

/*
 * Lanes in mask of x get x[l] ^ src[l + delta] (within a register of eight coefficients; delta
 * is folded mod 8 into the permutation, and lanes where l + delta falls outside the register are
 * never in the mask).
 */
#define SHIFT_IDX(delta)                                                                           \
    _mm512_set_epi64((7 + (delta)) & 7, (6 + (delta)) & 7, (5 + (delta)) & 7, (4 + (delta)) & 7,  \
                     (3 + (delta)) & 7, (2 + (delta)) & 7, (1 + (delta)) & 7, (0 + (delta)) & 7)
#define MXOR(x, mask, delta, src)                                                                  \
    _mm512_mask_xor_epi64((x), (__mmask8)(mask), (x), _mm512_permutexvar_epi64(SHIFT_IDX(delta), (src)))

/*
 * The base case, the conversion of groups of 16 (toeplitz.c, novel16_fwd), in two registers.
 * Levels 1 and 2 within one register (blocks of 4 and 8): s_1 = y^2 + y gives, per block of 4,
 * f2 ^= f3 then f1 ^= f2; s_2 = y^4 + y gives f4 ^= f7, f3 ^= f6, f2 ^= f5 (independent), then
 * f1 ^= f4.
 */
TARGET_512 static inline __m512i level1_fwd(__m512i v)
{
    v = MXOR(v, 0x44, 1, v);
    return MXOR(v, 0x22, 1, v);
}

TARGET_512 static inline __m512i level1_inv(__m512i v)
{
    v = MXOR(v, 0x22, 1, v);
    return MXOR(v, 0x44, 1, v);
}

TARGET_512 static inline __m512i level2_fwd(__m512i v)
{
    v = MXOR(v, 0x1C, 3, v);
    return MXOR(v, 0x02, 3, v);
}

TARGET_512 static inline __m512i level2_inv(__m512i v)
{
    v = MXOR(v, 0x02, 3, v);
    return MXOR(v, 0x1C, 3, v);
}

/*
 * Level 3 on a group of 16 (v0 = f0..f7, v1 = f8..f15): s_3 = y^8 + y^4 + y^2 + y, so each
 * f_t, t = 15 down to 8, is added at t - 4, t - 6 and t - 7. First the sources f12..f15 (v1
 * lanes 4-7, which nothing here changes), then f8..f11 as they are after that.
 */
TARGET_512 static inline void level3_high(__m512i *v0, __m512i *v1)
{
    *v1 = MXOR(*v1, 0x0F, 4, *v1); /* t - 4 = 8..11 */
    *v1 = MXOR(*v1, 0x03, 6, *v1); /* t - 6 = 8, 9 from t = 14, 15 */
    *v1 = MXOR(*v1, 0x01, 7, *v1); /* t - 7 = 8 from t = 15 */
    *v0 = MXOR(*v0, 0xC0, -2, *v1); /* t - 6 = 6, 7 from t = 12, 13 */
    *v0 = MXOR(*v0, 0xE0, -1, *v1); /* t - 7 = 5, 6, 7 from t = 12, 13, 14 */
}

TARGET_512 static inline void level3_low(__m512i *v0, __m512i v1)
{
    *v0 = MXOR(*v0, 0xF0, -4, v1); /* t - 4 = 4..7 from t = 8..11 */
    *v0 = MXOR(*v0, 0x3C, -2, v1); /* t - 6 = 2..5 */
    *v0 = MXOR(*v0, 0x1E, -1, v1); /* t - 7 = 1..4 */
}

TARGET_512 static void novel_low_fwd_512(uint64_t *x, size_t len)
{
    size_t g;
    for (g = 0; g < len; g += 16) {
        __m512i v0 = LOAD8(x + g), v1 = LOAD8(x + g + 8);
        level3_high(&v0, &v1);
        level3_low(&v0, v1);
        v0 = level1_fwd(level2_fwd(v0));
        v1 = level1_fwd(level2_fwd(v1));
        STORE8(x + g, v0);
        STORE8(x + g + 8, v1);
    }
}

TARGET_512 static void novel_low_inv_512(uint64_t *x, size_t len)
{
    size_t g;
    for (g = 0; g < len; g += 16) {
        __m512i v0 = LOAD8(x + g), v1 = LOAD8(x + g + 8);
        v0 = level2_inv(level1_inv(v0));
        v1 = level2_inv(level1_inv(v1));
        level3_low(&v0, v1); /* XORs are their own inverses; undo in reverse order */
        level3_high(&v0, &v1);
        STORE8(x + g, v0);
        STORE8(x + g + 8, v1);
    }
}

#define NB_FN(name) name##_512
#define NB_TARGET TARGET_512
#define NB_XOR(dst, src, n) xor_range_512((dst), (src), (n))
#define NB_LOW16_FWD(x, n) novel_low_fwd_512((x), (n))
#define NB_LOW16_INV(x, n) novel_low_inv_512((x), (n))
#include "novel_basis.h"

const qkd_gf64_kernels qkd_gf64_avx512 = {
    fft_512, ifft_512, mul_512, mac_512, to_novel_512, from_novel_512,
};

#endif /* QKD_X86_AVX512 */

#else
/* ISO C wants at least one declaration in a translation unit. */
typedef int qkd_no_x86_kernels;
#endif /* QKD_X86_SIMD */
