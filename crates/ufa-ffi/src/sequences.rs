//! The C API of packed variable-length batches, KV caches and merging attention states.

use crate::boundary::{require, ufa_call, ufa_status};
use crate::native::{
    optional, params_of, read_versioned, ufa_attention_params, ufa_context, ufa_tensor, view,
    view_mut, Versioned,
};
use std::ffi::c_void;
use ufa::{
    AttentionState, BackwardInputs, Error, Gradients, KvAppend, KvCache, Result, Rotary,
    TensorView, Varlen, Workspace,
};

/// A packed batch of variable-length sequences (FlashAttention's `cu_seqlens` convention).
/// Start from `ufa_varlen_default()`. Sequence b's query rows are rows `cu_seqlens_q[b] ..
/// cu_seqlens_q[b+1]` of q [total_q, heads_q, head_dim] and out [total_q, heads_q,
/// head_dim_v] (its LSE is columns of lse [heads_q, total_q]); its keys rows `cu_seqlens_kv[b]
/// .. cu_seqlens_kv[b+1]` of k and v [total_kv, heads_kv, head_dim(_v)]. Rows past the last
/// sequence are neither read nor written.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ufa_varlen {
    /// `sizeof(ufa_varlen)` as the caller was compiled; lets the struct grow.
    pub struct_size: u32,
    /// CUDA calls: nonzero also checks the metadata's values on the host (a synchronisation).
    /// Without it the kernels clamp every index they read: bad metadata gives wrong numbers,
    /// never an access outside the tensors. CPU calls always check.
    pub checked: i32,
    /// int32 [batch + 1], from 0, non-decreasing; on the tensors' device.
    pub cu_seqlens_q: *const ufa_tensor,
    /// int32 [batch + 1], from 0, non-decreasing.
    pub cu_seqlens_kv: *const ufa_tensor,
    /// At least the query rows of every sequence (CUDA grids are sized by it).
    pub max_seqlen_q: i64,
    /// At least the keys of every sequence.
    pub max_seqlen_kv: i64,
    /// Optional int32 [batch]: sequence b attends to its first seqused_kv[b] keys only
    /// (forward only); NULL = all of them.
    pub seqused_kv: *const ufa_tensor,
    /// Optional int32 [batch, max_pages] (forward only): k and v are a paged cache [num_pages,
    /// page_size, heads_kv, dim] (page_size a power of two up to 256) and key j of sequence b
    /// is row j % page_size of page block_table[b][j / page_size]; cu_seqlens_kv then only
    /// counts each sequence's keys. NULL = packed k and v.
    pub block_table: *const ufa_tensor,
}

impl Versioned for ufa_varlen {
    const SIZES: &'static [usize] = &[std::mem::size_of::<Self>()];
    fn defaults() -> Self {
        ufa_varlen {
            struct_size: std::mem::size_of::<Self>() as u32,
            checked: 0,
            cu_seqlens_q: std::ptr::null(),
            cu_seqlens_kv: std::ptr::null(),
            max_seqlen_q: 0,
            max_seqlen_kv: 0,
            seqused_kv: std::ptr::null(),
            block_table: std::ptr::null(),
        }
    }
}

/// A KV cache and what a call appends to it (FlashAttention's `flash_attn_with_kvcache`).
/// Start from `ufa_kvcache_default()`. New keys and values are written in place at each
/// sequence's `cache_seqlens` before attending (rotated first when rotary tables are given);
/// `cache_seqlens` itself is not advanced (add seqlen_new after the call). On any error
/// nothing is written, the cache included.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ufa_kvcache {
    /// `sizeof(ufa_kvcache)` as the caller was compiled; lets the struct grow.
    pub struct_size: u32,
    /// CUDA calls: nonzero also checks the metadata's values on the host (a synchronisation);
    /// without it out-of-range indices are skipped by the kernels, never followed.
    pub checked: i32,
    /// Dense [batch_cache, capacity, heads_kv, head_dim], or paged [num_pages, page_size,
    /// heads_kv, head_dim] with `block_table`. Written where keys are appended.
    pub k_cache: *const ufa_tensor,
    /// As k_cache, with head_dim_v.
    pub v_cache: *const ufa_tensor,
    /// int32 [batch]: keys already in the cache for each sequence.
    pub cache_seqlens: *const ufa_tensor,
    /// Optional int32 [batch, max_pages]: key j of sequence b is row j % page_size of page
    /// block_table[b][j / page_size]; pages may be shared and in any order.
    pub block_table: *const ufa_tensor,
    /// Optional int32 [batch] (dense caches only): sequence b uses cache entry
    /// cache_batch_idx[b] (distinct when appending); NULL = entry b.
    pub cache_batch_idx: *const ufa_tensor,
    /// Optional [batch, seqlen_new, heads_kv, head_dim] and [.., head_dim_v]: appended before
    /// attending. Both or neither.
    pub k_new: *const ufa_tensor,
    pub v_new: *const ufa_tensor,
    /// Optional [seqlen_ro, rotary_dim / 2] rotary embedding tables (both or neither; with
    /// k_new): the new keys are rotated at positions cache_seqlens[b] + i, q at
    /// cache_seqlens[b] + i when causal or windowed, else at cache_seqlens[b].
    pub rotary_cos: *const ufa_tensor,
    pub rotary_sin: *const ufa_tensor,
    /// Nonzero: rotate pairs (x[2i], x[2i+1]) (GPT-J); zero: (x[i], x[i + rotary_dim/2])
    /// (GPT-NeoX).
    pub rotary_interleaved: i32,
    pub _reserved: i32,
    /// CUDA calls: scratch device memory of at least `ufa_kvcache_workspace_size` bytes
    /// (256-byte aligned), so that the call allocates nothing (CUDA graphs); NULL = the call
    /// allocates it in stream order.
    pub workspace: *mut c_void,
    pub workspace_bytes: usize,
}

