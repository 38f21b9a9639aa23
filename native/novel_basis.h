/*
 * Internal template: the change of basis between monomials and the novel polynomial basis of the
 * additive FFT (toeplitz.c), instantiated once per instruction set. The including file defines
 *   NB_FN(name)            the name of each function of this instance
 *   NB_TARGET              the function attributes of this instance (may be empty)
 *   NB_XOR(dst, src, n)    dst[i] ^= src[i] for i < n, the ranges never overlapping
 *   NB_LOW16_FWD(x, n)     the whole forward conversion of each group of 16 elements of x[0..n)
 *   NB_LOW16_INV(x, n)     its inverse
 * and gets NB_FN(to_novel)(x, k) and NB_FN(from_novel)(x, k) for arrays of 2^k elements.
 *
 * The novel basis is X_j = prod over the bits t of j of s_t(y), with s_t the subspace polynomials
 * of the Cantor basis, s_t = (y^2 + y) composed t times, so s_(a+b) = s_a(s_b(y)) and, for h a
 * power of two, s_h(y) = y^(2^h) + y. Split an index j of k bits as (j_hi, j_lo) with h low bits,
 * h the largest power of two below k: X_j(y) = X_(j_lo)(y) * X_(j_hi)(Y) with Y = y^(2^h) + y.
 * So converting f of 2^k coefficients is
 *   1. a Taylor expansion f = sum_u g_u(y) Y^u, each g_u of 2^h coefficients (Gao and Mateer,
 *      "Additive fast Fourier transforms over finite fields", 2010, Algorithm 1: Y^m with m a
 *      power of two is y^(2^h m) + y^m, so halving steps of pure XORs);
 *   2. the same conversion, of size 2^(k-h), applied in Y to the rows g_u as vector elements;
 *   3. the conversion of size 2^h of each row in y.
 * Per element that costs c(k) = (k - h)/2 + c(k - h) + c(h) XORs (16 for k = 16, against 32.5 for
 * dividing by each s_t in turn), and every step XORs contiguous ranges: rows of 2^h elements in
 * step 2, and small blocks that stay in the L1 cache in step 3. The order of the elements is the
 * same as the index j, so nothing is transposed.
 */

/*
 * In place, expand f (n elements of w words each) in powers of Y = y^t + y (n, t powers of two,
 * t >= 2): with n = 2tm, f = f0 + y^(tm) (f1 + y^((t-1)m) f2) equals g0 + Y^m g1 for
 * h = f1 + f2, g0 = f0 + y^m h, g1 = h + y^((t-1)m) f2, which the two XORs compute where f
 * lies; then each half is expanded in turn, depth first, so that the small levels run on data
 * already in the L1 cache.
 */
NB_TARGET static void NB_FN(taylor)(uint64_t *x, size_t n, size_t t, size_t w)
{
    size_t m;
    if (n <= t)
        return;
    m = n / (2 * t);
    NB_XOR(x + n / 2 * w, x + (n / 2 + (t - 1) * m) * w, m * w);
    NB_XOR(x + m * w, x + n / 2 * w, (t - 1) * m * w);
    NB_FN(taylor)(x, n / 2, t, w);
    NB_FN(taylor)(x + n / 2 * w, n / 2, t, w);
}

/* The inverse: each XOR is its own inverse, so the same steps in the opposite order. */
NB_TARGET static void NB_FN(taylor_inv)(uint64_t *x, size_t n, size_t t, size_t w)
{
    size_t m;
    if (n <= t)
        return;
    m = n / (2 * t);
    NB_FN(taylor_inv)(x, n / 2, t, w);
    NB_FN(taylor_inv)(x + n / 2 * w, n / 2, t, w);
    NB_XOR(x + m * w, x + n / 2 * w, (t - 1) * m * w);
    NB_XOR(x + n / 2 * w, x + (n / 2 + (t - 1) * m) * w, m * w);
}

static unsigned NB_FN(split_bits)(unsigned k)
{
    unsigned h = 1;
    while (2 * h < k)
        h *= 2;
    return h;
}

/* Monomial to novel basis of 2^k elements of w words each. */
NB_TARGET static void NB_FN(convert)(uint64_t *x, unsigned k, size_t w)
{
    unsigned h;
    size_t rows, r;
    if (k <= 1)
        return; /* X_0 = 1, X_1 = s_0 = y */
    h = NB_FN(split_bits)(k);
    rows = (size_t)1 << (k - h);
    NB_FN(taylor)(x, (size_t)1 << k, (size_t)1 << h, w);
    NB_FN(convert)(x, k - h, w << h);
    if (h == 4 && w == 1)
        NB_LOW16_FWD(x, rows << 4);
    else
        for (r = 0; r < rows; r++)
            NB_FN(convert)(x + r * (w << h), h, w);
}

NB_TARGET static void NB_FN(convert_inv)(uint64_t *x, unsigned k, size_t w)
{
    unsigned h;
    size_t rows, r;
    if (k <= 1)
        return;
    h = NB_FN(split_bits)(k);
    rows = (size_t)1 << (k - h);
    if (h == 4 && w == 1)
        NB_LOW16_INV(x, rows << 4);
    else
        for (r = 0; r < rows; r++)
            NB_FN(convert_inv)(x + r * (w << h), h, w);
    NB_FN(convert_inv)(x, k - h, w << h);
    NB_FN(taylor_inv)(x, (size_t)1 << k, (size_t)1 << h, w);
}

static void NB_FN(to_novel)(uint64_t *x, unsigned k)
{
    if (k == 4)
        NB_LOW16_FWD(x, 16);
    else
        NB_FN(convert)(x, k, 1);
}

static void NB_FN(from_novel)(uint64_t *x, unsigned k)
{
    if (k == 4)
        NB_LOW16_INV(x, 16);
    else
        NB_FN(convert_inv)(x, k, 1);
}
