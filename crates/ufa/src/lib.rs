//! ufa — Universal Flash Attention.
//!
//! Exact attention (`softmax(scale · q kᵀ + bias) v`) computed tile by tile with an online
//! softmax, so no `seqlen_q × seqlen_kv` matrix is ever stored. One [`Context`] serves every
//! thread; tensors are borrowed [`TensorView`]s in any strided layout whose last dimension is
//! contiguous.
//!
//! ```
//! use ufa::{AttentionParams, Context, TensorView, TensorViewMut};
//! let (b, s, h, d) = (1, 16, 2, 32);
//! let q = vec![0.1f32; b * s * h * d];
//! let (k, v) = (q.clone(), q.clone());
//! let mut out = vec![0f32; b * s * h * d];
//! let ctx = Context::new()?;
//! ctx.forward(
//!     &TensorView::new(&q, &[b, s, h, d])?,
//!     &TensorView::new(&k, &[b, s, h, d])?,
//!     &TensorView::new(&v, &[b, s, h, d])?,
//!     &mut TensorViewMut::new(&mut out, &[b, s, h, d])?,
//!     &AttentionParams::default().causal(true),
//! )?;
//! assert!((out[0] - 0.1).abs() < 1e-6);
//! # Ok::<(), ufa::Error>(())
//! ```

mod context;
mod cpu;
mod cuda;
mod device;
mod dropout;
mod dtype;
mod empty;
mod error;
mod grads;
mod kvcache;
mod merge;
mod metadata;
mod params;
mod problem;
mod sequences;
mod tensor;
mod varlen;

#[cfg(feature = "testkit")]
#[doc(hidden)]
pub mod internals;

pub use context::{kvcache_workspace_bytes, Context, ContextBuilder, CPU_ISA_ENV, NUM_THREADS_ENV};
pub use cpu::{
    amx, cpu_features, last_level_cache, rates, Amx, Isa, Rates, AMX_BY_DEFAULT, BF16_DOT_MIN_RATIO,
};
pub use cuda::tensor_core_coverage;
pub use device::Device;
pub use dropout::Dropout;
pub use dtype::{DType, Element};
pub use error::{Error, ErrorKind, Result};
pub use grads::{BackwardInputs, Gradients};
pub use kvcache::{KvAppend, KvCache, Rotary, Workspace};
pub use merge::AttentionState;
pub use params::{AttentionParams, CausalAlignment, Fp32Precision};
pub use problem::{forward_flops, MAX_HEAD_DIM};
pub use tensor::{Layout, TensorView, TensorViewMut, MAX_DIMS};
pub use varlen::Varlen;

/// Re-exported so callers name the same f16/bf16 types as the library.
pub use half;

/// The library version, from Cargo.toml.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Compiles and runs the README's examples as doctests, so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;