impl Versioned for ufa_kvcache {
    const SIZES: &'static [usize] = &[std::mem::size_of::<Self>()];
    fn defaults() -> Self {
        ufa_kvcache {
            struct_size: std::mem::size_of::<Self>() as u32,
            checked: 0,
            k_cache: std::ptr::null(),
            v_cache: std::ptr::null(),
            cache_seqlens: std::ptr::null(),
            block_table: std::ptr::null(),
            cache_batch_idx: std::ptr::null(),
            k_new: std::ptr::null(),
            v_new: std::ptr::null(),
            rotary_cos: std::ptr::null(),
            rotary_sin: std::ptr::null(),
            rotary_interleaved: 0,
            _reserved: 0,
            workspace: std::ptr::null_mut(),
            workspace_bytes: 0,
        }
    }
}

// The released layouts (LP64): appending fields needs a new entry in `Versioned::SIZES`.
#[cfg(target_pointer_width = "64")]
const _: () = {
    assert!(std::mem::size_of::<ufa_varlen>() == 56);
    assert!(std::mem::size_of::<ufa_kvcache>() == 104);
};

/// The default packed-batch description (every pointer NULL, not checked).
#[no_mangle]
pub extern "C" fn ufa_varlen_default() -> ufa_varlen {
    ufa_varlen::defaults()
}

/// The default KV-cache description (every pointer NULL, not interleaved, not checked).
#[no_mangle]
pub extern "C" fn ufa_kvcache_default() -> ufa_kvcache {
    ufa_kvcache::defaults()
}

/// A required descriptor field.
unsafe fn field<'a>(t: *const ufa_tensor, name: &str) -> Result<TensorView<'a>> {
    if t.is_null() {
        return Err(Error::invalid(format!("{name} is NULL")));
    }
    view(t, name)
}

fn size(x: i64, name: &str) -> Result<usize> {
    usize::try_from(x).map_err(|_| Error::invalid(format!("{name}={x} must be >= 0")))
}

unsafe fn varlen_of<'a>(s: *const ufa_varlen) -> Result<Varlen<'a>> {
    if s.is_null() {
        return Err(Error::invalid("seqs is NULL"));
    }
    let c = read_versioned(s, "seqs")?;
    Ok(Varlen {
        cu_seqlens_q: field(c.cu_seqlens_q, "seqs->cu_seqlens_q")?,
        cu_seqlens_kv: field(c.cu_seqlens_kv, "seqs->cu_seqlens_kv")?,
        max_seqlen_q: size(c.max_seqlen_q, "seqs->max_seqlen_q")?,
        max_seqlen_kv: size(c.max_seqlen_kv, "seqs->max_seqlen_kv")?,
        seqused_kv: optional(c.seqused_kv, "seqs->seqused_kv", view)?,
        block_table: optional(c.block_table, "seqs->block_table", view)?,
        checked: c.checked != 0,
    })
}

