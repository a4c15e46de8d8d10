/* Concurrency stress of the C ABI: threads sharing one ufa_context (and others with contexts of
 * their own, destroyed and re-created as they go) call ufa_attention_forward (with and without
 * the LSE), ufa_attention_backward, mfa_attention_forward and mfa_attention_backward on shared,
 * read-only inputs, each writing its own outputs, and compare every result byte for byte with
 * the same call made up front on a one-thread context. Every thread also makes failing calls
 * whose message names a value of its own, and checks that ufa_last_error_message() still tells
 * its own failure after other threads' failures and its own successful calls (the message is
 * per thread).
 *
 * Usage: test_stress [calls_per_thread [threads [inline]]]  (defaults 5000 and 16; scripts/test-c
 * passes fewer under the sanitizers and valgrind, which slow every call down 3-100x). "inline"
 * keeps to the cases that synchronise nothing inside Rust (no thread pool, no shared workspace),
 * for helgrind and DRD, which cannot see Rust's futex-based locks and would report every handoff
 * through them. Exit status 1 on any difference or failure. */
/* pthreads and clock_gettime under -std=c11. */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>

#include "common.h"
#include "mfa.h"
#include "ufa.h"

enum kind { K_FWD, K_FWD_LSE, K_BWD, K_MFA_FWD, K_MFA_BWD };

struct spec {
    enum kind kind;
    int64_t b, sq, skv, hq, hkv, d;
    int causal;
    enum elem t;
    /* Runs on the thread pool or uses the context's shared workspace: synchronised by Rust's
     * futex-based locks and rayon's atomics, which valgrind's race detectors cannot see. */
    int rust_sync;
};

/* Most cases are tiny (computed on the calling thread); those marked "pool" have 2^20
 * multiply-adds or more and go through the context's thread pool. Every backward also uses the
 * context's shared workspace for its partial dQ. The mfa_* functions take one head count. */
static const struct spec specs[] = {
    {K_FWD, 1, 7, 13, 2, 1, 16, 1, E_F32, 0},
    {K_FWD, 2, 1, 24, 4, 2, 32, 0, E_F16, 0},
    {K_FWD, 1, 64, 64, 4, 4, 32, 1, E_F32, 1}, /* pool */
    {K_FWD_LSE, 1, 9, 3, 2, 2, 16, 1, E_F16, 0}, /* more queries than keys: rows that see none */
    {K_FWD_LSE, 2, 12, 20, 2, 1, 32, 0, E_BF16, 0},
    {K_FWD_LSE, 1, 64, 64, 4, 2, 32, 0, E_BF16, 1}, /* pool */
    {K_BWD, 1, 8, 12, 2, 1, 16, 1, E_F32, 1},
    {K_BWD, 1, 16, 16, 2, 2, 32, 0, E_BF16, 1},
    {K_BWD, 1, 64, 64, 4, 4, 32, 1, E_F16, 1}, /* pool */
    {K_MFA_FWD, 1, 12, 20, 2, 2, 32, 1, E_BF16, 0},
    {K_MFA_BWD, 1, 10, 10, 2, 2, 16, 0, E_F32, 1},
};
enum { NCASES = sizeof specs / sizeof specs[0], MAX_OUTS = 3 };

static int dtype_code(enum elem t) {
    return t == E_F32 ? UFA_DTYPE_F32 : t == E_F16 ? UFA_DTYPE_F16 : UFA_DTYPE_BF16;
}

static int precision(enum elem t) {
    return t == E_F32 ? MFA_PRECISION_FP32 : t == E_F16 ? MFA_PRECISION_FP16 : MFA_PRECISION_BF16;
}

/* A case's inputs (shared by every thread, never written after setup) and expected outputs. */
struct data {
    int64_t qs[4], ks[4], ls[3]; /* shapes of q (and out, dout, dq), k (v, dk, dv), lse */
    void *q, *k, *v, *out, *dout, *lse; /* out and lse: inputs of the backward cases */
    mfa_buffer_t mq, mk, mv, mout, mdout, mlse; /* the same memory, for the mfa_* cases */
    int nout;
    size_t bytes[MAX_OUTS];
    void* expected[MAX_OUTS];
};

static struct data cases[NCASES];

/* The cases the threads draw from: all, or (under valgrind) those without rust_sync. */
static int g_pick[NCASES], g_npick;

static ufa_tensor desc(void* data, int dtype, int ndim, const int64_t* shape) {
    ufa_tensor t = {data, dtype, UFA_DEVICE_CPU, 0, ndim, shape, NULL, 0};
    return t;
}

