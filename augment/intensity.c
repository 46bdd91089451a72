/* docs/method.md section 3's intensity chain on the CPU, fused: every step of one unit (a slice, or a
 * whole view) runs while the unit sits in the cache, in three passes instead of some twenty.
 *
 * This is augment.apply_intensity's arithmetic, step for step; tests/test_native.py checks
 * that the two agree. The parameters are drawn by torch (augment.draw_intensity_params). The
 * standard normal noise is either given, or drawn here: xoshiro128+ (Blackman and Vigna), eight
 * generators side by side in one vector register, seeded by splitmix64 from the call's key and
 * the slice's index, then the Box-Muller transform of pairs of 24-bit uniforms, as torch does
 * on the CPU, faster than torch's Mersenne Twister, and a slice's noise does not depend on how
 * the batch is scheduled. Built and loaded by native_chain.py; compiled with -ffast-math so
 * that the loops of log and cos use the C library's vector functions, and linked without it,
 * so that loading the library leaves the host's floating-point mode (no flush-to-zero) alone.
 *
 * Layout: x, noise: (b, d, h, w) float32, C-contiguous; out the same shape, or (b, d, w, h)
 * with swap_hw (the in-plane axes swapped on the way out). Parameters per unit (b, units):
 * blur flag and sigma, brightness factor and offset, contrast factor, gamma; per view (b):
 * noise std and gamma flag. units is d (per slice) or 1 (per view).
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLUR_RADIUS 8          /* int(4 * 2.0 + 0.5): the widest kernel (sigma up to 2) */
#define POWER_FLOOR 1e-20f     /* augment.POWER_FLOOR */

/* Position p of a signal of n samples mirrored at its edges, the edge sample repeated
 * (scipy.ndimage's 'reflect'), as often as p needs. */
static int mirror(int p, int n) {
    int m = p % (2 * n);
    if (m < 0) m += 2 * n;
    return m < n ? m : 2 * n - 1 - m;
}

/* k[0 .. 2 rr]: the Gaussian of sigma truncated at rr = floor(4 sigma + 0.5), normalised. */
static int gaussian_kernel(float sigma, float *k) {
    int rr = (int)floorf(4.0f * sigma + 0.5f);
    if (rr > BLUR_RADIUS) rr = BLUR_RADIUS;
    float sum = 0.0f;
    for (int t = -rr; t <= rr; t++) {
        float z = (float)t / sigma;
        k[t + rr] = expf(-0.5f * z * z);
        sum += k[t + rr];
    }
    for (int t = 0; t <= 2 * rr; t++) k[t] /= sum;
    return rr;
}

#define LANES 8 /* generators side by side */
typedef uint32_t lanes_u32 __attribute__((vector_size(4 * LANES)));

