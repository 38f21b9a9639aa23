/*
 * qkdnative: the C kernels of qkdnode.
 *
 * Plain C99 without Python headers, so that cffi can call every function with the GIL released
 * and the kernels can be compiled and tested on their own. One kernel family per .c file next to
 * this header; each declaration here is repeated in the cdef of build_native.py, which is what
 * Python sees.
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

#endif /* QKDNATIVE_H */
