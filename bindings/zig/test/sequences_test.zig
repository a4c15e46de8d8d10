//! Packed variable-length batches, KV caches (paged, appending) and merged attention states
//! against a float64 reference, and bad metadata coming back as an error that leaves every output
//! (the cache included) as it was.
const std = @import("std");
const ufa = @import("ufa");

const gpa = std.testing.allocator;

fn newSeed() u64 {
    var seed: u64 = undefined;
    std.testing.io.random(std.mem.asBytes(&seed));
    return seed;
}

/// A packed [rows, heads, dim] view whose head rows are padded to `pad` elements.
const Packed = struct {
    shape: [3]i64,
    strides: [3]i64,

    fn init(n: usize, heads: usize, dim: usize, pad: usize) Packed {
        const r: i64 = @intCast(n);
        const h: i64 = @intCast(heads);
        const d: i64 = @intCast(dim);
        const p: i64 = @intCast(pad);
        return .{ .shape = .{ r, h, d }, .strides = .{ h * p, p, 1 } };
    }

    fn size(l: *const Packed) usize {
        var n: i64 = 1;
        for (l.shape, l.strides) |s, st| n += (s - 1) * st;
        return @intCast(n);
    }

    fn at(l: *const Packed, r: usize, h: usize, x: usize) usize {
        return r * @as(usize, @intCast(l.strides[0])) + h * @as(usize, @intCast(l.strides[1])) + x;
    }

    /// The view of `data`; `l` must outlive the calls using it.
    fn tensor(l: *const Packed, data: []f32) ufa.Tensor {
        return ufa.Tensor.init(data, &l.shape).withStrides(&l.strides);
    }

    /// Rows [from, to) of `data` as dense row-major float64 [to - from, heads, dim].
    fn rows(l: *const Packed, data: []const f32, from: usize, to: usize) ![]f64 {
        const heads: usize = @intCast(l.shape[1]);
        const dim: usize = @intCast(l.shape[2]);
        const out = try gpa.alloc(f64, (to - from) * heads * dim);
        var i: usize = 0;
        for (from..to) |r| for (0..heads) |h| for (0..dim) |x| {
            out[i] = data[l.at(r, h, x)];
            i += 1;
        };
        return out;
    }
};

fn randomF32(rng: std.Random, n: usize) ![]f32 {
    const out = try gpa.alloc(f32, n);
    for (out) |*x| x.* = rng.floatNorm(f32);
    return out;
}

fn poisoned(n: usize) ![]f32 {
    const out = try gpa.alloc(f32, n);
    @memset(out, std.math.nan(f32));
    return out;
}

fn toF64(xs: []const f32) ![]f64 {
    const out = try gpa.alloc(f64, xs.len);
    for (xs, out) |x, *y| y.* = x;
    return out;
}

