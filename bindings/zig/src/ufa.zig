//! ufa (Universal Flash Attention) for Zig: a thin binding of the C API, ufa.h.
//!
//! Tensors are views of slices (`[]f32`, `[]f16`, `[]BF16`, `[]bool`, and `[]i32` for the
//! sequence metadata of packed batches and KV caches) with a shape and optional
//! strides in elements, outermost first, as in ufa.h: Q is [batch, seqlen_q, heads_q, head_dim],
//! K and V [batch, seqlen_kv, heads_kv, head_dim], the output [batch, seqlen_q, heads_q,
//! head_dim]. No strides means row-major; any strides work as long as the last one is 1.
//!
//! Failures are error unions: `Error.InvalidArgument` and the other statuses of ufa.h, with the
//! library's message in `lastErrorMessage()`. Each descriptor carries its slice's length in
//! bytes, so the library also refuses a view that reaches past its slice.
const std = @import("std");
/// The C declarations (ufa.h), for calls this binding does not wrap.
pub const c = @import("c.zig");

/// Every failure a ufa call can report: one error per `ufa_status`.
pub const Error = error{
    InvalidArgument,
    Unsupported,
    DeviceUnavailable,
    OutOfMemory,
    BackendFailure,
    Internal,
};

/// The library's message for the last failed call on this thread, e.g. "invalid argument:
/// k.shape[2]=3 (heads_kv) does not divide q.shape[2]=8 (heads_q)". Valid until the next failing
/// call on this thread; copy it to keep it.
pub fn lastErrorMessage() [:0]const u8 {
    return std.mem.span(c.ufa_last_error_message());
}

/// The library's short name of a status ("invalid argument", ...).
pub fn statusString(status: c.ufa_status) [:0]const u8 {
    return std.mem.span(c.ufa_status_string(status));
}

fn check(status: c.ufa_status) Error!void {
    return switch (status) {
        c.UFA_STATUS_SUCCESS => {},
        c.UFA_STATUS_INVALID_ARGUMENT => error.InvalidArgument,
        c.UFA_STATUS_UNSUPPORTED => error.Unsupported,
        c.UFA_STATUS_DEVICE_UNAVAILABLE => error.DeviceUnavailable,
        c.UFA_STATUS_OUT_OF_MEMORY => error.OutOfMemory,
        c.UFA_STATUS_BACKEND_FAILURE => error.BackendFailure,
        else => error.Internal,
    };
}

/// The loaded library's version, "major.minor.patch".
pub fn version() [:0]const u8 {
    return std.mem.span(c.ufa_version());
}

/// A bfloat16 value, stored as its bits.
pub const BF16 = enum(u16) {
    _,

    /// Rounds to the nearest bfloat16 (ties to even); NaN stays NaN.
    pub fn fromF32(x: f32) BF16 {
        const b: u32 = @bitCast(x);
        if (b & 0x7fff_ffff > 0x7f80_0000) return @fromBackingInt(@intCast(@as(u16, @truncate(b >> 16)) | 0x40));
        const rounded = b +% (0x7fff + ((b >> 16) & 1));
        return @fromBackingInt(@intCast(@as(u16, @truncate(rounded >> 16))));
    }

    pub fn toF32(h: BF16) f32 {
        return @bitCast(@as(u32, @backingInt(h)) << 16);
    }
};

pub const DType = enum(c.ufa_dtype) {
    f16 = c.UFA_DTYPE_F16,
    bf16 = c.UFA_DTYPE_BF16,
    f32 = c.UFA_DTYPE_F32,
    bool = c.UFA_DTYPE_BOOL,
    /// Sequence metadata only: cu_seqlens, lengths, block tables, cache indices.
    i32 = c.UFA_DTYPE_I32,

    /// The dtype of a slice element type: f32, f16, BF16, bool or i32.
    pub fn of(comptime T: type) DType {
        return switch (T) {
            f32 => .f32,
            f16 => .f16,
            BF16 => .bf16,
            bool => .bool,
            i32 => .i32,
            else => @compileError("ufa tensors hold f32, f16, ufa.BF16, bool or i32, not " ++ @typeName(T)),
        };
    }
};

