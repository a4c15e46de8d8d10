//! The declarations of ufa.h that this package uses, written out (translating the header at build
//! time would compile Zig's translate-c first: a minute on a fresh machine). test/abi.c compiles
//! the real header and `zig build test` checks every size, offset and constant below against it.
pub const ufa_status = i32;
pub const ufa_dtype = i32;
pub const ufa_device_type = i32;

pub const UFA_MAX_DIMS = 4;
pub const UFA_CAUSAL_BOTTOM_RIGHT: i32 = 0;
pub const UFA_CAUSAL_TOP_LEFT: i32 = 1;
pub const UFA_FP32_IEEE: i32 = 0;
pub const UFA_FP32_TF32: i32 = 1;
pub const UFA_STATUS_SUCCESS: ufa_status = 0;
pub const UFA_STATUS_INVALID_ARGUMENT: ufa_status = 1;
pub const UFA_STATUS_UNSUPPORTED: ufa_status = 2;
pub const UFA_STATUS_DEVICE_UNAVAILABLE: ufa_status = 3;
pub const UFA_STATUS_OUT_OF_MEMORY: ufa_status = 4;
pub const UFA_STATUS_BACKEND_FAILURE: ufa_status = 5;
pub const UFA_STATUS_INTERNAL: ufa_status = 6;
pub const UFA_DTYPE_F16: ufa_dtype = 1;
pub const UFA_DTYPE_BF16: ufa_dtype = 2;
pub const UFA_DTYPE_F32: ufa_dtype = 3;
pub const UFA_DTYPE_BOOL: ufa_dtype = 4;
pub const UFA_DTYPE_I32: ufa_dtype = 5;
pub const UFA_DEVICE_CPU: ufa_device_type = 0;
pub const UFA_DEVICE_CUDA: ufa_device_type = 1;

pub const ufa_context = opaque {};

pub const ufa_context_options = extern struct {
    struct_size: u32,
    num_threads: u32,
    device_ordinal: i32,
    cpu_isa: ?[*:0]const u8,
};

pub const ufa_tensor = extern struct {
    data: ?*anyopaque,
    dtype: ufa_dtype,
    device_type: ufa_device_type,
    device_ordinal: i32,
    ndim: i32,
    shape: ?[*]const i64,
    strides: ?[*]const i64,
    nbytes: u64,
};

pub const ufa_attention_params = extern struct {
    struct_size: u32,
    causal: i32,
    softmax_scale: f32,
    softcap: f32,
    causal_alignment: i32,
    deterministic: i32,
    window_left: i64,
    window_right: i64,
    alibi_slopes: ?*const ufa_tensor,
    mask: ?*const ufa_tensor,
    lse: ?*const ufa_tensor,
    fp32_precision: i32,
    dropout_seed: u64,
    dropout_offset: u64,
    dropout_p: f32,
};

pub const ufa_varlen = extern struct {
    struct_size: u32,
    checked: i32,
    cu_seqlens_q: ?*const ufa_tensor,
    cu_seqlens_kv: ?*const ufa_tensor,
    max_seqlen_q: i64,
    max_seqlen_kv: i64,
    seqused_kv: ?*const ufa_tensor,
    block_table: ?*const ufa_tensor,
};

pub const ufa_kvcache = extern struct {
    struct_size: u32,
    checked: i32,
    k_cache: ?*const ufa_tensor,
    v_cache: ?*const ufa_tensor,
    cache_seqlens: ?*const ufa_tensor,
    block_table: ?*const ufa_tensor,
    cache_batch_idx: ?*const ufa_tensor,
    k_new: ?*const ufa_tensor,
    v_new: ?*const ufa_tensor,
    rotary_cos: ?*const ufa_tensor,
    rotary_sin: ?*const ufa_tensor,
    rotary_interleaved: i32,
    _reserved: i32,
    workspace: ?*anyopaque,
    workspace_bytes: usize,
};

pub extern fn ufa_status_string(status: ufa_status) [*:0]const u8;
pub extern fn ufa_last_error_message() [*:0]const u8;
pub extern fn ufa_version() [*:0]const u8;
pub extern fn ufa_context_options_default() ufa_context_options;
pub extern fn ufa_attention_params_default() ufa_attention_params;
pub extern fn ufa_context_create(options: ?*const ufa_context_options, out: *?*ufa_context) ufa_status;
pub extern fn ufa_context_destroy(ctx: ?*ufa_context) void;
pub extern fn ufa_context_num_threads(ctx: ?*const ufa_context, out: *u32) ufa_status;
pub extern fn ufa_context_cpu_isa(ctx: ?*const ufa_context, out: *?[*:0]const u8) ufa_status;
pub extern fn ufa_attention_forward(
    ctx: ?*const ufa_context,
    q: *const ufa_tensor,
    k: *const ufa_tensor,
    v: *const ufa_tensor,
    out: *const ufa_tensor,
    params: ?*const ufa_attention_params,
    stream: ?*anyopaque,
) ufa_status;
pub extern fn ufa_attention_backward(
    ctx: ?*const ufa_context,
    q: *const ufa_tensor,
    k: *const ufa_tensor,
    v: *const ufa_tensor,
    out: *const ufa_tensor,
    dout: *const ufa_tensor,
    lse: *const ufa_tensor,
    dq: *const ufa_tensor,
    dk: *const ufa_tensor,
    dv: *const ufa_tensor,
    params: ?*const ufa_attention_params,
    stream: ?*anyopaque,
) ufa_status;
pub extern fn ufa_varlen_default() ufa_varlen;
pub extern fn ufa_kvcache_default() ufa_kvcache;
pub extern fn ufa_attention_forward_varlen(
    ctx: ?*const ufa_context,
    q: *const ufa_tensor,
    k: *const ufa_tensor,
    v: *const ufa_tensor,
    out: *const ufa_tensor,
    seqs: *const ufa_varlen,
    params: ?*const ufa_attention_params,
    stream: ?*anyopaque,
) ufa_status;
pub extern fn ufa_attention_backward_varlen(
    ctx: ?*const ufa_context,
    q: *const ufa_tensor,
    k: *const ufa_tensor,
    v: *const ufa_tensor,
    out: *const ufa_tensor,
    dout: *const ufa_tensor,
    lse: *const ufa_tensor,
    dq: *const ufa_tensor,
    dk: *const ufa_tensor,
    dv: *const ufa_tensor,
    seqs: *const ufa_varlen,
    params: ?*const ufa_attention_params,
    stream: ?*anyopaque,
) ufa_status;
pub extern fn ufa_attention_forward_kvcache(
    ctx: ?*const ufa_context,
    q: *const ufa_tensor,
    cache: *const ufa_kvcache,
    out: *const ufa_tensor,
    params: ?*const ufa_attention_params,
    stream: ?*anyopaque,
) ufa_status;
pub extern fn ufa_kvcache_workspace_size(q: *const ufa_tensor, cache: *const ufa_kvcache, out: *usize) ufa_status;
pub extern fn ufa_merge_states(
    ctx: ?*const ufa_context,
    num_states: usize,
    outs: ?[*]const ufa_tensor,
    lses: ?[*]const ufa_tensor,
    out: *const ufa_tensor,
    lse: ?*const ufa_tensor,
    stream: ?*anyopaque,
) ufa_status;
