//! NVRTC: finding the library, and compiling a variant's source straight to a cubin.
//!
//! cudarc loads libnvrtc by file name through the system loader. To also find it in CUDA_HOME
//! or in the `nvidia-cuda-nvrtc` Python package (no system install needed), ufa first opens the
//! library it found by full path; the loader then matches cudarc's `libnvrtc.so.N` against that
//! already-loaded object's soname instead of searching again.

use super::sources::Program;
use crate::error::{Error, ErrorKind, Result};
use cudarc::nvrtc::{result as nv, sys};
use std::ffi::{c_char, CString};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Environment variable naming libnvrtc (the file, or the folder holding it).
pub const NVRTC_PATH_ENV: &str = "UFA_NVRTC_PATH";

/// Folders that may hold libnvrtc, most specific first. `env` reads a variable.
pub(crate) fn nvrtc_search_dirs(env: &dyn Fn(&str) -> Option<String>) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(p) = env(NVRTC_PATH_ENV).filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        dirs.push(if p.is_file() {
            p.parent().map(Path::to_path_buf).unwrap_or_default()
        } else {
            p
        });
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(root) = env(var).filter(|p| !p.is_empty()) {
            dirs.push(Path::new(&root).join("lib64"));
            dirs.push(Path::new(&root).join("lib"));
        }
    }
    dirs.push(PathBuf::from("/usr/local/cuda/lib64"));
    // pip's nvidia-cuda-nvrtc: <prefix>/lib/python3.X/site-packages/nvidia/{cu13,cuda_nvrtc}/lib
    for var in ["VIRTUAL_ENV", "CONDA_PREFIX"] {
        if let Some(prefix) = env(var).filter(|p| !p.is_empty()) {
            dirs.extend(python_nvidia_lib_dirs(Path::new(&prefix)));
        }
    }
    dirs
}

fn python_nvidia_lib_dirs(prefix: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(prefix.join("lib")) else {
        return Vec::new();
    };
    let mut pythons: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("python3"))
        })
        .collect();
    pythons.sort();
    pythons
        .iter()
        .flat_map(|py| {
            ["cu13", "cuda_nvrtc", "cu12"]
                .map(|pkg| py.join("site-packages/nvidia").join(pkg).join("lib"))
        })
        .collect()
}

/// The libnvrtc in `dir`, if any: `libnvrtc.so.N[.M...]`, newest major first (never the
/// `libnvrtc-builtins` helper, which NVRTC opens itself).
pub(crate) fn nvrtc_in_dir(dir: &Path) -> Option<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let rest = name.strip_prefix("libnvrtc.so")?;
            let major = rest
                .strip_prefix('.')
                .and_then(|r| r.split('.').next()?.parse().ok());
            Some((major.unwrap_or(0), e.path()))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, p)| p)
}

/// `libnvrtc-builtins.so.*` in `dir` (not the `.alt` variant).
fn builtins_in_dir(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("libnvrtc-builtins.so")
        })
        .map(|e| e.path())
        .collect();
    found.sort();
    found.truncate(1);
    found
}

/// The loaded NVRTC and its version.
pub(crate) struct Nvrtc {
    pub version: (i32, i32),
    /// Where it was found; None = the system loader's search path.
    pub path: Option<PathBuf>,
}

/// Loads NVRTC once per process; later calls return the same result.
pub(crate) fn nvrtc() -> Result<&'static Nvrtc> {
    static NVRTC: OnceLock<std::result::Result<Nvrtc, Error>> = OnceLock::new();
    NVRTC
        .get_or_init(|| super::no_panic("loading NVRTC", load))
        .as_ref()
        .map_err(Clone::clone)
}

fn load() -> Result<Nvrtc> {
    static PRELOADED: OnceLock<Vec<libloading::Library>> = OnceLock::new();
    let env = |k: &str| std::env::var(k).ok();
    let mut path = None;
    for dir in nvrtc_search_dirs(&env) {
        if let Some(lib) = nvrtc_in_dir(&dir) {
            // NVRTC opens its builtins library by soname at compile time; some wheels carry no
            // RPATH for it, so it is loaded first from the same folder.
            let builtins = builtins_in_dir(&dir);
            // SAFETY: these libraries' initialisers have no preconditions.
            let libs: Vec<_> = builtins
                .iter()
                .chain(std::iter::once(&lib))
                .filter_map(|p| unsafe { libloading::Library::new(p) }.ok())
                .collect();
            if libs.len() == builtins.len() + 1 {
                let _ = PRELOADED.set(libs);
                path = Some(lib);
                break;
            }
        }
    }
    // SAFETY: only tries to open the library.
    if !unsafe { sys::is_culib_present() } {
        return Err(Error::new(
            ErrorKind::DeviceUnavailable,
            format!(
                "no NVRTC library found (libnvrtc.so.13 or .12): install the CUDA toolkit or \
                 `pip install nvidia-cuda-nvrtc`, or set {NVRTC_PATH_ENV} to the library"
            ),
        ));
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: two out-pointers to live integers.
    unsafe { sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| backend(format!("nvrtcVersion failed: {e}")))?;
    Ok(Nvrtc {
        version: (major, minor),
        path,
    })
}

fn backend(msg: String) -> Error {
    Error::new(ErrorKind::Backend, msg)
}

/// NVRTC options for `arch` (`sm_80`, `sm_90a`, ...). Real flags, spelled out: the kernels
/// choose their fast instructions (ex2.approx) themselves, so no `--use_fast_math`.
pub(crate) fn compile_options(arch: &str) -> Vec<String> {
    vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".into(),
        "--ptxas-options=--verbose".into(),
        "--generate-line-info".into(),
    ]
}