/// One sequence's attention in float64 over dense row-major q [sq, hq, d], k [sk, hk, d], v [sk,
/// hk, dv] (causal: bottom-right aligned): the output [sq, hq, dv], the log-sum-exp [hq, sq]
/// (-inf where a row sees no key) and, with dout [sq, hq, dv], the gradients (dk and dv summed
/// over each KV head's query heads).
const Reference = struct {
    out: []f64,
    lse: []f64,
    dq: []f64,
    dk: []f64,
    dv: []f64,

    fn init(q: []const f64, k: []const f64, v: []const f64, dout: ?[]const f64, sq: usize, sk: usize, hq: usize, hk: usize, d: usize, dv: usize, causal: bool) !Reference {
        var r: Reference = .{
            .out = try gpa.alloc(f64, sq * hq * dv),
            .lse = try gpa.alloc(f64, hq * sq),
            .dq = try gpa.alloc(f64, sq * hq * d),
            .dk = try gpa.alloc(f64, sk * hk * d),
            .dv = try gpa.alloc(f64, sk * hk * dv),
        };
        inline for (.{ "out", "lse", "dq", "dk", "dv" }) |f| @memset(@field(r, f), 0);
        const p = try gpa.alloc(f64, sk);
        defer gpa.free(p);
        const scale = 1.0 / @sqrt(@as(f64, @floatFromInt(d)));
        for (0..hq) |h| {
            const kh = h / (hq / hk);
            for (0..sq) |i| {
                var best = -std.math.inf(f64);
                for (p, 0..) |*s, j| {
                    s.* = -std.math.inf(f64);
                    if (causal and j + sq > i + sk) continue; // j > i + sk - sq
                    var dot: f64 = 0;
                    for (0..d) |x| dot += q[(i * hq + h) * d + x] * k[(j * hk + kh) * d + x];
                    s.* = dot * scale;
                    best = @max(best, s.*);
                }
                r.lse[h * sq + i] = best;
                if (best == -std.math.inf(f64)) continue; // no visible key: zeros, no gradient
                var sum: f64 = 0;
                for (p) |*s| {
                    s.* = @exp(s.* - best);
                    sum += s.*;
                }
                r.lse[h * sq + i] = best + @log(sum);
                const o = r.out[(i * hq + h) * dv ..][0..dv];
                for (p, 0..) |*s, j| {
                    s.* /= sum;
                    for (o, 0..) |*y, x| y.* += s.* * v[(j * hk + kh) * dv + x];
                }
                const dout_all = dout orelse continue;
                const do = dout_all[(i * hq + h) * dv ..][0..dv];
                var delta: f64 = 0;
                for (do, o) |a, b| delta += a * b;
                for (p, 0..) |s, j| {
                    if (s == 0) continue;
                    var dp: f64 = 0;
                    for (do, 0..) |a, x| {
                        dp += a * v[(j * hk + kh) * dv + x];
                        r.dv[(j * hk + kh) * dv + x] += s * a;
                    }
                    const ds = s * (dp - delta) * scale;
                    for (0..d) |x| {
                        r.dq[(i * hq + h) * d + x] += ds * k[(j * hk + kh) * d + x];
                        r.dk[(j * hk + kh) * d + x] += ds * q[(i * hq + h) * d + x];
                    }
                }
            }
        }
        return r;
    }

    fn deinit(r: Reference) void {
        inline for (.{ "out", "lse", "dq", "dk", "dv" }) |f| gpa.free(@field(r, f));
    }
};

/// Fails unless `got` matches `want` to a relative error (over the slice) under 1e-5; an all-zero
/// `want` must be matched exactly, equal infinities (an LSE of -inf) match, NaN (an unwritten
/// poisoned output) never does.
fn compare(what: []const u8, got: []const f64, want: []const f64) !void {
    errdefer std.debug.print("{s}: mismatch\n", .{what});
    try std.testing.expectEqual(want.len, got.len);
    var num: f64 = 0;
    var den: f64 = 0;
    for (got, want, 0..) |g, w, i| {
        if (std.math.isNan(g)) {
            std.debug.print("{s}[{d}] not written (or NaN)\n", .{ what, i });
            return error.TestUnexpectedResult;
        }
        if (std.math.isInf(g) or std.math.isInf(w)) {
            if (g != w) {
                std.debug.print("{s}[{d}] = {d}, want {d}\n", .{ what, i, g, w });
                return error.TestUnexpectedResult;
            }
            continue;
        }
        num += (g - w) * (g - w);
        den += w * w;
    }
    if (den == 0) return std.testing.expectEqual(@as(f64, 0), num);
    const rel = @sqrt(num / den);
    if (!(rel < 1e-5)) {
        std.debug.print("{s}: relative error {e:.3}, tolerance 1e-5\n", .{ what, rel });
        return error.TestUnexpectedResult;
    }
}

/// Fails unless every element of `xs` from `from` on is still NaN (the poison).
fn untouchedFrom(what: []const u8, xs: []const f32, from: usize) !void {
    for (xs[from..], from..) |x, i| if (!std.math.isNan(x)) {
        std.debug.print("{s}[{d}] = {d} was written\n", .{ what, i, x });
        return error.TestUnexpectedResult;
    };
}

