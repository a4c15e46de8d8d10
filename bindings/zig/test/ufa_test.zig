//! The Zig binding against a float64 reference: every dtype, GQA with causal masking, strided
//! views, the log-sum-exp, and bad input coming back as an error with the library's message.
const std = @import("std");
const ufa = @import("ufa");

const gpa = std.testing.allocator;

/// A 4-d view [b, s, h, d] and its strides.
const Layout = struct {
    shape: [4]i64,
    strides: [4]i64,

    fn rowMajor(b: i64, s: i64, h: i64, d: i64) Layout {
        return .{ .shape = .{ b, s, h, d }, .strides = .{ s * h * d, h * d, d, 1 } };
    }

    /// [b, s, h, d] stored as a [b, h, s, d] buffer whose rows are padded to `pad` elements.
    fn headsFirst(b: i64, s: i64, h: i64, d: i64, pad: i64) Layout {
        return .{ .shape = .{ b, s, h, d }, .strides = .{ h * s * pad, pad, s * pad, 1 } };
    }

    fn size(l: Layout) usize {
        var n: i64 = 1;
        for (l.shape, l.strides) |s, st| n += (s - 1) * st;
        return @intCast(n);
    }

    fn at(l: Layout, b: i64, s: i64, h: i64, d: i64) usize {
        return @intCast(b * l.strides[0] + s * l.strides[1] + h * l.strides[2] + d * l.strides[3]);
    }
};

/// Attention in float64, from the values the library actually sees.
fn reference(q: []const f64, k: []const f64, v: []const f64, lq: Layout, lk: Layout, lo: Layout, causal: bool) ![]f64 {
    const B = lq.shape[0];
    const SQ = lq.shape[1];
    const HQ = lq.shape[2];
    const D = lq.shape[3];
    const SK = lk.shape[1];
    const HK = lk.shape[2];
    const out = try gpa.alloc(f64, lo.size());
    @memset(out, 0);
    const scores = try gpa.alloc(f64, @intCast(SK));
    defer gpa.free(scores);
    const scale = 1.0 / @sqrt(@as(f64, @floatFromInt(D)));
    for (0..@intCast(B)) |bu| for (0..@intCast(HQ)) |hu| for (0..@intCast(SQ)) |iu| {
        const b: i64 = @intCast(bu);
        const h: i64 = @intCast(hu);
        const i: i64 = @intCast(iu);
        const kh = @divFloor(h, @divExact(HQ, HK));
        var best = -std.math.inf(f64);
        for (scores, 0..) |*s, ju| {
            const j: i64 = @intCast(ju);
            s.* = -std.math.inf(f64);
            if (causal and j > i + SK - SQ) continue;
            var dot: f64 = 0;
            for (0..@intCast(D)) |xu| {
                const x: i64 = @intCast(xu);
                dot += q[lq.at(b, i, h, x)] * k[lk.at(b, j, kh, x)];
            }
            s.* = dot * scale;
            best = @max(best, s.*);
        }
        if (best == -std.math.inf(f64)) continue;
        var sum: f64 = 0;
        for (scores) |*s| {
            s.* = @exp(s.* - best);
            sum += s.*;
        }
        for (0..@intCast(D)) |xu| {
            const x: i64 = @intCast(xu);
            var acc: f64 = 0;
            for (scores, 0..) |s, ju| acc += s * v[lk.at(b, @intCast(ju), kh, x)];
            out[lo.at(b, i, h, x)] = acc / sum;
        }
    };
    return out;
}

fn toF64(x: anytype) f64 {
    return switch (@TypeOf(x)) {
        ufa.BF16 => x.toF32(),
        else => @floatCast(x),
    };
}

fn fromF32(comptime T: type, x: f32) T {
    return switch (T) {
        ufa.BF16 => ufa.BF16.fromF32(x),
        else => @floatCast(x),
    };
}

fn nan(comptime T: type) T {
    return switch (T) {
        ufa.BF16 => @fromBackingInt(@intCast(0xffff)),
        else => std.math.nan(T),
    };
}

fn isNan(x: anytype) bool {
    return std.math.isNan(toF64(x));
}

