/* The native API on CUDA tensors: device memory from the driver API, work queued on the
 * caller's stream, results against the float64 reference. Exits 0 with "skipped" where no
 * CUDA device can be used. The driver is loaded with dlopen, so this builds without CUDA. */
#define _POSIX_C_SOURCE 200809L
#include <dlfcn.h>

#include "common.h"
#include "mfa.h"
#include "ufa.h"

static int (*cuInit)(unsigned);
static int (*cuDeviceGet)(int*, int);
static int (*cuDevicePrimaryCtxRetain)(void**, int);
static int (*cuCtxSetCurrent)(void*);
static int (*cuMemAlloc)(uint64_t*, size_t);
static int (*cuMemFree)(uint64_t);
static int (*cuMemcpyHtoD)(uint64_t, const void*, size_t);
static int (*cuMemcpyDtoH)(void*, uint64_t, size_t);
static int (*cuStreamCreate)(void**, unsigned);
static int (*cuStreamSynchronize)(void*);
static int (*cuStreamDestroy)(void*);

/* POSIX's way to turn dlsym's object pointer into a function pointer without a cast ISO C
 * forbids. */
#define LOAD(lib, var, name) (*(void**)(&var) = dlsym(lib, name))

static int load_driver(void) {
    void* lib = dlopen("libcuda.so.1", RTLD_NOW);
    if (!lib) return 0;
    return LOAD(lib, cuInit, "cuInit") && LOAD(lib, cuDeviceGet, "cuDeviceGet") &&
           LOAD(lib, cuDevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain") &&
           LOAD(lib, cuCtxSetCurrent, "cuCtxSetCurrent") && LOAD(lib, cuMemAlloc, "cuMemAlloc_v2") &&
           LOAD(lib, cuMemFree, "cuMemFree_v2") && LOAD(lib, cuMemcpyHtoD, "cuMemcpyHtoD_v2") &&
           LOAD(lib, cuMemcpyDtoH, "cuMemcpyDtoH_v2") && LOAD(lib, cuStreamCreate, "cuStreamCreate") &&
           LOAD(lib, cuStreamSynchronize, "cuStreamSynchronize") &&
           LOAD(lib, cuStreamDestroy, "cuStreamDestroy_v2");
}

static uint64_t upload(const void* host, size_t bytes) {
    uint64_t d = 0;
    CHECK(cuMemAlloc(&d, bytes) == 0, "cuMemAlloc");
    CHECK(cuMemcpyHtoD(d, host, bytes) == 0, "cuMemcpyHtoD");
    return d;
}

/* ||a - b|| / ||b|| over n elements of type t. */
static double rel_diff(const void* a, const void* b, size_t n, enum elem t) {
    double diff = 0, norm = 0;
    for (size_t i = 0; i < n; i++) {
        double x = load(a, t, i), y = load(b, t, i);
        diff += (x - y) * (x - y);
        norm += y * y;
    }
    return norm > 0 ? sqrt(diff / norm) : sqrt(diff / (double)n);
}

/* The backward on the GPU (queued on `stream`, deterministic mode) against the CPU backward from
 * the same saved forward (q, k, v, out, lse, dout); the CPU's gradients are checked against the
 * float64 reference by the Rust tests, so agreement within the dtype's bound checks the GPU's. */
static void run_backward(ufa_context* ctx, void* stream, enum elem type, int dt, int64_t S, int64_t HQ,
                         int64_t HK, int64_t D, const ufa_attention_params* p, const void* q, const void* k,
                         const void* v, const void* out, uint64_t gq, uint64_t gk, uint64_t gv, uint64_t gout) {
    size_t nq = (size_t)(S * HQ * D), nk = (size_t)(S * HK * D), es = elem_size(type), nl = (size_t)(HQ * S);
    int64_t qs[4] = {1, S, HQ, D}, ks[4] = {1, S, HK, D}, ls[3] = {1, HQ, S};
    void *dout = random_tensor(nq, type), *lse = poisoned(nl * 4);
    void *gpu[3] = {poisoned(nq * es), poisoned(nk * es), poisoned(nk * es)};
    void *cpu[3] = {poisoned(nq * es), poisoned(nk * es), poisoned(nk * es)};
    /* The forward again, with its LSE, on the stream. */
    uint64_t glse = upload(lse, nl * 4), gdo = upload(dout, nq * es);
    uint64_t gg[3] = {upload(gpu[0], nq * es), upload(gpu[1], nk * es), upload(gpu[2], nk * es)};
    ufa_tensor tq = {(void*)(uintptr_t)gq, dt, UFA_DEVICE_CUDA, 0, 4, qs, NULL, 0};
    ufa_tensor tk = {(void*)(uintptr_t)gk, dt, UFA_DEVICE_CUDA, 0, 4, ks, NULL, 0};
    ufa_tensor tv = {(void*)(uintptr_t)gv, dt, UFA_DEVICE_CUDA, 0, 4, ks, NULL, 0};
    ufa_tensor to = {(void*)(uintptr_t)gout, dt, UFA_DEVICE_CUDA, 0, 4, qs, NULL, 0};
    ufa_tensor tl = {(void*)(uintptr_t)glse, UFA_DTYPE_F32, UFA_DEVICE_CUDA, 0, 3, ls, NULL, 0};
    ufa_tensor tdo = {(void*)(uintptr_t)gdo, dt, UFA_DEVICE_CUDA, 0, 4, qs, NULL, 0};
    ufa_tensor tg[3] = {{(void*)(uintptr_t)gg[0], dt, UFA_DEVICE_CUDA, 0, 4, qs, NULL, 0},
                        {(void*)(uintptr_t)gg[1], dt, UFA_DEVICE_CUDA, 0, 4, ks, NULL, 0},
                        {(void*)(uintptr_t)gg[2], dt, UFA_DEVICE_CUDA, 0, 4, ks, NULL, 0}};
    ufa_attention_params pf = *p;
    pf.lse = &tl;
    CHECK(ufa_attention_forward(ctx, &tq, &tk, &tv, &to, &pf, stream) == UFA_STATUS_SUCCESS, "fwd+lse: %s",
          ufa_last_error_message());
    ufa_attention_params pb = *p;
    pb.deterministic = true;
    ufa_status s = ufa_attention_backward(ctx, &tq, &tk, &tv, &to, &tdo, &tl, &tg[0], &tg[1], &tg[2], &pb, stream);
    CHECK(s == UFA_STATUS_SUCCESS, "cuda backward %s: %s", elem_name(type), ufa_last_error_message());
    CHECK(cuStreamSynchronize(stream) == 0, "sync");
    CHECK(cuMemcpyDtoH(lse, glse, nl * 4) == 0, "download lse");
    for (int i = 0; i < 3; i++) CHECK(cuMemcpyDtoH(gpu[i], gg[i], (i ? nk : nq) * es) == 0, "download grad");
    /* The same backward on the CPU from the GPU's saved forward (out was downloaded by the caller). */
    ufa_tensor hq = {(void*)q, dt, UFA_DEVICE_CPU, 0, 4, qs, NULL, 0}, hk = {(void*)k, dt, UFA_DEVICE_CPU, 0, 4, ks, NULL, 0};
    ufa_tensor hv = {(void*)v, dt, UFA_DEVICE_CPU, 0, 4, ks, NULL, 0}, ho = {(void*)out, dt, UFA_DEVICE_CPU, 0, 4, qs, NULL, 0};
    ufa_tensor hl = {lse, UFA_DTYPE_F32, UFA_DEVICE_CPU, 0, 3, ls, NULL, 0}, hdo = {dout, dt, UFA_DEVICE_CPU, 0, 4, qs, NULL, 0};
    ufa_tensor hg[3] = {{cpu[0], dt, UFA_DEVICE_CPU, 0, 4, qs, NULL, 0},
                        {cpu[1], dt, UFA_DEVICE_CPU, 0, 4, ks, NULL, 0},
                        {cpu[2], dt, UFA_DEVICE_CPU, 0, 4, ks, NULL, 0}};
    CHECK(ufa_attention_backward(ctx, &hq, &hk, &hv, &ho, &hdo, &hl, &hg[0], &hg[1], &hg[2], p, NULL) ==
              UFA_STATUS_SUCCESS, "cpu backward: %s", ufa_last_error_message());
    const char* names[3] = {"dq", "dk", "dv"};
    for (int i = 0; i < 3; i++) {
        size_t n = i ? nk : nq;
        double err = rel_diff(gpu[i], cpu[i], n, type);
        printf("cuda backward %s S%lld HQ%lld HK%lld D%lld causal%d: %s differs from the CPU's by %.2e\n",
               elem_name(type), (long long)S, (long long)HQ, (long long)HK, (long long)D, p->causal, names[i], err);
        CHECK(all_written(gpu[i], n * es, es) && err < tolerance(type, type), "cuda backward %s: %s error %.3g",
              elem_name(type), names[i], err);
    }
    cuMemFree(glse); cuMemFree(gdo);
    for (int i = 0; i < 3; i++) {
        cuMemFree(gg[i]);
        free(gpu[i]);
        free(cpu[i]);
    }
    free(dout); free(lse);
}

static void run(ufa_context* ctx, void* stream, enum elem type, int64_t S, int64_t HQ, int64_t HK, int64_t D,
                int causal) {
    size_t nq = (size_t)(S * HQ * D), nk = (size_t)(S * HK * D), es = elem_size(type);
    void *q = random_tensor(nq, type), *k = random_tensor(nk, type), *v = random_tensor(nk, type);
    void* out = poisoned(nq * es);
    uint64_t dq = upload(q, nq * es), dk = upload(k, nk * es), dv = upload(v, nk * es), dout = upload(out, nq * es);
    int64_t qs[4] = {1, S, HQ, D}, ks[4] = {1, S, HK, D};
    int dt = type == E_F32 ? UFA_DTYPE_F32 : type == E_F16 ? UFA_DTYPE_F16 : UFA_DTYPE_BF16;
    ufa_tensor tq = {(void*)(uintptr_t)dq, dt, UFA_DEVICE_CUDA, 0, 4, qs, NULL, 0};
    ufa_tensor tk = {(void*)(uintptr_t)dk, dt, UFA_DEVICE_CUDA, 0, 4, ks, NULL, 0};
    ufa_tensor tv = {(void*)(uintptr_t)dv, dt, UFA_DEVICE_CUDA, 0, 4, ks, NULL, 0};
    ufa_tensor to = {(void*)(uintptr_t)dout, dt, UFA_DEVICE_CUDA, 0, 4, qs, NULL, 0};
    ufa_attention_params p = ufa_attention_params_default();
    p.causal = causal;
    ufa_status s = ufa_attention_forward(ctx, &tq, &tk, &tv, &to, &p, stream);
    CHECK(s == UFA_STATUS_SUCCESS, "cuda %s: %s", elem_name(type), ufa_last_error_message());
    CHECK(cuStreamSynchronize(stream) == 0, "sync");
    CHECK(cuMemcpyDtoH(out, dout, nq * es) == 0, "download");
    struct problem pr = {1, S, S, HQ, HK, D, D, 0, causal, NULL};
    struct operand oq = {q, type, {0}}, ok = {k, type, {0}}, ov = {v, type, {0}}, oo = {out, type, {0}};
    strides_of(S, HQ, D, 0, oq.st);
    strides_of(S, HQ, D, 0, oo.st);
    strides_of(S, HK, D, 0, ok.st);
    strides_of(S, HK, D, 0, ov.st);
    double *ref = malloc(nq * sizeof(double)), *lse = malloc((size_t)(HQ * S) * sizeof(double));
    reference(&pr, &oq, &ok, &ov, ref, lse);
    double err = rel_error(&oo, &pr, ref);
    printf("cuda %s S%lld HQ%lld HK%lld D%lld causal%d: relative error %.2e\n", elem_name(type), (long long)S,
           (long long)HQ, (long long)HK, (long long)D, causal, err);
    CHECK(all_written(out, nq * es, es) && err < tolerance(type, type), "cuda %s: error %.3g", elem_name(type), err);
    run_backward(ctx, stream, type, dt, S, HQ, HK, D, &p, q, k, v, out, dq, dk, dv, dout);
    /* A CPU pointer described as a CUDA tensor is an error, not a crash. */
    ufa_tensor host = tq;
    host.data = q;
    s = ufa_attention_forward(ctx, &host, &tk, &tv, &to, &p, stream);
    CHECK(s != UFA_STATUS_SUCCESS, "host pointer as a CUDA tensor was accepted");
    cuMemFree(dq); cuMemFree(dk); cuMemFree(dv); cuMemFree(dout);
    free(q); free(k); free(v); free(out); free(ref); free(lse);
}

/* UMFA's API on device memory: buffers wrapping device pointers, the README's 19-argument call,
 * default [batch, heads, seq, dim] layout, fp16 in and fp32 out. With `umfa_style` the device
 * pointers are wrapped by mfa_buffer_from_ptr, as UMFA's README shows (it once made the CPU read
 * device memory): the driver says where they live and the call runs on the GPU. */
static void run_mfa(ufa_context* ctx, int umfa_style) {
    const uint32_t B = 2, S = 77, H = 4;
    const uint16_t D = 64;
    size_t n = (size_t)B * S * H * D;
    void *q = random_tensor(n, E_F16), *k = random_tensor(n, E_F16), *v = random_tensor(n, E_F16);
    float* out = poisoned(n * 4);
    uint64_t d[4] = {upload(q, n * 2), upload(k, n * 2), upload(v, n * 2), upload(out, n * 4)};
    mfa_buffer_t b[4];
    for (int i = 0; i < 4; i++) {
        void* ptr = (void*)(uintptr_t)d[i];
        size_t bytes = n * (i == 3 ? 4 : 2);
        mfa_error_t w = umfa_style ? mfa_buffer_from_ptr(ctx, ptr, bytes, &b[i])
                                   : mfa_buffer_from_cuda_ptr(ctx, ptr, bytes, 0, &b[i]);
        CHECK(w == MFA_SUCCESS, "wrap: %s", ufa_last_error_message());
    }
    mfa_error_t e = mfa_attention_forward(ctx, b[0], b[1], b[2], b[3], B, S, S, H, D, 0.0f, true, MFA_PRECISION_FP16,
                                          MFA_PRECISION_FP32, MFA_PRECISION_FP32, false, false, false, false);
    CHECK(e == MFA_SUCCESS, "mfa on cuda: %s", ufa_last_error_message());
    /* Synchronous copies on the legacy default stream come after the attention kernel. */
    CHECK(cuMemcpyDtoH(out, d[3], n * 4) == 0, "download");
    struct problem pr = {B, S, S, H, H, D, D, 0, 1, NULL};
    struct operand oq = {q, E_F16, {0}}, ok = {k, E_F16, {0}}, ov = {v, E_F16, {0}}, oo = {out, E_F32, {0}};
    strides_of(S, H, D, 1, oq.st);
    strides_of(S, H, D, 1, ok.st);
    strides_of(S, H, D, 1, ov.st);
    strides_of(S, H, D, 1, oo.st);
    double *ref = malloc(n * sizeof(double)), *lse = malloc((size_t)B * H * S * sizeof(double));
    reference(&pr, &oq, &ok, &ov, ref, lse);
    double err = rel_error(&oo, &pr, ref);
    printf("mfa on cuda (%s) f16->f32 B%u S%u H%u D%u causal: relative error %.2e\n",
           umfa_style ? "mfa_buffer_from_ptr" : "mfa_buffer_from_cuda_ptr", B, S, H, D, err);
    CHECK(all_written(out, n * 4, 4) && err < 1e-2, "mfa cuda: error %.3g", err);
    /* A host buffer among device ones is refused by the core's device check. */
    mfa_buffer_t host = NULL;
    CHECK(mfa_buffer_from_ptr(ctx, q, n * 2, &host) == MFA_SUCCESS, "wrap host");
    e = mfa_attention_forward(ctx, host, b[1], b[2], b[3], B, S, S, H, D, 0.0f, true, MFA_PRECISION_FP16,
                              MFA_PRECISION_FP32, MFA_PRECISION_FP32, false, false, false, false);
    CHECK(e == MFA_ERROR_INVALID_ARGS, "mixed devices gave %d", e);
    mfa_destroy_buffer(host);
    for (int i = 0; i < 4; i++) {
        mfa_destroy_buffer(b[i]);
        cuMemFree(d[i]);
    }
    free(q); free(k); free(v); free(out); free(ref); free(lse);
}

/* The native API refuses device memory described as host memory (the CPU would read it): a
 * status, a message naming the argument and the device, and the output untouched. */
static void device_memory_declared_as_host(ufa_context* ctx) {
    const int64_t S = 16, H = 2, D = 64;
    size_t n = (size_t)(S * H * D);
    void *q = random_tensor(n, E_F16), *out = poisoned(n * 2);
    uint64_t dq = upload(q, n * 2), dout = upload(out, n * 2);
    int64_t shape[4] = {1, S, H, D};
    ufa_tensor tq = {(void*)(uintptr_t)dq, UFA_DTYPE_F16, UFA_DEVICE_CPU, 0, 4, shape, NULL, 0};
    ufa_tensor tk = tq, tv = tq;
    ufa_tensor to = {(void*)(uintptr_t)dout, UFA_DTYPE_F16, UFA_DEVICE_CUDA, 0, 4, shape, NULL, 0};
    ufa_attention_params p = ufa_attention_params_default();
    ufa_status s = ufa_attention_forward(ctx, &tq, &tk, &tv, &to, &p, NULL);
    const char* msg = ufa_last_error_message();
    printf("device memory declared as host: status %d: %s\n", s, msg);
    CHECK(s == UFA_STATUS_INVALID_ARGUMENT && strstr(msg, "q.device_type is UFA_DEVICE_CPU") &&
              strstr(msg, "is memory of cuda:0"),
          "device pointer as host tensor: %d %s", s, msg);
    void* back = malloc(n * 2);
    CHECK(cuMemcpyDtoH(back, dout, n * 2) == 0, "download");
    CHECK(memcmp(back, out, n * 2) == 0, "out was written on error");
    cuMemFree(dq);
    cuMemFree(dout);
    free(q); free(out); free(back);
}

int main(void) {
    seed_rng("test_cuda");
    ufa_context* ctx = NULL;
    uint32_t gpus = 0;
    if (ufa_context_create(NULL, &ctx) != UFA_STATUS_SUCCESS) return 1;
    ufa_device_count(ctx, UFA_DEVICE_CUDA, &gpus);
    if (gpus == 0 || !load_driver()) {
        printf("test_cuda: no CUDA device: skipped\n");
        ufa_context_destroy(ctx);
        return 0;
    }
    void* cu_ctx = NULL;
    void* stream = NULL;
    int dev = 0;
    CHECK(cuInit(0) == 0 && cuDeviceGet(&dev, 0) == 0, "init");
    CHECK(cuDevicePrimaryCtxRetain(&cu_ctx, dev) == 0 && cuCtxSetCurrent(cu_ctx) == 0, "context");
    CHECK(cuStreamCreate(&stream, 1) == 0, "stream");
    run(ctx, stream, E_BF16, 257, 8, 2, 128, 1);
    run(ctx, stream, E_F16, 100, 4, 4, 64, 0);
    run(ctx, stream, E_F32, 33, 2, 1, 80, 1);
    run(ctx, NULL, E_BF16, 64, 2, 2, 256, 0); /* the legacy default stream */
    run_mfa(ctx, 0); /* an mfa_context_t is a ufa_context* */
    run_mfa(ctx, 1);
    device_memory_declared_as_host(ctx);
    cuStreamDestroy(stream);
    ufa_context_destroy(ctx);
    return finish("test_cuda");
}