static mfa_buffer_t wrap(ufa_context* ctx, void* data, size_t bytes) {
    mfa_buffer_t b = NULL;
    if (mfa_buffer_from_ptr(ctx, data, bytes, &b) != MFA_SUCCESS) {
        fprintf(stderr, "mfa_buffer_from_ptr: %s\n", ufa_last_error_message());
        exit(1);
    }
    return b;
}

/* Runs case `c` on `ctx`, writing outs[0..nout) (mfa: the buffers mouts wrap). */
static int run(ufa_context* ctx, int c, void* const* outs, const mfa_buffer_t* mouts) {
    const struct spec* s = &specs[c];
    struct data* x = &cases[c];
    int dt = dtype_code(s->t);
    ufa_tensor q = desc(x->q, dt, 4, x->qs), k = desc(x->k, dt, 4, x->ks), v = desc(x->v, dt, 4, x->ks);
    ufa_attention_params p = ufa_attention_params_default();
    p.causal = s->causal;
    switch (s->kind) {
    case K_FWD:
    case K_FWD_LSE: {
        ufa_tensor o = desc(outs[0], dt, 4, x->qs);
        ufa_tensor l = desc(outs[s->kind == K_FWD_LSE], UFA_DTYPE_F32, 3, x->ls);
        if (s->kind == K_FWD_LSE) p.lse = &l;
        return ufa_attention_forward(ctx, &q, &k, &v, &o, &p, NULL);
    }
    case K_BWD: {
        ufa_tensor o = desc(x->out, dt, 4, x->qs), d = desc(x->dout, dt, 4, x->qs);
        ufa_tensor l = desc(x->lse, UFA_DTYPE_F32, 3, x->ls);
        ufa_tensor dq = desc(outs[0], dt, 4, x->qs), dk = desc(outs[1], dt, 4, x->ks);
        ufa_tensor dv = desc(outs[2], dt, 4, x->ks);
        return ufa_attention_backward(ctx, &q, &k, &v, &o, &d, &l, &dq, &dk, &dv, &p, NULL);
    }
    case K_MFA_FWD:
        return mfa_attention_forward(ctx, x->mq, x->mk, x->mv, mouts[0], (uint32_t)s->b, (uint32_t)s->sq,
                                     (uint32_t)s->skv, (uint32_t)s->hq, (uint16_t)s->d, 0.0f, s->causal,
                                     precision(s->t), MFA_PRECISION_FP32, precision(s->t), false, false,
                                     false, false);
    case K_MFA_BWD:
        return mfa_attention_backward(ctx, x->mdout, x->mq, x->mk, x->mv, x->mout, x->mlse, mouts[0], mouts[1],
                                      mouts[2], NULL, (uint32_t)s->b, (uint32_t)s->sq, (uint32_t)s->skv,
                                      (uint32_t)s->hq, (uint16_t)s->d, 0.0f, s->causal, precision(s->t),
                                      MFA_PRECISION_FP32, false, false, false, false);
    }
    return -1;
}

static ufa_context* make_context(uint32_t threads) {
    ufa_context_options o = ufa_context_options_default();
    o.num_threads = threads;
    ufa_context* ctx = NULL;
    if (ufa_context_create(&o, &ctx) != UFA_STATUS_SUCCESS) {
        fprintf(stderr, "ufa_context_create: %s\n", ufa_last_error_message());
        exit(1);
    }
    return ctx;
}

/* Inputs of every case; the backward cases' out and LSE from a forward on `ctx` (the mfa one
 * through mfa_attention_forward_with_lse, [b, h, s, d] like its other buffers); then each
 * case run once on `ctx` for the expected bytes, which must all be written. Cases not picked
 * keep no outputs (nout 0) and NULL pointers, which the loops below skip or free harmlessly. */
