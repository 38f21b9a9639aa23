#include <string.h>

#include "qkdnative.h"

void qkd_xor(uint8_t *dst, const uint8_t *a, const uint8_t *b, size_t n)
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
