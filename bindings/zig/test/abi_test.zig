//! src/c.zig (ufa.h written out in Zig) against test/abi.c (ufa.h as the C compiler sees it).
const std = @import("std");
const c = @import("ufa").c;

extern const ufa_zig_abi: i64; // the first element of a C array
extern const ufa_zig_abi_len: usize;

fn fields(comptime T: type, comptime names: []const []const u8) [1 + 2 * names.len]i64 {
    var out: [1 + 2 * names.len]i64 = undefined;
    out[0] = @sizeOf(T);
    inline for (names, 0..) |name, i| {
        out[1 + 2 * i] = @offsetOf(T, name);
        out[2 + 2 * i] = @sizeOf(@FieldType(T, name));
    }
    return out;
}

test "src/c.zig matches ufa.h: sizes, offsets and constants" {
    const want = fields(c.ufa_context_options, &.{ "struct_size", "num_threads", "device_ordinal", "cpu_isa" }) ++
        fields(c.ufa_tensor, &.{ "data", "dtype", "device_type", "device_ordinal", "ndim", "shape", "strides" }) ++
        fields(c.ufa_attention_params, &.{ "struct_size", "causal", "softmax_scale", "softcap", "causal_alignment", "deterministic", "window_left", "window_right", "alibi_slopes", "mask", "lse", "fp32_precision", "dropout_seed", "dropout_offset", "dropout_p" }) ++
        fields(c.ufa_varlen, &.{ "struct_size", "checked", "cu_seqlens_q", "cu_seqlens_kv", "max_seqlen_q", "max_seqlen_kv", "seqused_kv", "block_table" }) ++
        fields(c.ufa_kvcache, &.{ "struct_size", "checked", "k_cache", "v_cache", "cache_seqlens", "block_table", "cache_batch_idx", "k_new", "v_new", "rotary_cos", "rotary_sin", "rotary_interleaved", "_reserved", "workspace", "workspace_bytes" }) ++
        [_]i64{
            @sizeOf(c.ufa_status),           @sizeOf(c.ufa_dtype),          @sizeOf(c.ufa_device_type),
            c.UFA_MAX_DIMS,                  c.UFA_CAUSAL_BOTTOM_RIGHT,     c.UFA_CAUSAL_TOP_LEFT,
            c.UFA_STATUS_SUCCESS,            c.UFA_STATUS_INVALID_ARGUMENT, c.UFA_STATUS_UNSUPPORTED,
            c.UFA_STATUS_DEVICE_UNAVAILABLE, c.UFA_STATUS_OUT_OF_MEMORY,    c.UFA_STATUS_BACKEND_FAILURE,
            c.UFA_STATUS_INTERNAL,           c.UFA_DTYPE_F16,               c.UFA_DTYPE_BF16,
            c.UFA_DTYPE_F32,                 c.UFA_DTYPE_BOOL,              c.UFA_DTYPE_I32,
            c.UFA_DEVICE_CPU,                c.UFA_DEVICE_CUDA,             c.UFA_FP32_IEEE,
            c.UFA_FP32_TF32,
        };
    try std.testing.expectEqual(want.len, ufa_zig_abi_len);
    try std.testing.expectEqualSlices(i64, &want, @as([*]const i64, @ptrCast(&ufa_zig_abi))[0..ufa_zig_abi_len]);
}