fn cumulative(comptime n: usize, lens: [n]i32) [n + 1]i32 {
    var cu: [n + 1]i32 = undefined;
    cu[0] = 0;
    for (lens, 0..) |l, i| cu[i + 1] = cu[i] + l;
    return cu;
}

fn usz(x: i32) usize {
    return @intCast(x);
}

test "varlen forward: three sequences (one empty), GQA, causal, strided keys, against float64" {
    const seed = newSeed();
    errdefer std.debug.print("seed {d}\n", .{seed});
    var prng = std.Random.DefaultPrng.init(seed);
    const rng = prng.random();
    const ctx = try ufa.Context.init(.{ .num_threads = 2 });
    defer ctx.deinit();
    const hq = 4;
    const hk = 2;
    const d = 32;
    // 5 queries over 11 keys, an empty sequence, 8 queries over 6 keys (causal: its first two
    // rows see no key); then rows that belong to no sequence.
    const lens_q = [_]i32{ 5, 0, 8 };
    const lens_kv = [_]i32{ 11, 0, 6 };
    const cu_q = cumulative(3, lens_q);
    const cu_kv = cumulative(3, lens_kv);
    const total_q = usz(cu_q[3]) + 2;
    const total_kv = usz(cu_kv[3]) + 1;
    const lq = Packed.init(total_q, hq, d, d);
    const lkv = Packed.init(total_kv, hk, d, d + 3);
    const q = try randomF32(rng, lq.size());
    defer gpa.free(q);
    const k = try randomF32(rng, lkv.size());
    defer gpa.free(k);
    const v = try randomF32(rng, lkv.size());
    defer gpa.free(v);
    const out = try poisoned(lq.size());
    defer gpa.free(out);
    const lse = try poisoned(hq * total_q);
    defer gpa.free(lse);
    const lse_shape = [_]i64{ hq, @intCast(total_q) };
    try ctx.forwardVarlen(lq.tensor(q), lkv.tensor(k), lkv.tensor(v), lq.tensor(out), .{
        .cu_seqlens_q = ufa.Tensor.init(&cu_q, &.{4}),
        .cu_seqlens_kv = ufa.Tensor.init(&cu_kv, &.{4}),
        .max_seqlen_q = 8,
        .max_seqlen_kv = 11,
    }, .{ .causal = true, .lse = ufa.Tensor.init(lse, &lse_shape) });

    for (0..3) |b| {
        const q0 = usz(cu_q[b]);
        const q1 = usz(cu_q[b + 1]);
        const k0 = usz(cu_kv[b]);
        const k1 = usz(cu_kv[b + 1]);
        const qb = try lq.rows(q, q0, q1);
        defer gpa.free(qb);
        const kb = try lkv.rows(k, k0, k1);
        defer gpa.free(kb);
        const vb = try lkv.rows(v, k0, k1);
        defer gpa.free(vb);
        const ref = try Reference.init(qb, kb, vb, null, q1 - q0, k1 - k0, hq, hk, d, d, true);
        defer ref.deinit();
        const got = try lq.rows(out, q0, q1);
        defer gpa.free(got);
        try compare("out", got, ref.out);
        const got_lse = try gpa.alloc(f64, hq * (q1 - q0));
        defer gpa.free(got_lse);
        for (0..hq) |h| for (q0..q1, 0..) |r, i| {
            got_lse[h * (q1 - q0) + i] = lse[h * total_q + r];
        };
        try compare("lse", got_lse, ref.lse);
    }
    try std.testing.expect(lse[usz(cu_q[2])] == -std.math.inf(f32)); // sequence 2, row 0: no key
    try untouchedFrom("out", out, usz(cu_q[3]) * hq * d);
    for (0..hq) |h| try untouchedFrom("lse", lse[h * total_q .. (h + 1) * total_q], usz(cu_q[3]));
}

