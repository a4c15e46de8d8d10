//! One query attending over three keys (batch 1, one head, head_dim 2), then a bad call.
const std = @import("std");
const ufa = @import("ufa");

pub fn main() !void {
    const ctx = try ufa.Context.init(.{});
    defer ctx.deinit();

    const q = [_]f32{ 1, 0 }; // [batch=1, seqlen_q=1, heads=1, head_dim=2]
    const k = [_]f32{ 1, 0, 0, 1, 0, 0 }; // [1, 3, 1, 2]
    const v = [_]f32{ 1, 0, 0, 1, 1, 1 }; // [1, 3, 1, 2]
    var out: [2]f32 = undefined; // [1, 1, 1, 2]
    try ctx.forward(
        ufa.Tensor.init(&q, &.{ 1, 1, 1, 2 }),
        ufa.Tensor.init(&k, &.{ 1, 3, 1, 2 }),
        ufa.Tensor.init(&v, &.{ 1, 3, 1, 2 }),
        ufa.Tensor.init(&out, &.{ 1, 1, 1, 2 }),
        .{ .softmax_scale = 1 },
    );
    std.debug.print("out = {any}\n", .{out});

    // Errors are error unions; the library's message says what was wrong.
    ctx.forward(
        ufa.Tensor.init(&q, &.{ 1, 1, 1, 2 }),
        ufa.Tensor.init(&k, &.{ 1, 1, 3, 2 }),
        ufa.Tensor.init(&v, &.{ 1, 1, 3, 2 }),
        ufa.Tensor.init(&out, &.{ 1, 1, 1, 2 }),
        .{},
    ) catch |err| std.debug.print("{s}: {s}\n", .{ @errorName(err), ufa.lastErrorMessage() });
}
