#include <string.h>

#include "qkdnative.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

/*
 * From this size on the result bypasses the caches (non-temporal stores): a buffer this large
 * would evict itself from the L2 cache anyway, and a normal store first reads the destination
 * line into the cache (read-for-ownership), so writing around the cache saves a third of the
 * memory traffic of a XOR (64 MiB: 13 GB/s with normal stores, 19 GB/s without, against 20 GB/s
 * for memcpy on the development machine). Below it the result stays in the cache, where a caller
 * about to use it wants it.
 */
#define STREAM_THRESHOLD ((size_t)4 << 20)

static void xor_words(uint8_t *dst, const uint8_t *a, const uint8_t *b, size_t n)
{
    const size_t words = n / sizeof(uint64_t);
    size_t i;

    /*
     * memcpy is the portable way to load and store a word at any alignment without breaking
     * strict aliasing; compilers lower it to a single move and vectorise the loop. Both words
     * are loaded before the store, which is what makes dst == a or dst == b safe.
     */
    for (i = 0; i < words; i++) {
        uint64_t x, y;
        memcpy(&x, a + i * sizeof x, sizeof x);
        memcpy(&y, b + i * sizeof y, sizeof y);
        x ^= y;
        memcpy(dst + i * sizeof x, &x, sizeof x);
    }
    for (i = words * sizeof(uint64_t); i < n; i++)
        dst[i] = a[i] ^ b[i];
}

#if defined(__SSE2__)
/*
 * SSE2 is part of every x86-64 CPU, so this needs no run-time check. Streaming stores need a
 * 16-byte aligned destination: the bytes up to that alignment go through xor_words first. Each
 * 64-byte step loads all of its input before storing, so dst may again be a or b.
 */
static void xor_stream(uint8_t *dst, const uint8_t *a, const uint8_t *b, size_t n)
{
    size_t head = (16 - ((uintptr_t)dst & 15)) & 15, i;

    xor_words(dst, a, b, head);
    dst += head;
    a += head;
    b += head;
    n -= head;
    for (i = 0; i + 64 <= n; i += 64) {
        __m128i x0 = _mm_loadu_si128((const __m128i *)(const void *)(a + i));
        __m128i x1 = _mm_loadu_si128((const __m128i *)(const void *)(a + i + 16));
        __m128i x2 = _mm_loadu_si128((const __m128i *)(const void *)(a + i + 32));
        __m128i x3 = _mm_loadu_si128((const __m128i *)(const void *)(a + i + 48));
        __m128i y0 = _mm_loadu_si128((const __m128i *)(const void *)(b + i));
        __m128i y1 = _mm_loadu_si128((const __m128i *)(const void *)(b + i + 16));
        __m128i y2 = _mm_loadu_si128((const __m128i *)(const void *)(b + i + 32));
        __m128i y3 = _mm_loadu_si128((const __m128i *)(const void *)(b + i + 48));
        _mm_stream_si128((__m128i *)(void *)(dst + i), _mm_xor_si128(x0, y0));
        _mm_stream_si128((__m128i *)(void *)(dst + i + 16), _mm_xor_si128(x1, y1));
        _mm_stream_si128((__m128i *)(void *)(dst + i + 32), _mm_xor_si128(x2, y2));
        _mm_stream_si128((__m128i *)(void *)(dst + i + 48), _mm_xor_si128(x3, y3));
    }
    /* Streaming stores are weakly ordered: make them visible before the caller reads dst. */
    _mm_sfence();
    xor_words(dst + i, a + i, b + i, n - i);
}
#endif

void qkd_xor(uint8_t *dst, const uint8_t *a, const uint8_t *b, size_t n)
{
#if defined(__SSE2__)
    if (n >= STREAM_THRESHOLD) { /* a choice by size only, like everything here */
        xor_stream(dst, a, b, n);
        return;
    }
#endif
    xor_words(dst, a, b, n);
}
