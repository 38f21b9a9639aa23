/*
 * Run-time choice between the portable and the x86-64 SIMD kernels.
 *
 * The SIMD kernels are compiled with function-level target attributes into an otherwise
 * baseline build, so the library loads on any x86-64 CPU; they may only be called after the
 * checks here. __builtin_cpu_supports also checks that the OS saves the AVX-512 registers.
 */
#include "qkdnative.h"
#include "clmul.h"

/* Set only by qkd_set_impl (tests, benchmarks); read by every call. */
static int forced_impl = QKD_IMPL_AUTO;

static int best_impl(void)
{
#if QKD_X86_SIMD
    __builtin_cpu_init(); /* idempotent; needed if we run before libgcc's constructor */
#if QKD_X86_AVX512
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("vpclmulqdq") &&
        __builtin_cpu_supports("pclmul"))
        return QKD_IMPL_AVX512;
#endif
    if (__builtin_cpu_supports("pclmul"))
        return QKD_IMPL_PCLMUL;
#endif
    return QKD_IMPL_PORTABLE;
}

int qkd_impl_available(int impl)
{
    /* The tiers are nested: a CPU with AVX-512 VPCLMULQDQ has PCLMULQDQ too. */
    return impl == QKD_IMPL_AUTO || (impl >= QKD_IMPL_PORTABLE && impl <= best_impl());
}

int qkd_set_impl(int impl)
{
    if (!qkd_impl_available(impl))
        return -1;
    forced_impl = impl;
    return 0;
}

int qkd_get_impl(void)
{
    return forced_impl == QKD_IMPL_AUTO ? best_impl() : forced_impl;
}