test "varlen backward: gradients against float64, empty query and key sets" {
    const seed = newSeed();
    errdefer std.debug.print("seed {d}\n", .{seed});
    var prng = std.Random.DefaultPrng.init(seed);
    const rng = prng.random();
    const ctx = try ufa.Context.init(.{ .num_threads = 2 });
    defer ctx.deinit();
    const hq = 4;
    const hk = 2;
    const d = 16;
    const dv = 24;
    const lens_q = [_]i32{ 4, 0, 3, 6 };
    const lens_kv = [_]i32{ 7, 3, 0, 6 };
    const cu_q = cumulative(4, lens_q);
    const cu_kv = cumulative(4, lens_kv);
    const total_q = usz(cu_q[4]) + 1;
    const total_kv = usz(cu_kv[4]) + 2;
    const lq = Packed.init(total_q, hq, d, d);
    const lk = Packed.init(total_kv, hk, d, d);
    const lo = Packed.init(total_q, hq, dv, dv);
    const lv = Packed.init(total_kv, hk, dv, dv);
    const q = try randomF32(rng, lq.size());
    defer gpa.free(q);
    const k = try randomF32(rng, lk.size());
    defer gpa.free(k);
    const v = try randomF32(rng, lv.size());
    defer gpa.free(v);
    const dout = try randomF32(rng, lo.size());
    defer gpa.free(dout);
    const out = try poisoned(lo.size());
    defer gpa.free(out);
    const lse = try poisoned(hq * total_q);
    defer gpa.free(lse);
    const lse_shape = [_]i64{ hq, @intCast(total_q) };
    const seqs: ufa.Varlen = .{
        .cu_seqlens_q = ufa.Tensor.init(&cu_q, &.{5}),
        .cu_seqlens_kv = ufa.Tensor.init(&cu_kv, &.{5}),
        .max_seqlen_q = 6,
        .max_seqlen_kv = 7,
    };
    try ctx.forwardVarlen(lq.tensor(q), lk.tensor(k), lv.tensor(v), lo.tensor(out), seqs, .{ .causal = true, .lse = ufa.Tensor.init(lse, &lse_shape) });
    const dq = try poisoned(lq.size());
    defer gpa.free(dq);
    const dk = try poisoned(lk.size());
    defer gpa.free(dk);
    const dV = try poisoned(lv.size());
    defer gpa.free(dV);
    try ctx.backwardVarlen(lq.tensor(q), lk.tensor(k), lv.tensor(v), lo.tensor(out), lo.tensor(dout), ufa.Tensor.init(lse, &lse_shape), lq.tensor(dq), lk.tensor(dk), lv.tensor(dV), seqs, .{ .causal = true });

    for (0..4) |b| {
        const q0 = usz(cu_q[b]);
        const q1 = usz(cu_q[b + 1]);
        const k0 = usz(cu_kv[b]);
        const k1 = usz(cu_kv[b + 1]);
        const inputs = [_][]f64{ try lq.rows(q, q0, q1), try lk.rows(k, k0, k1), try lv.rows(v, k0, k1), try lo.rows(dout, q0, q1) };
        defer for (inputs) |x| gpa.free(x);
        const ref = try Reference.init(inputs[0], inputs[1], inputs[2], inputs[3], q1 - q0, k1 - k0, hq, hk, d, dv, true);
        defer ref.deinit();
        const got = [_][]f64{ try lq.rows(dq, q0, q1), try lk.rows(dk, k0, k1), try lv.rows(dV, k0, k1) };
        defer for (got) |x| gpa.free(x);
        try compare("dq", got[0], ref.dq);
        try compare("dk", got[1], ref.dk);
        try compare("dv", got[2], ref.dv);
    }
    try untouchedFrom("dq", dq, usz(cu_q[4]) * hq * d);
    try untouchedFrom("dk", dk, usz(cu_kv[4]) * hk * d);
    try untouchedFrom("dv", dV, usz(cu_kv[4]) * hk * dv);
}

