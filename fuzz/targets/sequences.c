/* Fuzz target `sequences`: packed batches (ufa_attention_forward_varlen / _backward_varlen), KV
 * caches (ufa_attention_forward_kvcache, ufa_kvcache_workspace_size) and ufa_merge_states, with
 * the int32 metadata (cu_seqlens, seqused_kv, block tables, cache_seqlens, cache_batch_idx)
 * mostly consistent and now and then hostile, and the structs of any claimed size. The library
 * must check every value before following it: each tensor ends at a guard page. */
#include "../harness.h"

/* A struct of `size` bytes as the caller claims (at least the size field, at most a page). */
static void* sized_struct(fz_in* in, void* s, size_t real, int* ok) {
    uint32_t size = (uint32_t)real;
    uint8_t b = fz_u8(in);
    if (b >= 0xf0) {
        static const uint32_t sizes[] = {0, 4, 8, 48, 52, 55, 57, 96, 100, 103, 105, 4096, UINT32_MAX};
        size = b == 0xff ? fz_u32(in) : sizes[b % 13];
    }
    memcpy(s, &size, 4);
    if (size != real) *ok = 0;
    size_t bytes = size < 8 ? 8 : (size > FZ_PAGE ? FZ_PAGE : size);
    bytes = (bytes + 7) & ~(size_t)7;
    void* mem = fz_small_alloc(bytes);
    memcpy(mem, s, bytes < real ? bytes : real);
    return mem;
}

/* Lengths of `batch` sequences, each 0..max, and their cumulative offsets (batch + 1 values). */
static int64_t lengths(fz_in* in, int64_t batch, int64_t max, int32_t* len, int32_t* cu) {
    int64_t m = 0;
    cu[0] = 0;
    for (int64_t b = 0; b < batch; b++) {
        len[b] = (int32_t)fz_range(in, 0, max);
        cu[b + 1] = cu[b] + len[b];
        if (len[b] > m) m = len[b];
    }
    return m;
}

/* max_seqlen as promised: the true maximum, or more, or less, or hostile. */
static int64_t max_seqlen(fz_in* in, int64_t truth) {
    uint8_t b = fz_u8(in);
    if (b < 0xd0) return truth;
    if (b < 0xe8) return truth + fz_range(in, -2, 3);
    return fz_int(in);
}

/* Rows of a packed tensor holding `total` rows: exactly, with spare rows, or short. */
static int64_t rows(fz_in* in, int64_t total) {
    uint8_t b = fz_u8(in);
    if (b < 0xc0) return total;
    return total + fz_range(in, -2, 3) < 0 ? 0 : total + fz_range(in, -2, 3);
}

static const int32_t dts[] = {UFA_DTYPE_F32, UFA_DTYPE_F16, UFA_DTYPE_BF16};

