/* The UMFA-compatible API (mfa.h): results against the float64 reference for a spread of shapes,
 * layouts and precisions, and every failure path returning a code without writing. */
#include "common.h"
#include "mfa.h"
#include "ufa.h"

static mfa_context_t ctx;

/* Wraps `data` (bytes) as a buffer; every test buffer is caller memory, so ASan/valgrind see
 * any out-of-bounds access. */
static mfa_buffer_t wrap(void* data, size_t bytes) {
    mfa_buffer_t b = NULL;
    mfa_error_t e = mfa_buffer_from_ptr(ctx, data, bytes, &b);
    CHECK(e == MFA_SUCCESS, "mfa_buffer_from_ptr: %s", ufa_last_error_message());
    return b;
}

struct mfa_case {
    uint32_t batch, seq_q, seq_kv, heads;
    uint16_t head_dim;
    int causal;
    enum elem in, out;
    int transpose; /* all four operands [b, s, h, d] instead of [b, h, s, d] */
};

static int precision(enum elem t) {
    return t == E_F32 ? MFA_PRECISION_FP32 : t == E_F16 ? MFA_PRECISION_FP16 : MFA_PRECISION_BF16;
}

/* Runs one case through mfa_attention_forward (or _with_lse, or _masked with `bias`) and
 * compares with the reference. */
static void run_case(const struct mfa_case* c, int with_lse, const double* bias) {
    int64_t B = c->batch, SQ = c->seq_q, SK = c->seq_kv, H = c->heads, D = c->head_dim;
    size_t nq = (size_t)(B * SQ * H * D), nk = (size_t)(B * SK * H * D);
    void *q = random_tensor(nq, c->in), *k = random_tensor(nk, c->in), *v = random_tensor(nk, c->in);
    size_t out_bytes = nq * elem_size(c->out), lse_bytes = (size_t)(B * H * SQ) * 4;
    void *out = poisoned(out_bytes), *lse = poisoned(lse_bytes);
    mfa_buffer_t bq = wrap(q, nq * elem_size(c->in)), bk = wrap(k, nk * elem_size(c->in));
    mfa_buffer_t bv = wrap(v, nk * elem_size(c->in)), bo = wrap(out, out_bytes), bl = wrap(lse, lse_bytes);
    bool t = c->transpose != 0;
    mfa_error_t e;
    unsigned char* mask = NULL;
    if (with_lse) {
        e = mfa_attention_forward_with_lse(ctx, bq, bk, bv, bo, bl, c->batch, c->seq_q, c->seq_kv, c->heads,
                                           c->head_dim, 0.0f, c->causal, precision(c->in),
                                           MFA_PRECISION_FP32, t, t, t, t);
    } else if (bias) {
        /* A boolean [seq_q, seq_kv] mask, broadcast over batch and heads. */
        mask = malloc((size_t)(SQ * SK));
        for (int64_t i = 0; i < SQ * SK; i++) mask[i] = bias[i] != -INFINITY;
        int64_t shape[2] = {SQ, SK};
        e = mfa_attention_forward_masked(ctx, bq, bk, bv, bo, c->batch, c->seq_q, c->seq_kv, c->heads,
                                         c->head_dim, 0.0f, c->causal, precision(c->in), MFA_PRECISION_FP32,
                                         precision(c->out), t, t, t, t, mask, (size_t)(SQ * SK), shape, NULL,
                                         2, MFA_MASK_TYPE_BOOL, MFA_MASK_SCALAR_BYTE);
    } else {
        e = mfa_attention_forward(ctx, bq, bk, bv, bo, c->batch, c->seq_q, c->seq_kv, c->heads, c->head_dim,
                                  0.0f, c->causal, precision(c->in), MFA_PRECISION_FP32, precision(c->out),
                                  t, t, t, t);
    }
    char what[160];
    snprintf(what, sizeof what, "b%u sq%u skv%u h%u d%u causal%d %s->%s %s%s%s", c->batch, c->seq_q,
             c->seq_kv, c->heads, c->head_dim, c->causal, elem_name(c->in), elem_name(c->out),
             t ? "bshd" : "bhsd", with_lse ? " lse" : "", bias ? " mask" : "");
    CHECK(e == MFA_SUCCESS, "%s: %s", what, ufa_last_error_message());
    if (e == MFA_SUCCESS) {
        struct problem p = {B, SQ, SK, H, H, D, D, 0, c->causal, bias};
        struct operand oq = {q, c->in, {0}}, ok = {k, c->in, {0}}, ov = {v, c->in, {0}};
        struct operand oo = {out, with_lse ? c->in : c->out, {0}};
        strides_of(SQ, H, D, !t, oq.st);
        strides_of(SK, H, D, !t, ok.st);
        strides_of(SK, H, D, !t, ov.st);
        strides_of(SQ, H, D, !t, oo.st);
        double* ref = malloc(nq * sizeof(double));
        double* ref_lse = malloc((size_t)(B * H * SQ) * sizeof(double));
        reference(&p, &oq, &ok, &ov, ref, ref_lse);
        enum elem out_t = with_lse ? c->in : c->out;
        CHECK(all_written(out, nq * elem_size(out_t), elem_size(out_t)), "%s: output not fully written", what);
        double err = rel_error(&oo, &p, ref);
        CHECK(err < tolerance(c->in, out_t), "%s: relative error %.3g", what, err);
        if (with_lse) {
            double worst = 0;
            for (int64_t i = 0; i < B * H * SQ; i++) worst = fmax(worst, fabs(((float*)lse)[i] - ref_lse[i]));
            CHECK(worst < 1e-3, "%s: lse error %.3g", what, worst);
        }
        free(ref);
        free(ref_lse);
    }
    mfa_destroy_buffer(bq); mfa_destroy_buffer(bk); mfa_destroy_buffer(bv);
    mfa_destroy_buffer(bo); mfa_destroy_buffer(bl);
    free(q); free(k); free(v); free(out); free(lse); free(mask);
}

