/* Fuzz target `native`: ufa_attention_forward and ufa_attention_backward with every descriptor,
 * the parameter struct and its optional tensors built from the input (see ../harness.h), plus
 * ufa_context_create with odd options. */
#include "../harness.h"

static const ufa_attention_params* g_params;

/* ufa_context_create with an options struct of any claimed size and odd fields. */
static void fuzz_context_create(fz_in* in) {
    ufa_context_options o = ufa_context_options_default();
    uint8_t f = fz_u8(in);
    int must_fail = 0;
    if (f & 1) {
        o.struct_size = (uint32_t)fz_int(in);
        must_fail |= o.struct_size != sizeof o;
    }
    o.num_threads = (uint32_t)fz_range(in, 0, 3);
    if (f & 2) {
        o.device_ordinal = (int32_t)fz_int(in);
        must_fail |= o.device_ordinal != -1; /* no CUDA device here */
    }
    /* The last three are no kernel family; case is the library's choice. */
    static const char* isas[] = {NULL, "portable", "avx2", "avx512", "avx512bf16", "AVX2", "", "portable\n", "x"};
    uint8_t isa = fz_u8(in) % 9;
    o.cpu_isa = isas[isa];
    must_fail |= isa >= 6;
    size_t bytes = o.struct_size < 4 ? 4 : (o.struct_size > FZ_PAGE ? FZ_PAGE : o.struct_size);
    bytes = (bytes + 7) & ~(size_t)7;
    void* mem = fz_small_alloc(bytes);
    memcpy(mem, &o, bytes < sizeof o ? bytes : sizeof o);
    ufa_context* ctx = NULL;
    int st = ufa_context_create(f & 4 ? NULL : (const ufa_context_options*)mem, &ctx);
    fz_check("ufa_context_create", st, must_fail && !(f & 4));
    if (st == UFA_STATUS_SUCCESS) {
        uint32_t n = 0;
        const char* isa = NULL;
        fz_check("ufa_context_num_threads", ufa_context_num_threads(ctx, &n), 0);
        fz_check("ufa_context_cpu_isa", ufa_context_cpu_isa(ctx, &isa), 0);
        fz_check("ufa_device_count", ufa_device_count(ctx, (int32_t)fz_int(in), &n), 0);
        ufa_context_destroy(ctx);
    } else if (ctx != NULL) {
        fz_fail("wrote *out on failure", "ufa_context_create", st);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    fz_init_memory();
    fz_in in = {data, size};
    fz_call call;
    fz_call* c = &call;
    fz_call_reset(c);

    uint8_t op = fz_u8(&in);
    if (op >= 0xf8) {
        fuzz_context_create(&in);
        return 0;
    }
    ufa_context* ctx = fz_context(op >> 1);
    int backward = op & 1;

    static const int32_t dts[] = {UFA_DTYPE_F32, UFA_DTYPE_F16, UFA_DTYPE_BF16};
    int32_t dt = dts[fz_u8(&in) % 3];
    int64_t B = fz_range(&in, 1, 3), Sq = fz_range(&in, 1, 6), Skv = fz_range(&in, 1, 6);
    int64_t Hkv = fz_range(&in, 1, 3), Hq = Hkv * fz_range(&in, 1, 3);
    int64_t D = fz_range(&in, 1, 16), Dv = fz_range(&in, 1, 16);
    /* The same head dimension for V most of the time, as most callers have. */
    if (fz_u8(&in) < 0xc0) Dv = D;

    const int64_t qs[4] = {B, Sq, Hq, D}, ks[4] = {B, Skv, Hkv, D}, vs[4] = {B, Skv, Hkv, Dv};
    const int64_t os[4] = {B, Sq, Hq, Dv}, ls[3] = {B, Hq, Sq};
    int q = fz_tensor_gen(&in, c, dt, 4, qs), k = fz_tensor_gen(&in, c, dt, 4, ks);
    int v = fz_tensor_gen(&in, c, dt, 4, vs), o = fz_tensor_gen(&in, c, dt, 4, os);
    int params_ok = 1;
    int dout = 0, lse = 0, dq = 0, dk = 0, dv = 0;
    if (backward) {
        dout = fz_tensor_gen(&in, c, dt, 4, os);
        lse = fz_tensor_gen(&in, c, UFA_DTYPE_F32, 3, ls);
        dq = fz_tensor_gen(&in, c, dt, 4, qs);
        dk = fz_tensor_gen(&in, c, dt, 4, ks);
        dv = fz_tensor_gen(&in, c, dt, 4, vs);
    }
    g_params = fz_params(&in, c, ls, 3, B, Hq, Sq, Skv, &params_ok);
    /* NULL pointers for a required argument, now and then. */
    uint8_t nulls = fz_u8(&in);
    if (!fz_layout(&in, c)) return -1;
    fz_params_fix(c, g_params);
    if (backward && g_params && fz_params_size_known(g_params->struct_size) && g_params->lse)
        params_ok = 0; /* the backward takes the LSE as an argument, never in params */

    const ufa_tensor* d[FZ_MAX_TENSORS];
    for (int i = 0; i < c->n; i++) d[i] = fz_desc(c, i);
    int must_fail = c->any_invalid || !params_ok;
    if (nulls >= 0xf0) {
        must_fail = 1;
        if (nulls == 0xff) ctx = NULL;
        else d[nulls % (backward ? 9 : 4)] = NULL;
    }
    fz_snapshot(c);
    int st;
    if (!backward)
        st = ufa_attention_forward(ctx, d[q], d[k], d[v], d[o], g_params, NULL);
    else
        st = ufa_attention_backward(ctx, d[q], d[k], d[v], d[o], d[dout], d[lse], d[dq], d[dk], d[dv], g_params,
                                    NULL);
    fz_check(backward ? "ufa_attention_backward" : "ufa_attention_forward", st, must_fail);
    return 0;
}
