//! Builds and tests the ufa Zig package. libufa is found through pkg-config (ufa.pc), as installed
//! by scripts/install-c: set PKG_CONFIG_PATH=PREFIX/lib/pkgconfig.
const std = @import("std");

pub fn build(b: *std.Build) void {
    const target = b.standardTargetOptions(.{});
    const optimize = b.standardOptimizeOption(.{});

    // ufa.h, translated to Zig; the package's module imports it as "c".
    const header = b.addTranslateC(.{
        .root_source_file = b.path("src/c.h"),
        .target = target,
        .optimize = optimize,
    });
    header.linkSystemLibrary("ufa", .{});

    const mod = b.addModule("ufa", .{
        .root_source_file = b.path("src/ufa.zig"),
        .target = target,
        .optimize = optimize,
        .link_libc = true,
        .imports = &.{.{ .name = "c", .module = header.createModule() }},
    });
    mod.linkSystemLibrary("ufa", .{});

    const tests = b.addTest(.{
        .root_module = b.createModule(.{
            .root_source_file = b.path("test/ufa_test.zig"),
            .target = target,
            .optimize = optimize,
            .imports = &.{.{ .name = "ufa", .module = mod }},
        }),
    });
    const test_step = b.step("test", "Run the binding's tests against libufa");
    test_step.dependOn(&b.addRunArtifact(tests).step);
    const unit = b.addTest(.{ .root_module = mod });
    test_step.dependOn(&b.addRunArtifact(unit).step);

    const example = b.addExecutable(.{
        .name = "ufa-example",
        .root_module = b.createModule(.{
            .root_source_file = b.path("examples/example.zig"),
            .target = target,
            .optimize = optimize,
            .imports = &.{.{ .name = "ufa", .module = mod }},
        }),
    });
    const run_example = b.step("example", "Run the example");
    run_example.dependOn(&b.addRunArtifact(example).step);
    test_step.dependOn(&b.addRunArtifact(example).step);
}