/// A view of a slice. `shape` and `strides` are borrowed: they must outlive the calls using the
/// tensor (literals such as `&.{ 1, 2, 3, 4 }` do).
pub const Tensor = struct {
    data: ?*anyopaque,
    /// Bytes of the slice, which the library checks the view against.
    nbytes: usize,
    dtype: DType,
    shape: []const i64,
    strides: ?[]const i64 = null,

    /// A row-major view of `data` (a slice of f32, f16, ufa.BF16, bool or i32) with `shape`.
    pub fn init(data: anytype, shape: []const i64) Tensor {
        const T = std.meta.Elem(@TypeOf(data));
        return .{
            .data = if (data.len == 0) null else @ptrCast(@constCast(data.ptr)),
            .nbytes = data.len * @sizeOf(T),
            .dtype = DType.of(T),
            .shape = shape,
        };
    }

    /// The same view with explicit strides (in elements, one per dimension).
    pub fn withStrides(t: Tensor, strides: []const i64) Tensor {
        var s = t;
        s.strides = strides;
        return s;
    }

    fn raw(t: Tensor) c.ufa_tensor {
        return .{
            .data = t.data,
            .dtype = @backingInt(t.dtype),
            .device_type = c.UFA_DEVICE_CPU,
            .device_ordinal = 0,
            .ndim = std.math.cast(i32, t.shape.len) orelse std.math.maxInt(i32),
            .shape = t.shape.ptr,
            .strides = if (t.strides) |s| s.ptr else null,
            .nbytes = t.nbytes,
        };
    }
};

/// Attention dropout: probability `p` of dropping each probability, and the generator's seed and
/// offset (the same three give the same mask).
pub const Dropout = struct {
    p: f32,
    seed: u64 = 0,
    offset: u64 = 0,
};

/// What an attention call computes besides softmax(q k^T) v; the defaults are the library's. A
/// backward call takes the forward's params, without `lse`.
pub const Params = struct {
    /// Query i sees only keys at or before its aligned position.
    causal: bool = false,
    /// Align query i with key i (PyTorch's is_causal) instead of the last query with the last key.
    causal_top_left: bool = false,
    /// Multiplies q.k; 0 = 1/sqrt(head_dim).
    softmax_scale: f32 = 0,
    /// Scores become softcap * tanh(scores / softcap); 0 disables it.
    softcap: f32 = 0,
    /// Sliding window around each query's aligned position; -1 = unbounded.
    window_left: i64 = -1,
    window_right: i64 = -1,
    /// f32 ALiBi slopes, [heads_q] or [batch, heads_q].
    alibi_slopes: ?Tensor = null,
    /// Mask broadcastable to [batch, heads_q, seqlen_q, seqlen_kv]: bool (true = attend) or a
    /// float dtype (added to the scores).
    mask: ?Tensor = null,
    /// Receives each score row's log-sum-exp (f32, [batch, heads_q, seqlen_q]). Forward calls only.
    lse: ?Tensor = null,
    /// Backward calls: bitwise-reproducible gradients (CPU gradients always are).
    deterministic: bool = false,
    /// f32 inputs on CUDA: let the forward and backward round each operand to TF32 once (about
    /// 3x faster, results within 2e-3 relative) instead of keeping f32 accuracy. The CPU ignores
    /// it.
    allow_tf32: bool = false,
    /// Drops each attention probability with probability `p` in [0, 1) (scaling the rest by
    /// 1/(1-p)), from the generator at (`seed`, `offset`); a backward call takes its forward's.
    /// Not on KV-cache calls.
    dropout: ?Dropout = null,

    /// The C parameters; `storage` holds the tensor descriptors they point at.
    fn raw(params: Params, storage: *[3]c.ufa_tensor) c.ufa_attention_params {
        var p = c.ufa_attention_params_default();
        p.causal = @intFromBool(params.causal);
        if (params.causal_top_left) p.causal_alignment = c.UFA_CAUSAL_TOP_LEFT;
        p.softmax_scale = params.softmax_scale;
        p.softcap = params.softcap;
        p.window_left = params.window_left;
        p.window_right = params.window_right;
        p.deterministic = @intFromBool(params.deterministic);
        if (params.allow_tf32) p.fp32_precision = c.UFA_FP32_TF32;
        if (params.dropout) |d| {
            p.dropout_p = d.p;
            p.dropout_seed = d.seed;
            p.dropout_offset = d.offset;
        }
        p.alibi_slopes = rawOptional(params.alibi_slopes, &storage[0]);
        p.mask = rawOptional(params.mask, &storage[1]);
        p.lse = rawOptional(params.lse, &storage[2]);
        return p;
    }
};

