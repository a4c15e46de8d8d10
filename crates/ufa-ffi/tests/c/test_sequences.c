/* The C API of packed batches, KV caches and merging: each against the float64 reference of
 * common.h applied to one sequence at a time, outputs poisoned first, and a rejected call that
 * must leave the cache as it was. */
#include "common.h"
#include "ufa.h"

#define OK(call) CHECK((call) == UFA_STATUS_SUCCESS, "%s", ufa_last_error_message())

enum { HQ = 4, HKV = 2, D = 8 };

static ufa_tensor tensor(void* data, int32_t dtype, int32_t ndim, const int64_t* shape) {
    ufa_tensor t = {data, dtype, UFA_DEVICE_CPU, 0, ndim, shape, NULL, 0};
    return t;
}

/* An f32 [rows, heads, D] operand starting at `row0` of a packed buffer. */
static struct operand rows_of(const float* base, int64_t row0, int64_t heads) {
    struct operand o = {base + row0 * heads * D, E_F32, {0, heads * D, D, 1}};
    return o;
}

static void varlen_forward(ufa_context* ctx) {
    /* Three sequences: 3, 0 and 5 query rows over 4, 2 and 7 keys; one spare row after each. */
    const int32_t cu_q[] = {0, 3, 3, 8}, cu_kv[] = {0, 4, 6, 13};
    const int64_t tq = 9, tk = 14;
    float* q = (float*)random_tensor((size_t)(tq * HQ * D), E_F32);
    float* k = (float*)random_tensor((size_t)(tk * HKV * D), E_F32);
    float* v = (float*)random_tensor((size_t)(tk * HKV * D), E_F32);
    float* out = (float*)poisoned((size_t)(tq * HQ * D) * 4);
    float* lse = (float*)poisoned((size_t)(HQ * tq) * 4);
    const int64_t qs[] = {tq, HQ, D}, ks[] = {tk, HKV, D}, ls[] = {HQ, tq}, cs[] = {4};
    ufa_tensor tq_ = tensor(q, UFA_DTYPE_F32, 3, qs), tk_ = tensor(k, UFA_DTYPE_F32, 3, ks);
    ufa_tensor tv_ = tensor(v, UFA_DTYPE_F32, 3, ks), to_ = tensor(out, UFA_DTYPE_F32, 3, qs);
    ufa_tensor tl_ = tensor(lse, UFA_DTYPE_F32, 2, ls);
    ufa_tensor cq = tensor((void*)cu_q, UFA_DTYPE_I32, 1, cs), ck = tensor((void*)cu_kv, UFA_DTYPE_I32, 1, cs);
    ufa_varlen seqs = ufa_varlen_default();
    seqs.cu_seqlens_q = &cq;
    seqs.cu_seqlens_kv = &ck;
    seqs.max_seqlen_q = 5;
    seqs.max_seqlen_kv = 7;
    ufa_attention_params params = ufa_attention_params_default();
    params.causal = 1;
    params.lse = &tl_;
    OK(ufa_attention_forward_varlen(ctx, &tq_, &tk_, &tv_, &to_, &seqs, &params, NULL));
    for (int b = 0; b < 3; b++) {
        struct problem p = {1, cu_q[b + 1] - cu_q[b], cu_kv[b + 1] - cu_kv[b], HQ, HKV, D, D, 0, 1, NULL};
        if (p.seq_q == 0) continue;
        struct operand qo = rows_of(q, cu_q[b], HQ), ko = rows_of(k, cu_kv[b], HKV);
        struct operand vo = rows_of(v, cu_kv[b], HKV), oo = rows_of(out, cu_q[b], HQ);
        double* want = (double*)malloc((size_t)(p.seq_q * HQ * D) * sizeof(double));
        double* want_lse = (double*)malloc((size_t)(HQ * p.seq_q) * sizeof(double));
        reference(&p, &qo, &ko, &vo, want, want_lse);
        double err = rel_error(&oo, &p, want);
        CHECK(err < 1e-5, "sequence %d: error %g", b, err);
        for (int h = 0; h < HQ; h++)
            for (int64_t i = 0; i < p.seq_q; i++) {
                double got = lse[h * tq + cu_q[b] + i], w = want_lse[h * p.seq_q + i];
                CHECK(fabs(got - w) < 1e-5 * (1 + fabs(w)), "lse[%d][%lld] %g vs %g", h,
                      (long long)(cu_q[b] + i), got, w);
            }
        free(want);
        free(want_lse);
    }
    /* The spare row past the last sequence is neither read nor written. */
    CHECK(!all_written(out + 8 * HQ * D, (size_t)(HQ * D) * 4, 4), "spare row written");

    /* Bad metadata: an error naming it, nothing written. */
    const int32_t bad[] = {0, 3, 2, 8};
    ufa_tensor cb = tensor((void*)bad, UFA_DTYPE_I32, 1, cs);
    seqs.cu_seqlens_q = &cb;
    float* out2 = (float*)poisoned((size_t)(tq * HQ * D) * 4);
    ufa_tensor to2 = tensor(out2, UFA_DTYPE_F32, 3, qs);
    params.lse = NULL;
    CHECK(ufa_attention_forward_varlen(ctx, &tq_, &tk_, &tv_, &to2, &seqs, &params, NULL) ==
              UFA_STATUS_INVALID_ARGUMENT, "decreasing cu_seqlens_q accepted");
    CHECK(strstr(ufa_last_error_message(), "cu_seqlens_q[2]=2 is less than cu_seqlens_q[1]=3") != NULL,
          "message: %s", ufa_last_error_message());
    CHECK(!all_written(out2, (size_t)(tq * HQ * D) * 4, 4) && !all_written(out2 + 9, 4, 4), "written on error");
    CHECK(ufa_attention_forward_varlen(ctx, &tq_, &tk_, &tv_, &to2, NULL, &params, NULL) ==
              UFA_STATUS_INVALID_ARGUMENT, "NULL seqs accepted");

    /* Found by fuzzing (fuzz/regressions/sequences/): out laid over cu_seqlens_q, which the
     * kernels read while they write out, sent later sequences' rows past the end of out. */
    float* out3 = (float*)poisoned((size_t)(tq * HQ * D) * 4);
    int32_t* inside = (int32_t*)(out3 + 2 * HQ * D);
    memcpy(inside, cu_q, sizeof cu_q);
    ufa_tensor to3 = tensor(out3, UFA_DTYPE_F32, 3, qs), ci = tensor(inside, UFA_DTYPE_I32, 1, cs);
    seqs.cu_seqlens_q = &ci;
    CHECK(ufa_attention_forward_varlen(ctx, &tq_, &tk_, &tv_, &to3, &seqs, &params, NULL) ==
              UFA_STATUS_INVALID_ARGUMENT, "out over cu_seqlens_q accepted");
    CHECK(strstr(ufa_last_error_message(), "out shares memory with cu_seqlens_q") != NULL, "message: %s",
          ufa_last_error_message());
    CHECK(memcmp(inside, cu_q, sizeof cu_q) == 0, "cu_seqlens_q overwritten");
    free(q); free(k); free(v); free(out); free(lse); free(out2); free(out3);
}