static void test_correctness(void) {
    const struct mfa_case cases[] = {
        {1, 1, 1, 1, 32, 0, E_F32, E_F32, 0},
        {1, 17, 17, 2, 64, 1, E_F32, E_F32, 0},
        {2, 33, 129, 3, 80, 1, E_F32, E_F32, 1},   /* causal, seq_q != seq_kv */
        {1, 129, 17, 2, 128, 0, E_F16, E_F16, 0},
        {2, 40, 40, 2, 96, 1, E_BF16, E_BF16, 1},
        {1, 24, 50, 4, 160, 0, E_F16, E_F32, 0},   /* output precision honoured */
        {1, 16, 16, 1, 256, 0, E_BF16, E_F32, 1},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) run_case(&cases[i], 0, NULL);
    for (size_t i = 0; i < 3; i++) run_case(&cases[i + 1], 1, NULL);
    /* A banded boolean mask with one row that sees nothing (it must output zeros). */
    struct mfa_case m = {2, 9, 21, 2, 64, 0, E_F32, E_F32, 0};
    double* bias = malloc(9 * 21 * sizeof(double));
    for (int i = 0; i < 9; i++)
        for (int j = 0; j < 21; j++) bias[i * 21 + j] = (i != 4 && (i + j) % 3 != 0) ? 0 : -INFINITY;
    run_case(&m, 0, bias);
    m.in = m.out = E_BF16;
    run_case(&m, 0, bias);
    free(bias);
}

/* A [b, h, s, d] tensor viewed through explicit strides: a slice of a wider buffer, so the
 * strides are not row-major. */
static void test_with_strides(void) {
    int64_t B = 1, H = 2, S = 19, D = 32, pitch = 48; /* head_dim padded to 48 */
    size_t n = (size_t)(B * H * S * pitch);
    float *q = random_tensor(n, E_F32), *k = random_tensor(n, E_F32), *v = random_tensor(n, E_F32);
    float* out = poisoned((size_t)(B * H * S * D) * 4);
    int64_t shape[4] = {B, H, S, D}, strides[4] = {H * S * pitch, S * pitch, pitch, 1};
    mfa_buffer_t b[3];
    float* src[3] = {q, k, v};
    for (int i = 0; i < 3; i++)
        CHECK(mfa_buffer_from_ptr_with_strides(ctx, src[i], n * 4, shape, strides, 4, &b[i]) == MFA_SUCCESS,
              "%s", ufa_last_error_message());
    mfa_buffer_t bo = wrap(out, (size_t)(B * H * S * D) * 4);
    mfa_error_t e = mfa_attention_forward(ctx, b[0], b[1], b[2], bo, 1, 19, 19, 2, 32, 0.0f, true,
                                          MFA_PRECISION_FP32, MFA_PRECISION_FP32, MFA_PRECISION_FP32,
                                          false, false, false, false);
    CHECK(e == MFA_SUCCESS, "strided: %s", ufa_last_error_message());
    struct problem p = {B, S, S, H, H, D, D, 0, 1, NULL};
    struct operand oq = {q, E_F32, {H * S * pitch, pitch, S * pitch, 1}}, ok = oq, ov = oq;
    ok.data = k; ov.data = v;
    struct operand oo = {out, E_F32, {0}};
    strides_of(S, H, D, 1, oo.st);
    double *ref = malloc((size_t)(B * S * H * D) * 8), *lse = malloc((size_t)(B * H * S) * 8);
    reference(&p, &oq, &ok, &ov, ref, lse);
    double err = rel_error(&oo, &p, ref);
    CHECK(err < 1e-5, "strided: relative error %.3g", err);
    /* The recorded shape must be the call's. */
    e = mfa_attention_forward(ctx, b[0], b[1], b[2], bo, 1, 19, 19, 1, 32, 0.0f, true, MFA_PRECISION_FP32,
                              MFA_PRECISION_FP32, MFA_PRECISION_FP32, false, false, false, false);
    CHECK(e == MFA_ERROR_INVALID_ARGS, "shape mismatch with recorded shape gave %d", e);
    for (int i = 0; i < 3; i++) mfa_destroy_buffer(b[i]);
    mfa_destroy_buffer(bo);
    free(q); free(k); free(v); free(out); free(ref); free(lse);
}

