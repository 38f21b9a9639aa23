/*
 * Internal: the GF(2^64) kernels of the additive FFT used by toeplitz.c, in one table of
 * function pointers per implementation (portable in toeplitz.c, SIMD in toeplitz_x86.c).
 *
 * GF(2^64) = GF(2)[y] / (y^64 + y^4 + y^3 + y + 1); an element is a uint64_t whose bit i is the
 * coefficient of y^i. Every implementation computes exactly the same function.
 */
#ifndef QKD_GF64_H
#define QKD_GF64_H

#include <stddef.h>
#include <stdint.h>

#include "clmul.h"

typedef struct {
    /*
     * In-place additive FFT of length 2^k (Lin-Chung-Han butterflies over the Cantor basis, see
     * toeplitz.c): x holds the coefficients of a polynomial in the novel basis and becomes its
     * values at the 2^k points of the subspace V_k. tw[b] = omega(2b) for b < 2^(k-1).
     */
    void (*fft)(uint64_t *x, unsigned k, const uint64_t *tw);
    /* The exact inverse of fft. */
    void (*ifft)(uint64_t *x, unsigned k, const uint64_t *tw);
    /* x[i] = x[i] * y[i] for i < n. */
    void (*mul)(uint64_t *x, const uint64_t *y, size_t n);
    /* acc[i] ^= x[i] * y[i] for i < n. */
    void (*mac)(uint64_t *acc, const uint64_t *x, const uint64_t *y, size_t n);
    /*
     * In-place change of basis of a polynomial of 2^k coefficients, from the monomial basis to
     * the novel basis of the transform, and back (XORs only; see toeplitz.c).
     */
    void (*to_novel)(uint64_t *x, unsigned k);
    void (*from_novel)(uint64_t *x, unsigned k);
} qkd_gf64_kernels;

extern const qkd_gf64_kernels qkd_gf64_portable;
#if QKD_X86_SIMD
extern const qkd_gf64_kernels qkd_gf64_pclmul;
#endif
#if QKD_X86_AVX512
extern const qkd_gf64_kernels qkd_gf64_avx512;
#endif

/* The portable product, for the SIMD kernels' scalar tails. */
uint64_t qkd_gf64_mul(uint64_t a, uint64_t b);

/* The portable basis conversions, which the PCLMULQDQ kernels use too. */
void qkd_gf64_to_novel_portable(uint64_t *x, unsigned k);
void qkd_gf64_from_novel_portable(uint64_t *x, unsigned k);

#endif /* QKD_GF64_H */