static int varlen(fz_in* in, fz_call* c, ufa_context* ctx, int backward) {
    int32_t dt = dts[fz_u8(in) % 3];
    int64_t batch = fz_range(in, 0, 4), Hkv = fz_range(in, 1, 2), Hq = Hkv * fz_range(in, 1, 2);
    int64_t D = fz_range(in, 1, 8), Dv = fz_u8(in) < 0xc0 ? D : fz_range(in, 1, 8);
    int32_t len_q[8], cu_q[9], len_kv[8], cu_kv[9], used[8];
    int64_t mq = lengths(in, batch, 5, len_q, cu_q), mkv = lengths(in, batch, 5, len_kv, cu_kv);
    int64_t tq = rows(in, cu_q[batch]);
    int paged = !backward && (fz_u8(in) & 3) == 1;
    int with_used = !backward && (fz_u8(in) & 3) == 1;
    for (int64_t b = 0; b < batch; b++) used[b] = (int32_t)fz_range(in, 0, len_kv[b]);
    int64_t page = 1 << fz_range(in, 0, 3), pages_per_seq = (5 + page - 1) / page;
    int64_t n_pages = fz_range(in, 1, 8);
    int64_t tk = paged ? n_pages : rows(in, cu_kv[batch]);
    const int64_t qs[3] = {tq, Hq, D}, os[3] = {tq, Hq, Dv};
    const int64_t ks[4] = {tk, page, Hkv, D}, vs[4] = {tk, page, Hkv, Dv};
    const int64_t pk[3] = {tk, Hkv, D}, pv[3] = {tk, Hkv, Dv}, ls[2] = {Hq, tq};
    const int64_t cs[1] = {batch + 1}, us[1] = {batch}, bt[2] = {batch, pages_per_seq};
    int q = fz_tensor_gen(in, c, dt, 3, qs);
    int k = paged ? fz_tensor_gen(in, c, dt, 4, ks) : fz_tensor_gen(in, c, dt, 3, pk);
    int v = paged ? fz_tensor_gen(in, c, dt, 4, vs) : fz_tensor_gen(in, c, dt, 3, pv);
    int o = fz_tensor_gen(in, c, dt, 3, os);
    int dout = 0, lse = 0, dq = 0, dk = 0, dv = 0;
    if (backward) {
        dout = fz_tensor_gen(in, c, dt, 3, os);
        lse = fz_tensor_gen(in, c, UFA_DTYPE_F32, 2, ls);
        dq = fz_tensor_gen(in, c, dt, 3, qs);
        dk = fz_tensor_gen(in, c, dt, 3, pk);
        dv = fz_tensor_gen(in, c, dt, 3, pv);
    }
    int cq = fz_tensor_gen(in, c, UFA_DTYPE_I32, 1, cs), ck = fz_tensor_gen(in, c, UFA_DTYPE_I32, 1, cs);
    int u = with_used ? fz_tensor_gen(in, c, UFA_DTYPE_I32, 1, us) : -1;
    int t = paged ? fz_tensor_gen(in, c, UFA_DTYPE_I32, 2, bt) : -1;
    int ok = 1;
    ufa_varlen s = ufa_varlen_default();
    s.checked = fz_u8(in) & 1;
    s.max_seqlen_q = max_seqlen(in, mq);
    s.max_seqlen_kv = max_seqlen(in, mkv);
    const ufa_attention_params* p = fz_params(in, c, backward ? NULL : ls, 2, batch, Hq, mq, mkv, &ok);
    uint8_t nulls = fz_u8(in);
    if (!fz_layout(in, c)) return -1;
    fz_params_fix(c, p);
    if (backward && p && fz_params_size_known(p->struct_size) && p->lse) ok = 0;
    fz_fill_i32(in, c, cq, cu_q, batch + 1);
    fz_fill_i32(in, c, ck, cu_kv, batch + 1);
    if (u >= 0) fz_fill_i32(in, c, u, used, batch);
    if (t >= 0) { /* each sequence its own pages, in a shuffled order, some shared */
        int32_t table[8 * 8];
        for (int64_t i = 0; i < batch * pages_per_seq; i++) table[i] = (int32_t)fz_range(in, 0, n_pages - 1);
        fz_fill_i32(in, c, t, table, batch * pages_per_seq);
    }
    s.cu_seqlens_q = fz_desc(c, cq);
    s.cu_seqlens_kv = fz_desc(c, ck);
    if (u >= 0) s.seqused_kv = fz_desc(c, u);
    if (t >= 0) s.block_table = fz_desc(c, t);
    const ufa_varlen* sp = (const ufa_varlen*)sized_struct(in, &s, sizeof s, &ok);
    const ufa_tensor* d[FZ_MAX_TENSORS];
    for (int i = 0; i < c->n; i++) d[i] = fz_desc(c, i);
    int must_fail = c->any_invalid || !ok;
    if (nulls >= 0xf0) {
        must_fail = 1;
        if (nulls == 0xff) ctx = NULL;
        else if (nulls == 0xfe) sp = NULL;
        else d[nulls % (backward ? 9 : 4)] = NULL;
    }
    fz_snapshot(c);
    int st = backward ? ufa_attention_backward_varlen(ctx, d[q], d[k], d[v], d[o], d[dout], d[lse], d[dq], d[dk],
                                                      d[dv], sp, p, NULL)
                      : ufa_attention_forward_varlen(ctx, d[q], d[k], d[v], d[o], sp, p, NULL);
    fz_check(backward ? "ufa_attention_backward_varlen" : "ufa_attention_forward_varlen", st, must_fail);
    return 0;
}