/// Attention over a packed batch of variable-length sequences (see `ufa_varlen`): q
/// [total_q, heads_q, head_dim], k [total_kv, heads_kv, head_dim], v [total_kv, heads_kv,
/// head_dim_v], out [total_q, heads_q, head_dim_v]; `params->lse`, when set, is f32 [heads_q,
/// total_q]. Every rule of `ufa_attention_forward` applies to each sequence (causal alignment
/// per sequence). CUDA tensors: queued on `stream`, not waited for (unless `seqs->checked`).
/// On failure nothing is written.
#[no_mangle]
pub unsafe extern "C" fn ufa_attention_forward_varlen(
    ctx: *const ufa_context,
    q: *const ufa_tensor,
    k: *const ufa_tensor,
    v: *const ufa_tensor,
    out: *const ufa_tensor,
    seqs: *const ufa_varlen,
    params: *const ufa_attention_params,
    stream: *mut c_void,
) -> ufa_status {
    ufa_call(|| {
        require!(ctx, "ctx");
        let (q, k, v) = (view(q, "q")?, view(k, "k")?, view(v, "v")?);
        let mut out = view_mut(out, "out")?;
        let seqs = varlen_of(seqs)?;
        let (params, mut lse) = params_of(params)?;
        (*ctx).timed(|c| {
            c.forward_varlen_on_stream(&q, &k, &v, &mut out, lse.as_mut(), &seqs, &params, stream)
        })
    })
}

/// Gradients of `ufa_attention_forward_varlen` (packed k and v, no seqused_kv): from the
/// forward's inputs, its output `out`, its LSE `lse` (f32 [heads_q, total_q]) and `dout`,
/// writes dq, dk, dv packed like q, k and v. `params` as for the forward (its lse NULL).
#[no_mangle]
pub unsafe extern "C" fn ufa_attention_backward_varlen(
    ctx: *const ufa_context,
    q: *const ufa_tensor,
    k: *const ufa_tensor,
    v: *const ufa_tensor,
    out: *const ufa_tensor,
    dout: *const ufa_tensor,
    lse: *const ufa_tensor,
    dq: *const ufa_tensor,
    dk: *const ufa_tensor,
    dv: *const ufa_tensor,
    seqs: *const ufa_varlen,
    params: *const ufa_attention_params,
    stream: *mut c_void,
) -> ufa_status {
    ufa_call(|| {
        require!(ctx, "ctx");
        let inputs = BackwardInputs {
            q: view(q, "q")?,
            k: view(k, "k")?,
            v: view(v, "v")?,
            out: view(out, "out")?,
            dout: view(dout, "dout")?,
            lse: view(lse, "lse")?,
        };
        let mut grads = Gradients {
            dq: view_mut(dq, "dq")?,
            dk: view_mut(dk, "dk")?,
            dv: view_mut(dv, "dv")?,
        };
        let seqs = varlen_of(seqs)?;
        let (params, lse_out) = params_of(params)?;
        if lse_out.is_some() {
            return Err(Error::invalid(
                "params->lse must be NULL for the backward pass; pass the forward's LSE as lse",
            ));
        }
        (*ctx).timed(|c| c.backward_varlen_on_stream(&inputs, &mut grads, &seqs, &params, stream))
    })
}

/// The cache, append and workspace of a `ufa_kvcache`.
struct CacheCall<'a> {
    cache: KvCache<'a>,
    append: Option<KvAppend<'a>>,
    workspace: Option<Workspace<'a>>,
}

unsafe fn cache_call<'a>(c: *const ufa_kvcache) -> Result<CacheCall<'a>> {
    if c.is_null() {
        return Err(Error::invalid("cache is NULL"));
    }
    let c = read_versioned(c, "cache")?;
    let needs = |t: *const ufa_tensor, name: &str| {
        if t.is_null() {
            Err(Error::invalid(format!("{name} is NULL")))
        } else {
            view_mut(t, name)
        }
    };
    let cache = KvCache {
        k: needs(c.k_cache, "cache->k_cache")?,
        v: needs(c.v_cache, "cache->v_cache")?,
        seqlens: field(c.cache_seqlens, "cache->cache_seqlens")?,
        block_table: optional(c.block_table, "cache->block_table", view)?,
        batch_idx: optional(c.cache_batch_idx, "cache->cache_batch_idx", view)?,
        checked: c.checked != 0,
    };
    let both = |a: *const ufa_tensor, b: *const ufa_tensor, what: &str| {
        if a.is_null() != b.is_null() {
            Err(Error::invalid(format!(
                "cache->{what}: pass both tensors or neither"
            )))
        } else {
            Ok(!a.is_null())
        }
    };
    let rotary = if both(c.rotary_cos, c.rotary_sin, "rotary_cos and rotary_sin")? {
        Some(Rotary {
            cos: view(c.rotary_cos, "cache->rotary_cos")?,
            sin: view(c.rotary_sin, "cache->rotary_sin")?,
            interleaved: c.rotary_interleaved != 0,
        })
    } else {
        None
    };
    let append = if both(c.k_new, c.v_new, "k_new and v_new")? {
        Some(KvAppend {
            k: view(c.k_new, "cache->k_new")?,
            v: view(c.v_new, "cache->v_new")?,
            rotary,
        })
    } else {
        if rotary.is_some() {
            return Err(Error::invalid(
                "cache->rotary_cos is set but cache->k_new is NULL: rotary embedding applies \
                 to the keys a call appends (and to q with them)",
            ));
        }
        None
    };
    let workspace =
        (!c.workspace.is_null()).then(|| Workspace::from_raw_parts(c.workspace, c.workspace_bytes));
    Ok(CacheCall {
        cache,
        append,
        workspace,
    })
}

