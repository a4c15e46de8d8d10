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
// failure the library reports comes back as an *Error carrying its status code and its message;
// the binding itself only checks what the library cannot know, that each view fits in its slice.
package ufa

/*
#cgo pkg-config: ufa
#include <stdlib.h>
#include <ufa.h>
*/
import "C"

import (
	"errors"
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

// ErrViewOutOfBounds is returned (wrapped, with the details) when a tensor's shape and strides
// reach past the end of its slice. This is the one check the binding makes itself: the C API
// takes a bare pointer and cannot know the slice's length.
var ErrViewOutOfBounds = errors.New("ufa: tensor view reaches past the end of its slice")

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

// fits reports whether every element the view addresses lies inside the slice. Views the library
// rejects anyway (sizes < 1, negative strides, a stride count that differs from the shape's) are
// let through so that the library's own message reports them.
func (t Tensor) fits(name string) error {
	if len(t.strides) != 0 && len(t.strides) != len(t.shape) {
		return nil
	}
	var last uint64 // offset of the last element addressed
	for i, n := range t.shape {
		if n < 1 {
			return nil
		}
		var s int64
		if len(t.strides) != 0 {
			s = t.strides[i]
		} else {
			s = 1
			for _, m := range t.shape[i+1:] {
				if m > 0 && s > (1<<62)/m {
					return fmt.Errorf("%w: %s: shape %v is too large", ErrViewOutOfBounds, name, t.shape)
				}
				s *= m
			}
		}
		if s < 0 {
			return nil
		}
		if uint64(n-1) > 0 && uint64(s) > (1<<62)/uint64(n-1) {
			return fmt.Errorf("%w: %s: shape %v with strides %v is too large", ErrViewOutOfBounds, name, t.shape, t.strides)
		}
		last += uint64(n-1) * uint64(s)
		if last >= 1<<62 {
			return fmt.Errorf("%w: %s: shape %v with strides %v is too large", ErrViewOutOfBounds, name, t.shape, t.strides)
		}
	}
	if last >= uint64(t.length) {
		return fmt.Errorf("%w: %s: shape %v with strides %v needs %d elements, the slice has %d",
			ErrViewOutOfBounds, name, t.shape, t.strides, last+1, t.length)
	}
	return nil
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

// tensor returns a C descriptor of t (nil for a nil t), or an error when t does not fit its slice.
func (d *descriptors) tensor(name string, t *Tensor) (*C.ufa_tensor, error) {
	if t == nil {
		return nil, nil
	}
	c := (*C.ufa_tensor)(d.alloc(C.sizeof_ufa_tensor))
	if err := d.fill(c, name, t); err != nil {
		return nil, err
	}
	return c, nil
}

// tensors returns a C array of descriptors of ts, nil when ts is empty.
func (d *descriptors) tensors(name func(i int) string, ts []*Tensor) (*C.ufa_tensor, error) {
	if len(ts) == 0 {
		return nil, nil
	}
	cs := unsafe.Slice((*C.ufa_tensor)(d.alloc(C.sizeof_ufa_tensor*uintptr(len(ts)))), len(ts))
	for i, t := range ts {
		if err := d.fill(&cs[i], name(i), t); err != nil {
			return nil, err
		}
	}
	return &cs[0], nil
}

// fill writes a descriptor of t into c (C memory), or returns an error when t does not fit its
// slice.
func (d *descriptors) fill(c *C.ufa_tensor, name string, t *Tensor) error {
	if err := t.fits(name); err != nil {
		return err
	}
	if t.base != nil {
		d.pinner.Pin(t.base)
	}
	c.data = t.base
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
	return nil
}