/// The descriptor of an optional tensor, written to `storage`; null for null.
fn rawOptional(t: ?Tensor, storage: *c.ufa_tensor) ?*const c.ufa_tensor {
    const tensor = t orelse return null;
    storage.* = tensor.raw();
    return storage;
}

/// A packed batch of variable-length sequences (FlashAttention's cu_seqlens convention) for
/// `forwardVarlen` and `backwardVarlen`. Sequence b's query rows are rows cu_seqlens_q[b] ..
/// cu_seqlens_q[b+1] of q [total_q, heads_q, head_dim] and of out [total_q, heads_q,
/// head_dim_v] (its log-sum-exp columns of lse [heads_q, total_q]); its keys rows
/// cu_seqlens_kv[b] .. cu_seqlens_kv[b+1] of k and v [total_kv, heads_kv, head_dim(_v)]. Rows
/// past the last sequence are neither read nor written. The metadata are i32 tensors; the
/// library checks every value and names a bad one in its message ("cu_seqlens_q[2]=3 ...").
pub const Varlen = struct {
    /// i32 [batch + 1]: 0 first, non-decreasing.
    cu_seqlens_q: Tensor,
    /// i32 [batch + 1]: 0 first, non-decreasing.
    cu_seqlens_kv: Tensor,
    /// At least the query rows of every sequence.
    max_seqlen_q: i64,
    /// At least the keys of every sequence.
    max_seqlen_kv: i64,
    /// i32 [batch]: sequence b attends to its first seqused_kv[b] keys only (forward only).
    seqused_kv: ?Tensor = null,
    /// i32 [batch, max_pages] (forward only): k and v are a paged cache [num_pages, page_size,
    /// heads_kv, head_dim(_v)] (page_size a power of two up to 256), key j of sequence b is row
    /// j % page_size of page block_table[b][j / page_size], and cu_seqlens_kv only counts each
    /// sequence's keys. null = packed k and v.
    block_table: ?Tensor = null,

    fn raw(s: Varlen, storage: *[4]c.ufa_tensor) c.ufa_varlen {
        var r = c.ufa_varlen_default();
        r.cu_seqlens_q = rawOptional(s.cu_seqlens_q, &storage[0]);
        r.cu_seqlens_kv = rawOptional(s.cu_seqlens_kv, &storage[1]);
        r.max_seqlen_q = s.max_seqlen_q;
        r.max_seqlen_kv = s.max_seqlen_kv;
        r.seqused_kv = rawOptional(s.seqused_kv, &storage[2]);
        r.block_table = rawOptional(s.block_table, &storage[3]);
        return r;
    }
};

/// Rotary position embedding tables for the keys a KV-cache call appends (and its q).
pub const Rotary = struct {
    /// [seqlen_ro, rotary_dim / 2], any float dtype; the first rotary_dim columns of a row are
    /// rotated, the rest pass unchanged.
    cos: Tensor,
    sin: Tensor,
    /// Rotate pairs (x[2i], x[2i+1]) (GPT-J) instead of (x[i], x[i + rotary_dim / 2]) (GPT-NeoX).
    interleaved: bool = false,
};