test "dense backward: gradients against float64 (GQA, causal)" {
    const seed = newSeed();
    errdefer std.debug.print("seed {d}\n", .{seed});
    var prng = std.Random.DefaultPrng.init(seed);
    const rng = prng.random();
    const ctx = try ufa.Context.init(.{ .num_threads = 2 });
    defer ctx.deinit();
    const sq = 7;
    const sk = 9;
    const hq = 4;
    const hk = 2;
    const d = 16;
    const q = try randomF32(rng, sq * hq * d);
    defer gpa.free(q);
    const k = try randomF32(rng, sk * hk * d);
    defer gpa.free(k);
    const v = try randomF32(rng, sk * hk * d);
    defer gpa.free(v);
    const dout = try randomF32(rng, sq * hq * d);
    defer gpa.free(dout);
    var out: [sq * hq * d]f32 = undefined;
    var lse: [hq * sq]f32 = undefined;
    var grads: [3][sq * hq * d]f32 = undefined; // dk, dv use the first sk * hk * d elements
    const qs = [_]i64{ 1, sq, hq, d };
    const ks = [_]i64{ 1, sk, hk, d };
    try ctx.forward(ufa.Tensor.init(q, &qs), ufa.Tensor.init(k, &ks), ufa.Tensor.init(v, &ks), ufa.Tensor.init(&out, &qs), .{ .causal = true, .lse = ufa.Tensor.init(&lse, &.{ 1, hq, sq }) });
    try ctx.backward(ufa.Tensor.init(q, &qs), ufa.Tensor.init(k, &ks), ufa.Tensor.init(v, &ks), ufa.Tensor.init(&out, &qs), ufa.Tensor.init(dout, &qs), ufa.Tensor.init(&lse, &.{ 1, hq, sq }), ufa.Tensor.init(&grads[0], &qs), ufa.Tensor.init(grads[1][0 .. sk * hk * d], &ks), ufa.Tensor.init(grads[2][0 .. sk * hk * d], &ks), .{ .causal = true });
    const in64 = [_][]f64{ try toF64(q), try toF64(k), try toF64(v), try toF64(dout) };
    defer for (in64) |x| gpa.free(x);
    const ref = try Reference.init(in64[0], in64[1], in64[2], in64[3], sq, sk, hq, hk, d, d, true);
    defer ref.deinit();
    const got = [_][]f64{ try toF64(&grads[0]), try toF64(grads[1][0 .. sk * hk * d]), try toF64(grads[2][0 .. sk * hk * d]) };
    defer for (got) |x| gpa.free(x);
    try compare("dq", got[0], ref.dq);
    try compare("dk", got[1], ref.dk);
    try compare("dv", got[2], ref.dv);
}

