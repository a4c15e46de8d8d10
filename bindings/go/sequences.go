package ufa

/*
#include <ufa.h>
*/
import "C"

import "runtime"

// Varlen describes a packed batch of variable-length sequences (FlashAttention's cu_seqlens
// convention) for ForwardVarlen and BackwardVarlen. Sequence b's query rows are rows
// CuSeqlensQ[b] .. CuSeqlensQ[b+1] of q [total_q, heads_q, head_dim] and of out [total_q,
// heads_q, head_dim_v] (its log-sum-exp columns of lse [heads_q, total_q]); its keys are rows
// CuSeqlensKV[b] .. CuSeqlensKV[b+1] of k and v [total_kv, heads_kv, head_dim(_v)]. Rows past
// the last sequence are neither read nor written. The metadata is int32 (NewI32); the library
// checks every value and names the bad one in its error ("cu_seqlens_q[2]=3 is less than ...").
type Varlen struct {
	// CuSeqlensQ and CuSeqlensKV are int32 [batch + 1]: 0 first, non-decreasing.
	CuSeqlensQ, CuSeqlensKV Tensor
	// MaxSeqlenQ and MaxSeqlenKV bound the query rows and keys of every sequence.
	MaxSeqlenQ, MaxSeqlenKV int
	// SeqUsedKV, int32 [batch], limits sequence b to its first SeqUsedKV[b] keys; nil = all of
	// them. Forward only.
	SeqUsedKV *Tensor
	// BlockTable, int32 [batch, max_pages], makes k and v a paged cache [num_pages, page_size,
	// heads_kv, head_dim(_v)] (page_size a power of two up to 256): key j of sequence b is row
	// j % page_size of page BlockTable[b][j / page_size], and CuSeqlensKV only counts each
	// sequence's keys. nil = packed k and v. Forward only.
	BlockTable *Tensor
}

func (d *descriptors) varlen(s *Varlen) *C.ufa_varlen {
	cs := (*C.ufa_varlen)(d.alloc(C.sizeof_ufa_varlen))
	*cs = C.ufa_varlen_default()
	t := d.all(&s.CuSeqlensQ, &s.CuSeqlensKV,
		s.SeqUsedKV, s.BlockTable)
	cs.cu_seqlens_q, cs.cu_seqlens_kv, cs.seqused_kv, cs.block_table = t[0], t[1], t[2], t[3]
	cs.max_seqlen_q = C.int64_t(s.MaxSeqlenQ)
	cs.max_seqlen_kv = C.int64_t(s.MaxSeqlenKV)
	return cs
}

// ForwardVarlen is Forward over the packed sequences of seqs: q [total_q, heads_q, head_dim], k
// [total_kv, heads_kv, head_dim] and v [total_kv, heads_kv, head_dim_v] (or a paged cache, see
// Varlen.BlockTable), out [total_q, heads_q, head_dim_v]; p.LSE, if set, is f32 [heads_q,
// total_q]. Every rule of Forward applies to each sequence on its own (causal alignment too). On
// failure nothing is written; errors as for Forward.
func (c *Context) ForwardVarlen(q, k, v, out Tensor, seqs Varlen, p *Params) error {
	var d descriptors
	defer d.free()
	t := d.all(&q, &k, &v, &out)
	cs := d.varlen(&seqs)
	cp := d.params(p)
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	err := check(C.ufa_attention_forward_varlen(c.ptr, t[0], t[1], t[2], t[3], cs, cp, nil))
	runtime.KeepAlive(c)
	return err
}

// BackwardVarlen writes the gradients dq, dk, dv (packed like q, k, v) of a ForwardVarlen call
// over packed k and v (no SeqUsedKV, no BlockTable), from its inputs, its output out, its
// log-sum-exp lse (f32 [heads_q, total_q]) and the output gradient dout. seqs and p must be the
// forward's (p.LSE nil). On failure nothing is written; errors as for Forward.
func (c *Context) BackwardVarlen(q, k, v, out, dout, lse, dq, dk, dv Tensor, seqs Varlen, p *Params) error {
	var d descriptors
	defer d.free()
	t := d.all(&q, &k, &v, &out,
		&dout, &lse, &dq, &dk, &dv)
	cs := d.varlen(&seqs)
	cp := d.params(p)
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	err := check(C.ufa_attention_backward_varlen(c.ptr, t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7], t[8], cs, cp, nil))
	runtime.KeepAlive(c)
	return err
}

// Rotary holds rotary position embedding tables for the keys a KV-cache call appends (and its q).
type Rotary struct {
	// Cos and Sin are [seqlen_ro, rotary_dim / 2], any float dtype; the first rotary_dim
	// columns of each row are rotated, the rest pass unchanged.
	Cos, Sin Tensor
	// Interleaved rotates pairs (x[2i], x[2i+1]) (GPT-J); otherwise (x[i], x[i + rotary_dim/2])
	// (GPT-NeoX).
	Interleaved bool
}

