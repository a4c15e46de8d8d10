/* The layout of ufa.h as the C compiler sees it; test/abi_test.zig compares src/c.zig with it. */
#include <stddef.h>
#include <stdint.h>
#include <ufa.h>

#define FIELD(T, f) (int64_t) offsetof(T, f), (int64_t) sizeof(((T*)0)->f)

const int64_t ufa_zig_abi[] = {
    sizeof(ufa_context_options),
    FIELD(ufa_context_options, struct_size), FIELD(ufa_context_options, num_threads),
    FIELD(ufa_context_options, device_ordinal), FIELD(ufa_context_options, cpu_isa),
    sizeof(ufa_tensor),
    FIELD(ufa_tensor, data), FIELD(ufa_tensor, dtype), FIELD(ufa_tensor, device_type),
    FIELD(ufa_tensor, device_ordinal), FIELD(ufa_tensor, ndim), FIELD(ufa_tensor, shape),
    FIELD(ufa_tensor, strides),
    sizeof(ufa_attention_params),
    FIELD(ufa_attention_params, struct_size), FIELD(ufa_attention_params, causal),
    FIELD(ufa_attention_params, softmax_scale), FIELD(ufa_attention_params, softcap),
    FIELD(ufa_attention_params, causal_alignment), FIELD(ufa_attention_params, deterministic),
    FIELD(ufa_attention_params, window_left), FIELD(ufa_attention_params, window_right),
    FIELD(ufa_attention_params, alibi_slopes), FIELD(ufa_attention_params, mask),
    FIELD(ufa_attention_params, lse), FIELD(ufa_attention_params, fp32_precision),
    FIELD(ufa_attention_params, dropout_seed), FIELD(ufa_attention_params, dropout_offset),
    FIELD(ufa_attention_params, dropout_p),
    sizeof(ufa_varlen),
    FIELD(ufa_varlen, struct_size), FIELD(ufa_varlen, checked), FIELD(ufa_varlen, cu_seqlens_q),
    FIELD(ufa_varlen, cu_seqlens_kv), FIELD(ufa_varlen, max_seqlen_q), FIELD(ufa_varlen, max_seqlen_kv),
    FIELD(ufa_varlen, seqused_kv), FIELD(ufa_varlen, block_table),
    sizeof(ufa_kvcache),
    FIELD(ufa_kvcache, struct_size), FIELD(ufa_kvcache, checked), FIELD(ufa_kvcache, k_cache),
    FIELD(ufa_kvcache, v_cache), FIELD(ufa_kvcache, cache_seqlens), FIELD(ufa_kvcache, block_table),
    FIELD(ufa_kvcache, cache_batch_idx), FIELD(ufa_kvcache, k_new), FIELD(ufa_kvcache, v_new),
    FIELD(ufa_kvcache, rotary_cos), FIELD(ufa_kvcache, rotary_sin),
    FIELD(ufa_kvcache, rotary_interleaved), FIELD(ufa_kvcache, _reserved),
    FIELD(ufa_kvcache, workspace), FIELD(ufa_kvcache, workspace_bytes),
    sizeof(ufa_status), sizeof(ufa_dtype), sizeof(ufa_device_type),
    UFA_MAX_DIMS, UFA_CAUSAL_BOTTOM_RIGHT, UFA_CAUSAL_TOP_LEFT,
    UFA_STATUS_SUCCESS, UFA_STATUS_INVALID_ARGUMENT, UFA_STATUS_UNSUPPORTED,
    UFA_STATUS_DEVICE_UNAVAILABLE, UFA_STATUS_OUT_OF_MEMORY, UFA_STATUS_BACKEND_FAILURE,
    UFA_STATUS_INTERNAL,
    UFA_DTYPE_F16, UFA_DTYPE_BF16, UFA_DTYPE_F32, UFA_DTYPE_BOOL, UFA_DTYPE_I32,
    UFA_DEVICE_CPU, UFA_DEVICE_CUDA, UFA_FP32_IEEE, UFA_FP32_TF32,
};
const size_t ufa_zig_abi_len = sizeof ufa_zig_abi / sizeof ufa_zig_abi[0];
