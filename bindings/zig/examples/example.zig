//! One query attending over three keys (batch 1, one head, head_dim 2), then a bad call.
const std = @import("std");
const ufa = @import("ufa");

pub fn main(init: std.process.Init) !void {
    var buffer: [1024]u8 = undefined;
    var stdout_writer: std.Io.File.Writer = .init(.stdout(), init.io, &buffer);
    const stdout = &stdout_writer.interface;

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
    try stdout.print("out = {any}\n", .{out});

    // Errors are error unions; the library's message says what was wrong.
    ctx.forward(
        ufa.Tensor.init(&q, &.{ 1, 1, 1, 2 }),
        ufa.Tensor.init(&k, &.{ 1, 1, 3, 2 }),
        ufa.Tensor.init(&v, &.{ 1, 1, 3, 2 }),
        ufa.Tensor.init(&out, &.{ 1, 1, 1, 2 }),
        .{},
    ) catch |err| try stdout.print("error.{s}: {s}\n", .{ @errorName(err), ufa.lastErrorMessage() });
    try stdout.flush();
}
