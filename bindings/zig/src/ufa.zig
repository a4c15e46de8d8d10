//! ufa (Universal Flash Attention) for Zig: a thin binding of the C API, ufa.h.
//!
//! Tensors are views of slices (`[]f32`, `[]f16`, `[]BF16`, `[]bool`) with a shape and optional
//! strides in elements, outermost first, as in ufa.h: Q is [batch, seqlen_q, heads_q, head_dim],
//! K and V [batch, seqlen_kv, heads_kv, head_dim], the output [batch, seqlen_q, heads_q,
//! head_dim]. No strides means row-major; any strides work as long as the last one is 1.
//!
//! Failures are error unions: `Error.InvalidArgument` and the other statuses of ufa.h, with the
//! library's message in `lastErrorMessage()`. The binding checks one thing itself, what the C API
//! cannot know: that each view fits in its slice (`error.ViewOutOfBounds`).
const std = @import("std");
/// The C declarations (ufa.h), for calls this binding does not wrap.
pub const c = @import("c.zig");

/// Every failure a ufa call can report: one error per `ufa_status`, plus ViewOutOfBounds from
/// the binding itself.
pub const Error = error{
    InvalidArgument,
    Unsupported,
    DeviceUnavailable,
    OutOfMemory,
    BackendFailure,
    Internal,
    /// A tensor's shape and strides reach past the end of its slice (checked by the binding;
    /// `lastErrorMessage()` does not describe it).
    ViewOutOfBounds,
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

    /// The dtype of a slice element type: f32, f16, BF16 or bool.
    pub fn of(comptime T: type) DType {
        return switch (T) {
            f32 => .f32,
            f16 => .f16,
            BF16 => .bf16,
            bool => .bool,
            else => @compileError("ufa tensors hold f32, f16, ufa.BF16 or bool, not " ++ @typeName(T)),
        };
    }
};

/// A view of a slice. `shape` and `strides` are borrowed: they must outlive the calls using the
/// tensor (literals such as `&.{ 1, 2, 3, 4 }` do).
pub const Tensor = struct {
    data: ?*anyopaque,
    len: usize,
    dtype: DType,
    shape: []const i64,
    strides: ?[]const i64 = null,

    /// A row-major view of `data` (a slice of f32, f16, ufa.BF16 or bool) with `shape`.
    pub fn init(data: anytype, shape: []const i64) Tensor {
        const T = std.meta.Elem(@TypeOf(data));
        return .{
            .data = if (data.len == 0) null else @ptrCast(@constCast(data.ptr)),
            .len = data.len,
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

    /// Whether every element the view addresses lies in the slice. Views the library rejects
    /// anyway (sizes < 1, negative strides, mismatched ranks) pass, so that its message tells.
    fn fits(t: Tensor) bool {
        if (t.strides) |s| if (s.len != t.shape.len) return true;
        var last: u64 = 0;
        for (t.shape, 0..) |n, i| {
            if (n < 1) return true;
            var stride: i64 = 1;
            if (t.strides) |s| {
                stride = s[i];
            } else for (t.shape[i + 1 ..]) |m| {
                if (m < 1) return true;
                stride = std.math.mul(i64, stride, m) catch return false;
            }
            if (stride < 0) return true;
            const reach = std.math.mul(u64, @intCast(n - 1), @intCast(stride)) catch return false;
            last = std.math.add(u64, last, reach) catch return false;
        }
        return last < t.len;
    }

    fn raw(t: Tensor) Error!c.ufa_tensor {
        if (!t.fits()) return error.ViewOutOfBounds;
        return .{
            .data = t.data,
            .dtype = @backingInt(t.dtype),
            .device_type = c.UFA_DEVICE_CPU,
            .device_ordinal = 0,
            .ndim = std.math.cast(i32, t.shape.len) orelse std.math.maxInt(i32),
            .shape = t.shape.ptr,
            .strides = if (t.strides) |s| s.ptr else null,
        };
    }
};

/// What a forward call computes besides softmax(q k^T) v; the defaults are the library's.
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
    /// Receives each score row's log-sum-exp (f32, [batch, heads_q, seqlen_q]).
    lse: ?Tensor = null,
};

/// The library's thread pool and kernel caches; safe to share between threads.
pub const Context = struct {
    ptr: *c.ufa_context,

    pub const Options = struct {
        /// CPU threads; 0 = $UFA_NUM_THREADS if set, else every core.
        num_threads: u32 = 0,
        /// CPU kernel family ("avx512bf16", "avx512", "avx2", "portable"); null = the best.
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
    /// written; `lastErrorMessage()` says why (except for error.ViewOutOfBounds).
    pub fn forward(self: Context, q: Tensor, k: Tensor, v: Tensor, out: Tensor, params: Params) Error!void {
        const rq = try q.raw();
        const rk = try k.raw();
        const rv = try v.raw();
        const ro = try out.raw();
        var p = c.ufa_attention_params_default();
        p.causal = @intFromBool(params.causal);
        if (params.causal_top_left) p.causal_alignment = c.UFA_CAUSAL_TOP_LEFT;
        p.softmax_scale = params.softmax_scale;
        p.softcap = params.softcap;
        p.window_left = params.window_left;
        p.window_right = params.window_right;
        var alibi: c.ufa_tensor = undefined;
        var mask: c.ufa_tensor = undefined;
        var lse: c.ufa_tensor = undefined;
        if (params.alibi_slopes) |t| {
            alibi = try t.raw();
            p.alibi_slopes = &alibi;
        }
        if (params.mask) |t| {
            mask = try t.raw();
            p.mask = &mask;
        }
        if (params.lse) |t| {
            lse = try t.raw();
            p.lse = &lse;
        }
        try check(c.ufa_attention_forward(self.ptr, &rq, &rk, &rv, &ro, &p, null));
    }
};

test "bf16 rounding" {
    try std.testing.expectEqual(@as(u16, 0x3f80), @backingInt(BF16.fromF32(1.0)));
    try std.testing.expectEqual(@as(u16, 0x3f81), @backingInt(BF16.fromF32(1.0078125)));
    try std.testing.expectEqual(@as(u16, 0x3f80), @backingInt(BF16.fromF32(1.00390625))); // tie: even
    try std.testing.expectEqual(@as(u16, 0x3f82), @backingInt(BF16.fromF32(1.01171875))); // tie: even
    try std.testing.expectEqual(@as(u16, 0x4780), @backingInt(BF16.fromF32(65504)));
    try std.testing.expect(std.math.isNan(BF16.fromF32(std.math.nan(f32)).toF32()));
    try std.testing.expectEqual(@as(f32, -2.5), BF16.fromF32(-2.5).toF32());
}
