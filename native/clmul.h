/*
 * Internal helpers shared by the kernels of qkdnative (not part of the cffi interface).
 *
 * Carry-less multiplication is the primitive of both Toeplitz hashing (toeplitz.c, over
 * GF(2^64)) and Wegman-Carter tags (wegman_carter.c, over GF(2^128)). Each kernel comes in a
 * portable C99 version, which is the reference and runs everywhere, and x86-64 versions using
 * PCLMULQDQ (and VPCLMULQDQ with AVX-512) compiled with function-level target attributes, so
 * the library builds with plain -O3 for the baseline x86-64 ISA and only executes the special
 * instructions after cpu.c has checked at run time that the CPU (and OS) support them.
 */
#ifndef QKD_CLMUL_H
#define QKD_CLMUL_H

#include <stddef.h>
#include <stdint.h>

/*
 * QKD_X86_SIMD: the compiler can build x86-64 intrinsics for targets other than the one the file
 * is compiled for (GCC >= 5 and clang have __attribute__((target)) and __builtin_cpu_supports).
 * On other compilers or architectures only the portable code exists.
 */
#if defined(__x86_64__) && (defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 5))
#define QKD_X86_SIMD 1
/* VPCLMULQDQ intrinsics appeared in GCC 8 and clang 6. */
#if defined(__clang__) ? (__clang_major__ >= 6) : (__GNUC__ >= 8)
#define QKD_X86_AVX512 1
#else
#define QKD_X86_AVX512 0
#endif
#else
#define QKD_X86_SIMD 0
#define QKD_X86_AVX512 0
#endif

/*
 * Little-endian loads and stores byte by byte: independent of the host byte order and of
 * alignment, and compilers turn them into a single move on little-endian machines.
 */
static inline uint64_t qkd_load_le64(const uint8_t *p)
{
    return (uint64_t)p[0] | (uint64_t)p[1] << 8 | (uint64_t)p[2] << 16 | (uint64_t)p[3] << 24 |
           (uint64_t)p[4] << 32 | (uint64_t)p[5] << 40 | (uint64_t)p[6] << 48 | (uint64_t)p[7] << 56;
}

static inline void qkd_store_le64(uint8_t *p, uint64_t v)
{
    int i;
    for (i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

/*
 * Low 64 bits of the carry-less product x * y, without tables or branches (the operands may be
 * key material, so the time must not depend on them). The bits of each operand are split into
 * four classes by position mod 4 and multiplied with ordinary integer multiplication: the 1-bits
 * of one class are 4 positions apart, so the 3 bits between two of them absorb the carries of
 * the sums. A position 4s of a product of two classes collects at most s + 1 <= 16 terms below
 * bit 64, and a sum of 16 can only carry out of the top position, beyond bit 63, so masking each
 * class keeps the parity, i.e. the carry-less result. (Technique of T. Pornin, BearSSL
 * ghash_ctmul64.c.) Integer multiplication takes constant time on the CPUs this runs on.
 */
static inline uint64_t qkd_bmul64_lo(uint64_t x, uint64_t y)
{
    const uint64_t m0 = 0x1111111111111111u, m1 = 0x2222222222222222u;
    const uint64_t m2 = 0x4444444444444444u, m3 = 0x8888888888888888u;
    uint64_t x0 = x & m0, x1 = x & m1, x2 = x & m2, x3 = x & m3;
    uint64_t y0 = y & m0, y1 = y & m1, y2 = y & m2, y3 = y & m3;
    uint64_t z0 = (x0 * y0) ^ (x1 * y3) ^ (x2 * y2) ^ (x3 * y1);
    uint64_t z1 = (x0 * y1) ^ (x1 * y0) ^ (x2 * y3) ^ (x3 * y2);
    uint64_t z2 = (x0 * y2) ^ (x1 * y1) ^ (x2 * y0) ^ (x3 * y3);
    uint64_t z3 = (x0 * y3) ^ (x1 * y2) ^ (x2 * y1) ^ (x3 * y0);
    return (z0 & m0) | (z1 & m1) | (z2 & m2) | (z3 & m3);
}

static inline uint64_t qkd_rev64(uint64_t x)
{
    x = ((x >> 1) & 0x5555555555555555u) | ((x & 0x5555555555555555u) << 1);
    x = ((x >> 2) & 0x3333333333333333u) | ((x & 0x3333333333333333u) << 2);
    x = ((x >> 4) & 0x0F0F0F0F0F0F0F0Fu) | ((x & 0x0F0F0F0F0F0F0F0Fu) << 4);
    x = ((x >> 8) & 0x00FF00FF00FF00FFu) | ((x & 0x00FF00FF00FF00FFu) << 8);
    x = ((x >> 16) & 0x0000FFFF0000FFFFu) | ((x & 0x0000FFFF0000FFFFu) << 16);
    return (x >> 32) | (x << 32);
}

/*
 * Full 128-bit carry-less product x * y = (*hi << 64) | *lo. Reversing the bit order of both
 * operands reverses the (127-bit) product, so the low half of the reversed product, reversed
 * back and shifted by one, is the high half of the product.
 */
static inline void qkd_clmul64(uint64_t x, uint64_t y, uint64_t *hi, uint64_t *lo)
{
    *lo = qkd_bmul64_lo(x, y);
    *hi = qkd_rev64(qkd_bmul64_lo(qkd_rev64(x), qkd_rev64(y))) >> 1;
}

#endif /* QKD_CLMUL_H */