static void kvcache_paged(ufa_context* ctx) {
    /* Two sequences with 3 and 0 cached keys in pages of 2; each appends one key and one query
     * row attends causally to all of its keys. Pages: sequence 0 -> [4, 1], 1 -> [0]. */
    enum { PAGES = 5, PS = 2, B = 2 };
    const int32_t lens[] = {3, 0}, table[] = {4, 1, 0, 3};
    float* kc = (float*)random_tensor(PAGES * PS * HKV * D, E_F32);
    float* vc = (float*)random_tensor(PAGES * PS * HKV * D, E_F32);
    float* kn = (float*)random_tensor(B * HKV * D, E_F32);
    float* vn = (float*)random_tensor(B * HKV * D, E_F32);
    float* q = (float*)random_tensor(B * HQ * D, E_F32);
    float* out = (float*)poisoned(B * HQ * D * 4);
    const int64_t cshape[] = {PAGES, PS, HKV, D}, nshape[] = {B, 1, HKV, D}, qshape[] = {B, 1, HQ, D};
    const int64_t lshape[] = {B}, tshape[] = {B, 2};
    ufa_tensor tkc = tensor(kc, UFA_DTYPE_F32, 4, cshape), tvc = tensor(vc, UFA_DTYPE_F32, 4, cshape);
    ufa_tensor tkn = tensor(kn, UFA_DTYPE_F32, 4, nshape), tvn = tensor(vn, UFA_DTYPE_F32, 4, nshape);
    ufa_tensor tq = tensor(q, UFA_DTYPE_F32, 4, qshape), to = tensor(out, UFA_DTYPE_F32, 4, qshape);
    ufa_tensor tl = tensor((void*)lens, UFA_DTYPE_I32, 1, lshape);
    ufa_tensor tt = tensor((void*)table, UFA_DTYPE_I32, 2, tshape);
    ufa_kvcache cache = ufa_kvcache_default();
    cache.k_cache = &tkc;
    cache.v_cache = &tvc;
    cache.cache_seqlens = &tl;
    cache.block_table = &tt;
    cache.k_new = &tkn;
    cache.v_new = &tvn;
    size_t ws = 1;
    OK(ufa_kvcache_workspace_size(&tq, &cache, &ws));
    CHECK(ws == 0, "workspace without rotary: %zu bytes", ws);

    /* A rejected call first: 3 cached + 1 new keys need 2 pages; table[0][1] = 7 is no page. */
    float* kc0 = (float*)malloc(PAGES * PS * HKV * D * 4);
    memcpy(kc0, kc, PAGES * PS * HKV * D * 4);
    const int32_t bad_table[] = {4, 7, 0, 3};
    ufa_tensor tbad = tensor((void*)bad_table, UFA_DTYPE_I32, 2, tshape);
    cache.block_table = &tbad;
    ufa_attention_params params = ufa_attention_params_default();
    params.causal = 1;
    CHECK(ufa_attention_forward_kvcache(ctx, &tq, &cache, &to, &params, NULL) == UFA_STATUS_INVALID_ARGUMENT,
          "a block table naming a missing page accepted");
    CHECK(strstr(ufa_last_error_message(), "block_table[0][1]=7") != NULL, "message: %s", ufa_last_error_message());
    CHECK(memcmp(kc0, kc, PAGES * PS * HKV * D * 4) == 0, "cache written on error");
    CHECK(!all_written(out, B * HQ * D * 4, 4), "out written on error");

    cache.block_table = &tt;
    OK(ufa_attention_forward_kvcache(ctx, &tq, &cache, &to, &params, NULL));
    /* The new keys went to sequence 0's slot 3 (page 1, row 1) and sequence 1's slot 0 (page
     * 0, row 0); nothing else changed. */
    CHECK(memcmp(kc + (1 * PS + 1) * HKV * D, kn, HKV * D * 4) == 0, "sequence 0's new key");
    CHECK(memcmp(kc + (0 * PS + 0) * HKV * D, kn + HKV * D, HKV * D * 4) == 0, "sequence 1's new key");
    memcpy(kc0 + (1 * PS + 1) * HKV * D, kn, HKV * D * 4);
    memcpy(kc0 + 0, kn + HKV * D, HKV * D * 4);
    CHECK(memcmp(kc0, kc, PAGES * PS * HKV * D * 4) == 0, "other cache slots changed");
    /* Attention of each sequence over its gathered keys. */
    for (int b = 0; b < B; b++) {
        int n = lens[b] + 1;
        float* kg = (float*)malloc((size_t)(n * HKV * D) * 4);
        float* vg = (float*)malloc((size_t)(n * HKV * D) * 4);
        for (int j = 0; j < n; j++) {
            int page = table[b * 2 + j / PS], row = j % PS;
            memcpy(kg + j * HKV * D, kc + (page * PS + row) * HKV * D, HKV * D * 4);
            memcpy(vg + j * HKV * D, vc + (page * PS + row) * HKV * D, HKV * D * 4);
        }
        struct problem p = {1, 1, n, HQ, HKV, D, D, 0, 1, NULL};
        struct operand qo = rows_of(q, b, HQ), ko = rows_of(kg, 0, HKV), vo = rows_of(vg, 0, HKV);
        struct operand oo = rows_of(out, b, HQ);
        double want[HQ * D], want_lse[HQ];
        reference(&p, &qo, &ko, &vo, want, want_lse);
        double err = rel_error(&oo, &p, want);
        CHECK(err < 1e-5, "sequence %d: error %g", b, err);
        free(kg);
        free(vg);
    }
    free(kc); free(vc); free(kn); free(vn); free(q); free(out); free(kc0);
}

