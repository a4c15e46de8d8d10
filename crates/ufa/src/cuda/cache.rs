//! The on-disk cubin cache: a compiled variant is found again by any later process, so NVRTC
//! runs once per (source, options, NVRTC version, arch) on a machine.

use std::path::{Path, PathBuf};

/// Environment variable naming the cache directory.
pub const CACHE_DIR_ENV: &str = "UFA_CACHE_DIR";

/// The cache directory: `$UFA_CACHE_DIR`, else `$XDG_CACHE_HOME/ufa`, else `~/.cache/ufa`, else
/// a folder in the temporary directory. `env` reads a variable (injected for tests).
pub(crate) fn cache_dir(env: &dyn Fn(&str) -> Option<String>) -> PathBuf {
    let set = |k: &str| env(k).filter(|v| !v.is_empty());
    if let Some(d) = set(CACHE_DIR_ENV) {
        return PathBuf::from(d);
    }
    if let Some(d) = set("XDG_CACHE_HOME") {
        return Path::new(&d).join("ufa");
    }
    if let Some(h) = set("HOME") {
        return Path::new(&h).join(".cache").join("ufa");
    }
    std::env::temp_dir().join("ufa-cache")
}

/// FNV-1a, 64 bits: stable across Rust versions and platforms, unlike `DefaultHasher`, so a
/// key computed by one build finds the cubin written by another.
fn fnv1a(bytes: impl IntoIterator<Item = u8>, mut h: u64) -> u64 {
    for b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The cache key of a compiled module: every text NVRTC reads (the entry point and each header,
/// named), the options, NVRTC's version and the arch. Each part is length-prefixed so that no
/// two different inputs concatenate to the same bytes.
pub(crate) fn cache_key<'a>(
    texts: impl IntoIterator<Item = &'a str>,
    options: &[String],
    nvrtc_version: (i32, i32),
    arch: &str,
) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325;
    let mut part = |bytes: &[u8]| {
        h = fnv1a((bytes.len() as u64).to_le_bytes(), h);
        h = fnv1a(bytes.iter().copied(), h);
    };
    for t in texts {
        part(t.as_bytes());
    }
    for o in options {
        part(o.as_bytes());
    }
    part(&nvrtc_version.0.to_le_bytes());
    part(&nvrtc_version.1.to_le_bytes());
    part(arch.as_bytes());
    h
}

/// Where the cubin of kernel `name` with `key` lives.
pub(crate) fn cubin_path(dir: &Path, name: &str, arch: &str, key: u64) -> PathBuf {
    dir.join(format!("{name}-{arch}-{key:016x}.cubin"))
}

/// A cached cubin, if present and plausible (an ELF image).
pub(crate) fn load(path: &Path) -> Option<Vec<u8>> {
    let bytes = std::fs::read(path).ok()?;
    bytes.starts_with(b"\x7fELF").then_some(bytes)
}

/// Stores a cubin; another process may write the same file at the same time, so it is written
/// beside and renamed into place. Failure only costs a recompile next time, so it is ignored.
pub(crate) fn store(path: &Path, cubin: &[u8]) {
    let Some(dir) = path.parent() else { return };
    if std::fs::create_dir_all(dir).is_err() {
        return;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    if std::fs::write(&tmp, cubin).is_ok() && std::fs::rename(&tmp, path).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn cache_dir_precedence() {
        let all = [
            ("UFA_CACHE_DIR", "/c"),
            ("XDG_CACHE_HOME", "/x"),
            ("HOME", "/h"),
        ];
        assert_eq!(cache_dir(&env_of(&all)), PathBuf::from("/c"));
        assert_eq!(cache_dir(&env_of(&all[1..])), PathBuf::from("/x/ufa"));
        assert_eq!(
            cache_dir(&env_of(&all[2..])),
            PathBuf::from("/h/.cache/ufa")
        );
        assert_eq!(
            cache_dir(&env_of(&[("UFA_CACHE_DIR", ""), ("HOME", "/h")])),
            PathBuf::from("/h/.cache/ufa")
        );
    }

    #[test]
    fn key_changes_with_every_input() {
        let o = vec!["-a".to_string()];
        let base = cache_key(["src"], &o, (13, 0), "sm_90a");
        assert_eq!(base, cache_key(["src"], &o, (13, 0), "sm_90a"));
        assert_ne!(base, cache_key(["src2"], &o, (13, 0), "sm_90a"));
        assert_ne!(
            base,
            cache_key(["src"], &["-b".to_string()], (13, 0), "sm_90a")
        );
        assert_ne!(base, cache_key(["src"], &o, (13, 1), "sm_90a"));
        assert_ne!(base, cache_key(["src"], &o, (13, 0), "sm_80"));
        // Length prefixes keep concatenations apart.
        assert_ne!(
            cache_key(["ab"], &["c".into()], (13, 0), "x"),
            cache_key(["a"], &["bc".into()], (13, 0), "x")
        );
    }

    #[test]
    fn store_then_load_round_trips_and_rejects_junk() {
        let dir = std::env::temp_dir().join(format!("ufa-cache-test-{}", std::process::id()));
        let path = cubin_path(&dir, "k", "sm_80", 42);
        assert!(load(&path).is_none());
        store(&path, b"\x7fELF rest");
        assert_eq!(load(&path).as_deref(), Some(&b"\x7fELF rest"[..]));
        std::fs::write(&path, b"junk").unwrap();
        assert!(load(&path).is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
