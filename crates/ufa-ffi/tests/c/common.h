/* Shared by the C tests and the C++ test: a tiny check framework, seeded random inputs, fp16/bf16 rounding, and a
 * float64 reference of attention written from the definition (one query row at a time). */
#ifndef UFA_TEST_COMMON_H
#define UFA_TEST_COMMON_H

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static int g_failures = 0;
static int g_checks = 0;

#define CHECK(cond, ...)                                                        \
    do {                                                                        \
        g_checks++;                                                             \
        if (!(cond)) {                                                          \
            g_failures++;                                                       \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);    \
            fprintf(stderr, __VA_ARGS__);                                       \
            fprintf(stderr, "\n");                                              \
        }                                                                       \
    } while (0)

static inline int finish(const char* name) {
    printf("%s: %d checks, %d failures\n", name, g_checks, g_failures);
    return g_failures == 0 ? 0 : 1;
}

/* xorshift64*: fresh inputs every run, the seed printed so a failure can be replayed with
 * UFA_TEST_SEED. */
static uint64_t g_rng;

static inline void seed_rng(const char* name) {
    const char* s = getenv("UFA_TEST_SEED");
    g_rng = s ? strtoull(s, NULL, 10) : (uint64_t)time(NULL) ^ (uint64_t)(uintptr_t)&g_rng;
    if (g_rng == 0) g_rng = 1;
    printf("%s: seed %llu (UFA_TEST_SEED to replay)\n", name, (unsigned long long)g_rng);
}

static inline float uniform(void) {
    g_rng ^= g_rng >> 12;
    g_rng ^= g_rng << 25;
    g_rng ^= g_rng >> 27;
    uint64_t r = g_rng * 2685821657736338717ull;
    return (float)((double)(r >> 11) / 9007199254740992.0 * 2.0 - 1.0); /* [-1, 1) */
}

enum elem { E_F32, E_F16, E_BF16 };

static inline size_t elem_size(enum elem t) { return t == E_F32 ? 4 : 2; }

static inline uint16_t f32_to_bf16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    return (uint16_t)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16); /* round to nearest even */
}

static inline uint16_t f32_to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000u, mant = x & 0x7fffffu;
    int32_t exp = (int32_t)((x >> 23) & 0xffu) - 127 + 15;
    if (exp >= 31) return (uint16_t)(sign | 0x7c00u);
    int shift = 13;
    uint32_t base;
    if (exp <= 0) { /* subnormal half */
        if (exp < -10) return (uint16_t)sign;
        mant |= 0x800000u;
        shift = 14 - exp;
        base = 0;
    } else {
        base = (uint32_t)exp << 10;
    }
    uint32_t half = base | (mant >> shift), rem = mant & ((1u << shift) - 1), mid = 1u << (shift - 1);
    if (rem > mid || (rem == mid && (half & 1u))) half++;
    return (uint16_t)(sign | half);
}

static inline double load(const void* p, enum elem t, size_t i) {
    if (t == E_F32) return ((const float*)p)[i];
    uint16_t h = ((const uint16_t*)p)[i];
    if (t == E_BF16) {
        uint32_t x = (uint32_t)h << 16;
        float f;
        memcpy(&f, &x, 4);
        return f;
    }
    int e = (h >> 10) & 0x1f, m = h & 0x3ff;
    double v = e == 0 ? ldexp(m, -24) : e == 31 ? INFINITY : ldexp(m | 0x400, e - 25);
    return (h & 0x8000) ? -v : v;
}

static inline void store(void* p, enum elem t, size_t i, float f) {
    if (t == E_F32) ((float*)p)[i] = f;
    else ((uint16_t*)p)[i] = t == E_F16 ? f32_to_f16(f) : f32_to_bf16(f);
}

/* n random elements (never all zero). */
static inline void* random_tensor(size_t n, enum elem t) {
    void* p = malloc(n * elem_size(t));
    for (size_t i = 0; i < n; i++) store(p, t, i, uniform());
    return p;
}

/* A poison pattern (0xFF bytes: NaN in every float type), and whether any of it survived. */
static inline void* poisoned(size_t bytes) {
    void* p = malloc(bytes);
    memset(p, 0xff, bytes);
    return p;
}

static inline int all_written(const void* p, size_t bytes, size_t elem_bytes) {
    const unsigned char* c = (const unsigned char*)p;
    for (size_t i = 0; i < bytes; i += elem_bytes) {
        size_t j = 0;
        while (j < elem_bytes && c[i + j] == 0xff) j++;
        if (j == elem_bytes) return 0;
    }
    return 1;
}

