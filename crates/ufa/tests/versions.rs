//! The version is the workspace's (Cargo.toml, `[workspace.package]`). Two manifests cannot
//! inherit it and repeat it: the Python extension's (its own workspace, so that the main one
//! never links libpython; maturin gives the wheel this version) and Julia's Project.toml. This
//! test fails the moment either disagrees, so a release changes one number and fixes what it
//! names.

/// The `version = "..."` line of a TOML manifest's first table that has one.
fn manifest_version(path: &str) -> String {
    let full = format!("{}/../../{path}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{full}: {e}"));
    text.lines()
        .find_map(|l| {
            let v = l.trim().strip_prefix("version")?.trim().strip_prefix('=')?;
            Some(v.trim().trim_matches('"').to_string())
        })
        .unwrap_or_else(|| panic!("{path} has no version line"))
}

#[test]
fn every_manifest_carries_the_workspace_version() {
    let workspace = env!("CARGO_PKG_VERSION");
    assert_eq!(ufa::VERSION, workspace);
    for path in ["python/Cargo.toml", "bindings/julia/UFA.jl/Project.toml"] {
        assert_eq!(
            manifest_version(path),
            workspace,
            "{path} must carry the workspace version (Cargo.toml [workspace.package])"
        );
    }
}
