/*
 * Wegman-Carter authentication: tag = polynomial hash of the message under a reusable key H,
 * XOR a one-time pad. docs/native.md states the forgery bound and the key each tag consumes.
 *
 * GF(2^128) = GF(2)[x] / (x^128 + x^7 + x^2 + x + 1), an element stored as 16 bytes
 * little-endian: bit k of the block (byte k >> 3, bit k & 7) is the coefficient of x^k, the bit
 * order used everywhere in qkdnative. That is GHASH's field without its bit reflection, so the
 * low qword of an SSE register is the low half of the polynomial and PCLMULQDQ applies directly.
 *
 * hash(H, M) = M_1 H^(l+1) + M_2 H^l + ... + M_l H^2 + M_(l+1) H, where M_1..M_l are the message
 * in 16-byte blocks (the last one zero-padded) and M_(l+1) is the length block (message length
 * in bits, 64-bit little-endian, then 8 zero bytes). Two different messages of the same length
 * differ in some M_i, and of different lengths in M_(l+1), so hash(H, M) - hash(H, M') - c is a
 * nonzero polynomial in H of degree <= l+1 and holds for at most l+1 of the 2^128 keys: the
 * family is (l+1)/2^128-almost-XOR-universal.
 */
#include <string.h>

#include "qkdnative.h"
#include "clmul.h"

typedef struct {
    uint64_t lo, hi; /* coefficients of x^0..x^63 and x^64..x^127 */
} gf128;

static gf128 load128(const uint8_t *p)
{
    gf128 r;
    r.lo = qkd_load_le64(p);
    r.hi = qkd_load_le64(p + 8);
    return r;
}

static void store128(uint8_t *p, gf128 v)
{
    qkd_store_le64(p, v.lo);
    qkd_store_le64(p + 8, v.hi);
}

/* memset through a volatile pointer: the compiler cannot drop it as a dead store. */
static void *(*const volatile wipe)(void *, int, size_t) = memset;

/*
 * Portable product: Karatsuba on the 64-bit halves (three carry-less products), then the
 * 256-bit result z3:z2:z1:z0 is reduced with x^128 = x^7 + x^2 + x + 1 =: R. z3 * x^192 becomes
 * z3 * R * x^64 (R has degree 7, so z3 * R spills 7 bits into z2), then z2 * x^128 becomes z2 * R.
 */
static gf128 gf128_mul_portable(gf128 a, gf128 b)
{
    uint64_t l_hi, l_lo, h_hi, h_lo, m_hi, m_lo, z0, z1, z2, z3;
    gf128 r;

    qkd_clmul64(a.lo, b.lo, &l_hi, &l_lo);
    qkd_clmul64(a.hi, b.hi, &h_hi, &h_lo);
    qkd_clmul64(a.lo ^ a.hi, b.lo ^ b.hi, &m_hi, &m_lo);
    m_lo ^= l_lo ^ h_lo;
    m_hi ^= l_hi ^ h_hi;
    z0 = l_lo;
    z1 = l_hi ^ m_lo;
    z2 = h_lo ^ m_hi;
    z3 = h_hi;

    z1 ^= z3 ^ (z3 << 1) ^ (z3 << 2) ^ (z3 << 7);
    z2 ^= (z3 >> 63) ^ (z3 >> 62) ^ (z3 >> 57);
    z0 ^= z2 ^ (z2 << 1) ^ (z2 << 2) ^ (z2 << 7);
    z1 ^= (z2 >> 63) ^ (z2 >> 62) ^ (z2 >> 57);
    r.lo = z0;
    r.hi = z1;
    return r;
}

/* Horner's rule, one multiplication per block. */
static void hash_portable(uint8_t *out, const uint8_t *key, const uint8_t *msg, size_t len)
{
    gf128 h = load128(key), acc = {0, 0}, m;
    size_t full = len / 16, i;
    uint8_t last[16];

    for (i = 0; i < full; i++) {
        m = load128(msg + 16 * i);
        acc.lo ^= m.lo;
        acc.hi ^= m.hi;
        acc = gf128_mul_portable(acc, h);
    }
    if (len % 16) {
        memset(last, 0, sizeof last);
        memcpy(last, msg + 16 * full, len % 16);
        m = load128(last);
        acc.lo ^= m.lo;
        acc.hi ^= m.hi;
        acc = gf128_mul_portable(acc, h);
    }
    acc.lo ^= (uint64_t)len * 8; /* the length block */
    acc = gf128_mul_portable(acc, h);
    store128(out, acc);
    wipe(&h, 0, sizeof h);
    wipe(&acc, 0, sizeof acc);
    wipe(last, 0, sizeof last);
}

#if QKD_X86_SIMD

#include <immintrin.h>

#define TARGET_CLMUL __attribute__((target("pclmul,sse2")))
#define AGGREGATE 8 /* blocks per reduction */

/* Unreduced product a * b added into the 256-bit sum lo + mid * x^64 + hi * x^128. */
TARGET_CLMUL static inline void mul_add(__m128i a, __m128i b, __m128i *lo, __m128i *mid,
                                        __m128i *hi)
{
    *lo = _mm_xor_si128(*lo, _mm_clmulepi64_si128(a, b, 0x00));
    *hi = _mm_xor_si128(*hi, _mm_clmulepi64_si128(a, b, 0x11));
    *mid = _mm_xor_si128(*mid, _mm_xor_si128(_mm_clmulepi64_si128(a, b, 0x01),
                                             _mm_clmulepi64_si128(a, b, 0x10)));
}

/*
 * The reduction of gf128_mul_portable with carry-less multiplications by R = 0x87: first z3 * R
 * (into z2:z1), then the updated z2 * R (into z1:z0).
 */
