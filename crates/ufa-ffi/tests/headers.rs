//! The committed headers are exactly what cbindgen generates from the sources, so they cannot
//! drift from the ABI. `UFA_BLESS=1 cargo test -p ufa-ffi --test headers` rewrites them.

use std::path::{Path, PathBuf};

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn check(config: &str, sources: &[&str], header: &str) {
    let dir = crate_dir();
    let config = cbindgen::Config::from_file(dir.join(config)).expect("cbindgen config");
    let mut builder = cbindgen::Builder::new().with_config(config);
    for s in sources {
        builder = builder.with_src(dir.join("src").join(s));
    }
    let mut generated = Vec::new();
    builder
        .generate()
        .expect("cbindgen failed")
        .write(&mut generated);
    let generated = String::from_utf8(generated).unwrap();
    let path = dir.join("../../include").join(header);
    if std::env::var_os("UFA_BLESS").is_some() {
        std::fs::write(&path, &generated).unwrap();
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "{} is stale: rerun with UFA_BLESS=1 cargo test -p ufa-ffi --test headers and commit it",
        Path::new("include").join(header).display()
    );
}

#[test]
fn ufa_h_is_current() {
    check(
        "cbindgen-ufa.toml",
        &["boundary.rs", "native.rs", "sequences.rs", "hooks.rs"],
        "ufa.h",
    );
}

#[test]
fn mfa_h_is_current() {
    check("cbindgen-mfa.toml", &["mfa.rs"], "mfa.h");
}
