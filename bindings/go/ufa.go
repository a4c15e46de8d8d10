// Package ufa binds ufa (Universal Flash Attention) through its C API, ufa.h.
//
// Tensors are views over Go slices: []float32 for f32, []uint16 for f16 and bf16 (bit patterns;
// see F16FromFloat32 and BF16FromFloat32), []bool for boolean masks, []int32 for the sequence
// metadata of packed batches and KV caches (sequences.go). Shapes and strides are in
// elements, outermost first, as in ufa.h: Q is [batch, seqlen_q, heads_q, head_dim], K and V are
// [batch, seqlen_kv, heads_kv, head_dim], the output is [batch, seqlen_q, heads_q, head_dim].
// Nil strides mean row-major; any strides work as long as the last one is 1.
//
// The library reads and writes the slices in place and never keeps them after a call. Every
// failure comes back as an *Error carrying the library's status code and message; each tensor's
// descriptor carries its slice's length in bytes, so a view that reaches past its slice is one
// of them (ErrInvalidArgument, naming the tensor and its nbytes).
package ufa

/*
#cgo pkg-config: ufa
#include <stdlib.h>
#include <ufa.h>
*/
import "C"

import (
	"fmt"
	"runtime"
	"unsafe"
)

// Status is a ufa_status code; 0 is success.
type Status int32

// The status codes of ufa.h.
const (
	StatusSuccess           Status = C.UFA_STATUS_SUCCESS
	StatusInvalidArgument   Status = C.UFA_STATUS_INVALID_ARGUMENT
	StatusUnsupported       Status = C.UFA_STATUS_UNSUPPORTED
	StatusDeviceUnavailable Status = C.UFA_STATUS_DEVICE_UNAVAILABLE
	StatusOutOfMemory       Status = C.UFA_STATUS_OUT_OF_MEMORY
	StatusBackendFailure    Status = C.UFA_STATUS_BACKEND_FAILURE
	StatusInternal          Status = C.UFA_STATUS_INTERNAL
)

// String is the library's short description of the status ("invalid argument", ...).
func (s Status) String() string { return C.GoString(C.ufa_status_string(C.ufa_status(s))) }

// Error is a failed ufa call: the status it returned and ufa_last_error_message() right after it.
type Error struct {
	Status  Status
	Message string
}

func (e *Error) Error() string { return "ufa: " + e.Message }

// Is makes errors.Is(err, ufa.ErrInvalidArgument) (and the other sentinels) match by status.
func (e *Error) Is(target error) bool {
	t, ok := target.(*Error)
	return ok && t.Message == "" && t.Status == e.Status
}

// Sentinels for errors.Is; they match any *Error with the same status.
var (
	ErrInvalidArgument   = &Error{Status: StatusInvalidArgument}
	ErrUnsupported       = &Error{Status: StatusUnsupported}
	ErrDeviceUnavailable = &Error{Status: StatusDeviceUnavailable}
	ErrOutOfMemory       = &Error{Status: StatusOutOfMemory}
	ErrBackendFailure    = &Error{Status: StatusBackendFailure}
	ErrInternal          = &Error{Status: StatusInternal}
)

// check turns a status into an error. The caller must still be on the OS thread that made the
// call (the message is thread-local): call it right after the C call, with the goroutine locked.
func check(s C.ufa_status) error {
	if s == C.UFA_STATUS_SUCCESS {
		return nil
	}
	return &Error{Status: Status(s), Message: C.GoString(C.ufa_last_error_message())}
}

// Version is the loaded library's version, "major.minor.patch".
func Version() string { return C.GoString(C.ufa_version()) }

// DType is a ufa_dtype.
type DType int32

// Element types.
const (
	F16  DType = C.UFA_DTYPE_F16
	BF16 DType = C.UFA_DTYPE_BF16
	F32  DType = C.UFA_DTYPE_F32
	Bool DType = C.UFA_DTYPE_BOOL
	// I32 is for sequence metadata only: cu_seqlens, lengths, block tables, cache indices.
	I32 DType = C.UFA_DTYPE_I32
)

// size is the bytes of one element.
func (d DType) size() uintptr {
	switch d {
	case F32, I32:
		return 4
	case F16, BF16:
		return 2
	}
	return 1
}

func (d DType) String() string {
	switch d {
	case F16:
		return "f16"
	case BF16:
		return "bf16"
	case F32:
		return "f32"
	case Bool:
		return "bool"
	case I32:
		return "i32"
	}
	return fmt.Sprintf("DType(%d)", int32(d))
}

// Tensor is a view of a slice: element type, shape and strides (in elements). Build one with
// NewF32, NewF16, NewBF16, NewBool or NewI32; WithStrides gives a strided view. CPU memory only.
type Tensor struct {
	dtype   DType
	base    unsafe.Pointer // first element of the slice; nil for an empty slice
	length  int            // elements in the slice
	shape   []int64
	strides []int64 // nil = row-major
}