static void setup(ufa_context* ctx) {
    for (int i = 0; i < g_npick; i++) {
        int c = g_pick[i];
        const struct spec* s = &specs[c];
        struct data* x = &cases[c];
        int64_t qs[4] = {s->b, s->sq, s->hq, s->d}, ks[4] = {s->b, s->skv, s->hkv, s->d};
        int64_t ls[3] = {s->b, s->hq, s->sq};
        memcpy(x->qs, qs, sizeof qs);
        memcpy(x->ks, ks, sizeof ks);
        memcpy(x->ls, ls, sizeof ls);
        size_t es = elem_size(s->t), nq = (size_t)(s->b * s->sq * s->hq * s->d);
        size_t nk = (size_t)(s->b * s->skv * s->hkv * s->d), nl = (size_t)(s->b * s->hq * s->sq) * 4;
        x->q = random_tensor(nq, s->t);
        x->k = random_tensor(nk, s->t);
        x->v = random_tensor(nk, s->t);
        x->mq = wrap(ctx, x->q, nq * es);
        x->mk = wrap(ctx, x->k, nk * es);
        x->mv = wrap(ctx, x->v, nk * es);
        if (s->kind == K_BWD || s->kind == K_MFA_BWD) {
            x->out = poisoned(nq * es);
            x->lse = poisoned(nl);
            x->dout = random_tensor(nq, s->t);
            x->mout = wrap(ctx, x->out, nq * es);
            x->mlse = wrap(ctx, x->lse, nl);
            x->mdout = wrap(ctx, x->dout, nq * es);
            int st;
            if (s->kind == K_BWD) {
                int dt = dtype_code(s->t);
                ufa_tensor q = desc(x->q, dt, 4, x->qs), k = desc(x->k, dt, 4, x->ks);
                ufa_tensor v = desc(x->v, dt, 4, x->ks), o = desc(x->out, dt, 4, x->qs);
                ufa_tensor l = desc(x->lse, UFA_DTYPE_F32, 3, x->ls);
                ufa_attention_params p = ufa_attention_params_default();
                p.causal = s->causal;
                p.lse = &l;
                st = ufa_attention_forward(ctx, &q, &k, &v, &o, &p, NULL);
            } else {
                st = mfa_attention_forward_with_lse(ctx, x->mq, x->mk, x->mv, x->mout, x->mlse, (uint32_t)s->b,
                                                    (uint32_t)s->sq, (uint32_t)s->skv, (uint32_t)s->hq,
                                                    (uint16_t)s->d, 0.0f, s->causal, precision(s->t),
                                                    MFA_PRECISION_FP32, false, false, false, false);
            }
            if (st != 0) {
                fprintf(stderr, "case %d: the backward's forward failed: %s\n", c, ufa_last_error_message());
                exit(1);
            }
            x->nout = 3;
            x->bytes[0] = nq * es;
            x->bytes[1] = x->bytes[2] = nk * es;
        } else {
            x->nout = s->kind == K_FWD_LSE ? 2 : 1;
            x->bytes[0] = nq * es;
            x->bytes[1] = nl;
        }
        mfa_buffer_t m[MAX_OUTS] = {NULL};
        for (int o = 0; o < x->nout; o++) {
            x->expected[o] = poisoned(x->bytes[o]);
            m[o] = wrap(ctx, x->expected[o], x->bytes[o]);
        }
        if (run(ctx, c, x->expected, m) != 0) {
            fprintf(stderr, "case %d: %s\n", c, ufa_last_error_message());
            exit(1);
        }
        for (int o = 0; o < x->nout; o++) {
            size_t e = o == 1 && x->nout == 2 ? 4 : es; /* the LSE is f32 */
            if (!all_written(x->expected[o], x->bytes[o], e)) {
                fprintf(stderr, "case %d: output %d not fully written\n", c, o);
                exit(1);
            }
            mfa_destroy_buffer(m[o]);
        }
    }
}

static void teardown(void) {
    for (int c = 0; c < NCASES; c++) {
        struct data* x = &cases[c];
        mfa_buffer_t bufs[] = {x->mq, x->mk, x->mv, x->mout, x->mdout, x->mlse};
        for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) mfa_destroy_buffer(bufs[i]);
        free(x->q); free(x->k); free(x->v); free(x->out); free(x->dout); free(x->lse);
        for (int o = 0; o < x->nout; o++) free(x->expected[o]);
    }
}

/* Threads with their own context destroy it and make a new one this often (in calls), so that
 * contexts come and go while the others compute. */
enum { RECREATE_EVERY = 32, ERROR_EVERY = 50 };

struct worker {
    int id;
    ufa_context* shared; /* NULL: the thread makes contexts of its own */
    long calls;
    long bad, errors_wrong;
};

