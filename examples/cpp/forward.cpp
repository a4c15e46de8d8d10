// The C++ wrapper: an RAII context, tensors that own their shapes, failures as exceptions.
// Build: c++ -std=c++17 forward.cpp $(pkg-config --cflags --libs ufa)
#include <ufa.hpp>

#include <cmath>
#include <cstdio>
#include <vector>

int main() {
    const int64_t S = 32, H = 4, D = 64;
    std::vector<float> q(S * H * D), k(q.size()), v(q.size()), out(q.size());
    for (size_t i = 0; i < q.size(); i++) {
        q[i] = std::sin(0.3f * i);
        k[i] = std::cos(0.2f * i);
        v[i] = std::sin(0.1f * i);
    }
    ufa::context ctx;
    std::vector<int64_t> shape{1, S, H, D};
    ufa_attention_params p = ufa::default_params();
    p.causal = 1;
    ctx.forward(ufa::tensor(q.data(), UFA_DTYPE_F32, shape), ufa::tensor(k.data(), UFA_DTYPE_F32, shape),
                ufa::tensor(v.data(), UFA_DTYPE_F32, shape), ufa::tensor(out.data(), UFA_DTYPE_F32, shape), p);
    // Causal: query 0 sees only key 0, so its output is v's first row.
    double worst = 0;
    for (int64_t e = 0; e < D; e++) worst = std::fmax(worst, std::fabs(out[e] - v[e]));
    std::printf("forward (C++): ufa %s on %s, row 0 differs from v[0] by %.1e\n", ufa::version().c_str(),
                ctx.cpu_isa().c_str(), worst);
    try {
        ctx.forward(ufa::tensor(q.data(), UFA_DTYPE_F32, {1, S, H, D}),
                    ufa::tensor(k.data(), UFA_DTYPE_F32, {1, S, 3, D}),
                    ufa::tensor(v.data(), UFA_DTYPE_F32, {1, S, 3, D}),
                    ufa::tensor(out.data(), UFA_DTYPE_F32, {1, S, H, D}));
        return 1;
    } catch (const ufa::error& e) {
        std::printf("3 KV heads for 4 query heads: status %d: %s\n", e.status(), e.what());
    }
    return worst < 1e-6 ? 0 : 1;
}