// KVCache is a KV cache and what a ForwardKVCache call appends to it (FlashAttention's
// flash_attn_with_kvcache). The metadata is int32 (NewI32).
type KVCache struct {
	// K and V are dense [batch_cache, capacity, heads_kv, head_dim(_v)], or paged [num_pages,
	// page_size, heads_kv, head_dim(_v)] with BlockTable. They are written where keys are
	// appended.
	K, V Tensor
	// CacheSeqlens, int32 [batch], counts the keys already in the cache for each sequence. The
	// call does not advance it: add seqlen_new afterwards.
	CacheSeqlens Tensor
	// BlockTable, int32 [batch, max_pages]: key j of sequence b is row j % page_size of page
	// BlockTable[b][j / page_size]; pages may be shared and in any order. nil = a dense cache.
	BlockTable *Tensor
	// CacheBatchIdx, int32 [batch] (dense caches only): sequence b uses cache entry
	// CacheBatchIdx[b] (distinct when appending); nil = entry b.
	CacheBatchIdx *Tensor
	// KNew and VNew, [batch, seqlen_new, heads_kv, head_dim(_v)], are appended at each
	// sequence's CacheSeqlens before attending. Both or neither.
	KNew, VNew *Tensor
	// Rotary, with KNew, rotates the new keys at positions CacheSeqlens[b] + i and q at
	// CacheSeqlens[b] + i when causal or windowed, else at CacheSeqlens[b]. nil = no rotation.
	Rotary *Rotary
}

func (d *descriptors) kvcache(k *KVCache) *C.ufa_kvcache {
	ck := (*C.ufa_kvcache)(d.alloc(C.sizeof_ufa_kvcache))
	*ck = C.ufa_kvcache_default()
	var cos, sin *Tensor
	if k.Rotary != nil {
		cos, sin = &k.Rotary.Cos, &k.Rotary.Sin
		if k.Rotary.Interleaved {
			ck.rotary_interleaved = 1
		}
	}
	t := d.all(&k.K, &k.V, &k.CacheSeqlens,
		k.BlockTable, k.CacheBatchIdx,
		k.KNew, k.VNew, cos, sin)
	ck.k_cache, ck.v_cache, ck.cache_seqlens, ck.block_table, ck.cache_batch_idx = t[0], t[1], t[2], t[3], t[4]
	ck.k_new, ck.v_new, ck.rotary_cos, ck.rotary_sin = t[5], t[6], t[7], t[8]
	return ck
}

// ForwardKVCache appends cache.KNew and cache.VNew to the cache (rotated when cache.Rotary is
// set), then attends q [batch, seqlen_q, heads_q, head_dim] to each sequence's cached and
// appended keys, writing out [batch, seqlen_q, heads_q, head_dim_v] and, when p.LSE is set, the
// log-sum-exp [batch, heads_q, seqlen_q]. Causal masking aligns q's last row with the
// sequence's last key. On failure nothing is written, the cache included; errors as for Forward.
func (c *Context) ForwardKVCache(q Tensor, cache KVCache, out Tensor, p *Params) error {
	var d descriptors
	defer d.free()
	t := d.all(&q, &out)
	ck := d.kvcache(&cache)
	cp := d.params(p)
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	err := check(C.ufa_attention_forward_kvcache(c.ptr, t[0], ck, t[1], cp, nil))
	runtime.KeepAlive(c)
	return err
}

// KVCacheWorkspaceSize is the scratch memory, in bytes, that a CUDA ForwardKVCache call with
// this q and cache needs: the rotated q with rotary tables, and the decoding kernel's partial
// states for 16-bit q of few rows (0 when it needs none). This binding passes CPU memory only, where
// the library allocates its own scratch: the number is informational here.
func KVCacheWorkspaceSize(q Tensor, cache KVCache) (int, error) {
	var d descriptors
	defer d.free()
	cq := d.tensor(&q)
	ck := d.kvcache(&cache)
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	var n C.size_t
	if err := check(C.ufa_kvcache_workspace_size(cq, ck, &n)); err != nil {
		return 0, err
	}
	return int(n), nil
}

// State is a partial attention result over some of the keys: Out [batch, seqlen, heads,
// head_dim] (any float dtype) and its log-sum-exp LSE (f32 [batch, heads, seqlen], natural
// log), as Forward writes them with Params.LSE.
type State struct {
	Out, LSE Tensor
}

// MergeStates combines partial results over disjoint sets of keys into out and, unless lse is
// nil, their joint log-sum-exp: the result of attending to all the keys at once. A state whose
// LSE is -inf for a row contributes nothing to it. out and lse may be states[0]'s own tensors
// (merged in place). On failure nothing is written; errors as for Forward.
func (c *Context) MergeStates(states []State, out Tensor, lse *Tensor) error {
	var d descriptors
	defer d.free()
	outs := make([]*Tensor, len(states))
	lses := make([]*Tensor, len(states))
	for i := range states {
		outs[i], lses[i] = &states[i].Out, &states[i].LSE
	}
	couts := d.tensors(outs)
	clses := d.tensors(lses)
	t := d.all(&out, lse)
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	err := check(C.ufa_merge_states(c.ptr, C.size_t(len(states)), couts, clses, t[0], t[1], nil))
	runtime.KeepAlive(c)
	return err
}