/// Attention over a KV cache (see `ufa_kvcache`): appends `cache->k_new`/`v_new` (rotated when
/// rotary tables are set), then attends q [batch, seqlen_q, heads_q, head_dim] to each
/// sequence's cached and appended keys, writing out [batch, seqlen_q, heads_q, head_dim_v]
/// and, when `params->lse` is set, the LSE [batch, heads_q, seqlen_q]. Causal masking aligns
/// q's last row with the sequence's last key. CUDA tensors: queued on `stream`, not waited for
/// (unless `cache->checked`). On failure nothing is written, the cache included.
#[no_mangle]
pub unsafe extern "C" fn ufa_attention_forward_kvcache(
    ctx: *const ufa_context,
    q: *const ufa_tensor,
    cache: *const ufa_kvcache,
    out: *const ufa_tensor,
    params: *const ufa_attention_params,
    stream: *mut c_void,
) -> ufa_status {
    ufa_call(|| {
        require!(ctx, "ctx");
        let q = view(q, "q")?;
        let mut out = view_mut(out, "out")?;
        let mut call = cache_call(cache)?;
        let (params, mut lse) = params_of(params)?;
        (*ctx).timed(|c| {
            c.forward_kvcache_on_stream(
                &q,
                &mut call.cache,
                call.append.as_ref(),
                &mut out,
                lse.as_mut(),
                &params,
                call.workspace.take(),
                stream,
            )
        })
    })
}

/// Writes to `*out` the bytes of scratch memory a CUDA `ufa_attention_forward_kvcache` call
/// with this q and cache needs as `cache->workspace`, on any device, at most: the rotated q
/// (with rotary tables, where the decoding kernel does not serve the call: that one rotates q
/// as it loads it) and the partial states of the decoding kernel's key splits (f16/bf16 q of
/// few rows). 0 when it needs none.
#[no_mangle]
pub unsafe extern "C" fn ufa_kvcache_workspace_size(
    q: *const ufa_tensor,
    cache: *const ufa_kvcache,
    out: *mut usize,
) -> ufa_status {
    ufa_call(|| {
        require!(out, "out");
        let q = view(q, "q")?;
        let call = cache_call(cache)?;
        out.write(ufa::kvcache_workspace_bytes(&q, call.append.as_ref()));
        Ok(())
    })
}

/// Merges `num_states` partial attention results over disjoint keys: `outs[i]` [batch, seqlen,
/// heads, head_dim] (any float dtype) with `lses[i]` (f32 [batch, heads, seqlen], natural log)
/// into `out` and, unless NULL, `lse`: weights exp(lse_i - max), so a state with LSE -inf
/// contributes nothing. `out` (and `lse`) may be states[0]'s own tensors. CUDA tensors: queued
/// on `stream`.
#[no_mangle]
pub unsafe extern "C" fn ufa_merge_states(
    ctx: *const ufa_context,
    num_states: usize,
    outs: *const ufa_tensor,
    lses: *const ufa_tensor,
    out: *const ufa_tensor,
    lse: *const ufa_tensor,
    stream: *mut c_void,
) -> ufa_status {
    ufa_call(|| {
        require!(ctx, "ctx");
        if num_states > 0 {
            require!(outs, "outs");
            require!(lses, "lses");
        }
        let states = (0..num_states)
            .map(|i| {
                Ok(AttentionState {
                    out: view(outs.add(i), &format!("outs[{i}]"))?,
                    lse: view(lses.add(i), &format!("lses[{i}]"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut out = view_mut(out, "out")?;
        let mut lse = optional(lse, "lse", view_mut)?;
        (*ctx).timed(|c| c.merge_states_on_stream(&states, &mut out, lse.as_mut(), stream))
    })
}
