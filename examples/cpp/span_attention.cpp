// ufa from C++20 with include/ufa.hpp: inputs in std::vector, views handed around as std::span,
// a strided ([batch, heads, seq, dim]) query, and a failed call caught as ufa::error.
// Build: c++ -std=c++20 span_attention.cpp $(pkg-config --cflags --libs ufa)
#include <ufa.hpp>

#include <cmath>
#include <cstdio>
#include <random>
#include <span>
#include <vector>

// A row-major or strided f32 view of a span (the span must outlive the call).
static ufa::tensor view(std::span<const float> data, std::vector<int64_t> shape, std::vector<int64_t> strides = {}) {
    return std::move(ufa::tensor(const_cast<float*>(data.data()), UFA_DTYPE_F32, std::move(shape), std::move(strides))
                         .nbytes(data.size_bytes()));
}

// Reference attention for one (batch 0) query row, in double; q given by a strided accessor.
template <class Q>
static double max_error(Q q_at, std::span<const float> k, std::span<const float> v, std::span<const float> out,
                        int64_t seq_q, int64_t seq_kv, int64_t heads, int64_t heads_kv, int64_t dim) {
    double worst = 0;
    for (int64_t h = 0; h < heads; h++) {
        int64_t kh = h / (heads / heads_kv);
        for (int64_t i = 0; i < seq_q; i++) {
            std::vector<double> p(seq_kv);
            double best = -INFINITY, sum = 0;
            for (int64_t j = 0; j <= i + seq_kv - seq_q; j++) {  // causal, bottom-right aligned
                double s = 0;
                for (int64_t d = 0; d < dim; d++) s += q_at(i, h, d) * k[(j * heads_kv + kh) * dim + d];
                p[j] = s / std::sqrt(double(dim));
                best = std::max(best, p[j]);
            }
            for (int64_t j = 0; j <= i + seq_kv - seq_q; j++) sum += (p[j] = std::exp(p[j] - best));
            for (int64_t d = 0; d < dim; d++) {
                double acc = 0;
                for (int64_t j = 0; j <= i + seq_kv - seq_q; j++) acc += p[j] * v[(j * heads_kv + kh) * dim + d];
                worst = std::max(worst, std::abs(acc / sum - out[(i * heads + h) * dim + d]));
            }
        }
    }
    return worst;
}

int main() {
    const int64_t seq_q = 5, seq_kv = 9, heads = 4, heads_kv = 2, dim = 16;
    std::mt19937 rng(7);
    std::normal_distribution<float> normal;
    auto random = [&](size_t n) {
        std::vector<float> x(n);
        for (auto& e : x) e = normal(rng);
        return x;
    };
    // q stored heads-first ([1, heads, seq_q, dim]); k, v, out row-major [1, seq, heads, dim].
    std::vector<float> q = random(heads * seq_q * dim), k = random(seq_kv * heads_kv * dim),
                       v = random(seq_kv * heads_kv * dim), out(seq_q * heads * dim, NAN);

    try {
        ufa::context ctx;
        auto params = ufa::default_params();
        params.causal = 1;
        ctx.forward(view(q, {1, seq_q, heads, dim}, {heads * seq_q * dim, dim, seq_q * dim, 1}),
                    view(k, {1, seq_kv, heads_kv, dim}), view(v, {1, seq_kv, heads_kv, dim}),
                    view(out, {1, seq_q, heads, dim}), params);
        auto q_at = [&](int64_t i, int64_t h, int64_t d) { return double(q[(h * seq_q + i) * dim + d]); };
        double err = max_error(q_at, k, v, out, seq_q, seq_kv, heads, heads_kv, dim);
        std::printf("ufa %s on %s: GQA causal, strided q, max |out - ref| = %.2e\n", ufa::version().c_str(),
                    ctx.cpu_isa().c_str(), err);
        if (!(err < 1e-5)) return 1;

        // heads_kv = 3 does not divide heads = 4: the library says so, as a ufa::error.
        try {
            ctx.forward(view(q, {1, seq_q, heads, dim}), view(k, {1, seq_kv / 3, 3, dim}),
                        view(v, {1, seq_kv / 3, 3, dim}), view(out, {1, seq_q, heads, dim}));
            std::puts("bad input was accepted");
            return 1;
        } catch (const ufa::error& e) {
            std::printf("caught ufa::error (status %d): %s\n", e.status(), e.what());
            if (e.status() != UFA_STATUS_INVALID_ARGUMENT) return 1;
        }
    } catch (const ufa::error& e) {
        std::fprintf(stderr, "ufa failed (status %d): %s\n", e.status(), e.what());
        return 1;
    }
    return 0;
}