static int kvcache(fz_in* in, fz_call* c, ufa_context* ctx, int workspace_query) {
    int32_t dt = dts[fz_u8(in) % 3];
    int64_t batch = fz_range(in, 1, 3), Hkv = fz_range(in, 1, 2), Hq = Hkv * fz_range(in, 1, 2);
    int64_t D = 2 * fz_range(in, 1, 4), Dv = fz_u8(in) < 0xc0 ? D : fz_range(in, 1, 8);
    int64_t Sq = fz_range(in, 1, 3), cap = fz_range(in, 1, 8), Sn = fz_range(in, 0, 2);
    uint8_t f = fz_u8(in);
    int paged = f & 1, with_new = (f & 6) != 0, with_idx = !paged && (f & 8), with_rot = with_new && (f & 16);
    int64_t batch_cache = with_idx ? batch + fz_range(in, 0, 2) : batch;
    int64_t page = 1 << fz_range(in, 0, 2), pages_per_seq = (cap + page - 1) / page;
    int64_t n_pages = fz_range(in, 1, 8);
    int32_t lens[8], idx[8], table[8 * 8];
    for (int64_t b = 0; b < batch; b++) {
        lens[b] = (int32_t)fz_range(in, 0, cap - (with_new ? Sn : 0));
        idx[b] = (int32_t)((b + fz_range(in, 0, 3)) % batch_cache);
    }
    for (int64_t i = 0; i < batch * pages_per_seq; i++) table[i] = (int32_t)fz_range(in, 0, n_pages - 1);
    const int64_t qs[4] = {batch, Sq, Hq, D}, os[4] = {batch, Sq, Hq, Dv}, ls[3] = {batch, Hq, Sq};
    const int64_t kcs[4] = {paged ? n_pages : batch_cache, paged ? page : cap, Hkv, D};
    const int64_t vcs[4] = {kcs[0], kcs[1], Hkv, Dv};
    const int64_t kns[4] = {batch, Sn, Hkv, D}, vns[4] = {batch, Sn, Hkv, Dv};
    int64_t rot_rows = cap + fz_range(in, -1, 1), half = fz_range(in, 1, D / 2);
    const int64_t rs[2] = {rot_rows, half}, bs[1] = {batch}, bt[2] = {batch, pages_per_seq};
    int q = fz_tensor_gen(in, c, dt, 4, qs), o = fz_tensor_gen(in, c, dt, 4, os);
    int kc = fz_tensor_gen(in, c, dt, 4, kcs), vc = fz_tensor_gen(in, c, dt, 4, vcs);
    int sl = fz_tensor_gen(in, c, UFA_DTYPE_I32, 1, bs);
    int tb = paged ? fz_tensor_gen(in, c, UFA_DTYPE_I32, 2, bt) : -1;
    int bi = with_idx ? fz_tensor_gen(in, c, UFA_DTYPE_I32, 1, bs) : -1;
    int kn = with_new ? fz_tensor_gen(in, c, dt, 4, kns) : -1, vn = with_new ? fz_tensor_gen(in, c, dt, 4, vns) : -1;
    int rc = with_rot ? fz_tensor_gen(in, c, dt, 2, rs) : -1, rsn = with_rot ? fz_tensor_gen(in, c, dt, 2, rs) : -1;
    int ok = 1, ok_params = 1;
    const ufa_attention_params* p = fz_params(in, c, ls, 3, batch, Hq, Sq, cap, &ok_params);
    uint8_t nulls = fz_u8(in);
    uint8_t ws = fz_u8(in);
    if (!fz_layout(in, c)) return -1;
    fz_params_fix(c, p);
    fz_fill_i32(in, c, sl, lens, batch);
    if (tb >= 0) fz_fill_i32(in, c, tb, table, batch * pages_per_seq);
    if (bi >= 0) fz_fill_i32(in, c, bi, idx, batch);
    ufa_kvcache kv = ufa_kvcache_default();
    kv.checked = fz_u8(in) & 1;
    kv.k_cache = fz_desc(c, kc);
    kv.v_cache = fz_desc(c, vc);
    kv.cache_seqlens = fz_desc(c, sl);
    if (tb >= 0) kv.block_table = fz_desc(c, tb);
    if (bi >= 0) kv.cache_batch_idx = fz_desc(c, bi);
    if (kn >= 0) kv.k_new = fz_desc(c, kn), kv.v_new = fz_desc(c, vn);
    if (rc >= 0) kv.rotary_cos = fz_desc(c, rc), kv.rotary_sin = fz_desc(c, rsn);
    kv.rotary_interleaved = f >> 7;
    if (ws & 1) { /* CUDA scratch: a CPU call must not need it; give real (guarded) bytes */
        kv.workspace_bytes = (size_t)fz_range(in, 0, 64) * 16;
        kv.workspace = fz_small_alloc(kv.workspace_bytes);
    }
    /* Half the pair (k_new without v_new, a rotary table alone) must be rejected. */
    if ((ws & 6) == 2 && kn >= 0) kv.v_new = NULL, ok = 0;
    if ((ws & 6) == 4 && rc >= 0) kv.rotary_sin = NULL, ok = 0;
    const ufa_kvcache* kp = (const ufa_kvcache*)sized_struct(in, &kv, sizeof kv, &ok);
    const ufa_tensor* dq = fz_desc(c, q);
    const ufa_tensor* dout = fz_desc(c, o);
    int must_fail = c->any_invalid || !ok || !ok_params;
    if (nulls >= 0xf0) {
        must_fail = 1;
        if (nulls == 0xff) ctx = NULL;
        else if (nulls == 0xfe) kp = NULL;
        else if (nulls & 1) dq = NULL;
        else dout = NULL;
    }
    fz_snapshot(c);
    if (workspace_query) {
        /* Only q and the cache's descriptors are arguments here, and their values are not read:
         * bad cache_seqlens may pass. */
        int ws_fail = !ok || kp == NULL || dq == NULL;
        const int args[] = {q, kc, vc, sl, tb, bi, kn, vn, rc, rsn};
        for (size_t i = 0; i < sizeof args / sizeof args[0]; i++)
            if (args[i] >= 0 && c->t[args[i]].klass != FZ_VALID && !c->t[args[i]].on_cuda) ws_fail = 1;
        size_t bytes = 12345;
        int st = ufa_kvcache_workspace_size(dq, kp, &bytes);
        fz_check("ufa_kvcache_workspace_size", st, ws_fail);
        if (st != UFA_STATUS_SUCCESS && bytes != 12345)
            fz_fail("wrote *out on failure", "ufa_kvcache_workspace_size", st);
        return 0;
    }
    int st = ufa_attention_forward_kvcache(ctx, dq, kp, dout, p, NULL);
    fz_check("ufa_attention_forward_kvcache", st, must_fail);
    return 0;
}

