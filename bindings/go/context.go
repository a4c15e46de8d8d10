package ufa

/*
#include <stdlib.h>
#include <ufa.h>
*/
import "C"

import (
	"runtime"
	"unsafe"
)

// Options configure NewContext; the zero value (or nil) means the library's defaults.
type Options struct {
	// NumThreads is the number of CPU threads; 0 = $UFA_NUM_THREADS if set, else every core.
	NumThreads int
	// CPUISA names the CPU kernel family ("amx-bf16", "avx512bf16", "avx512bf16-decode", "avx512", "avx2", "portable");
	// "" = the best this CPU supports.
	CPUISA string
}

// Context holds the library's thread pool and kernel caches. It is safe for concurrent use by
// many goroutines. Close frees it; a Context that is never closed is freed by the garbage collector.
type Context struct {
	ptr *C.ufa_context
}

// NewContext creates a context; opts may be nil.
func NewContext(opts *Options) (*Context, error) {
	o := C.ufa_context_options_default()
	if opts != nil {
		o.num_threads = C.uint32_t(opts.NumThreads)
		if opts.CPUISA != "" {
			isa := C.CString(opts.CPUISA)
			defer C.free(unsafe.Pointer(isa))
			o.cpu_isa = isa
		}
	}
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	var ptr *C.ufa_context
	if err := check(C.ufa_context_create(&o, &ptr)); err != nil {
		return nil, err
	}
	c := &Context{ptr: ptr}
	runtime.SetFinalizer(c, (*Context).Close)
	return c, nil
}

// Close frees the context. No call may be using it; closing twice is harmless.
func (c *Context) Close() error {
	if c.ptr != nil {
		C.ufa_context_destroy(c.ptr)
		c.ptr = nil
		runtime.SetFinalizer(c, nil)
	}
	return nil
}

// NumThreads is the number of CPU threads the context computes with.
func (c *Context) NumThreads() (int, error) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	var n C.uint32_t
	err := check(C.ufa_context_num_threads(c.ptr, &n))
	runtime.KeepAlive(c)
	return int(n), err
}

// CPUISA is the name of the CPU kernel family the context uses.
func (c *Context) CPUISA() (string, error) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	var name *C.char
	if err := check(C.ufa_context_cpu_isa(c.ptr, &name)); err != nil {
		return "", err
	}
	runtime.KeepAlive(c)
	return C.GoString(name), nil
}

// Window is a sliding attention window around each query's aligned position; -1 = unbounded.
type Window struct {
	Left, Right int
}

// Params say what an attention call computes besides softmax(q k^T) v; the zero value (or nil)
// means the library's defaults: no masking, scale 1/sqrt(head_dim), no log-sum-exp. A backward
// call takes the forward's Params, with LSE nil.
type Params struct {
	// Causal: query i sees keys at or before its aligned position.
	Causal bool
	// CausalTopLeft aligns query i with key i (PyTorch's is_causal); the default aligns the
	// last query with the last key (FlashAttention 2+).
	CausalTopLeft bool
	// SoftmaxScale multiplies q.k; 0 = 1/sqrt(head_dim).
	SoftmaxScale float32
	// Softcap: scores become Softcap * tanh(scores / Softcap); 0 disables it.
	Softcap float32
	// Window limits the keys each query sees; nil = no window.
	Window *Window
	// ALiBi slopes, f32, [heads_q] or [batch, heads_q]; nil = none.
	ALiBiSlopes *Tensor
	// Mask broadcastable to [batch, heads_q, seqlen_q, seqlen_kv]: Bool (true = attend) or a
	// float dtype (added to the scores); nil = none.
	Mask *Tensor
	// LSE, if set, receives each score row's log-sum-exp (f32, [batch, heads_q, seqlen_q]).
	// Forward calls only.
	LSE *Tensor
	// Deterministic asks backward calls for bitwise-reproducible gradients (CPU gradients
	// always are).
	Deterministic bool
	// AllowTF32 lets the CUDA forward and backward round f32 operands to TF32 once (about 3x
	// faster, results within 2e-3 relative) instead of keeping f32 accuracy. The CPU ignores it.
	AllowTF32 bool
	// Dropout, if set, drops attention probabilities (not on KV-cache calls); a backward call
	// must be given its forward's.
	Dropout *Dropout
}

// Dropout drops each attention probability with probability P in [0, 1) and scales the rest
// by 1/(1-P). The mask comes from a counter-based generator at (Seed, Offset): the same three
// values give the same mask in the forward and the backward.
type Dropout struct {
	P            float32
	Seed, Offset uint64
}

// params returns a C description of p (the library's defaults for a nil p).
func (d *descriptors) params(p *Params) *C.ufa_attention_params {
	cp := (*C.ufa_attention_params)(d.alloc(C.sizeof_ufa_attention_params))
	*cp = C.ufa_attention_params_default()
	if p == nil {
		return cp
	}
	if p.Causal {
		cp.causal = 1
	}
	if p.CausalTopLeft {
		cp.causal_alignment = C.UFA_CAUSAL_TOP_LEFT
	}
	if p.Deterministic {
		cp.deterministic = 1
	}
	if p.AllowTF32 {
		cp.fp32_precision = C.UFA_FP32_TF32
	}
	if p.Dropout != nil {
		cp.dropout_p = C.float(p.Dropout.P)
		cp.dropout_seed = C.uint64_t(p.Dropout.Seed)
		cp.dropout_offset = C.uint64_t(p.Dropout.Offset)
	}
	cp.softmax_scale = C.float(p.SoftmaxScale)
	cp.softcap = C.float(p.Softcap)
	if p.Window != nil {
		cp.window_left = C.int64_t(p.Window.Left)
		cp.window_right = C.int64_t(p.Window.Right)
	}
	cp.alibi_slopes = d.tensor(p.ALiBiSlopes)
	cp.mask = d.tensor(p.Mask)
	cp.lse = d.tensor(p.LSE)
	return cp
}

// all returns C descriptors of the tensors, in order (nil for a nil tensor).
func (d *descriptors) all(ts ...*Tensor) []*C.ufa_tensor {
	out := make([]*C.ufa_tensor, len(ts))
	for i, t := range ts {
		out[i] = d.tensor(t)
	}
	return out
}

// Forward computes out = softmax(scale * q k^T + bias) v into out, with the masks of p (nil =
// defaults). On failure nothing is written and the error is an *Error from the library.
func (c *Context) Forward(q, k, v, out Tensor, p *Params) error {
	var d descriptors
	defer d.free()
	t := d.all(&q, &k, &v, &out)
	cp := d.params(p)
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	err := check(C.ufa_attention_forward(c.ptr, t[0], t[1], t[2], t[3], cp, nil))
	runtime.KeepAlive(c)
	return err
}

// Backward writes the gradients dq, dk, dv (shapes of q, k, v; for GQA dk and dv are summed over
// the query heads sharing a KV head) of a Forward call, from its inputs, its output out, its
// log-sum-exp lse (f32, [batch, heads_q, seqlen_q]) and the output gradient dout. p must be the
// forward's Params (nil = defaults) with LSE nil. On failure nothing is written; errors as for
// Forward.
func (c *Context) Backward(q, k, v, out, dout, lse, dq, dk, dv Tensor, p *Params) error {
	var d descriptors
	defer d.free()
	t := d.all(&q, &k, &v, &out,
		&dout, &lse, &dq, &dk, &dv)
	cp := d.params(p)
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	err := check(C.ufa_attention_backward(c.ptr, t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7], t[8], cp, nil))
	runtime.KeepAlive(c)
	return err
}