fn newSeed() u64 {
    var seed: u64 = undefined;
    std.testing.io.random(std.mem.asBytes(&seed));
    return seed;
}

const Case = struct {
    batch: i64,
    seq_q: i64,
    seq_kv: i64,
    heads: i64,
    heads_kv: i64,
    head_dim: i64,
    causal: bool = false,
    strided: bool = false,
};

/// Random inputs of type T and what they are in float64.
fn Operand(comptime T: type) type {
    return struct {
        data: []T,
        values: []f64,

        fn random(rng: std.Random, n: usize) !@This() {
            const o: @This() = .{ .data = try gpa.alloc(T, n), .values = try gpa.alloc(f64, n) };
            for (o.data, o.values) |*d, *x| {
                d.* = fromF32(T, rng.floatNorm(f32));
                x.* = toF64(d.*);
            }
            return o;
        }

        fn deinit(o: @This()) void {
            gpa.free(o.data);
            gpa.free(o.values);
        }
    };
}

/// Checks one case with fresh random inputs; a failure prints the case and its seed.
fn run(comptime T: type, c: Case) !void {
    const seed = newSeed();
    errdefer std.debug.print("failed: {s} {any}, seed {d}\n", .{ @typeName(T), c, seed });
    var prng = std.Random.DefaultPrng.init(seed);
    const rng = prng.random();
    const ctx = try ufa.Context.init(.{ .num_threads = 2 });
    defer ctx.deinit();
    const lq = if (c.strided) Layout.headsFirst(c.batch, c.seq_q, c.heads, c.head_dim, c.head_dim + 3) else Layout.rowMajor(c.batch, c.seq_q, c.heads, c.head_dim);
    const lk = if (c.strided) Layout.headsFirst(c.batch, c.seq_kv, c.heads_kv, c.head_dim, c.head_dim + 5) else Layout.rowMajor(c.batch, c.seq_kv, c.heads_kv, c.head_dim);
    const lo = lq;
    const q = try Operand(T).random(rng, lq.size());
    defer q.deinit();
    const k = try Operand(T).random(rng, lk.size());
    defer k.deinit();
    const v = try Operand(T).random(rng, lk.size());
    defer v.deinit();
    const out = try gpa.alloc(T, lo.size());
    defer gpa.free(out);
    @memset(out, nan(T));

    try ctx.forward(
        ufa.Tensor.init(q.data, &lq.shape).withStrides(&lq.strides),
        ufa.Tensor.init(k.data, &lk.shape).withStrides(&lk.strides),
        ufa.Tensor.init(v.data, &lk.shape).withStrides(&lk.strides),
        ufa.Tensor.init(out, &lo.shape).withStrides(&lo.strides),
        .{ .causal = c.causal },
    );
    const ref = try reference(q.values, k.values, v.values, lq, lk, lo, c.causal);
    defer gpa.free(ref);
    var num: f64 = 0;
    var den: f64 = 0;
    for (0..@intCast(c.batch)) |b| for (0..@intCast(c.seq_q)) |s| for (0..@intCast(c.heads)) |h| for (0..@intCast(c.head_dim)) |x| {
        const i = lo.at(@intCast(b), @intCast(s), @intCast(h), @intCast(x));
        if (isNan(out[i])) {
            std.debug.print("out[{d},{d},{d},{d}] not written (or NaN)\n", .{ b, s, h, x });
            return error.TestUnexpectedResult;
        }
        const d = toF64(out[i]) - ref[i];
        num += d * d;
        den += ref[i] * ref[i];
    };
    const rel = @sqrt(num / den);
    const tol: f64 = if (T == f32) 1e-5 else 1e-2;
    if (!(rel < tol)) {
        std.debug.print("relative error {e:.3}, tolerance {e:.0}\n", .{ rel, tol });
        return error.TestUnexpectedResult;
    }
}

test "f32 matches the float64 reference" {
    try run(f32, .{ .batch = 2, .seq_q = 17, .seq_kv = 17, .heads = 2, .heads_kv = 2, .head_dim = 32 });
}