/// A paged KV cache (page size 2, pages shuffled) of two sequences holding 3 and 6 keys, to
/// which a call appends 2 keys a sequence, and q with 3 rows a sequence (GQA).
const PagedCase = struct {
    const batch = 2;
    const hq = 4;
    const hk = 2;
    const d = 16;
    const page = 2;
    const pages = 9;
    const max_pages = 4;
    const seq_new = 2;
    const sq = 3;
    const cache_shape = [_]i64{ pages, page, hk, d };
    const new_shape = [_]i64{ batch, seq_new, hk, d };
    const q_shape = [_]i64{ batch, sq, hq, d };
    const table_shape = [_]i64{ batch, max_pages };

    seqlens: [batch]i32 = .{ 3, 6 },
    table: [batch * max_pages]i32,
    k_cache: [pages * page * hk * d]f32,
    v_cache: [pages * page * hk * d]f32,
    k_new: [batch * seq_new * hk * d]f32,
    v_new: [batch * seq_new * hk * d]f32,
    q: [batch * sq * hq * d]f32,

    fn init(rng: std.Random) PagedCase {
        var c: PagedCase = .{ .table = undefined, .k_cache = undefined, .v_cache = undefined, .k_new = undefined, .v_new = undefined, .q = undefined };
        // Sequence 0 holds 5 keys after the append (3 pages), sequence 1 8 keys (4 pages); two
        // pages belong to no one; the entry past sequence 0's last page is never read (-1).
        var perm: [pages]i32 = undefined;
        for (&perm, 0..) |*p, i| p.* = @intCast(i);
        rng.shuffle(i32, &perm);
        c.table = .{ perm[0], perm[1], perm[2], -1, perm[3], perm[4], perm[5], perm[6] };
        inline for (.{ "k_cache", "v_cache", "k_new", "v_new", "q" }) |f| {
            for (&@field(c, f)) |*x| x.* = rng.floatNorm(f32);
        }
        return c;
    }

    fn cache(c: *PagedCase) ufa.KvCache {
        return .{
            .k_cache = ufa.Tensor.init(&c.k_cache, &cache_shape),
            .v_cache = ufa.Tensor.init(&c.v_cache, &cache_shape),
            .cache_seqlens = ufa.Tensor.init(&c.seqlens, &.{batch}),
            .block_table = ufa.Tensor.init(&c.table, &table_shape),
            .k_new = ufa.Tensor.init(&c.k_new, &new_shape),
            .v_new = ufa.Tensor.init(&c.v_new, &new_shape),
        };
    }

    /// Offset of key `pos` of sequence `b`, head `h`, in the cache.
    fn slot(c: *const PagedCase, b: usize, pos: usize, h: usize) usize {
        const p: usize = @intCast(c.table[b * max_pages + pos / page]);
        return ((p * page + pos % page) * hk + h) * d;
    }

    /// The cache after the append: `old` with each sequence's new rows at cache_seqlens[b].
    fn expected(c: *const PagedCase, old: []const f32, add: []const f32) ![]f32 {
        const want = try gpa.dupe(f32, old);
        for (0..batch) |b| for (0..seq_new) |i| for (0..hk) |h| {
            const src = ((b * seq_new + i) * hk + h) * d;
            @memcpy(want[c.slot(b, usz(c.seqlens[b]) + i, h)..][0..d], add[src..][0..d]);
        };
        return want;
    }

    /// Keys (or values) 0..n of sequence `b`, dense float64 [n, hk, d].
    fn gather(c: *const PagedCase, from: []const f32, b: usize, n: usize) ![]f64 {
        const out = try gpa.alloc(f64, n * hk * d);
        for (0..n) |pos| for (0..hk) |h| for (0..d) |x| {
            out[(pos * hk + h) * d + x] = from[c.slot(b, pos, h) + x];
        };
        return out;
    }
};

