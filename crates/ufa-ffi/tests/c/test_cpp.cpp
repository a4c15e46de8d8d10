// The C++17 wrapper (ufa.hpp): RAII contexts, results against the float64 reference, and
// failures (including a panic inside the library) arriving as ufa::error with their status.
#include "ufa.hpp"

#include "common.h"

#include <vector>

static void test_forward(ufa::context& ctx, enum elem type, int64_t S, int64_t H, int64_t D, bool causal) {
    size_t n = static_cast<size_t>(S * H * D);
    void* q = random_tensor(n, type);
    void* k = random_tensor(n, type);
    void* v = random_tensor(n, type);
    void* out = poisoned(n * elem_size(type));
    std::vector<float> lse(static_cast<size_t>(H * S));
    ufa_dtype dt = type == E_F32 ? UFA_DTYPE_F32 : type == E_F16 ? UFA_DTYPE_F16 : UFA_DTYPE_BF16;
    std::vector<int64_t> shape{1, S, H, D};
    ufa_attention_params p = ufa::default_params();
    p.causal = causal;
    ctx.forward(ufa::tensor(q, dt, shape), ufa::tensor(k, dt, shape), ufa::tensor(v, dt, shape),
                ufa::tensor(out, dt, shape), ufa::tensor(lse.data(), UFA_DTYPE_F32, {1, H, S}), p);
    problem pr{1, S, S, H, H, D, D, 0, causal, nullptr};
    operand oq{q, type, {S * H * D, H * D, D, 1}}, ok = oq, ov = oq, oo = oq;
    ok.data = k;
    ov.data = v;
    oo.data = out;
    std::vector<double> ref(n), ref_lse(static_cast<size_t>(H * S));
    reference(&pr, &oq, &ok, &ov, ref.data(), ref_lse.data());
    double err = rel_error(&oo, &pr, ref.data());
    CHECK(err < tolerance(type, type), "C++ %s S%lld: relative error %.3g", elem_name(type), (long long)S, err);
    free(q);
    free(k);
    free(v);
    free(out);
}

template <class F>
static void expect_error(ufa_status want, F&& f, const char* what) {
    try {
        f();
        CHECK(false, "%s: no exception", what);
    } catch (const ufa::error& e) {
        CHECK(e.status() == want, "%s: status %d, want %d (%s)", what, e.status(), want, e.what());
        CHECK(*e.what() != '\0', "%s: empty message", what);
    }
}

int main() {
    seed_rng("test_cpp");
    ufa_context_options o = ufa_context_options_default();
    o.num_threads = 2;
    ufa::context ctx(o);
    CHECK(ctx.num_threads() == 2, "threads");
    CHECK(!ctx.cpu_isa().empty(), "isa");
    CHECK(ctx.device_count(UFA_DEVICE_CPU) == 1, "cpu count");
    CHECK(!ufa::version().empty(), "version");
    // Each dtype, causal and not.
    test_forward(ctx, E_F32, 37, 3, 64, true);
    test_forward(ctx, E_F16, 20, 2, 128, false);
    test_forward(ctx, E_BF16, 65, 1, 80, true);

    float buf[64] = {0};
    expect_error(UFA_STATUS_INVALID_ARGUMENT, [&] {
        ufa::tensor q(buf, UFA_DTYPE_F32, {1, 4, 1, 16}), k(buf, UFA_DTYPE_F32, {1, 4, 3, 16});
        ctx.forward(q, k, k, q);
    }, "mismatched heads");
    expect_error(UFA_STATUS_INVALID_ARGUMENT, [&] {
        ufa_context_options bad = ufa_context_options_default();
        bad.cpu_isa = "bogus";
        ufa::context c(bad);
    }, "bad options");
#ifdef UFA_TEST_HOOKS
    expect_error(UFA_STATUS_INTERNAL, [] { ufa::check(ufa_debug_trigger_panic()); }, "panic");
#endif
    // Moves transfer ownership; a moved-from context destroys nothing.
    for (int i = 0; i < 10; i++) {
        ufa::context a;
        ufa::context b(std::move(a));
        CHECK(a.get() == nullptr && b.get() != nullptr, "move");
        a = std::move(b);
        CHECK(a.get() != nullptr && b.get() == nullptr, "move assign");
    }
    return finish("test_cpp");
}
