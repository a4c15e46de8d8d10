//! What NVRTC compiles: the kernel files of `crates/ufa/kernels/` and the headers generated at
//! run time, by the names the kernels `#include` them as. Each variant is one program: a short
//! generated translation unit that includes its kernel file and defines the `extern "C"` entry
//! point; NVRTC resolves the includes from this in-memory list, so no toolkit headers are
//! needed and a reader sees each file's dependencies in the file itself.

use std::borrow::Cow;

/// Every kernel source of `crates/ufa/kernels/` (a test checks that none is missing).
pub(crate) const KERNEL_FILES: [(&str, &str); 25] = [
    ("common.cuh", include_str!("../../kernels/common.cuh")),
    ("sequence.cuh", include_str!("../../kernels/sequence.cuh")),
    ("mask.cuh", include_str!("../../kernels/mask.cuh")),
    ("softmax.cuh", include_str!("../../kernels/softmax.cuh")),
    ("mma.cuh", include_str!("../../kernels/mma.cuh")),
    ("smem_rows.cuh", include_str!("../../kernels/smem_rows.cuh")),
    ("append.cuh", include_str!("../../kernels/append.cuh")),
    ("dropout.cuh", include_str!("../../kernels/dropout.cuh")),
    ("fwd_tile.cuh", include_str!("../../kernels/fwd_tile.cuh")),
    ("bwd_keys.cuh", include_str!("../../kernels/bwd_keys.cuh")),
    ("bwd_tf32.cuh", include_str!("../../kernels/bwd_tf32.cuh")),
    ("wgmma.cuh", include_str!("../../kernels/wgmma.cuh")),
    ("tma.cuh", include_str!("../../kernels/tma.cuh")),
    ("fwd_sm80.cu", include_str!("../../kernels/fwd_sm80.cu")),
    (
        "fwd_sm90_tile.cuh",
        include_str!("../../kernels/fwd_sm90_tile.cuh"),
    ),
    ("fwd_sm90.cu", include_str!("../../kernels/fwd_sm90.cu")),
    (
        "fwd_sm90_f32.cu",
        include_str!("../../kernels/fwd_sm90_f32.cu"),
    ),
    (
        "fwd_sm90_tma.cu",
        include_str!("../../kernels/fwd_sm90_tma.cu"),
    ),
    ("fwd_simple.cu", include_str!("../../kernels/fwd_simple.cu")),
    ("fwd_decode.cu", include_str!("../../kernels/fwd_decode.cu")),
    ("bwd_sm80.cu", include_str!("../../kernels/bwd_sm80.cu")),
    ("bwd_sm90.cu", include_str!("../../kernels/bwd_sm90.cu")),
    ("bwd_rows.cu", include_str!("../../kernels/bwd_rows.cu")),
    ("kvcache.cu", include_str!("../../kernels/kvcache.cu")),
    ("merge.cu", include_str!("../../kernels/merge.cu")),
];

/// One NVRTC program: the entry point's translation unit and the headers it may include.
#[derive(Clone, Debug)]
pub(crate) struct Program {
    pub source: String,
    pub headers: Vec<(&'static str, Cow<'static, str>)>,
}

impl Program {
    /// The translation unit `source` with the kernel files, the generated ABI header and the
    /// variant's generated headers (`extra`).
    pub fn new(source: String, extra: Vec<(&'static str, Cow<'static, str>)>) -> Program {
        let mut headers: Vec<(&'static str, Cow<'static, str>)> = KERNEL_FILES
            .iter()
            .map(|&(name, text)| (name, Cow::Borrowed(text)))
            .collect();
        headers.push(("ufa_abi.cuh", Cow::Owned(super::abi::header())));
        headers.extend(extra);
        Program { source, headers }
    }

    /// Everything the compile reads, in a fixed order (for the cache key).
    pub fn texts(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.source.as_str()).chain(
            self.headers
                .iter()
                .flat_map(|(name, text)| [*name, text.as_ref()]),
        )
    }

    /// The text of header `name`.
    #[cfg(test)]
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, t)| t.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::KERNEL_FILES;

    /// A kernel file left out of the list would be missing from NVRTC's headers (an include
    /// error at run time) and from the cache key.
    #[test]
    fn every_kernel_file_is_listed() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/kernels");
        let mut on_disk: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".cu") || n.ends_with(".cuh"))
            .collect();
        on_disk.sort();
        let mut listed: Vec<String> = KERNEL_FILES.iter().map(|(n, _)| n.to_string()).collect();
        listed.sort();
        assert_eq!(on_disk, listed);
    }
}
