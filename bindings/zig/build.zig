//! Builds and tests the ufa Zig package. libufa is found through pkg-config (ufa.pc), as installed
//! by scripts/install-c: set PKG_CONFIG_PATH=PREFIX/lib/pkgconfig.
const std = @import("std");

pub fn build(b: *std.Build) void {
    const target = b.standardTargetOptions(.{});
    const optimize = b.standardOptimizeOption(.{});

    const mod = b.addModule("ufa", .{
        .root_source_file = b.path("src/ufa.zig"),
        .target = target,
        .optimize = optimize,
        .link_libc = true,
    });
    mod.linkSystemLibrary("ufa", .{});

    const test_step = b.step("test", "Run the binding's tests against libufa");
    inline for (.{ "test/ufa_test.zig", "test/sequences_test.zig", "test/abi_test.zig" }) |file| {
        const test_mod = b.createModule(.{
            .root_source_file = b.path(file),
            .target = target,
            .optimize = optimize,
            .link_libc = true,
            .imports = &.{.{ .name = "ufa", .module = mod }},
        });
        // test/abi.c: the real ufa.h's layout, which abi_test.zig compares with src/c.zig
        test_mod.addCSourceFile(.{ .file = b.path("test/abi.c"), .flags = &.{"-std=c11"} });
        test_mod.linkSystemLibrary("ufa", .{});
        addTestRun(b, test_step, test_mod);
    }
    addTestRun(b, test_step, mod);

    const example = b.addExecutable(.{
        .name = "ufa-example",
        .root_module = b.createModule(.{
            .root_source_file = b.path("examples/example.zig"),
            .target = target,
            .optimize = optimize,
            .imports = &.{.{ .name = "ufa", .module = mod }},
        }),
    });
    const run_example = b.addRunArtifact(example);
    b.step("example", "Run examples/example.zig").dependOn(&run_example.step);
    test_step.dependOn(&run_example.step);
}

/// Runs the tests of `module` on every `zig build test`: they draw fresh random inputs each time,
/// so a passing result is never reused from the cache.
fn addTestRun(b: *std.Build, test_step: *std.Build.Step, module: *std.Build.Module) void {
    const run = b.addRunArtifact(b.addTest(.{ .root_module = module }));
    run.has_side_effects = true;
    test_step.dependOn(&run.step);
}