test "paged KV cache (page size 2, shuffled pages): the append lands bitwise, attention matches float64" {
    const seed = newSeed();
    errdefer std.debug.print("seed {d}\n", .{seed});
    var prng = std.Random.DefaultPrng.init(seed);
    const P = PagedCase;
    var c = P.init(prng.random());
    const want_k = try c.expected(&c.k_cache, &c.k_new);
    defer gpa.free(want_k);
    const want_v = try c.expected(&c.v_cache, &c.v_new);
    defer gpa.free(want_v);
    const ctx = try ufa.Context.init(.{ .num_threads = 2 });
    defer ctx.deinit();
    var out: [c.q.len]f32 = @splat(std.math.nan(f32));
    var lse: [P.batch * P.hq * P.sq]f32 = @splat(std.math.nan(f32));
    try ctx.forwardKvCache(ufa.Tensor.init(&c.q, &P.q_shape), c.cache(), ufa.Tensor.init(&out, &P.q_shape), .{
        .causal = true,
        .lse = ufa.Tensor.init(&lse, &.{ P.batch, P.hq, P.sq }),
    });
    try std.testing.expectEqualSlices(u8, std.mem.sliceAsBytes(want_k), std.mem.sliceAsBytes(&c.k_cache));
    try std.testing.expectEqualSlices(u8, std.mem.sliceAsBytes(want_v), std.mem.sliceAsBytes(&c.v_cache));
    try std.testing.expectEqual([2]i32{ 3, 6 }, c.seqlens); // not advanced
    const nq = P.sq * P.hq * P.d;
    for (0..P.batch) |b| {
        const n = usz(c.seqlens[b]) + P.seq_new;
        const qb = try toF64(c.q[b * nq ..][0..nq]);
        defer gpa.free(qb);
        const kb = try c.gather(want_k, b, n);
        defer gpa.free(kb);
        const vb = try c.gather(want_v, b, n);
        defer gpa.free(vb);
        const ref = try Reference.init(qb, kb, vb, null, P.sq, n, P.hq, P.hk, P.d, P.d, true);
        defer ref.deinit();
        const got = try toF64(out[b * nq ..][0..nq]);
        defer gpa.free(got);
        try compare("out", got, ref.out);
        const got_lse = try toF64(lse[b * P.hq * P.sq ..][0 .. P.hq * P.sq]);
        defer gpa.free(got_lse);
        try compare("lse", got_lse, ref.lse);
    }
    try std.testing.expectEqual(@as(usize, 0), try ufa.kvCacheWorkspaceSize(ufa.Tensor.init(&c.q, &P.q_shape), c.cache()));
}

test "a bad block table: the error names the entry, the cache and out stay as they were" {
    var prng = std.Random.DefaultPrng.init(newSeed());
    const P = PagedCase;
    var c = P.init(prng.random());
    c.table[1] = 99;
    const k_before = c.k_cache;
    const v_before = c.v_cache;
    const ctx = try ufa.Context.init(.{ .num_threads = 2 });
    defer ctx.deinit();
    var out: [c.q.len]f32 = @splat(std.math.nan(f32));
    try std.testing.expectError(error.InvalidArgument, ctx.forwardKvCache(ufa.Tensor.init(&c.q, &P.q_shape), c.cache(), ufa.Tensor.init(&out, &P.q_shape), .{ .causal = true }));
    const msg = ufa.lastErrorMessage();
    errdefer std.debug.print("message: {s}\n", .{msg});
    try std.testing.expect(std.mem.indexOf(u8, msg, "block_table[0][1]=99") != null);
    try std.testing.expectEqualSlices(u8, std.mem.sliceAsBytes(&k_before), std.mem.sliceAsBytes(&c.k_cache));
    try std.testing.expectEqualSlices(u8, std.mem.sliceAsBytes(&v_before), std.mem.sliceAsBytes(&c.v_cache));
    try untouchedFrom("out", &out, 0);

    // Decreasing cu_seqlens in a varlen call: named, nothing written.
    const cu_bad = [_]i32{ 0, 5, 3, 8 };
    const cu_good = [_]i32{ 0, 5, 6, 8 };
    var q: [8 * 2 * 4]f32 = @splat(0.5);
    var vout: [8 * 2 * 4]f32 = @splat(std.math.nan(f32));
    const shape = [_]i64{ 8, 2, 4 };
    try std.testing.expectError(error.InvalidArgument, ctx.forwardVarlen(ufa.Tensor.init(&q, &shape), ufa.Tensor.init(&q, &shape), ufa.Tensor.init(&q, &shape), ufa.Tensor.init(&vout, &shape), .{
        .cu_seqlens_q = ufa.Tensor.init(&cu_bad, &.{4}),
        .cu_seqlens_kv = ufa.Tensor.init(&cu_good, &.{4}),
        .max_seqlen_q = 8,
        .max_seqlen_kv = 8,
    }, .{}));
    try std.testing.expect(std.mem.indexOf(u8, ufa.lastErrorMessage(), "cu_seqlens_q[2]=3") != null);
    try untouchedFrom("out", &vout, 0);

    // A metadata view past the end of its slice.
    try std.testing.expectError(error.InvalidArgument, ctx.forwardVarlen(ufa.Tensor.init(&q, &shape), ufa.Tensor.init(&q, &shape), ufa.Tensor.init(&q, &shape), ufa.Tensor.init(&vout, &shape), .{
        .cu_seqlens_q = ufa.Tensor.init(cu_good[0..3], &.{4}),
        .cu_seqlens_kv = ufa.Tensor.init(&cu_good, &.{4}),
        .max_seqlen_q = 8,
        .max_seqlen_kv = 8,
    }, .{}));
    try untouchedFrom("out", &vout, 0);
}