TARGET_CLMUL static inline __m128i reduce(__m128i lo, __m128i mid, __m128i hi)
{
    const __m128i r = _mm_set_epi64x(0, 0x87);
    __m128i t;
    lo = _mm_xor_si128(lo, _mm_slli_si128(mid, 8)); /* lo = z1:z0 */
    hi = _mm_xor_si128(hi, _mm_srli_si128(mid, 8)); /* hi = z3:z2 */
    t = _mm_clmulepi64_si128(hi, r, 0x01);          /* z3 * R */
    lo = _mm_xor_si128(lo, _mm_slli_si128(t, 8));
    hi = _mm_xor_si128(hi, _mm_srli_si128(t, 8));
    return _mm_xor_si128(lo, _mm_clmulepi64_si128(hi, r, 0x00)); /* + z2 * R */
}

TARGET_CLMUL static inline __m128i mul_clmul(__m128i a, __m128i b)
{
    __m128i lo = _mm_setzero_si128(), mid = lo, hi = lo;
    mul_add(a, b, &lo, &mid, &hi);
    return reduce(lo, mid, hi);
}

#define LOAD16(p) _mm_loadu_si128((const __m128i *)(const void *)(p))

/*
 * Horner's rule 8 blocks at a time: acc' = (acc + M_1) H^8 + M_2 H^7 + ... + M_8 H, whose eight
 * products are summed unreduced and reduced once, so the multiplications are independent and
 * overlap in the pipeline instead of waiting for each other.
 */
TARGET_CLMUL static void hash_clmul(uint8_t *out, const uint8_t *key, const uint8_t *msg,
                                    size_t len)
{
    __m128i pw[AGGREGATE], acc = _mm_setzero_si128();
    size_t full = len / 16, i = 0, j;
    uint8_t last[16];

    pw[0] = LOAD16(key); /* pw[j] = H^(j+1) */
    for (j = 1; j < AGGREGATE; j++)
        pw[j] = mul_clmul(pw[j - 1], pw[0]);
    for (; i + AGGREGATE <= full; i += AGGREGATE) {
        __m128i lo = _mm_setzero_si128(), mid = lo, hi = lo;
        const uint8_t *p = msg + 16 * i;
        mul_add(_mm_xor_si128(acc, LOAD16(p)), pw[AGGREGATE - 1], &lo, &mid, &hi);
        for (j = 1; j < AGGREGATE; j++)
            mul_add(LOAD16(p + 16 * j), pw[AGGREGATE - 1 - j], &lo, &mid, &hi);
        acc = reduce(lo, mid, hi);
    }
    for (; i < full; i++)
        acc = mul_clmul(_mm_xor_si128(acc, LOAD16(msg + 16 * i)), pw[0]);
    if (len % 16) {
        memset(last, 0, sizeof last);
        memcpy(last, msg + 16 * full, len % 16);
        acc = mul_clmul(_mm_xor_si128(acc, LOAD16(last)), pw[0]);
    }
    acc = mul_clmul(_mm_xor_si128(acc, _mm_set_epi64x(0, (long long)((uint64_t)len * 8))), pw[0]);
    _mm_storeu_si128((__m128i *)(void *)out, acc);
    wipe(pw, 0, sizeof pw);
    wipe(&acc, 0, sizeof acc);
    wipe(last, 0, sizeof last);
}

#endif /* QKD_X86_SIMD */

void qkd_wc_hash(uint8_t *out, const uint8_t *key, const uint8_t *msg, size_t len)
{
#if QKD_X86_SIMD
    if (qkd_get_impl() != QKD_IMPL_PORTABLE) { /* both SIMD tiers have PCLMULQDQ */
        hash_clmul(out, key, msg, len);
        return;
    }
#endif
    hash_portable(out, key, msg, len);
}

/* Checks shared by tag and verify; the zero test branches only on whether the key is zero. */
static int wc_args_ok(const uint8_t *key, size_t tag_len, size_t len)
{
    unsigned nonzero = 0, i;
    for (i = 0; i < QKD_WC_KEY_BYTES; i++)
        nonzero |= key[i];
    return nonzero != 0 && tag_len >= QKD_WC_MIN_TAG_BYTES && tag_len <= QKD_WC_HASH_BYTES &&
           len <= QKD_WC_MAX_MESSAGE_BYTES;
}

int qkd_wc_tag(uint8_t *tag, const uint8_t *key, const uint8_t *pad, size_t tag_len,
               const uint8_t *msg, size_t len)
{
    uint8_t h[QKD_WC_HASH_BYTES];
    size_t i;

    if (!wc_args_ok(key, tag_len, len))
        return -1;
    qkd_wc_hash(h, key, msg, len);
    for (i = 0; i < tag_len; i++)
        tag[i] = h[i] ^ pad[i];
    wipe(h, 0, sizeof h);
    return 0;
}

int qkd_wc_verify(const uint8_t *tag, const uint8_t *key, const uint8_t *pad, size_t tag_len,
                  const uint8_t *msg, size_t len)
{
    uint8_t h[QKD_WC_HASH_BYTES];
    unsigned diff = 0;
    size_t i;

    if (!wc_args_ok(key, tag_len, len))
        return -1;
    qkd_wc_hash(h, key, msg, len);
    /* Accumulate every difference, no early exit: the time does not tell where tags differ. */
    for (i = 0; i < tag_len; i++)
        diff |= (unsigned)(tag[i] ^ h[i] ^ pad[i]);
    wipe(h, 0, sizeof h);
    return (int)(1u & ((diff - 1u) >> 8)); /* 1 iff diff == 0, without a branch */
}
