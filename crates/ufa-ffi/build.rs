fn main() {
    // The shared library is installed as libufa.so.<major>; the soname lets programs linked
    // against one release keep loading any later one with the same major version.
    let major = std::env::var("CARGO_PKG_VERSION_MAJOR").unwrap();
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libufa.so.{major}");
    }
}
