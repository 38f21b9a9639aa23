/*
 * qkdnative: the C kernels of qkdnode.
 *
 * Plain C99 without Python headers, so that cffi can call every function with the GIL released
 * and the kernels can be compiled and tested on their own. One kernel family per .c file next to
 * this header; each declaration here is repeated in the cdef of build_native.py, which is what
 * Python sees. docs/native.md describes the bit order, the algorithms and the security bounds.
 *
 * These functions handle key material, so none of them branches on or indexes memory by the
 * data: running time depends on lengths only.
 */
#ifndef QKDNATIVE_H
#define QKDNATIVE_H

#include <stddef.h>
#include <stdint.h>

/* ---- xor.c ---- */

/*
 * dst[i] = a[i] ^ b[i] for i < n: the one-time pad, and the hop-by-hop key relay of a trusted node.
 * dst may be exactly a or b, for in-place use; any other overlap is undefined because the buffers
 * are processed a word at a time.
 */
void qkd_xor(uint8_t *dst, const uint8_t *a, const uint8_t *b, size_t n);

/* ---- cpu.c: which implementation of the carry-less kernels runs ---- */

#define QKD_IMPL_AUTO (-1)    /* the best the CPU supports (the default) */
#define QKD_IMPL_PORTABLE 0   /* C99 only; the reference, on every machine */
#define QKD_IMPL_PCLMUL 1     /* x86-64 PCLMULQDQ on 128-bit SSE registers */
#define QKD_IMPL_AVX512 2     /* x86-64 VPCLMULQDQ on 512-bit AVX-512 registers */

/* 1 if impl (one of QKD_IMPL_*) can run on this machine, else 0. AUTO is always available. */
int qkd_impl_available(int impl);

/*
 * Force an implementation (for tests and benchmarks, which compare them; all give identical
 * results), or QKD_IMPL_AUTO to go back to the default. Returns 0, or -1 (and changes nothing)
 * if impl is unknown or unavailable. A plain global: do not call while other threads hash.
 */
int qkd_set_impl(int impl);

/* The implementation the next call will use: never QKD_IMPL_AUTO. */
int qkd_get_impl(void);

/* ---- toeplitz.c: Toeplitz hashing (privacy amplification) ---- */

/*
 * Bit k of a byte string buf is (buf[k >> 3] >> (k & 7)) & 1. With seed holding
 * n_in + n_out - 1 bits and data n_in bits, sets output bit j, for j < n_out, to
 *     XOR over i < n_in of seed_bit(j - i + n_in - 1) & data_bit(i)
 * and writes ceil(n_out / 8) bytes to out, unused high bits of the last byte zero. Bits of seed
 * and data beyond their n_in + n_out - 1 and n_in bits (the high bits of the last byte) are
 * ignored. out must not overlap the inputs.
 *
 * Returns 0, or -1 if the working memory (qkd_toeplitz_workspace) cannot be allocated or its
 * size overflows size_t, or -2 if a plan forced by qkd_toeplitz_force_plan does not fit these
 * sizes; out is then unspecified. Time O(N log N) for N = n_in + n_out (measured about linear
 * from 10^4 to 10^8 bits: docs/performance.md), independent of the bit values.
 */
int qkd_toeplitz(uint8_t *out, const uint8_t *seed, const uint8_t *data, uint64_t n_in,
                 uint64_t n_out);

/*
 * For tests: make qkd_toeplitz use one transform of 2^k elements (blocked = 0; k = 0 means the
 * shortest that fits) or square blocks with transforms of 2^k (blocked = 1), instead of the plan
 * its cost model picks (blocked = -1, the default). Every plan gives the same result, so tests
 * use this to reach, on small inputs, the code paths that only long inputs take. Returns 0, or
 * -1 for arguments out of range. A plain global like qkd_set_impl.
 */
int qkd_toeplitz_force_plan(int blocked, unsigned k);

/* Bytes of heap qkd_toeplitz(n_in, n_out) allocates at its peak (0 if it would overflow). */
uint64_t qkd_toeplitz_workspace(uint64_t n_in, uint64_t n_out);

/* Element i < 64 of the Cantor basis of GF(2^64) the transform uses (for the tests), else 0. */
uint64_t qkd_gf64_cantor(unsigned i);

/* ---- wegman_carter.c: Wegman-Carter authentication tags ---- */

#define QKD_WC_KEY_BYTES 16          /* hash key H, an element of GF(2^128) */
#define QKD_WC_HASH_BYTES 16         /* full hash output; tags are its first tag_len bytes */
#define QKD_WC_MIN_TAG_BYTES 8
#define QKD_WC_MAX_MESSAGE_BYTES 1048576 /* 1 MiB: the forgery bound assumes at most this */

/*
 * The polynomial hash over GF(2^128) (docs/native.md): the message in 16-byte blocks M_1..M_l
 * (the last one zero-padded) and a length block M_{l+1} holding the message length in bits,
 * hash = M_1 H^(l+1) + M_2 H^l + ... + M_{l+1} H. out gets 16 bytes. len must be at most
 * QKD_WC_MAX_MESSAGE_BYTES.
 */
void qkd_wc_hash(uint8_t *out, const uint8_t *key, const uint8_t *msg, size_t len);

/*
 * tag = first tag_len bytes of qkd_wc_hash(key, msg) XOR pad (tag_len bytes, used once).
 * QKD_WC_MIN_TAG_BYTES <= tag_len <= QKD_WC_HASH_BYTES. Returns 0, or -1 without writing tag if
 * the key is all zero (H = 0 hashes every message to 0) or a size is out of range.
 */
int qkd_wc_tag(uint8_t *tag, const uint8_t *key, const uint8_t *pad, size_t tag_len,
               const uint8_t *msg, size_t len);

/*
 * 1 if tag (tag_len bytes) is the tag of msg under key and pad, 0 if not, -1 on the errors of
 * qkd_wc_tag. The comparison takes the same time wherever the tags differ.
 */
int qkd_wc_verify(const uint8_t *tag, const uint8_t *key, const uint8_t *pad, size_t tag_len,
                  const uint8_t *msg, size_t len);

#endif /* QKDNATIVE_H */