static void test_backward(void) {
    uint32_t B = 1, S = 12, H = 2;
    uint16_t D = 32;
    size_t n = (size_t)B * S * H * D;
    float *q = random_tensor(n, E_F32), *k = random_tensor(n, E_F32), *v = random_tensor(n, E_F32);
    float *dout = random_tensor(n, E_F32), *out = poisoned(n * 4), *lse = poisoned((size_t)B * H * S * 4);
    float *dq = poisoned(n * 4), *dk = poisoned(n * 4), *dv = poisoned(n * 4);
    mfa_buffer_t bq = wrap(q, n * 4), bk = wrap(k, n * 4), bv = wrap(v, n * 4), bdo = wrap(dout, n * 4);
    mfa_buffer_t bo = wrap(out, n * 4), bl = wrap(lse, (size_t)B * H * S * 4);
    mfa_buffer_t bdq = wrap(dq, n * 4), bdk = wrap(dk, n * 4), bdv = wrap(dv, n * 4);
    CHECK(mfa_attention_forward_with_lse(ctx, bq, bk, bv, bo, bl, B, S, S, H, D, 0.0f, true, MFA_PRECISION_FP32,
                                         MFA_PRECISION_FP32, false, false, false, false) == MFA_SUCCESS,
          "%s", ufa_last_error_message());
    mfa_error_t e = mfa_attention_backward(ctx, bdo, bq, bk, bv, bo, bl, bdq, bdk, bdv, NULL, B, S, S, H, D, 0.0f,
                                           true, MFA_PRECISION_FP32, MFA_PRECISION_FP32, false, false, false, false);
    CHECK(e == MFA_SUCCESS, "backward: %s", ufa_last_error_message());
    CHECK(all_written(dq, n * 4, 4) && all_written(dk, n * 4, 4) && all_written(dv, n * 4, 4),
          "gradients not fully written");
    /* dV = P^T dO: with a causal mask the last key is seen only by the last query, with weight
     * P[S-1][S-1]; spot-check that one row against the reference probabilities. */
    struct problem p = {B, S, S, H, H, D, D, 0, 1, NULL};
    struct operand oq = {q, E_F32, {0}}, ok = {k, E_F32, {0}}, ov = {v, E_F32, {0}};
    strides_of(S, H, D, 1, oq.st); strides_of(S, H, D, 1, ok.st); strides_of(S, H, D, 1, ov.st);
    double *ref = malloc(n * 8), *ref_lse = malloc((size_t)B * H * S * 8);
    reference(&p, &oq, &ok, &ov, ref, ref_lse);
    double worst = 0;
    for (uint32_t h = 0; h < H; h++) {
        double dot = 0; /* score of the last query against the last key */
        for (uint16_t e2 = 0; e2 < D; e2++)
            dot += at(&oq, 0, S - 1, h, e2) * at(&ok, 0, S - 1, h, e2);
        double w = exp(dot / sqrt((double)D) - ref_lse[h * S + S - 1]);
        for (uint16_t e2 = 0; e2 < D; e2++) {
            size_t idx = ((size_t)h * S + (S - 1)) * D + e2; /* [b, h, s, d] layout */
            worst = fmax(worst, fabs(dv[idx] - w * dout[idx]));
        }
    }
    CHECK(worst < 1e-5, "dv of the last key differs by %.3g", worst);
    mfa_buffer_t all[] = {bq, bk, bv, bdo, bo, bl, bdq, bdk, bdv};
    for (size_t i = 0; i < 9; i++) mfa_destroy_buffer(all[i]);
    free(q); free(k); free(v); free(dout); free(out); free(lse); free(dq); free(dk); free(dv);
    free(ref); free(ref_lse);
}

