/* Fused elementwise kernels of the CPU engine's bf16 path (built and loaded by cpu_fused.py).
 *
 * Why: NumPy runs SwiGLU, RMSNorm and RoPE as 5-8 separate passes over (tokens, features) fp32
 * matrices, each a trip through memory, and its exp is ~400 M elements/s; here each kernel is one
 * pass per row block, vectorised by the compiler for the CPU it runs on (-march=native), with an
 * inline exp and the bf16 rounding of an output done while its value is in a register.
 *
 * Every function works on rows [lo, hi) of row-major contiguous matrices, so Python splits the
 * rows over its kernel pool (ctypes releases the GIL) and no OpenMP runtime is loaded.
 *
 * Precision: fp32 arithmetic throughout; exp is Cephes' expf (range reduction by ln 2 in two
 * parts, degree-6 polynomial: ~1 ulp on its range); sums run in fp32 vector lanes (NumPy sums
 * pairwise). These differences are ~1e-7 relative: far inside the bf16 path's bound (2^-8 per
 * rounded operand, cpu_gemm.gemm_bound), which is why only that path uses these kernels; the fp32
 * path keeps NumPy's bits.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef long idx;

static inline float exp_f(float x) {
    /* exp for x in [-87, 88] (clamped: exp(-87) ~ 1.6e-38 is the smallest normal scale 2^-126) */
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float n = rintf(x * 1.44269504088896341f);
    float r = fmaf(n, -0.693359375f, x);
    r = fmaf(n, 2.12194440e-4f, r);
    float p = 1.9875691500e-4f;
    p = fmaf(p, r, 1.3981999507e-3f);
    p = fmaf(p, r, 8.3334519073e-3f);
    p = fmaf(p, r, 4.1665795894e-2f);
    p = fmaf(p, r, 1.6666665459e-1f);
    p = fmaf(p, r, 5.0000001201e-1f);
    p = fmaf(p, r * r, r) + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return p * scale;
}

static inline uint16_t bf16_bits(float f) {
    /* round to nearest even, NaN -> 0x7FC0 (cpu_gemm.to_bf16's rule) */
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return (u & 0x7FFFFFFFu) > 0x7F800000u ? (uint16_t)0x7FC0 : (uint16_t)r;
}

static inline float sigmoid_f(float g) { return 1.0f / (1.0f + exp_f(-g)); }

/* out = silu(g) * u; sig (optional) = sigmoid(g); out16 (optional) = bf16 bits of out */
void swiglu_fwd(const float *restrict g, const float *restrict u, float *restrict out,
                float *restrict sig, uint16_t *restrict out16, idx cols, idx lo, idx hi) {
    for (idx i = lo * cols; i < hi * cols; i += cols) {
        #pragma omp simd
        for (idx j = i; j < i + cols; j++) {
            float s = sigmoid_f(g[j]);
            float o = s * g[j] * u[j];
            out[j] = o;
            if (sig) sig[j] = s;
            if (out16) out16[j] = bf16_bits(o);
        }
    }
}

/* dg = s (1 + g (1 - s)) u dact, du = g s dact (s = sig, or sigmoid(g) when sig is NULL);
 * dg16/du16 (optional): their bf16 bits */
void swiglu_bwd(const float *restrict dact, const float *restrict g, const float *restrict u,
                const float *restrict sig, float *restrict dg, float *restrict du,
                uint16_t *restrict dg16, uint16_t *restrict du16, idx cols, idx lo, idx hi) {
    for (idx i = lo * cols; i < hi * cols; i += cols) {
        #pragma omp simd
        for (idx j = i; j < i + cols; j++) {
            float s = sig ? sig[j] : sigmoid_f(g[j]);
            float a = dact[j];
            float d = (1.0f + g[j] * (1.0f - s)) * s * u[j] * a;
            float e = g[j] * s * a;
            dg[j] = d;
            du[j] = e;
            if (dg16) { dg16[j] = bf16_bits(d); du16[j] = bf16_bits(e); }
        }
    }
}

/* y = x / rms(x) * w, n = x / rms(x), r = 1 / rms(x) per row; y16 (optional): bf16 bits of y */
void rms_fwd(const float *restrict x, const float *restrict w, float eps, float *restrict y,
             float *restrict n, float *restrict r, uint16_t *restrict y16, idx cols, idx lo, idx hi) {
    for (idx i = lo; i < hi; i++) {
        const float *xr = x + i * cols;
        float ss = 0.0f;
        #pragma omp simd reduction(+:ss)
        for (idx j = 0; j < cols; j++) ss += xr[j] * xr[j];
        float ri = 1.0f / sqrtf(ss / (float)cols + eps);
        r[i] = ri;
        float *yr = y + i * cols, *nr = n + i * cols;
        #pragma omp simd
        for (idx j = 0; j < cols; j++) {
            float v = xr[j] * ri;
            nr[j] = v;
            yr[j] = v * w[j];
            if (y16) y16[i * cols + j] = bf16_bits(v * w[j]);
        }
    }
}