/// A KV cache and what a `forwardKvCache` call appends to it (FlashAttention's
/// flash_attn_with_kvcache). The metadata are i32 tensors.
pub const KvCache = struct {
    /// Dense [batch_cache, capacity, heads_kv, head_dim], or paged [num_pages, page_size,
    /// heads_kv, head_dim] with `block_table`. Written where keys are appended.
    k_cache: Tensor,
    /// As k_cache, with head_dim_v.
    v_cache: Tensor,
    /// i32 [batch]: keys already in the cache for each sequence. Not advanced by the call (add
    /// seqlen_new afterwards).
    cache_seqlens: Tensor,
    /// i32 [batch, max_pages]: key j of sequence b is row j % page_size of page
    /// block_table[b][j / page_size]; pages may be shared and in any order.
    block_table: ?Tensor = null,
    /// i32 [batch] (dense caches only): sequence b uses cache entry cache_batch_idx[b] (distinct
    /// when appending); null = entry b.
    cache_batch_idx: ?Tensor = null,
    /// [batch, seqlen_new, heads_kv, head_dim] and [.., head_dim_v], appended at each sequence's
    /// cache_seqlens before attending. Both or neither.
    k_new: ?Tensor = null,
    v_new: ?Tensor = null,
    /// With k_new: rotates the new keys at positions cache_seqlens[b] + i, and q at
    /// cache_seqlens[b] + i when causal or windowed, else at cache_seqlens[b].
    rotary: ?Rotary = null,

    fn raw(k: KvCache, storage: *[9]c.ufa_tensor) c.ufa_kvcache {
        var r = c.ufa_kvcache_default();
        r.k_cache = rawOptional(k.k_cache, &storage[0]);
        r.v_cache = rawOptional(k.v_cache, &storage[1]);
        r.cache_seqlens = rawOptional(k.cache_seqlens, &storage[2]);
        r.block_table = rawOptional(k.block_table, &storage[3]);
        r.cache_batch_idx = rawOptional(k.cache_batch_idx, &storage[4]);
        r.k_new = rawOptional(k.k_new, &storage[5]);
        r.v_new = rawOptional(k.v_new, &storage[6]);
        if (k.rotary) |rot| {
            r.rotary_cos = rawOptional(rot.cos, &storage[7]);
            r.rotary_sin = rawOptional(rot.sin, &storage[8]);
            r.rotary_interleaved = @intFromBool(rot.interleaved);
        }
        return r;
    }
};

/// A partial attention result over some of the keys: `out` [batch, seqlen, heads, head_dim] (any
/// float dtype) and its log-sum-exp `lse` (f32 [batch, heads, seqlen], natural log), as a
/// forward call writes them with `.lse`.
pub const State = struct {
    out: Tensor,
    lse: Tensor,
};

/// The bytes of scratch memory a CUDA `forwardKvCache` call with this q and cache needs (0
/// without rotary tables). This binding passes CPU memory only, where the library allocates its
/// own scratch: the number is informational here.
pub fn kvCacheWorkspaceSize(q: Tensor, cache: KvCache) Error!usize {
    const rq = q.raw();
    var storage: [9]c.ufa_tensor = undefined;
    const rc = cache.raw(&storage);
    var n: usize = 0;
    try check(c.ufa_kvcache_workspace_size(&rq, &rc, &n));
    return n;
}