static int merge(fz_in* in, fz_call* c, ufa_context* ctx) {
    int64_t n = fz_range(in, 0, 4);
    int64_t B = fz_range(in, 1, 2), S = fz_range(in, 1, 4), H = fz_range(in, 1, 3), D = fz_range(in, 1, 8);
    const int64_t os[4] = {B, S, H, D}, ls[3] = {B, H, S};
    int outs[4], lses[4];
    for (int64_t i = 0; i < n; i++) {
        outs[i] = fz_tensor_gen(in, c, dts[fz_u8(in) % 3], 4, os);
        lses[i] = fz_tensor_gen(in, c, UFA_DTYPE_F32, 3, ls);
    }
    /* Outputs in place (states[0]'s own tensors) or their own. */
    uint8_t f = fz_u8(in);
    int in_place = (f & 2) && n > 0;
    int o = in_place ? outs[0] : fz_tensor_gen(in, c, dts[fz_u8(in) % 3], 4, os);
    int l = !(f & 1) ? -1 : in_place ? lses[0] : fz_tensor_gen(in, c, UFA_DTYPE_F32, 3, ls);
    if (!fz_layout(in, c)) return -1;
    /* The arrays of descriptors in guarded memory of exactly n entries each. */
    ufa_tensor a[4], b[4];
    for (int64_t i = 0; i < n; i++) a[i] = c->t[outs[i]].t, b[i] = c->t[lses[i]].t;
    const ufa_tensor* pa = (const ufa_tensor*)fz_small_copy(a, sizeof(ufa_tensor) * (size_t)n);
    const ufa_tensor* pb = (const ufa_tensor*)fz_small_copy(b, sizeof(ufa_tensor) * (size_t)n);
    int must_fail = c->any_invalid;
    if (f >= 0xf0) {
        if (f & 4) ctx = NULL, must_fail = 1;
        else if (f & 8) pa = NULL, must_fail |= n > 0;
        else pb = NULL, must_fail |= n > 0;
    }
    fz_snapshot(c);
    int st = ufa_merge_states(ctx, (size_t)n, pa, pb, fz_desc(c, o), l >= 0 ? fz_desc(c, l) : NULL, NULL);
    fz_check("ufa_merge_states", st, must_fail);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    fz_init_memory();
    fz_in in = {data, size};
    fz_call call;
    fz_call_reset(&call);
    uint8_t op = fz_u8(&in);
    ufa_context* ctx = fz_context(op >> 7);
    switch (op % 5) {
    case 0: return varlen(&in, &call, ctx, 0);
    case 1: return varlen(&in, &call, ctx, 1);
    case 2: return kvcache(&in, &call, ctx, 0);
    case 3: return kvcache(&in, &call, ctx, 1);
    default: return merge(&in, &call, ctx);
    }
}