test "f16 matches the float64 reference" {
    try run(f16, .{ .batch = 1, .seq_q = 9, .seq_kv = 33, .heads = 3, .heads_kv = 3, .head_dim = 64 });
}

test "bf16 matches the float64 reference" {
    try run(ufa.BF16, .{ .batch = 2, .seq_q = 16, .seq_kv = 5, .heads = 2, .heads_kv = 1, .head_dim = 80 });
}

test "GQA with causal masking (seqlen_q < seqlen_kv), every dtype" {
    const c: Case = .{ .batch = 1, .seq_q = 7, .seq_kv = 19, .heads = 8, .heads_kv = 2, .head_dim = 32, .causal = true };
    try run(f32, c);
    try run(f16, c);
    try run(ufa.BF16, c);
}

test "strided views: [batch, heads, seq, dim] buffers with padded rows" {
    const c: Case = .{ .batch = 2, .seq_q = 13, .seq_kv = 21, .heads = 4, .heads_kv = 2, .head_dim = 48, .causal = true, .strided = true };
    try run(f32, c);
    try run(ufa.BF16, c);
}

test "log-sum-exp output" {
    const ctx = try ufa.Context.init(.{ .num_threads = 2 });
    defer ctx.deinit();
    const q = [_]f32{ 1, 0, 0, 1 };
    const k = [_]f32{ 1, 0, 0, 1 };
    const v = [_]f32{ 1, 2, 3, 4 };
    var out: [4]f32 = undefined;
    var lse: [2]f32 = undefined;
    const shape = [_]i64{ 1, 2, 1, 2 };
    try ctx.forward(ufa.Tensor.init(&q, &shape), ufa.Tensor.init(&k, &shape), ufa.Tensor.init(&v, &shape), ufa.Tensor.init(&out, &shape), .{
        .softmax_scale = 1,
        .lse = ufa.Tensor.init(&lse, &.{ 1, 1, 2 }),
    });
    for (lse) |l| try std.testing.expectApproxEqAbs(@as(f32, @floatCast(@log(std.math.e + 1.0))), l, 1e-5);
}

test "bad input: an error with the library's message, nothing written" {
    const ctx = try ufa.Context.init(.{ .num_threads = 2 });
    defer ctx.deinit();
    const q = try gpa.alloc(f32, 4 * 8 * 32);
    defer gpa.free(q);
    @memset(q, 0.5);
    const kv = try gpa.alloc(f32, 4 * 3 * 32);
    defer gpa.free(kv);
    @memset(kv, 0.5);
    const out = try gpa.alloc(f32, q.len);
    defer gpa.free(out);
    @memset(out, 42);
    const result = ctx.forward(
        ufa.Tensor.init(q, &.{ 1, 4, 8, 32 }),
        ufa.Tensor.init(kv, &.{ 1, 4, 3, 32 }),
        ufa.Tensor.init(kv, &.{ 1, 4, 3, 32 }),
        ufa.Tensor.init(out, &.{ 1, 4, 8, 32 }),
        .{},
    );
    try std.testing.expectError(error.InvalidArgument, result);
    const msg = ufa.lastErrorMessage();
    errdefer std.debug.print("message: {s}\n", .{msg});
    try std.testing.expect(std.mem.indexOf(u8, msg, "k.shape[2]=3") != null);
    try std.testing.expect(std.mem.indexOf(u8, msg, "q.shape[2]=8") != null);
    for (out) |x| try std.testing.expectEqual(@as(f32, 42), x);

    // A last dimension that is not contiguous: the library's message again.
    try std.testing.expectError(error.InvalidArgument, ctx.forward(
        ufa.Tensor.init(q, &.{ 1, 4, 8, 16 }).withStrides(&.{ 1024, 256, 32, 2 }),
        ufa.Tensor.init(q, &.{ 1, 4, 8, 16 }),
        ufa.Tensor.init(q, &.{ 1, 4, 8, 16 }),
        ufa.Tensor.init(out, &.{ 1, 4, 8, 16 }),
        .{},
    ));
    try std.testing.expect(std.mem.indexOf(u8, ufa.lastErrorMessage(), "contiguous") != null);

    // A negative window.
    try std.testing.expectError(error.InvalidArgument, ctx.forward(
        ufa.Tensor.init(q, &.{ 1, 4, 8, 32 }),
        ufa.Tensor.init(q, &.{ 1, 4, 8, 32 }),
        ufa.Tensor.init(q, &.{ 1, 4, 8, 32 }),
        ufa.Tensor.init(out, &.{ 1, 4, 8, 32 }),
        .{ .window_left = -5 },
    ));
    try std.testing.expect(std.mem.indexOf(u8, ufa.lastErrorMessage(), "-5") != null);
}