test "merging attention over two halves of the keys equals attention over all of them" {
    const seed = newSeed();
    errdefer std.debug.print("seed {d}\n", .{seed});
    var prng = std.Random.DefaultPrng.init(seed);
    const rng = prng.random();
    const ctx = try ufa.Context.init(.{ .num_threads = 2 });
    defer ctx.deinit();
    const sq = 5;
    const sk = 12;
    const split = 5;
    const hq = 4;
    const hk = 2;
    const d = 16;
    const q = try randomF32(rng, sq * hq * d);
    defer gpa.free(q);
    const k = try randomF32(rng, sk * hk * d);
    defer gpa.free(k);
    const v = try randomF32(rng, sk * hk * d);
    defer gpa.free(v);
    const qs = [_]i64{ 1, sq, hq, d };
    const ls = [_]i64{ 1, hq, sq };
    const halves = [2][4]i64{ .{ 1, split, hk, d }, .{ 1, sk - split, hk, d } };
    var outs: [2][sq * hq * d]f32 = undefined;
    var lses: [2][hq * sq]f32 = undefined;
    var states: [2]ufa.State = undefined;
    for (0..2, [2]usize{ 0, split }) |i, from| {
        states[i] = .{ .out = ufa.Tensor.init(&outs[i], &qs), .lse = ufa.Tensor.init(&lses[i], &ls) };
        const kv = [2][]f32{ k[from * hk * d ..][0 .. @as(usize, @intCast(halves[i][1])) * hk * d], v[from * hk * d ..][0 .. @as(usize, @intCast(halves[i][1])) * hk * d] };
        try ctx.forward(ufa.Tensor.init(q, &qs), ufa.Tensor.init(kv[0], &halves[i]), ufa.Tensor.init(kv[1], &halves[i]), states[i].out, .{ .lse = states[i].lse });
    }
    var out: [sq * hq * d]f32 = @splat(std.math.nan(f32));
    var lse: [hq * sq]f32 = @splat(std.math.nan(f32));
    try ctx.mergeStates(&states, ufa.Tensor.init(&out, &qs), ufa.Tensor.init(&lse, &ls));
    const in64 = [_][]f64{ try toF64(q), try toF64(k), try toF64(v) };
    defer for (in64) |x| gpa.free(x);
    const ref = try Reference.init(in64[0], in64[1], in64[2], null, sq, sk, hq, hk, d, d, false);
    defer ref.deinit();
    const got = [_][]f64{ try toF64(&out), try toF64(&lse) };
    defer for (got) |x| gpa.free(x);
    try compare("merged out", got[0], ref.out);
    try compare("merged lse", got[1], ref.lse);

    // Mismatched states: the message names the state.
    const bad = [_]ufa.State{ states[0], .{ .out = states[1].out, .lse = ufa.Tensor.init(lses[1][0 .. hq * 4], &.{ 1, hq, 4 }) } };
    const before = out;
    try std.testing.expectError(error.InvalidArgument, ctx.mergeStates(&bad, ufa.Tensor.init(&out, &qs), null));
    try std.testing.expect(std.mem.indexOf(u8, ufa.lastErrorMessage(), "states[1].lse") != null);
    try std.testing.expectEqualSlices(u8, std.mem.sliceAsBytes(&before), std.mem.sliceAsBytes(&out));
}
