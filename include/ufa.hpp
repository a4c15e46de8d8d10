// ufa.hpp: a header-only C++17 wrapper of ufa.h. A context is an RAII object, a failed call
// throws ufa::error (carrying the status and ufa_last_error_message()), and tensors own their
// shape and strides so descriptors never dangle.
#ifndef UFA_HPP
#define UFA_HPP

#include "ufa.h"

#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace ufa {

/// A failed ufa call: `status()` is the ufa_status, `what()` the library's message.
class error : public std::runtime_error {
public:
    error(ufa_status status, const std::string& message) : std::runtime_error(message), status_(status) {}
    ufa_status status() const noexcept { return status_; }

private:
    ufa_status status_;
};

/// Throws ufa::error unless `status` is UFA_STATUS_SUCCESS.
inline void check(ufa_status status) {
    if (status != UFA_STATUS_SUCCESS) throw error(status, ufa_last_error_message());
}

/// "major.minor.patch" of the library actually loaded.
inline std::string version() { return ufa_version(); }

/// A tensor descriptor that owns its shape and strides (the memory stays the caller's).
/// Empty strides mean row-major.
class tensor {
public:
    tensor(void* data, ufa_dtype dtype, std::vector<int64_t> shape, std::vector<int64_t> strides = {},
           ufa_device_type device = UFA_DEVICE_CPU, int32_t device_ordinal = 0)
        : shape_(std::move(shape)), strides_(std::move(strides)) {
        raw_ = ufa_tensor{data, dtype, device, device_ordinal, 0, nullptr, nullptr, 0};
    }

    /// The allocation's size in bytes from `data` on: the library then refuses a view that
    /// reaches past it (without, nothing is checked).
    tensor& nbytes(uint64_t n) {
        raw_.nbytes = n;
        return *this;
    }

    /// The C descriptor; valid while this object lives and is not modified.
    const ufa_tensor* get() const {
        // Rebuilt on each call: a copied or moved tensor has its own arrays.
        raw_.ndim = static_cast<int32_t>(shape_.size());
        raw_.shape = shape_.data();
        raw_.strides = strides_.empty() ? nullptr : strides_.data();
        return &raw_;
    }

private:
    std::vector<int64_t> shape_, strides_;
    mutable ufa_tensor raw_;
};

/// Attention parameters with the library's defaults; fill in what differs.
inline ufa_attention_params default_params() { return ufa_attention_params_default(); }

/// A ufa context (thread pool, CUDA kernel cache). Move-only; destroyed with the object.
class context {
public:
    explicit context(const ufa_context_options& options = ufa_context_options_default()) {
        check(ufa_context_create(&options, &ctx_));
    }
    ~context() { ufa_context_destroy(ctx_); }
    context(context&& other) noexcept : ctx_(std::exchange(other.ctx_, nullptr)) {}
    context& operator=(context&& other) noexcept {
        if (this != &other) {
            ufa_context_destroy(ctx_);
            ctx_ = std::exchange(other.ctx_, nullptr);
        }
        return *this;
    }
    context(const context&) = delete;
    context& operator=(const context&) = delete;

    /// The C handle, for calls this wrapper does not cover.
    ufa_context* get() const noexcept { return ctx_; }

    uint32_t num_threads() const {
        uint32_t n = 0;
        check(ufa_context_num_threads(ctx_, &n));
        return n;
    }

    std::string cpu_isa() const {
        const char* name = nullptr;
        check(ufa_context_cpu_isa(ctx_, &name));
        return name;
    }

    uint32_t device_count(ufa_device_type type) const {
        uint32_t n = 0;
        check(ufa_device_count(ctx_, type, &n));
        return n;
    }

    /// out = attention(q, k, v); see ufa_attention_forward.
    void forward(const tensor& q, const tensor& k, const tensor& v, const tensor& out,
                 const ufa_attention_params& params = default_params(), void* stream = nullptr) const {
        check(ufa_attention_forward(ctx_, q.get(), k.get(), v.get(), out.get(), &params, stream));
    }

    /// As forward, also writing the log-sum-exp to `lse` (f32, [batch, heads_q, seqlen_q]).
    void forward(const tensor& q, const tensor& k, const tensor& v, const tensor& out, const tensor& lse,
                 ufa_attention_params params = default_params(), void* stream = nullptr) const {
        params.lse = lse.get();
        check(ufa_attention_forward(ctx_, q.get(), k.get(), v.get(), out.get(), &params, stream));
    }

    /// Gradients dq, dk, dv; see ufa_attention_backward.
    void backward(const tensor& q, const tensor& k, const tensor& v, const tensor& out, const tensor& dout,
                  const tensor& lse, const tensor& dq, const tensor& dk, const tensor& dv,
                  const ufa_attention_params& params = default_params(), void* stream = nullptr) const {
        check(ufa_attention_backward(ctx_, q.get(), k.get(), v.get(), out.get(), dout.get(), lse.get(), dq.get(),
                                     dk.get(), dv.get(), &params, stream));
    }

private:
    ufa_context* ctx_ = nullptr;
};

}  // namespace ufa

#endif
