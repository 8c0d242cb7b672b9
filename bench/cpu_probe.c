/* Measures what the theoretical-peak formula needs, on one core:
 *
 *   clock_ghz          a chain of dependent 1-cycle integer adds: adds per second = cycles per second
 *                      (the clock the core really runs at, boost included; /proc/cpuinfo in a VM often
 *                      shows only the nominal TSC frequency);
 *   fp32_flop_cycle    12 independent FMA chains in the widest vector unit (AVX-512, else AVX2):
 *                      FLOP/s divided by the measured clock (2 FLOP per lane per FMA);
 *   bf16_flop_cycle    the same with VDPBF16PS (32 bf16 products summed into 16 fp32 lanes).
 *
 * Built by bench/run_benchmarks.py with `cc -O3 -funroll-all-loops -march=native`; prints one JSON line.
 * Nine interleaved repetitions (clock, fp32, bf16, clock); other processes may preempt a repetition, which
 * lowers that repetition's apparent clock and throughput alike, so the ratios (FLOP/cycle) are robust and
 * the highest clock is the one the core reaches when it has the CPU to itself.
 */
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

/* One repetition of each measurement; main() interleaves them so that a FLOP/cycle figure is
 * computed from a clock measured moments before and after it. */
static double clock_ghz(void) {
    const long n = 25000000L; /* 4 adds each: 0.1 G cycles */
    long x = 0;
    double t = now();
    for (long i = 0; i < n; i++) {
        __asm__ volatile("add $1,%0\n\tadd $1,%0\n\tadd $1,%0\n\tadd $1,%0" : "+r"(x));
    }
    return 4.0 * n / (now() - t) / 1e9;
}

static float sink;

static double fp32_gflops(void) {
    const long m = 4000000L;
#if defined(__AVX512F__)
    __m512 a[12], b = _mm512_set1_ps(1.0000001f), c = _mm512_set1_ps(1e-7f);
    for (int k = 0; k < 12; k++) a[k] = _mm512_set1_ps((float)k);
    double t = now();
    for (long i = 0; i < m; i++)
        for (int k = 0; k < 12; k++) a[k] = _mm512_fmadd_ps(a[k], b, c);
    double dt = now() - t;
    for (int k = 0; k < 12; k++) sink += _mm512_reduce_add_ps(a[k]);
    return 12.0 * m * 16 * 2 / dt / 1e9;
#elif defined(__AVX2__) && defined(__FMA__)
    __m256 a[12], b = _mm256_set1_ps(1.0000001f), c = _mm256_set1_ps(1e-7f);
    for (int k = 0; k < 12; k++) a[k] = _mm256_set1_ps((float)k);
    double t = now();
    for (long i = 0; i < m; i++)
        for (int k = 0; k < 12; k++) a[k] = _mm256_fmadd_ps(a[k], b, c);
    double dt = now() - t;
    float tmp[8];
    for (int k = 0; k < 12; k++) { _mm256_storeu_ps(tmp, a[k]); sink += tmp[0]; }
    return 12.0 * m * 8 * 2 / dt / 1e9;
#else
    return 0;
#endif
}

static double bf16_gflops(void) {
#if defined(__AVX512BF16__)
    const long m = 4000000L;
    __m512 d[12];
    __m512bh p = (__m512bh)_mm512_set1_epi16(0x3f80), q = (__m512bh)_mm512_set1_epi16(0x3400);
    for (int k = 0; k < 12; k++) d[k] = _mm512_set1_ps((float)k);
    double t = now();
    for (long i = 0; i < m; i++)
        for (int k = 0; k < 12; k++) d[k] = _mm512_dpbf16_ps(d[k], p, q);
    double dt = now() - t;
    for (int k = 0; k < 12; k++) sink += _mm512_reduce_add_ps(d[k]);
    return 12.0 * m * 32 * 2 / dt / 1e9;
#else
    return 0;
#endif
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

#define REPS 9

int main(void) {
    double clk[REPS], f32[REPS], b16[REPS], f32c[REPS], b16c[REPS];
    for (int r = 0; r < REPS; r++) {
        double c1 = clock_ghz();
        f32[r] = fp32_gflops();
        b16[r] = bf16_gflops();
        double c2 = clock_ghz();
        clk[r] = 0.5 * (c1 + c2);
        f32c[r] = f32[r] / clk[r];
        b16c[r] = b16[r] / clk[r];
    }
    qsort(clk, REPS, sizeof(double), cmp);
    qsort(f32, REPS, sizeof(double), cmp);
    qsort(b16, REPS, sizeof(double), cmp);
    qsort(f32c, REPS, sizeof(double), cmp);
    qsort(b16c, REPS, sizeof(double), cmp);
    const char *isa =
#if defined(__AVX512F__)
        "avx512";
#elif defined(__AVX2__)
        "avx2";
#else
        "none";
#endif
    printf("{\"clock_ghz_max\": %.4f, \"clock_ghz_median\": %.4f, \"fp32_gflops_1core_max\": %.3f, "
           "\"bf16_gflops_1core_max\": %.3f, \"fp32_flop_cycle_median\": %.3f, \"bf16_flop_cycle_median\": %.3f, "
           "\"isa\": \"%s\", \"reps\": %d, \"sink\": %g}\n",
           clk[REPS - 1], clk[REPS / 2], f32[REPS - 1], b16[REPS - 1], f32c[REPS / 2], b16c[REPS / 2], isa, REPS,
           (double)sink);
    return 0;
}