static void* work(void* arg) {
    struct worker* w = (struct worker*)arg;
    uint64_t rng = 0x9e3779b97f4a7c15ull * (uint64_t)(w->id + 1);
    void* outs[NCASES][MAX_OUTS];
    mfa_buffer_t mouts[NCASES][MAX_OUTS];
    /* (Destroyed and re-made at the first call already; buffers do not refer to a context.) */
    ufa_context* ctx = w->shared ? w->shared : make_context(1);
    for (int c = 0; c < NCASES; c++)
        for (int o = 0; o < cases[c].nout; o++) {
            outs[c][o] = malloc(cases[c].bytes[o]);
            mouts[c][o] = wrap(ctx, outs[c][o], cases[c].bytes[o]);
        }
    /* A bad dtype naming this thread: its message must survive the others' failures. */
    char mine[64];
    snprintf(mine, sizeof mine, "q.dtype=%d but", 1000 + w->id);
    for (long i = 0; i < w->calls; i++) {
        if (!w->shared && i % RECREATE_EVERY == 0) {
            ufa_context_destroy(ctx);
            ctx = make_context(1 + (uint32_t)(i / RECREATE_EVERY % 3));
        }
        rng ^= rng >> 12;
        rng ^= rng << 25;
        rng ^= rng >> 27;
        int c = g_pick[(rng * 2685821657736338717ull >> 33) % (uint64_t)g_npick];
        struct data* x = &cases[c];
        for (int o = 0; o < x->nout; o++) memset(outs[c][o], 0xff, x->bytes[o]);
        int st = run(ctx, c, outs[c], mouts[c]);
        int same = st == 0;
        for (int o = 0; same && o < x->nout; o++) same = memcmp(outs[c][o], x->expected[o], x->bytes[o]) == 0;
        if (!same) {
            if (w->bad < 10)
                fprintf(stderr, "thread %d call %ld case %d: %s\n", w->id, i, c,
                        st ? ufa_last_error_message() : "output differs from the single-threaded run");
            w->bad++;
        }
        if (i % ERROR_EVERY == ERROR_EVERY - 1) {
            /* Since its last failure this thread made only successful calls, which leave the
             * message alone, while other threads failed with messages of their own. */
            if (i >= ERROR_EVERY && strstr(ufa_last_error_message(), mine) == NULL) {
                if (w->errors_wrong < 10)
                    fprintf(stderr, "thread %d: last error became '%s'\n", w->id, ufa_last_error_message());
                w->errors_wrong++;
            }
            ufa_tensor q = desc(x->q, 1000 + w->id, 4, x->qs), k = desc(x->k, dtype_code(specs[c].t), 4, x->ks);
            ufa_tensor o = desc(outs[c][0], dtype_code(specs[c].t), 4, x->qs);
            if (ufa_attention_forward(ctx, &q, &k, &k, &o, NULL, NULL) != UFA_STATUS_INVALID_ARGUMENT ||
                strstr(ufa_last_error_message(), mine) == NULL) {
                if (w->errors_wrong < 10)
                    fprintf(stderr, "thread %d: last error '%s' is not its own ('%s')\n", w->id,
                            ufa_last_error_message(), mine);
                w->errors_wrong++;
            }
        }
    }
    for (int c = 0; c < NCASES; c++)
        for (int o = 0; o < cases[c].nout; o++) {
            mfa_destroy_buffer(mouts[c][o]);
            free(outs[c][o]);
        }
    if (!w->shared) ufa_context_destroy(ctx);
    return NULL;
}

int main(int argc, char** argv) {
    long calls = argc > 1 ? strtol(argv[1], NULL, 10) : 5000;
    int threads = argc > 2 ? (int)strtol(argv[2], NULL, 10) : 16;
    int inline_only = argc > 3 && strcmp(argv[3], "inline") == 0;
    if (calls < 1 || threads < 1 || threads > 256 || (argc > 3 && !inline_only)) {
        fprintf(stderr, "usage: test_stress [calls_per_thread [threads (1-256) [inline]]]\n");
        return 2;
    }
    for (int c = 0; c < NCASES; c++)
        if (!inline_only || !specs[c].rust_sync) g_pick[g_npick++] = c;
    seed_rng("test_stress");
    ufa_context* reference = make_context(1);
    setup(reference);
    ufa_context_destroy(reference);
    /* More pool threads than the CI machine's 2 cores, so workers are preempted mid-item. */
    ufa_context* shared = make_context(4);
    pthread_t tid[256];
    struct worker w[256];
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int i = 0; i < threads; i++) {
        /* One thread in four has contexts of its own. */
        struct worker x = {i, i % 4 == 3 ? NULL : shared, calls, 0, 0};
        w[i] = x;
        CHECK(pthread_create(&tid[i], NULL, work, &w[i]) == 0, "pthread_create %d", i);
    }
    long bad = 0, wrong = 0;
    for (int i = 0; i < threads; i++) {
        pthread_join(tid[i], NULL);
        bad += w[i].bad;
        wrong += w[i].errors_wrong;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double secs = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) * 1e-9;
    printf("test_stress: %d threads x %ld calls over %d cases in %.2f s\n", threads, calls, g_npick, secs);
    CHECK(bad == 0, "%ld of %ld calls differ from the single-threaded run or failed", bad, calls * threads);
    CHECK(wrong == 0, "%ld checks of the thread's own last error message failed", wrong);
    ufa_context_destroy(shared);
    teardown();
    return finish("test_stress");
}