/// The library's thread pool and kernel caches; safe to share between threads.
pub const Context = struct {
    ptr: *c.ufa_context,

    pub const Options = struct {
        /// CPU threads; 0 = $UFA_NUM_THREADS if set, else every core.
        num_threads: u32 = 0,
        /// CPU kernel family ("amx-bf16", "avx512bf16", "avx512bf16-decode", "avx512", "avx2", "portable"); null = the best.
        cpu_isa: ?[*:0]const u8 = null,
    };

    pub fn init(options: Options) Error!Context {
        var o = c.ufa_context_options_default();
        o.num_threads = options.num_threads;
        o.cpu_isa = options.cpu_isa;
        var ptr: ?*c.ufa_context = null;
        try check(c.ufa_context_create(&o, &ptr));
        return .{ .ptr = ptr.? };
    }

    pub fn deinit(self: Context) void {
        c.ufa_context_destroy(self.ptr);
    }

    pub fn numThreads(self: Context) Error!u32 {
        var n: u32 = 0;
        try check(c.ufa_context_num_threads(self.ptr, &n));
        return n;
    }

    pub fn cpuIsa(self: Context) Error![:0]const u8 {
        var name: ?[*:0]const u8 = null;
        try check(c.ufa_context_cpu_isa(self.ptr, &name));
        return std.mem.span(name.?);
    }

    /// out = softmax(scale * q k^T + bias) v, with the masks of `params`. On failure nothing is
    /// written; `lastErrorMessage()` says why.
    pub fn forward(self: Context, q: Tensor, k: Tensor, v: Tensor, out: Tensor, params: Params) Error!void {
        const rq = q.raw();
        const rk = k.raw();
        const rv = v.raw();
        const ro = out.raw();
        var storage: [3]c.ufa_tensor = undefined;
        const p = params.raw(&storage);
        try check(c.ufa_attention_forward(self.ptr, &rq, &rk, &rv, &ro, &p, null));
    }

    /// Writes dq, dk, dv (shapes of q, k, v; for GQA dk and dv are summed over the query heads
    /// sharing a KV head): the gradients of a `forward` call, from its inputs, its output `out`,
    /// its log-sum-exp `lse` (f32 [batch, heads_q, seqlen_q]) and the output gradient `dout`.
    /// `params` must be the forward's, without `lse`. On failure nothing is written.
    pub fn backward(self: Context, q: Tensor, k: Tensor, v: Tensor, out: Tensor, dout: Tensor, lse: Tensor, dq: Tensor, dk: Tensor, dv: Tensor, params: Params) Error!void {
        const r = rawAll(9, .{ q, k, v, out, dout, lse, dq, dk, dv });
        var storage: [3]c.ufa_tensor = undefined;
        const p = params.raw(&storage);
        try check(c.ufa_attention_backward(self.ptr, &r[0], &r[1], &r[2], &r[3], &r[4], &r[5], &r[6], &r[7], &r[8], &p, null));
    }

    /// `forward` over the packed sequences of `seqs`: q [total_q, heads_q, head_dim], k
    /// [total_kv, heads_kv, head_dim] and v [total_kv, heads_kv, head_dim_v] (or a paged cache,
    /// see `Varlen.block_table`), out [total_q, heads_q, head_dim_v]; `params.lse`, if set, is
    /// f32 [heads_q, total_q]. Every rule of `forward` applies to each sequence on its own. On
    /// failure nothing is written.
    pub fn forwardVarlen(self: Context, q: Tensor, k: Tensor, v: Tensor, out: Tensor, seqs: Varlen, params: Params) Error!void {
        const r = rawAll(4, .{ q, k, v, out });
        var seq_storage: [4]c.ufa_tensor = undefined;
        const s = seqs.raw(&seq_storage);
        var storage: [3]c.ufa_tensor = undefined;
        const p = params.raw(&storage);
        try check(c.ufa_attention_forward_varlen(self.ptr, &r[0], &r[1], &r[2], &r[3], &s, &p, null));
    }

    /// The gradients dq, dk, dv (packed like q, k, v) of a `forwardVarlen` call over packed k and
    /// v (no seqused_kv, no block_table), from its inputs, its output `out`, its log-sum-exp
    /// `lse` (f32 [heads_q, total_q]) and `dout`. `seqs` and `params` must be the forward's
    /// (without `lse`). On failure nothing is written.
    pub fn backwardVarlen(self: Context, q: Tensor, k: Tensor, v: Tensor, out: Tensor, dout: Tensor, lse: Tensor, dq: Tensor, dk: Tensor, dv: Tensor, seqs: Varlen, params: Params) Error!void {
        const r = rawAll(9, .{ q, k, v, out, dout, lse, dq, dk, dv });
        var seq_storage: [4]c.ufa_tensor = undefined;
        const s = seqs.raw(&seq_storage);
        var storage: [3]c.ufa_tensor = undefined;
        const p = params.raw(&storage);
        try check(c.ufa_attention_backward_varlen(self.ptr, &r[0], &r[1], &r[2], &r[3], &r[4], &r[5], &r[6], &r[7], &r[8], &s, &p, null));
    }

    /// Appends `cache.k_new` and `cache.v_new` to the cache (rotated with `cache.rotary`), then
    /// attends q [batch, seqlen_q, heads_q, head_dim] to each sequence's cached and appended
    /// keys, writing out [batch, seqlen_q, heads_q, head_dim_v] and, with `params.lse`, the
    /// log-sum-exp [batch, heads_q, seqlen_q]. Causal masking aligns q's last row with the
    /// sequence's last key. On failure nothing is written, the cache included.
    pub fn forwardKvCache(self: Context, q: Tensor, cache: KvCache, out: Tensor, params: Params) Error!void {
        const r = rawAll(2, .{ q, out });
        var cache_storage: [9]c.ufa_tensor = undefined;
        const kc = cache.raw(&cache_storage);
        var storage: [3]c.ufa_tensor = undefined;
        const p = params.raw(&storage);
        try check(c.ufa_attention_forward_kvcache(self.ptr, &r[0], &kc, &r[1], &p, null));
    }

    /// Combines partial results over disjoint sets of keys into `out` and, unless null, their
    /// joint log-sum-exp `lse`: the result of attending to all the keys at once. A state whose
    /// LSE is -inf for a row contributes nothing to it. `out` and `lse` may be states[0]'s own
    /// tensors (merged in place). On failure nothing is written. More than 16 states take their
    /// descriptors from the C heap (error.OutOfMemory if that fails).
    pub fn mergeStates(self: Context, states: []const State, out: Tensor, lse: ?Tensor) Error!void {
        const inline_states = 16;
        var buffer: [2 * inline_states]c.ufa_tensor = undefined;
        const descriptors = if (states.len <= inline_states)
            buffer[0 .. 2 * states.len]
        else
            std.heap.c_allocator.alloc(c.ufa_tensor, 2 * states.len) catch return error.OutOfMemory;
        defer if (states.len > inline_states) std.heap.c_allocator.free(descriptors);
        const outs = descriptors[0..states.len];
        const lses = descriptors[states.len..];
        for (states, outs, lses) |s, *o, *l| {
            o.* = s.out.raw();
            l.* = s.lse.raw();
        }
        const ro = out.raw();
        var lse_storage: c.ufa_tensor = undefined;
        const rl = rawOptional(lse, &lse_storage);
        const first_out: ?[*]const c.ufa_tensor = if (states.len == 0) null else outs.ptr;
        const first_lse: ?[*]const c.ufa_tensor = if (states.len == 0) null else lses.ptr;
        try check(c.ufa_merge_states(self.ptr, states.len, first_out, first_lse, &ro, rl, null));
    }
};

/// The descriptors of `n` tensors, in order.
fn rawAll(comptime n: usize, tensors: [n]Tensor) [n]c.ufa_tensor {
    var out: [n]c.ufa_tensor = undefined;
    for (tensors, &out) |t, *r| r.* = t.raw();
    return out;
}

test "bf16 rounding" {
    try std.testing.expectEqual(@as(u16, 0x3f80), @backingInt(BF16.fromF32(1.0)));
    try std.testing.expectEqual(@as(u16, 0x3f81), @backingInt(BF16.fromF32(1.0078125)));
    try std.testing.expectEqual(@as(u16, 0x3f80), @backingInt(BF16.fromF32(1.00390625))); // tie: even
    try std.testing.expectEqual(@as(u16, 0x3f82), @backingInt(BF16.fromF32(1.01171875))); // tie: even
    try std.testing.expectEqual(@as(u16, 0x4780), @backingInt(BF16.fromF32(65504)));
    try std.testing.expect(std.math.isNan(BF16.fromF32(std.math.nan(f32)).toF32()));
    try std.testing.expectEqual(@as(f32, -2.5), BF16.fromF32(-2.5).toF32());
}
