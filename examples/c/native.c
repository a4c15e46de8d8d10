/* The native ufa API: grouped-query causal attention over PyTorch-style [batch, heads, seq, dim]
 * buffers read in place (through strides), with the log-sum-exp, and an error reported with its
 * message. Build: cc -std=c11 native.c $(pkg-config --cflags --libs ufa) -lm */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include <ufa.h>

#define B 2
#define HQ 8
#define HKV 2
#define SQ 16
#define SKV 48
#define D 64

static void fill(float* x, size_t n, float f) {
    for (size_t i = 0; i < n; i++) x[i] = sinf(f * (float)(i + 1));
}

int main(void) {
    printf("ufa %s\n", ufa_version());
    ufa_context* ctx = NULL;
    ufa_status s = ufa_context_create(NULL, &ctx); /* NULL options: every core, best kernels */
    if (s != UFA_STATUS_SUCCESS) {
        fprintf(stderr, "ufa_context_create: %s\n", ufa_last_error_message());
        return 1;
    }
    const char* isa = NULL;
    uint32_t threads = 0, gpus = 0;
    ufa_context_cpu_isa(ctx, &isa);
    ufa_context_num_threads(ctx, &threads);
    ufa_device_count(ctx, UFA_DEVICE_CUDA, &gpus);
    printf("CPU kernels %s on %u threads, %u CUDA devices\n", isa, threads, gpus);

    float* q = malloc(sizeof(float) * B * HQ * SQ * D);
    float* k = malloc(sizeof(float) * B * HKV * SKV * D);
    float* v = malloc(sizeof(float) * B * HKV * SKV * D);
    float* out = malloc(sizeof(float) * B * HQ * SQ * D);
    float* lse = malloc(sizeof(float) * B * HQ * SQ);
    fill(q, (size_t)B * HQ * SQ * D, 0.37f);
    fill(k, (size_t)B * HKV * SKV * D, 0.11f);
    fill(v, (size_t)B * HKV * SKV * D, 0.05f);

    /* ufa's dimension order is [batch, seq, heads, dim]; buffers stored [batch, heads, seq, dim]
     * are described by swapping the middle shape and stride entries. */
    int64_t q_shape[4] = {B, SQ, HQ, D}, q_strides[4] = {HQ * SQ * D, D, SQ * D, 1};
    int64_t kv_shape[4] = {B, SKV, HKV, D}, kv_strides[4] = {HKV * SKV * D, D, SKV * D, 1};
    int64_t lse_shape[3] = {B, HQ, SQ};
    /* The last field is each allocation's size in bytes: ufa refuses a view that reaches past
     * it (0 = unknown, unchecked). */
    const uint64_t q_bytes = sizeof(float) * B * HQ * SQ * D, kv_bytes = sizeof(float) * B * HKV * SKV * D;
    ufa_tensor tq = {q, UFA_DTYPE_F32, UFA_DEVICE_CPU, 0, 4, q_shape, q_strides, q_bytes};
    ufa_tensor tk = {k, UFA_DTYPE_F32, UFA_DEVICE_CPU, 0, 4, kv_shape, kv_strides, kv_bytes};
    ufa_tensor tv = {v, UFA_DTYPE_F32, UFA_DEVICE_CPU, 0, 4, kv_shape, kv_strides, kv_bytes};
    ufa_tensor to = {out, UFA_DTYPE_F32, UFA_DEVICE_CPU, 0, 4, q_shape, q_strides, q_bytes};
    ufa_tensor tl = {lse, UFA_DTYPE_F32, UFA_DEVICE_CPU, 0, 3, lse_shape, NULL, sizeof(float) * B * HQ * SQ};

    ufa_attention_params params = ufa_attention_params_default();
    params.causal = 1; /* bottom-right: the 16 queries are the last 16 of the 48 positions */
    params.lse = &tl;
    s = ufa_attention_forward(ctx, &tq, &tk, &tv, &to, &params, NULL);
    if (s != UFA_STATUS_SUCCESS) {
        fprintf(stderr, "ufa_attention_forward: %s\n", ufa_last_error_message());
        return 1;
    }
    /* Query 0 of head 0 sees keys 0..32 of kv head 0; check its output directly. */
    double m = -INFINITY, l = 0, sc[SKV], worst = 0;
    for (int j = 0; j <= SKV - SQ; j++) {
        sc[j] = 0;
        for (int e = 0; e < D; e++) sc[j] += (double)q[e] * k[j * D + e];
        sc[j] /= sqrt(D);
        m = fmax(m, sc[j]);
    }
    for (int j = 0; j <= SKV - SQ; j++) l += exp(sc[j] - m);
    for (int e = 0; e < D; e++) {
        double ref = 0;
        for (int j = 0; j <= SKV - SQ; j++) ref += exp(sc[j] - m) / l * v[j * D + e];
        worst = fmax(worst, fabs(ref - out[e]));
    }
    worst = fmax(worst, fabs(m + log(l) - lse[0]));
    printf("native (C): GQA %d:%d causal, largest difference from float64 on row 0: %.2e\n", HQ, HKV, worst);

    /* A mistake comes back as a status and a message naming the argument. */
    kv_shape[2] = 3;
    s = ufa_attention_forward(ctx, &tq, &tk, &tv, &to, NULL, NULL);
    printf("with 3 KV heads: %s (%s)\n", ufa_status_string(s), ufa_last_error_message());

    free(q); free(k); free(v); free(out); free(lse);
    ufa_context_destroy(ctx);
    return worst < 1e-5 && s == UFA_STATUS_INVALID_ARGUMENT ? 0 : 1;
}