/* A [batch, seq, heads, dim] operand: data, element type and strides in elements. */
struct operand {
    const void* data;
    enum elem type;
    int64_t st[4];
};

static inline double at(const struct operand* o, int64_t b, int64_t s, int64_t h, int64_t d) {
    return load(o->data, o->type, (size_t)(b * o->st[0] + s * o->st[1] + h * o->st[2] + d * o->st[3]));
}

/* Strides of a [b, s, h, d] operand stored as [b, h, s, d] (heads_first) or [b, s, h, d]. */
static inline void strides_of(int64_t s, int64_t h, int64_t d, int heads_first, int64_t st[4]) {
    if (heads_first) { st[0] = h * s * d; st[1] = d; st[2] = s * d; st[3] = 1; }
    else { st[0] = s * h * d; st[1] = h * d; st[2] = d; st[3] = 1; }
}

struct problem {
    int64_t batch, seq_q, seq_kv, heads_q, heads_kv, head_dim, head_dim_v;
    double scale; /* 0 = 1/sqrt(head_dim) */
    int causal;   /* bottom-right aligned */
    /* Optional [seq_q, seq_kv] bias shared by every batch and head; -INFINITY masks a key. */
    const double* bias;
};

/* out: contiguous [b, sq, hq, dv]; lse: contiguous [b, hq, sq]. */
static inline void reference(const struct problem* p, const struct operand* q, const struct operand* k,
                      const struct operand* v, double* out, double* lse) {
    double scale = p->scale != 0 ? p->scale : 1.0 / sqrt((double)p->head_dim);
    double* s = (double*)malloc((size_t)p->seq_kv * sizeof(double));
    int64_t group = p->heads_q / p->heads_kv;
    for (int64_t b = 0; b < p->batch; b++)
        for (int64_t h = 0; h < p->heads_q; h++)
            for (int64_t i = 0; i < p->seq_q; i++) {
                double m = -INFINITY, l = 0;
                for (int64_t j = 0; j < p->seq_kv; j++) {
                    double x = -INFINITY;
                    int visible = !p->causal || j <= i + p->seq_kv - p->seq_q;
                    double bias = p->bias ? p->bias[i * p->seq_kv + j] : 0;
                    if (visible && bias != -INFINITY) {
                        double dot = 0;
                        for (int64_t e = 0; e < p->head_dim; e++)
                            dot += at(q, b, i, h, e) * at(k, b, j, h / group, e);
                        x = scale * dot + bias;
                    }
                    s[j] = x;
                    if (x > m) m = x;
                }
                double* o = out + ((b * p->seq_q + i) * p->heads_q + h) * p->head_dim_v;
                for (int64_t e = 0; e < p->head_dim_v; e++) o[e] = 0;
                if (m == -INFINITY) {
                    lse[(b * p->heads_q + h) * p->seq_q + i] = -INFINITY;
                    continue;
                }
                for (int64_t j = 0; j < p->seq_kv; j++) l += exp(s[j] - m);
                for (int64_t j = 0; j < p->seq_kv; j++) {
                    double w = exp(s[j] - m) / l;
                    if (w == 0) continue;
                    for (int64_t e = 0; e < p->head_dim_v; e++) o[e] += w * at(v, b, j, h / group, e);
                }
                lse[(b * p->heads_q + h) * p->seq_q + i] = m + log(l);
            }
    free(s);
}

/* ||got - want|| / ||want|| over a [b, sq, hq, dv] output read through `got`'s strides; NaN
 * propagates (and so never passes a `<` check). */
static inline double rel_error(const struct operand* got, const struct problem* p, const double* want) {
    double num = 0, den = 0;
    for (int64_t b = 0; b < p->batch; b++)
        for (int64_t i = 0; i < p->seq_q; i++)
            for (int64_t h = 0; h < p->heads_q; h++)
                for (int64_t e = 0; e < p->head_dim_v; e++) {
                    double w = want[((b * p->seq_q + i) * p->heads_q + h) * p->head_dim_v + e];
                    double d = at(got, b, i, h, e) - w;
                    num += d * d;
                    den += w * w;
                }
    return sqrt(num) / (den > 0 ? sqrt(den) : 1);
}

static inline double tolerance(enum elem in, enum elem out) {
    return (in == E_F32 && out == E_F32) ? 1e-5 : 1e-2;
}

static inline const char* elem_name(enum elem t) { return t == E_F32 ? "f32" : t == E_F16 ? "f16" : "bf16"; }

#endif