/* dx = r (g - n mean(g n)) with g = dy w: the input gradient of rms_fwd's y */
void rms_bwd(const float *restrict dy, const float *restrict w, const float *restrict n,
             const float *restrict r, float *restrict dx, idx cols, idx lo, idx hi) {
    for (idx i = lo; i < hi; i++) {
        const float *dr = dy + i * cols, *nr = n + i * cols;
        float t = 0.0f;
        #pragma omp simd reduction(+:t)
        for (idx j = 0; j < cols; j++) t += dr[j] * w[j] * nr[j];
        float m = t / (float)cols, ri = r[i];
        float *o = dx + i * cols;
        #pragma omp simd
        for (idx j = 0; j < cols; j++) o[j] = ri * (dr[j] * w[j] - nr[j] * m);
    }
}

/* RoPE on rows of (heads x hd) features: the first `dims` of each head rotated by +theta (sign 1)
 * or -theta (sign -1); pairs (k, k + dims/2), or (2k, 2k + 1) when traditional; cos/sin are
 * (tokens, dims/2); the other features copied */
void rope(const float *restrict x, float *restrict out, const float *restrict cs,
          const float *restrict sn, idx heads, idx hd, idx dims, int traditional, float sign,
          idx lo, idx hi) {
    idx half = dims / 2, a = traditional ? 2 : 1, b = traditional ? 1 : half;
    for (idx t = lo; t < hi; t++) {
        const float *c = cs + t * half, *s = sn + t * half;
        for (idx h = 0; h < heads; h++) {
            const float *xr = x + (t * heads + h) * hd;
            float *o = out + (t * heads + h) * hd;
            #pragma omp simd
            for (idx k = 0; k < half; k++) {
                float x1 = xr[a * k], x2 = xr[a * k + b], sk = sign * s[k];
                o[a * k] = x1 * c[k] - x2 * sk;
                o[a * k + b] = x2 * c[k] + x1 * sk;
            }
            for (idx k = dims; k < hd; k++) o[k] = xr[k];
        }
    }
}

/* bf16 bits of fp32 values (round to nearest even, NaN -> 0x7FC0), elements [lo, hi) */
void to_bf16(const float *restrict x, uint16_t *restrict out, idx lo, idx hi) {
    #pragma omp simd
    for (idx j = lo; j < hi; j++) out[j] = bf16_bits(x[j]);
}

/* One vocabulary chunk of the online softmax (bf16_head): rows [lo, hi) of the (rows, cols)
 * logits L. Per row: the running max m grows to m' = max(m, max_j L_j), alpha = exp(m - m')
 * (0 on the first chunk, m = -inf), s = s alpha + sum_j exp(L_j - m') (summed in float64, so
 * only each exp's own rounding enters), and p16 (optional) = bf16 bits of exp(L_j - m') */
void softmax_chunk(const float *restrict L, idx cols, float *restrict m, double *restrict s,
                   float *restrict alpha, uint16_t *restrict p16, idx lo, idx hi) {
    for (idx i = lo; i < hi; i++) {
        const float *row = L + i * cols;
        float mx = -INFINITY;
        #pragma omp simd reduction(max:mx)
        for (idx j = 0; j < cols; j++) mx = row[j] > mx ? row[j] : mx;
        float mn = m[i] > mx ? m[i] : mx;
        float a = m[i] == -INFINITY ? 0.0f : expf(m[i] - mn);
        double acc = 0.0;
        if (p16) {
            uint16_t *p = p16 + i * cols;
            #pragma omp simd reduction(+:acc)
            for (idx j = 0; j < cols; j++) {
                float e = exp_f(row[j] - mn);
                acc += (double)e;
                p[j] = bf16_bits(e);
            }
        } else {
            #pragma omp simd reduction(+:acc)
            for (idx j = 0; j < cols; j++) acc += (double)exp_f(row[j] - mn);
        }
        s[i] = s[i] * (double)a + acc;
        alpha[i] = a;
        m[i] = mn;
    }
}

/* Causal softmax of one segment's attention scores, in place: s is (groups, L, S) with query row
 * i of each group allowed keys j <= i + S - L. Each row: scaled, softmax over the allowed keys,
 * 0 on the others (numpy_kernels.attention's scale, mask and softmax_ in one pass) */
void causal_softmax(float *restrict s, idx L, idx S, float scale, idx lo, idx hi) {
    for (idx r = lo; r < hi; r++) {
        float *row = s + r * S;
        idx n = r % L + S - L + 1;           /* allowed keys of this row */
        float mx = -INFINITY;
        #pragma omp simd reduction(max:mx)
        for (idx j = 0; j < n; j++) mx = row[j] > mx ? row[j] : mx;
        mx *= scale;
        float sum = 0.0f;
        #pragma omp simd reduction(+:sum)
        for (idx j = 0; j < n; j++) { float e = exp_f(row[j] * scale - mx); row[j] = e; sum += e; }
        float inv = 1.0f / sum;
        #pragma omp simd
        for (idx j = 0; j < n; j++) row[j] *= inv;
        for (idx j = n; j < S; j++) row[j] = 0.0f;
    }
}

/* The scores' gradient from the probabilities' one, in place: dp = (dp - sum_j dp_j p_j) p scale */
void softmax_back(float *restrict dp, const float *restrict p, idx cols, float scale, idx lo, idx hi) {
    for (idx r = lo; r < hi; r++) {
        float *d = dp + r * cols;
        const float *q = p + r * cols;
        float t = 0.0f;
        #pragma omp simd reduction(+:t)
        for (idx j = 0; j < cols; j++) t += d[j] * q[j];
        #pragma omp simd
        for (idx j = 0; j < cols; j++) d[j] = (d[j] - t) * q[j] * scale;
    }
}