static mfa_error_t fwd(mfa_context_t c, mfa_buffer_t q, mfa_buffer_t k, mfa_buffer_t v, mfa_buffer_t o,
                       uint32_t b, uint32_t s, uint32_t h, uint16_t d, int in, int mid, int out) {
    return mfa_attention_forward(c, q, k, v, o, b, s, s, h, d, 0.0f, false, in, mid, out, false, false, false,
                                 false);
}

static void test_errors(void) {
    float q[64], k[64], v[64], out[64];
    for (int i = 0; i < 64; i++) q[i] = k[i] = v[i] = uniform();
    memset(out, 0xff, sizeof out);
    mfa_buffer_t bq = wrap(q, sizeof q), bk = wrap(k, sizeof k), bv = wrap(v, sizeof v), bo = wrap(out, sizeof out);
    const int F = MFA_PRECISION_FP32;
    mfa_buffer_t b = NULL;

    /* NULL for every pointer argument. */
    CHECK(mfa_create_context(NULL) == MFA_ERROR_INVALID_ARGS, "create_context(NULL)");
    CHECK(mfa_create_buffer(NULL, 16, &b) == MFA_ERROR_INVALID_ARGS && b == NULL, "create_buffer ctx NULL");
    CHECK(mfa_create_buffer(ctx, 16, NULL) == MFA_ERROR_INVALID_ARGS, "create_buffer out NULL");
    CHECK(mfa_buffer_from_ptr(NULL, q, 16, &b) == MFA_ERROR_INVALID_ARGS && b == NULL, "from_ptr ctx NULL");
    CHECK(mfa_buffer_from_ptr(ctx, NULL, 16, &b) == MFA_ERROR_INVALID_ARGS && b == NULL, "from_ptr data NULL");
    CHECK(strstr(ufa_last_error_message(), "data_ptr") != NULL, "message names data_ptr: %s",
          ufa_last_error_message());
    CHECK(mfa_buffer_from_ptr(ctx, q, 16, NULL) == MFA_ERROR_INVALID_ARGS, "from_ptr out NULL");
    int64_t shape[4] = {1, 1, 4, 16};
    CHECK(mfa_buffer_from_ptr_with_strides(ctx, q, sizeof q, NULL, NULL, 4, &b) == MFA_ERROR_INVALID_ARGS,
          "with_strides shape NULL");
    CHECK(mfa_buffer_from_ptr_with_strides(ctx, q, sizeof q, shape, NULL, 0, &b) == MFA_ERROR_INVALID_ARGS,
          "with_strides ndim 0");
    CHECK(mfa_buffer_from_ptr_with_strides(ctx, q, sizeof q, shape, NULL, 5, &b) == MFA_ERROR_INVALID_ARGS,
          "with_strides ndim 5");
    int64_t neg[4] = {1, 1, -4, 16};
    CHECK(mfa_buffer_from_ptr_with_strides(ctx, q, sizeof q, neg, NULL, 4, &b) == MFA_ERROR_INVALID_ARGS,
          "with_strides negative dim");
    CHECK(mfa_buffer_contents(NULL) == NULL, "contents(NULL)");
    mfa_buffer_t args[5] = {NULL, bq, bk, bv, bo};
    for (int i = 0; i < 5; i++) {
        mfa_buffer_t a[5];
        memcpy(a, args, sizeof a);
        a[0] = ctx;
        a[i] = NULL;
        mfa_error_t e = fwd(a[0], a[1], a[2], a[3], a[4], 1, 4, 1, 16, F, F, F);
        CHECK(e == MFA_ERROR_INVALID_ARGS, "forward with argument %d NULL gave %d", i, e);
    }
    CHECK(mfa_attention_forward_with_lse(ctx, bq, bk, bv, bo, NULL, 1, 4, 4, 1, 16, 0.0f, false, F, F, false,
                                         false, false, false) == MFA_ERROR_INVALID_ARGS, "lse NULL");
    for (int i = 0; i < 10; i++) { /* context, dout, q, k, v, out, softmax_lse, dq, dk, dv */
        void* a[10] = {ctx, bq, bq, bk, bv, bo, bo, bo, bo, bo};
        a[i] = NULL;
        mfa_error_t e = mfa_attention_backward(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9], NULL, 1, 4,
                                               4, 1, 16, 0.0f, false, F, F, false, false, false, false);
        CHECK(e == MFA_ERROR_INVALID_ARGS && strstr(ufa_last_error_message(), "NULL"),
              "backward with argument %d NULL gave %d: %s", i, e, ufa_last_error_message());
    }

    /* Zero and overflowing sizes. */
    CHECK(mfa_create_buffer(ctx, 0, &b) == MFA_ERROR_INVALID_ARGS, "create_buffer size 0");
    CHECK(mfa_create_buffer(ctx, SIZE_MAX, &b) == MFA_ERROR_MEMORY_ALLOCATION && b == NULL, "SIZE_MAX");
    CHECK(mfa_create_buffer(ctx, (size_t)1 << 62, &b) == MFA_ERROR_MEMORY_ALLOCATION && b == NULL, "2^62 bytes");
    CHECK(mfa_buffer_from_ptr(ctx, q, 0, &b) == MFA_ERROR_INVALID_ARGS, "from_ptr size 0");
    /* An empty batch is an empty result, as in PyTorch; a zero head dimension has no meaning. */
    CHECK(fwd(ctx, bq, bk, bv, bo, 0, 4, 1, 16, F, F, F) == MFA_SUCCESS, "batch 0: %s", ufa_last_error_message());
    CHECK(fwd(ctx, bq, bk, bv, bo, 1, 4, 1, 0, F, F, F) == MFA_ERROR_INVALID_ARGS, "head_dim 0");
    CHECK(fwd(ctx, bq, bk, bv, bo, UINT32_MAX, UINT32_MAX, UINT32_MAX, UINT16_MAX, F, F, F) ==
              MFA_ERROR_INVALID_ARGS, "overflowing dims");
    /* A wrapped buffer too small for the shape: 64 floats, asked for 2 heads of 4 x 16. */
    CHECK(fwd(ctx, bq, bk, bv, bo, 1, 4, 2, 16, F, F, F) == MFA_ERROR_INVALID_ARGS, "buffer too small");
    CHECK(strstr(ufa_last_error_message(), "buffer holds 256 bytes") != NULL, "message: %s",
          ufa_last_error_message());
    /* Mismatched K/V length: seq_len_kv past what the buffers hold. */
    CHECK(mfa_attention_forward(ctx, bq, bk, bv, bo, 1, 4, 5, 1, 16, 0.0f, false, F, F, F, false, false, false,
                                false) == MFA_ERROR_INVALID_ARGS, "seq_kv too long");
    /* The output aliasing an input (caught by the core). */
    CHECK(fwd(ctx, bq, bk, bv, bq, 1, 4, 1, 16, F, F, F) == MFA_ERROR_INVALID_ARGS, "out aliases q");
    CHECK(strstr(ufa_last_error_message(), "share") != NULL, "aliasing message: %s", ufa_last_error_message());
    /* Precisions. */
    CHECK(fwd(ctx, bq, bk, bv, bo, 1, 4, 1, 16, 9, F, F) == MFA_ERROR_INVALID_ARGS, "precision 9");
    CHECK(fwd(ctx, bq, bk, bv, bo, 1, 4, 1, 16, F, -1, F) == MFA_ERROR_INVALID_ARGS, "intermediate -1");
    CHECK(fwd(ctx, bq, bk, bv, bo, 1, 4, 1, 16, MFA_PRECISION_INT8, F, F) == MFA_ERROR_DEVICE_NOT_SUPPORTED,
          "INT8");
    /* Masks. */
    int64_t mshape[2] = {4, 4};
    unsigned char mask[16];
    memset(mask, 1, sizeof mask);
    CHECK(mfa_attention_forward_masked(ctx, bq, bk, bv, bo, 1, 4, 4, 1, 16, 0.0f, false, F, F, F, false, false,
                                       false, false, NULL, 16, mshape, NULL, 2, MFA_MASK_TYPE_BOOL,
                                       MFA_MASK_SCALAR_BYTE) == MFA_ERROR_INVALID_ARGS, "mask NULL");
    CHECK(mfa_attention_forward_masked(ctx, bq, bk, bv, bo, 1, 4, 4, 1, 16, 0.0f, false, F, F, F, false, false,
                                       false, false, mask, 15, mshape, NULL, 2, MFA_MASK_TYPE_BOOL,
                                       MFA_MASK_SCALAR_BYTE) == MFA_ERROR_INVALID_ARGS, "mask too small");
    CHECK(mfa_attention_forward_masked(ctx, bq, bk, bv, bo, 1, 4, 4, 1, 16, 0.0f, false, F, F, F, false, false,
                                       false, false, mask, 16, mshape, NULL, 2, MFA_MASK_TYPE_ADDITIVE,
                                       MFA_MASK_SCALAR_BYTE) == MFA_ERROR_INVALID_ARGS, "additive byte mask");
    int64_t bad_shape[2] = {3, 4};
    CHECK(mfa_attention_forward_masked(ctx, bq, bk, bv, bo, 1, 4, 4, 1, 16, 0.0f, false, F, F, F, false, false,
                                       false, false, mask, 16, bad_shape, NULL, 2, MFA_MASK_TYPE_BOOL,
                                       MFA_MASK_SCALAR_BYTE) == MFA_ERROR_INVALID_ARGS, "mask shape mismatch");
    /* Nothing above wrote the output. */
    CHECK(!all_written(out, sizeof out, 4), "a failed call wrote the output");
    CHECK(fwd(ctx, bq, bk, bv, bo, 1, 4, 1, 16, F, F, F) == MFA_SUCCESS, "%s", ufa_last_error_message());
    CHECK(mfa_get_gpu_latency(ctx) > 0, "latency after a call");
    CHECK(mfa_get_gpu_latency(NULL) == 0, "latency(NULL)");

    /* Every code reachable, and the panic boundary. */