/// A compiled module: the cubin and NVRTC's log (ptxas's resource report included).
pub(crate) struct Compiled {
    pub cubin: Vec<u8>,
    #[cfg_attr(not(feature = "testkit"), allow(dead_code))]
    pub log: String,
}

/// An NVRTC program, destroyed on every path out.
struct NvProgram(sys::nvrtcProgram);

impl Drop for NvProgram {
    fn drop(&mut self) {
        // SAFETY: created by nvrtcCreateProgram and destroyed only here.
        let _ = unsafe { nv::destroy_program(self.0) };
    }
}

fn log_of(prog: &NvProgram) -> String {
    // SAFETY: a live program.
    match unsafe { nv::get_program_log(prog.0) } {
        Ok(chars) => {
            let bytes: Vec<u8> = chars
                .iter()
                .take_while(|&&c| c != 0)
                .map(|&c| c as u8)
                .collect();
            String::from_utf8_lossy(&bytes).trim().to_string()
        }
        Err(e) => format!("(no log: {e})"),
    }
}

impl Nvrtc {
    /// Compiles `program` for `arch`; an error carries the options and NVRTC's full log.
    pub fn compile(&self, name: &str, program: &Program, arch: &str) -> Result<Compiled> {
        super::no_panic("compiling with NVRTC", || {
            let c = |s: &str, what: &str| {
                CString::new(s).map_err(|_| backend(format!("{name}: NUL in {what}")))
            };
            let src = c(&program.source, "source")?;
            let file = c(&format!("{name}.cu"), "name")?;
            let names = program
                .headers
                .iter()
                .map(|(n, _)| c(n, "a header name"))
                .collect::<Result<Vec<_>>>()?;
            let texts = program
                .headers
                .iter()
                .map(|(n, t)| c(t, n))
                .collect::<Result<Vec<_>>>()?;
            let (name_ptrs, text_ptrs): (Vec<_>, Vec<_>) = names
                .iter()
                .zip(&texts)
                .map(|(n, t)| (n.as_ptr(), t.as_ptr()))
                .unzip();
            let mut raw = std::mem::MaybeUninit::uninit();
            // SAFETY: every pointer is a live NUL-terminated string for the call; NVRTC copies
            // the sources and headers into the program.
            unsafe {
                sys::nvrtcCreateProgram(
                    raw.as_mut_ptr(),
                    src.as_ptr(),
                    file.as_ptr(),
                    text_ptrs.len() as i32,
                    text_ptrs.as_ptr(),
                    name_ptrs.as_ptr(),
                )
            }
            .result()
            .map_err(|e| backend(format!("nvrtcCreateProgram({name}) failed: {e}")))?;
            // SAFETY: initialised by the successful call.
            let prog = NvProgram(unsafe { raw.assume_init() });
            let options = compile_options(arch);
            // SAFETY: a live program; options are valid C strings.
            let status = unsafe { nv::compile_program(prog.0, &options) };
            let log = log_of(&prog);
            if let Err(e) = status {
                return Err(backend(format!(
                    "NVRTC {}.{} failed to compile {name} ({e}) with options {options:?}:\n{log}",
                    self.version.0, self.version.1
                )));
            }
            let mut size = 0usize;
            // SAFETY: a compiled program; the buffer has the size NVRTC reported.
            let cubin = unsafe {
                sys::nvrtcGetCUBINSize(prog.0, &mut size)
                    .result()
                    .map_err(|e| backend(format!("nvrtcGetCUBINSize({name}): {e}")))?;
                let mut buf = vec![0u8; size];
                sys::nvrtcGetCUBIN(prog.0, buf.as_mut_ptr() as *mut c_char)
                    .result()
                    .map_err(|e| backend(format!("nvrtcGetCUBIN({name}): {e}")))?;
                buf
            };
            Ok(Compiled { cubin, log })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn search_dirs_follow_the_documented_order() {
        let env = |k: &str| match k {
            NVRTC_PATH_ENV => Some("/opt/nv/lib".to_string()),
            "CUDA_HOME" => Some("/cuda".to_string()),
            _ => None,
        };
        let dirs = nvrtc_search_dirs(&env);
        assert_eq!(dirs[0], PathBuf::from("/opt/nv/lib"));
        assert_eq!(dirs[1], PathBuf::from("/cuda/lib64"));
        assert_eq!(dirs[2], PathBuf::from("/cuda/lib"));
        assert_eq!(dirs[3], PathBuf::from("/usr/local/cuda/lib64"));
        assert_eq!(
            nvrtc_search_dirs(&|_| None),
            vec![PathBuf::from("/usr/local/cuda/lib64")]
        );
    }

    #[test]
    fn finds_the_newest_nvrtc_and_skips_the_builtins() {
        let dir = std::env::temp_dir().join(format!("ufa-nvrtc-test-{}", std::process::id()));
        let site = dir.join("lib/python3.12/site-packages/nvidia/cu13/lib");
        std::fs::create_dir_all(&site).unwrap();
        for f in [
            "libnvrtc-builtins.so.13.0",
            "libnvrtc.so.12",
            "libnvrtc.so.13",
        ] {
            std::fs::write(site.join(f), b"").unwrap();
        }
        assert_eq!(nvrtc_in_dir(&site), Some(site.join("libnvrtc.so.13")));
        let venv = dir.to_string_lossy().into_owned();
        let dirs = nvrtc_search_dirs(&|k| (k == "VIRTUAL_ENV").then(|| venv.clone()));
        assert!(dirs.contains(&site), "{dirs:?}");
        assert_eq!(nvrtc_in_dir(&dir), None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