func ints64(xs []int) []int64 {
	out := make([]int64, len(xs))
	for i, x := range xs {
		out[i] = int64(x)
	}
	return out
}

func newTensor[T any](d DType, data []T, shape []int) Tensor {
	var base unsafe.Pointer
	if len(data) > 0 {
		base = unsafe.Pointer(&data[0])
	}
	return Tensor{dtype: d, base: base, length: len(data), shape: ints64(shape)}
}

// NewF32 views data as an f32 tensor of the given shape (row-major).
func NewF32(data []float32, shape ...int) Tensor { return newTensor(F32, data, shape) }

// NewF16 views data, IEEE half-precision bit patterns, as an f16 tensor (row-major).
func NewF16(data []uint16, shape ...int) Tensor { return newTensor(F16, data, shape) }

// NewBF16 views data, bfloat16 bit patterns, as a bf16 tensor (row-major).
func NewBF16(data []uint16, shape ...int) Tensor { return newTensor(BF16, data, shape) }

// NewBool views data as a boolean mask (true = attend), row-major.
func NewBool(data []bool, shape ...int) Tensor { return newTensor(Bool, data, shape) }

// NewI32 views data as an int32 tensor (row-major): the sequence metadata of ForwardVarlen,
// BackwardVarlen and ForwardKVCache (cu_seqlens, lengths, block tables, cache indices).
func NewI32(data []int32, shape ...int) Tensor { return newTensor(I32, data, shape) }

// WithStrides returns the same view with explicit strides in elements, one per dimension.
func (t Tensor) WithStrides(strides ...int) Tensor {
	t.strides = ints64(strides)
	return t
}

// DType is the tensor's element type.
func (t Tensor) DType() DType { return t.dtype }

// Shape is a copy of the tensor's shape.
func (t Tensor) Shape() []int {
	out := make([]int, len(t.shape))
	for i, s := range t.shape {
		out[i] = int(s)
	}
	return out
}

// descriptors builds C descriptors for Go tensors. The descriptors are C memory (so they may hold
// pointers into Go slices); the slices themselves are pinned until free is called.
type descriptors struct {
	pinner runtime.Pinner
	allocs []unsafe.Pointer
}

func (d *descriptors) alloc(size uintptr) unsafe.Pointer {
	p := C.calloc(1, C.size_t(size))
	if p == nil {
		panic("ufa: out of memory")
	}
	d.allocs = append(d.allocs, p)
	return p
}

func (d *descriptors) free() {
	d.pinner.Unpin()
	for _, p := range d.allocs {
		C.free(p)
	}
}

// tensor returns a C descriptor of t (nil for a nil t).
func (d *descriptors) tensor(t *Tensor) *C.ufa_tensor {
	if t == nil {
		return nil
	}
	c := (*C.ufa_tensor)(d.alloc(C.sizeof_ufa_tensor))
	d.fill(c, t)
	return c
}

// tensors returns a C array of descriptors of ts, nil when ts is empty.
func (d *descriptors) tensors(ts []*Tensor) *C.ufa_tensor {
	if len(ts) == 0 {
		return nil
	}
	cs := unsafe.Slice((*C.ufa_tensor)(d.alloc(C.sizeof_ufa_tensor*uintptr(len(ts)))), len(ts))
	for i, t := range ts {
		d.fill(&cs[i], t)
	}
	return &cs[0]
}

// fill writes a descriptor of t into c (C memory), with the slice's length as nbytes: the
// library refuses a view that reaches past it, naming the argument.
func (d *descriptors) fill(c *C.ufa_tensor, t *Tensor) {
	if t.base != nil {
		d.pinner.Pin(t.base)
	}
	c.data = t.base
	// The slice's length in bytes: the library refuses a view that reaches past it.
	c.nbytes = C.uint64_t(uintptr(t.length) * t.dtype.size())
	c.dtype = C.ufa_dtype(t.dtype)
	c.device_type = C.UFA_DEVICE_CPU
	c.ndim = C.int32_t(len(t.shape))
	if len(t.shape) > 0 {
		shape := unsafe.Slice((*C.int64_t)(d.alloc(C.sizeof_int64_t*uintptr(len(t.shape)))), len(t.shape))
		for i, s := range t.shape {
			shape[i] = C.int64_t(s)
		}
		c.shape = &shape[0]
	}
	if len(t.strides) > 0 {
		strides := unsafe.Slice((*C.int64_t)(d.alloc(C.sizeof_int64_t*uintptr(len(t.strides)))), len(t.strides))
		for i, s := range t.strides {
			strides[i] = C.int64_t(s)
		}
		c.strides = &strides[0]
	}
}