test "a view past the end of its slice is refused" {
    const ctx = try ufa.Context.init(.{ .num_threads = 2 });
    defer ctx.deinit();
    var full: [24]f32 = @splat(1);
    var out: [24]f32 = undefined;
    const shape = [_]i64{ 1, 2, 3, 4 };
    try std.testing.expectError(error.InvalidArgument, ctx.forward(
        ufa.Tensor.init(full[0..23], &shape),
        ufa.Tensor.init(&full, &shape),
        ufa.Tensor.init(&full, &shape),
        ufa.Tensor.init(&out, &shape),
        .{},
    ));
    try std.testing.expect(std.mem.indexOf(u8, ufa.lastErrorMessage(), "q.nbytes=92") != null);
    try std.testing.expectError(error.InvalidArgument, ctx.forward(
        ufa.Tensor.init(&full, &shape).withStrides(&.{ 24, 12, 5, 1 }),
        ufa.Tensor.init(&full, &shape),
        ufa.Tensor.init(&full, &shape),
        ufa.Tensor.init(&out, &shape),
        .{},
    ));
}

test "context queries and a bad option" {
    const ctx = try ufa.Context.init(.{ .num_threads = 2 });
    defer ctx.deinit();
    try std.testing.expectEqual(@as(u32, 2), try ctx.numThreads());
    try std.testing.expect((try ctx.cpuIsa()).len > 0);
    try std.testing.expect(ufa.version().len > 0);
    try std.testing.expectError(error.InvalidArgument, ufa.Context.init(.{ .cpu_isa = "no-such-isa" }));
    try std.testing.expect(ufa.lastErrorMessage().len > 0);
}

test "a bool mask spelling out causal masking, and a (-1, 0) window, give the causal result" {
    const ctx = try ufa.Context.init(.{ .num_threads = 2 });
    defer ctx.deinit();
    const sq = 5;
    const skv = 9;
    const h = 2;
    const d = 16;
    var prng = std.Random.DefaultPrng.init(newSeed());
    const rng = prng.random();
    var q: [sq * h * d]f32 = undefined;
    var k: [skv * h * d]f32 = undefined;
    var v: [skv * h * d]f32 = undefined;
    for (&q) |*x| x.* = rng.floatNorm(f32);
    for (&k) |*x| x.* = rng.floatNorm(f32);
    for (&v) |*x| x.* = rng.floatNorm(f32);
    var mask: [sq * skv]bool = undefined;
    for (0..sq) |i| for (0..skv) |j| {
        mask[i * skv + j] = j <= i + skv - sq;
    };
    var outs: [3][sq * h * d]f32 = undefined;
    const params = [_]ufa.Params{
        .{ .causal = true },
        .{ .mask = ufa.Tensor.init(&mask, &.{ 1, 1, sq, skv }) },
        .{ .window_left = -1, .window_right = 0 },
    };
    for (params, &outs) |p, *out| try ctx.forward(
        ufa.Tensor.init(&q, &.{ 1, sq, h, d }),
        ufa.Tensor.init(&k, &.{ 1, skv, h, d }),
        ufa.Tensor.init(&v, &.{ 1, skv, h, d }),
        ufa.Tensor.init(out, &.{ 1, sq, h, d }),
        p,
    );
    for (outs[0], outs[1], outs[2]) |causal, masked, windowed| {
        try std.testing.expectApproxEqAbs(causal, masked, 1e-6);
        try std.testing.expectApproxEqAbs(causal, windowed, 1e-6);
    }
}