static void merge_split_keys(ufa_context* ctx) {
    /* Attention over 13 keys equals the merge of attention over keys 0..6 and 6..13. */
    enum { S = 3, K1 = 6, K = 13 };
    float* q = (float*)random_tensor(S * HQ * D, E_F32);
    float* k = (float*)random_tensor(K * HKV * D, E_F32);
    float* v = (float*)random_tensor(K * HKV * D, E_F32);
    float* o[2];
    float* l[2];
    ufa_tensor outs[2], lses[2];
    const int64_t qs[] = {1, S, HQ, D}, ls[] = {1, HQ, S};
    for (int part = 0; part < 2; part++) {
        int64_t n = part == 0 ? K1 : K - K1;
        const int64_t ks[] = {1, n, HKV, D};
        o[part] = (float*)poisoned(S * HQ * D * 4);
        l[part] = (float*)poisoned(HQ * S * 4);
        ufa_tensor tq = tensor(q, UFA_DTYPE_F32, 4, qs);
        ufa_tensor tk = tensor(k + (part ? K1 : 0) * HKV * D, UFA_DTYPE_F32, 4, ks);
        ufa_tensor tv = tensor(v + (part ? K1 : 0) * HKV * D, UFA_DTYPE_F32, 4, ks);
        outs[part] = tensor(o[part], UFA_DTYPE_F32, 4, qs);
        lses[part] = tensor(l[part], UFA_DTYPE_F32, 3, ls);
        ufa_attention_params params = ufa_attention_params_default();
        params.lse = &lses[part];
        OK(ufa_attention_forward(ctx, &tq, &tk, &tv, &outs[part], &params, NULL));
    }
    float* merged = (float*)poisoned(S * HQ * D * 4);
    float* merged_lse = (float*)poisoned(HQ * S * 4);
    ufa_tensor tm = tensor(merged, UFA_DTYPE_F32, 4, qs), tml = tensor(merged_lse, UFA_DTYPE_F32, 3, ls);
    OK(ufa_merge_states(ctx, 2, outs, lses, &tm, &tml, NULL));
    struct problem p = {1, S, K, HQ, HKV, D, D, 0, 0, NULL};
    struct operand qo = rows_of(q, 0, HQ), ko = rows_of(k, 0, HKV), vo = rows_of(v, 0, HKV);
    struct operand mo = rows_of(merged, 0, HQ);
    double want[S * HQ * D], want_lse[HQ * S];
    reference(&p, &qo, &ko, &vo, want, want_lse);
    double err = rel_error(&mo, &p, want);
    CHECK(err < 1e-5, "merged error %g", err);
    for (int i = 0; i < HQ * S; i++)
        CHECK(fabs(merged_lse[i] - want_lse[i]) < 1e-5 * (1 + fabs(want_lse[i])), "lse %d: %g vs %g", i,
              merged_lse[i], want_lse[i]);
    CHECK(ufa_merge_states(ctx, 0, outs, lses, &tm, NULL, NULL) == UFA_STATUS_INVALID_ARGUMENT,
          "an empty merge accepted");
    CHECK(ufa_merge_states(ctx, 2, NULL, lses, &tm, NULL, NULL) == UFA_STATUS_INVALID_ARGUMENT,
          "NULL outs accepted");
    for (int part = 0; part < 2; part++) {
        free(o[part]);
        free(l[part]);
    }
    free(q); free(k); free(v); free(merged); free(merged_lse);
}

int main(void) {
    seed_rng("test_sequences");
    ufa_context* ctx = NULL;
    ufa_context_options opts = ufa_context_options_default();
    opts.num_threads = 2;
    OK(ufa_context_create(&opts, &ctx));
    varlen_forward(ctx);
    kvcache_paged(ctx);
    merge_split_keys(ctx);
    ufa_context_destroy(ctx);
    return finish("test_sequences");
}