static uint64_t splitmix64(uint64_t *state) {
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* words[0 .. n), n a multiple of LANES: word j comes from generator j % LANES, whose state
 * is two splitmix64 outputs (low half first) of the sequence seeded with
 * key ^ (stream * 0xD1B54A32D192ED03), taken in lane order. */
void desd_random_words(uint32_t *words, size_t n, uint32_t stream, uint64_t key) {
    lanes_u32 s0, s1, s2, s3;
    uint64_t seed = key ^ ((uint64_t)stream * 0xD1B54A32D192ED03ull);
    for (int l = 0; l < LANES; l++) {
        const uint64_t a = splitmix64(&seed), b = splitmix64(&seed);
        s0[l] = (uint32_t)a, s1[l] = (uint32_t)(a >> 32), s2[l] = (uint32_t)b, s3[l] = (uint32_t)(b >> 32);
    }
    for (size_t j = 0; j < n; j += LANES) { /* xoshiro128+ */
        const lanes_u32 result = s0 + s3, t = s1 << 9;
        memcpy(words + j, &result, sizeof result);
        s2 ^= s0, s3 ^= s1, s1 ^= s2, s0 ^= s3, s2 ^= t;
        s3 = (s3 << 11) | (s3 >> 21);
    }
}

/* Room desd_normal needs for count numbers: count rounded up to a multiple of 2 * LANES. */
size_t desd_normal_room(size_t count) { return (count + 2 * LANES - 1) / (2 * LANES) * (2 * LANES); }

/* z[0 .. count): standard normal numbers of stream `stream` under `key`; z has room for
 * desd_normal_room(count). With half = room / 2, words i and half + i give z[i] and
 * z[half + i]: radius sqrt(-2 log u), u = (w_i >> 8 + 1) / 2^24 in (0, 1], angle
 * 2 pi (w_{half+i} >> 8) / 2^24, and the cosine and sine of that angle. */
void desd_normal(float *z, size_t count, uint32_t stream, uint64_t key) {
    const size_t half = desd_normal_room(count) / 2;
    uint32_t *words = (uint32_t *)z; /* the words first, then the numbers in their place */
    desd_random_words(words, 2 * half, stream, key);
    for (size_t i = 0; i < half; i++) {
        const float r = sqrtf(-2.0f * logf(((float)(int32_t)(words[i] >> 8) + 1.0f) * 0x1p-24f));
        const float t = 6.2831853f * 0x1p-24f * (float)(int32_t)(words[half + i] >> 8);
        z[i] = r * cosf(t);
        z[half + i] = r * cosf(t - 1.5707963f); /* the sine: sinf and cosf together become one sincosf call, which does not vectorise */
    }
}

/* In-place blur of one (h, w) slice, along h then along w. tmp: h * w floats; pad: w + 2 rr. */
static void blur_slice(float *s, int h, int w, const float *k, int rr, float *tmp, float *pad) {
    for (int i = 0; i < h; i++) {
        float *o = tmp + (size_t)i * w;
        const float *src = s + (size_t)mirror(i - rr, h) * w;
        for (int j = 0; j < w; j++) o[j] = k[0] * src[j];
        for (int t = 1; t <= 2 * rr; t++) {
            const float kt = k[t];
            src = s + (size_t)mirror(i + t - rr, h) * w;
            for (int j = 0; j < w; j++) o[j] += kt * src[j];
        }
    }
    for (int i = 0; i < h; i++) {
        const float *row = tmp + (size_t)i * w;
        for (int p = -rr; p < w + rr; p++) pad[p + rr] = row[(p >= 0 && p < w) ? p : mirror(p, w)];
        float *o = s + (size_t)i * w;
        for (int j = 0; j < w; j++) o[j] = k[0] * pad[j];
        for (int t = 1; t <= 2 * rr; t++) {
            const float kt = k[t];
            for (int j = 0; j < w; j++) o[j] += kt * pad[j + t];
        }
    }
}

/* v through the unit's brightness and contrast map, clipped to [lo, hi]. */
static inline float map_clip(float v, float scale, float shift, float lo, float hi) {
    return fminf(fmaxf(v * scale + shift, lo), hi);
}

/* ((y - y_lo) / range) ** g, the base floored at POWER_FLOOR: base = y_lo * inv, inv = 1 / range. */
static inline float gamma_power(float y, float inv, float base, float g) {
    return expf(g * logf(fminf(fmaxf(y * inv - base, POWER_FLOOR), 1.0f)));
}

/* Write one (h, w) slice to out, transposed when swap. */
static void store_slice(const float *s, float *out, int h, int w, int swap, float a, float c) {
    if (!swap) {
        for (size_t i = 0; i < (size_t)h * w; i++) out[i] = s[i] * a + c;
        return;
    }
    for (int i = 0; i < h; i++)
        for (int j = 0; j < w; j++) out[(size_t)j * h + i] = s[(size_t)i * w + j] * a + c;
}

/* Returns 0, or -1 when out of memory. */
int desd_intensity(const float *x, const float *noise, float *out, int b, int d, int h, int w, int units,
                   const float *noise_std, const uint8_t *blur_on, const float *sigma, const float *mul,
                   const float *add, const float *contrast, const float *gamma, const uint8_t *gamma_on,
                   int swap_hw, uint64_t key) {
    /* noise NULL: drawn here, stream = the slice's index in the batch (b * d + slice) */
    const int reps = d / units;                  /* slices a unit */
    const size_t plane = (size_t)h * w, n = reps * plane;
    float *y = malloc(n * sizeof(float));
    float *tmp = malloc(plane * sizeof(float));
    float *pad = malloc((w + 2 * BLUR_RADIUS + 1) * sizeof(float));
    float *z = noise ? NULL : malloc(desd_normal_room(plane) * sizeof(float));
    if (!y || !tmp || !pad || (!noise && !z)) {
        free(y), free(tmp), free(pad), free(z);
        return -1;
    }
    float k[2 * BLUR_RADIUS + 1];
    for (int v = 0; v < b; v++) {
        const float std = noise_std[v];
        for (int u = 0; u < units; u++) {
            const int p = v * units + u;
            const size_t first = ((size_t)v * d + (size_t)u * reps) * plane;
            /* noise, blur, then the unit's mean, min and max */
            int rr = blur_on[p] ? gaussian_kernel(sigma[p], k) : -1;
            double total = 0.0;
            float lo = FLT_MAX, hi = -FLT_MAX; /* not INFINITY: -ffast-math assumes no infinities */
            for (int s = 0; s < reps; s++) {
                float *ys = y + s * plane;
                const float *xs = x + first + s * plane, *ns = noise ? noise + first + s * plane : z;
                if (!noise) desd_normal(z, plane, (uint32_t)(v * d + u * reps + s), key);
                for (size_t i = 0; i < plane; i++) ys[i] = xs[i] + std * ns[i];
                if (rr >= 0) blur_slice(ys, h, w, k, rr, tmp, pad);
                float part = 0.0f;
                for (size_t i = 0; i < plane; i++) {
                    part += ys[i];
                    lo = fminf(lo, ys[i]);
                    hi = fmaxf(hi, ys[i]);
                }
                total += part;
            }
            const float mean = (float)(total / n);
            /* brightness x f, brightness + o, contrast c around the mean: one affine map, then
             * clipped to the range the unit had after the brightness steps */
            const float f = mul[p], o = add[p], c = contrast[p];
            const float m1 = mean * f + o, lo1 = lo * f + o, hi1 = hi * f + o;
            const float scale = f * c, shift = (o - m1) * c + m1;
            float *dst = out + first;
            if (!gamma_on[v]) {
                for (size_t i = 0; i < n; i++) y[i] = map_clip(y[i], scale, shift, lo1, hi1);
                for (int s = 0; s < reps; s++) store_slice(y + s * plane, dst + s * plane, h, w, swap_hw, 1.0f, 0.0f);
                continue;
            }
            /* gamma on the clipped unit, whose range follows from the map, then its mean and
             * std restored: one affine map of ((y - lo) / range) ** g */
            const float y_lo = map_clip(lo, scale, shift, lo1, hi1), y_hi = map_clip(hi, scale, shift, lo1, hi1);
            const float span = y_hi - y_lo, inv = 1.0f / (span + 1e-7f), base = y_lo * inv, g = gamma[p];
            /* the statistics of y and u from sums of their differences to a value near their
             * mean (y's mean before the clip, the first u), which keeps float32 sums of squares
             * exact enough for slices of little contrast */
            const float u0 = gamma_power(map_clip(y[0], scale, shift, lo1, hi1), inv, base, g);
            double sy = 0.0, syy = 0.0, su = 0.0, suu = 0.0;
            for (int s = 0; s < reps; s++) {
                float *ys = y + s * plane;
                float py = 0.0f, pyy = 0.0f, pu = 0.0f, puu = 0.0f;
                for (size_t i = 0; i < plane; i++) {
                    const float yy = map_clip(ys[i], scale, shift, lo1, hi1), uu = gamma_power(yy, inv, base, g);
                    py += yy - m1;
                    pyy += (yy - m1) * (yy - m1);
                    pu += uu - u0;
                    puu += (uu - u0) * (uu - u0);
                    ys[i] = uu;
                }
                sy += py, syy += pyy, su += pu, suu += puu;
            }
            const float dy = (float)(sy / n), du = (float)(su / n);
            const float y_mean = m1 + dy, u_mean = u0 + du;
            const float y_std = sqrtf(fmaxf((float)(syy / n) - dy * dy, 0.0f));
            const float u_std = sqrtf(fmaxf((float)(suu / n) - du * du, 0.0f));
            const float a = y_std * span / (u_std * span + 1e-8f);
            for (int s = 0; s < reps; s++) store_slice(y + s * plane, dst + s * plane, h, w, swap_hw, a, y_mean - u_mean * a);
        }
    }
    free(y), free(tmp), free(pad), free(z);
    return 0;
}