#ifdef UFA_TEST_HOOKS
    CHECK(mfa_debug_trigger_panic() == MFA_ERROR_EXECUTION_FAILED, "panic -> execution failed");
    CHECK(strstr(ufa_last_error_message(), "deliberate panic") != NULL, "%s", ufa_last_error_message());
    CHECK(mfa_debug_fail_with(UFA_STATUS_OUT_OF_MEMORY) == MFA_ERROR_MEMORY_ALLOCATION, "oom");
    CHECK(mfa_debug_fail_with(UFA_STATUS_DEVICE_UNAVAILABLE) == MFA_ERROR_DEVICE_NOT_SUPPORTED, "device");
    CHECK(mfa_debug_fail_with(UFA_STATUS_BACKEND_FAILURE) == MFA_ERROR_EXECUTION_FAILED, "backend");
#endif
    for (int e = 0; e <= 6; e++) CHECK(mfa_error_string(e) != NULL && *mfa_error_string(e), "error string %d", e);
    CHECK(strcmp(mfa_error_string(MFA_SUCCESS), "success") == 0, "success string");

    mfa_destroy_buffer(bq); mfa_destroy_buffer(bk); mfa_destroy_buffer(bv); mfa_destroy_buffer(bo);
}

static void test_lifetimes(void) {
    mfa_destroy_buffer(NULL);
    mfa_destroy_context(NULL);
    /* Create/destroy loops: the leak checkers (ASan, valgrind) judge these. */
    for (int i = 0; i < 20; i++) {
        mfa_context_t c = NULL;
        CHECK(mfa_create_context(&c) == MFA_SUCCESS && c != NULL, "create %d", i);
        mfa_buffer_t b = NULL;
        CHECK(mfa_create_buffer(c, 4096, &b) == MFA_SUCCESS, "create_buffer");
        unsigned char* p = mfa_buffer_contents(b);
        CHECK(p != NULL && p[0] == 0 && p[4095] == 0 && ((uintptr_t)p % 64) == 0, "zeroed, aligned");
        mfa_destroy_buffer(b);
        mfa_destroy_context(c);
    }
    int major = -1, minor = -1, patch = -1;
    mfa_get_version(&major, &minor, &patch);
    mfa_get_version(NULL, NULL, NULL);
    CHECK(major >= 0 && minor >= 0 && patch >= 0, "version");
    CHECK(mfa_is_device_supported(), "device supported");
}

int main(void) {
    seed_rng("test_mfa");
    CHECK(mfa_create_context(&ctx) == MFA_SUCCESS, "%s", ufa_last_error_message());
    test_correctness();
    test_with_strides();
    test_backward();
    test_errors();
    test_lifetimes();
    mfa_destroy_context(ctx);
    return finish("test_mfa");
}
