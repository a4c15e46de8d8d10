package ufa_test

import (
	"errors"
	"math"
	"math/rand"
	"slices"
	"strings"
	"testing"
	"time"

	ufa "example.invalid/ufa/bindings/go"
)

// layout is a 4-d view: shape [b, s, h, d] and its strides.
type layout struct {
	shape, strides [4]int
}

func rowMajor(b, s, h, d int) layout {
	return layout{[4]int{b, s, h, d}, [4]int{s * h * d, h * d, d, 1}}
}

// headsFirst lays [b, s, h, d] out as a [b, h, s, d] buffer whose rows are padded to pad elements.
func headsFirst(b, s, h, d, pad int) layout {
	return layout{[4]int{b, s, h, d}, [4]int{h * s * pad, pad, s * pad, 1}}
}

func (l layout) size() int {
	n := 1
	for i := range l.shape {
		n += (l.shape[i] - 1) * l.strides[i]
	}
	return n
}

func (l layout) at(b, s, h, d int) int {
	return b*l.strides[0] + s*l.strides[1] + h*l.strides[2] + d*l.strides[3]
}

// reference computes attention in float64 from the values the library actually sees.
func reference(q, k, v []float64, lq, lk, lo layout, causal bool) []float64 {
	B, SQ, HQ, D := lq.shape[0], lq.shape[1], lq.shape[2], lq.shape[3]
	SK, HK := lk.shape[1], lk.shape[2]
	out := make([]float64, lo.size())
	scale := 1 / math.Sqrt(float64(D))
	scores := make([]float64, SK)
	for b := 0; b < B; b++ {
		for h := 0; h < HQ; h++ {
			kh := h / (HQ / HK)
			for i := 0; i < SQ; i++ {
				best := math.Inf(-1)
				for j := 0; j < SK; j++ {
					scores[j] = math.Inf(-1)
					if causal && j > i+SK-SQ {
						continue
					}
					dot := 0.0
					for x := 0; x < D; x++ {
						dot += q[lq.at(b, i, h, x)] * k[lk.at(b, j, kh, x)]
					}
					scores[j] = dot * scale
					best = math.Max(best, scores[j])
				}
				if math.IsInf(best, -1) {
					continue // no visible key: zeros
				}
				sum := 0.0
				for j := range scores {
					scores[j] = math.Exp(scores[j] - best)
					sum += scores[j]
				}
				for x := 0; x < D; x++ {
					acc := 0.0
					for j := 0; j < SK; j++ {
						acc += scores[j] * v[lk.at(b, j, kh, x)]
					}
					out[lo.at(b, i, h, x)] = acc / sum
				}
			}
		}
	}
	return out
}

// operand holds one tensor's data in every form a test needs.
type operand struct {
	values []float64 // what the library sees, as float64
	f32    []float32
	bits   []uint16
}

func randomOperand(rng *rand.Rand, dtype ufa.DType, n int) operand {
	o := operand{values: make([]float64, n)}
	switch dtype {
	case ufa.F32:
		o.f32 = make([]float32, n)
	default:
		o.bits = make([]uint16, n)
	}
	for i := range o.values {
		x := float32(rng.NormFloat64())
		switch dtype {
		case ufa.F32:
			o.f32[i] = x
			o.values[i] = float64(x)
		case ufa.F16:
			o.bits[i] = ufa.F16FromFloat32(x)
			o.values[i] = float64(ufa.F16ToFloat32(o.bits[i]))
		case ufa.BF16:
			o.bits[i] = ufa.BF16FromFloat32(x)
			o.values[i] = float64(ufa.BF16ToFloat32(o.bits[i]))
		}
	}
	return o
}

// poisoned returns an output buffer full of NaN (f32) or 0xffff (a NaN in f16 and bf16).
func poisoned(dtype ufa.DType, n int) operand {
	o := operand{}
	if dtype == ufa.F32 {
		o.f32 = make([]float32, n)
		for i := range o.f32 {
			o.f32[i] = float32(math.NaN())
		}
	} else {
		o.bits = make([]uint16, n)
		for i := range o.bits {
			o.bits[i] = 0xffff
		}
	}
	return o
}

func (o operand) tensor(dtype ufa.DType, l layout) ufa.Tensor {
	var t ufa.Tensor
	switch dtype {
	case ufa.F32:
		t = ufa.NewF32(o.f32, l.shape[:]...)
	case ufa.F16:
		t = ufa.NewF16(o.bits, l.shape[:]...)
	case ufa.BF16:
		t = ufa.NewBF16(o.bits, l.shape[:]...)
	}
	return t.WithStrides(l.strides[:]...)
}

func (o operand) float(dtype ufa.DType, i int) float64 {
	switch dtype {
	case ufa.F32:
		return float64(o.f32[i])
	case ufa.F16:
		return float64(ufa.F16ToFloat32(o.bits[i]))
	}
	return float64(ufa.BF16ToFloat32(o.bits[i]))
}

type testCase struct {
	dtype                     ufa.DType
	batch, seqQ, seqKV, heads int
	headsKV, headDim          int
	causal, strided           bool
}

func newContext(t *testing.T) *ufa.Context {
	t.Helper()
	ctx, err := ufa.NewContext(&ufa.Options{NumThreads: 2})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ctx.Close() })
	return ctx
}

func seeded(t *testing.T) *rand.Rand {
	seed := time.Now().UnixNano()
	t.Logf("seed %d", seed)
	return rand.New(rand.NewSource(seed))
}

func run(t *testing.T, c testCase) {
	t.Helper()
	ctx := newContext(t)
	rng := seeded(t)
	lq := rowMajor(c.batch, c.seqQ, c.heads, c.headDim)
	lk := rowMajor(c.batch, c.seqKV, c.headsKV, c.headDim)
	if c.strided {
		lq = headsFirst(c.batch, c.seqQ, c.heads, c.headDim, c.headDim+3)
		lk = headsFirst(c.batch, c.seqKV, c.headsKV, c.headDim, c.headDim+5)
	}
	lo := lq
	q := randomOperand(rng, c.dtype, lq.size())
	k := randomOperand(rng, c.dtype, lk.size())
	v := randomOperand(rng, c.dtype, lk.size())
	out := poisoned(c.dtype, lo.size())
	err := ctx.Forward(q.tensor(c.dtype, lq), k.tensor(c.dtype, lk), v.tensor(c.dtype, lk),
		out.tensor(c.dtype, lo), &ufa.Params{Causal: c.causal})
	if err != nil {
		t.Fatalf("%+v: %v", c, err)
	}
	ref := reference(q.values, k.values, v.values, lq, lk, lo, c.causal)
	var num, den float64
	for b := 0; b < c.batch; b++ {
		for s := 0; s < c.seqQ; s++ {
			for h := 0; h < c.heads; h++ {
				for x := 0; x < c.headDim; x++ {
					i := lo.at(b, s, h, x)
					got := out.float(c.dtype, i)
					if math.IsNaN(got) {
						t.Fatalf("%+v: out[%d,%d,%d,%d] not written (or NaN)", c, b, s, h, x)
					}
					num += (got - ref[i]) * (got - ref[i])
					den += ref[i] * ref[i]
				}
			}
		}
	}
	rel := math.Sqrt(num / den)
	tol := 1e-2
	if c.dtype == ufa.F32 {
		tol = 1e-5
	}
	if !(rel < tol) {
		t.Fatalf("%+v: relative error %.3g, tolerance %.0g", c, rel, tol)
	}
	t.Logf("%v: relative error %.3g", c.dtype, rel)
}

func TestForwardF32(t *testing.T) {
	run(t, testCase{dtype: ufa.F32, batch: 2, seqQ: 17, seqKV: 17, heads: 2, headsKV: 2, headDim: 32})
}

func TestForwardF16(t *testing.T) {
	run(t, testCase{dtype: ufa.F16, batch: 1, seqQ: 9, seqKV: 33, heads: 3, headsKV: 3, headDim: 64})
}

func TestForwardBF16(t *testing.T) {
	run(t, testCase{dtype: ufa.BF16, batch: 2, seqQ: 16, seqKV: 5, heads: 2, headsKV: 1, headDim: 80})
}

func TestGQACausal(t *testing.T) {
	for _, dt := range []ufa.DType{ufa.F32, ufa.F16, ufa.BF16} {
		t.Run(dt.String(), func(t *testing.T) {
			// GQA 4, causal with seqlen_q < seqlen_kv (bottom-right alignment)
			run(t, testCase{dtype: dt, batch: 1, seqQ: 7, seqKV: 19, heads: 8, headsKV: 2, headDim: 32, causal: true})
		})
	}
}

func TestStrided(t *testing.T) {
	// q, k, v and out stored as [batch, heads, seq, dim] with padded rows, passed by strides
	for _, dt := range []ufa.DType{ufa.F32, ufa.BF16} {
		t.Run(dt.String(), func(t *testing.T) {
			run(t, testCase{dtype: dt, batch: 2, seqQ: 13, seqKV: 21, heads: 4, headsKV: 2, headDim: 48, causal: true, strided: true})
		})
	}
}

func TestLSE(t *testing.T) {
	ctx := newContext(t)
	q := []float32{1, 0, 0, 1} // [1, 2, 1, 2]
	k := []float32{1, 0, 0, 1} // [1, 2, 1, 2]
	v := []float32{1, 2, 3, 4} // [1, 2, 1, 2]
	out := make([]float32, 4)
	lse := []float32{0, 0} // [1, 1, 2]
	err := ctx.Forward(ufa.NewF32(q, 1, 2, 1, 2), ufa.NewF32(k, 1, 2, 1, 2), ufa.NewF32(v, 1, 2, 1, 2),
		ufa.NewF32(out, 1, 2, 1, 2), &ufa.Params{SoftmaxScale: 1, LSE: &ufa.Tensor{}})
	if err == nil {
		t.Fatal("a zero Tensor as LSE was accepted")
	}
	err = ctx.Forward(ufa.NewF32(q, 1, 2, 1, 2), ufa.NewF32(k, 1, 2, 1, 2), ufa.NewF32(v, 1, 2, 1, 2),
		ufa.NewF32(out, 1, 2, 1, 2), &ufa.Params{SoftmaxScale: 1, LSE: ptr(ufa.NewF32(lse, 1, 1, 2))})
	if err != nil {
		t.Fatal(err)
	}
	want := math.Log(math.E + 1) // each row: scores {1, 0} in some order
	for i, l := range lse {
		if math.Abs(float64(l)-want) > 1e-5 {
			t.Errorf("lse[%d] = %v, want %v", i, l, want)
		}
	}
}

func ptr[T any](x T) *T { return &x }

func TestBadInputMessage(t *testing.T) {
	ctx := newContext(t)
	q := make([]float32, 1*4*8*32)
	kv := make([]float32, 1*4*3*32)
	out := make([]float32, len(q))
	for i := range out {
		out[i] = 42
	}
	err := ctx.Forward(ufa.NewF32(q, 1, 4, 8, 32), ufa.NewF32(kv, 1, 4, 3, 32), ufa.NewF32(kv, 1, 4, 3, 32),
		ufa.NewF32(out, 1, 4, 8, 32), nil)
	var e *ufa.Error
	if !errors.As(err, &e) {
		t.Fatalf("want a *ufa.Error, got %v", err)
	}
	if e.Status != ufa.StatusInvalidArgument || !errors.Is(err, ufa.ErrInvalidArgument) {
		t.Errorf("status %v, want invalid argument", e.Status)
	}
	if !strings.Contains(e.Message, "k.shape[2]=3") || !strings.Contains(e.Message, "q.shape[2]=8") {
		t.Errorf("message %q does not name the heads", e.Message)
	}
	for i, x := range out {
		if x != 42 {
			t.Fatalf("out[%d] written on failure", i)
		}
	}
	t.Logf("error: %v", err)

	// Zero heads: the library's message, not the binding's.
	err = ctx.Forward(ufa.NewF32(q, 1, 4, 0, 32), ufa.NewF32(kv, 1, 4, 8, 4), ufa.NewF32(kv, 1, 4, 8, 4),
		ufa.NewF32(out, 1, 4, 0, 32), nil)
	if !errors.Is(err, ufa.ErrInvalidArgument) || !strings.Contains(err.Error(), "at least 1") {
		t.Errorf("zero heads: got %v", err)
	}
	// An empty batch (nil slices) is an empty result, as in PyTorch.
	if err := ctx.Forward(ufa.NewF32(nil, 0, 4, 8, 32), ufa.NewF32(nil, 0, 4, 8, 32), ufa.NewF32(nil, 0, 4, 8, 32),
		ufa.NewF32(nil, 0, 4, 8, 32), nil); err != nil {
		t.Errorf("empty batch: %v", err)
	}
	// Strides whose last dimension is not contiguous.
	err = ctx.Forward(ufa.NewF32(q, 1, 4, 8, 16).WithStrides(1024, 256, 32, 2), ufa.NewF32(q, 1, 4, 8, 16),
		ufa.NewF32(q, 1, 4, 8, 16), ufa.NewF32(out, 1, 4, 8, 16), nil)
	if !errors.Is(err, ufa.ErrInvalidArgument) || !strings.Contains(err.Error(), "contiguous") {
		t.Errorf("strided last dimension: got %v", err)
	}
}

func TestViewOutOfBounds(t *testing.T) {
	ctx := newContext(t)
	q := make([]float32, 2*3*4-1) // one element short of [1, 2, 3, 4]
	full := make([]float32, 2*3*4)
	err := ctx.Forward(ufa.NewF32(q, 1, 2, 3, 4), ufa.NewF32(full, 1, 2, 3, 4), ufa.NewF32(full, 1, 2, 3, 4),
		ufa.NewF32(full, 1, 2, 3, 4), nil)
	if !errors.Is(err, ufa.ErrInvalidArgument) || !strings.Contains(err.Error(), "q.nbytes=92") {
		t.Fatalf("got %v, want the library's q.nbytes error", err)
	}
	// Strides that reach past the end.
	err = ctx.Forward(ufa.NewF32(full, 1, 2, 3, 4).WithStrides(24, 12, 5, 1), ufa.NewF32(full, 1, 2, 3, 4),
		ufa.NewF32(full, 1, 2, 3, 4), ufa.NewF32(make([]float32, 24), 1, 2, 3, 4), nil)
	if !errors.Is(err, ufa.ErrInvalidArgument) || !strings.Contains(err.Error(), "reaches 104 bytes") {
		t.Fatalf("got %v, want the library's q.nbytes error", err)
	}
}

func TestContext(t *testing.T) {
	ctx := newContext(t)
	if n, err := ctx.NumThreads(); err != nil || n != 2 {
		t.Errorf("NumThreads() = %d, %v", n, err)
	}
	if isa, err := ctx.CPUISA(); err != nil || isa == "" {
		t.Errorf("CPUISA() = %q, %v", isa, err)
	}
	_, err := ufa.NewContext(&ufa.Options{CPUISA: "no-such-isa"})
	var e *ufa.Error
	if !errors.As(err, &e) || e.Message == "" {
		t.Errorf("unknown ISA: got %v", err)
	}
	if ufa.Version() == "" {
		t.Error("empty version")
	}
}

func TestHalfConversions(t *testing.T) {
	cases := []struct {
		x        float32
		f16, b16 uint16
	}{
		{0, 0, 0},
		{1, 0x3c00, 0x3f80},
		{-2, 0xc000, 0xc000},
		{65504, 0x7bff, 0x4780},
		{1e6, 0x7c00, 0x4974},
		{float32(math.Inf(-1)), 0xfc00, 0xff80},
		{5.960464477539063e-08, 0x0001, 0x3380}, // smallest f16 subnormal
		{2.98e-08, 0x0000, 0x3300},              // just under half of it: rounds to 0
		{1.0009765625, 0x3c01, 0x3f80},          // 1 + 2^-10
		{1.00048828125, 0x3c00, 0x3f80},         // tie in f16: rounds to even
		{1.0078125, 0x3c08, 0x3f81},             // 1 + 2^-7
	}
	for _, c := range cases {
		if got := ufa.F16FromFloat32(c.x); got != c.f16 {
			t.Errorf("F16FromFloat32(%g) = %#04x, want %#04x", c.x, got, c.f16)
		}
		if got := ufa.BF16FromFloat32(c.x); got != c.b16 {
			t.Errorf("BF16FromFloat32(%g) = %#04x, want %#04x", c.x, got, c.b16)
		}
	}
	// Every finite f16 survives a round trip through float32.
	for h := 0; h < 1<<16; h++ {
		x := ufa.F16ToFloat32(uint16(h))
		if x != x || math.IsInf(float64(x), 0) {
			continue
		}
		if back := ufa.F16FromFloat32(x); back != uint16(h) {
			t.Fatalf("f16 %#04x -> %g -> %#04x", h, x, back)
		}
	}
	if !math.IsNaN(float64(ufa.F16ToFloat32(ufa.F16FromFloat32(float32(math.NaN()))))) {
		t.Error("f16 NaN lost")
	}
	if !math.IsNaN(float64(ufa.BF16ToFloat32(ufa.BF16FromFloat32(float32(math.NaN()))))) {
		t.Error("bf16 NaN lost")
	}
}

// A boolean mask ([]bool, broadcast over batch and heads) that spells out causal masking gives
// the causal result; so does a window of (-1, 0).
func TestMaskAndWindow(t *testing.T) {
	ctx := newContext(t)
	rng := seeded(t)
	const sq, skv, h, d = 5, 9, 2, 16
	q := randomOperand(rng, ufa.F32, sq*h*d).f32
	k := randomOperand(rng, ufa.F32, skv*h*d).f32
	v := randomOperand(rng, ufa.F32, skv*h*d).f32
	mask := make([]bool, sq*skv)
	for i := 0; i < sq; i++ {
		for j := 0; j < skv; j++ {
			mask[i*skv+j] = j <= i+skv-sq
		}
	}
	forward := func(p *ufa.Params) []float32 {
		out := make([]float32, sq*h*d)
		if err := ctx.Forward(ufa.NewF32(q, 1, sq, h, d), ufa.NewF32(k, 1, skv, h, d), ufa.NewF32(v, 1, skv, h, d),
			ufa.NewF32(out, 1, sq, h, d), p); err != nil {
			t.Fatal(err)
		}
		return out
	}
	causal := forward(&ufa.Params{Causal: true})
	masked := forward(&ufa.Params{Mask: ptr(ufa.NewBool(mask, 1, 1, sq, skv))})
	windowed := forward(&ufa.Params{Window: &ufa.Window{Left: -1, Right: 0}})
	for i := range causal {
		if math.Abs(float64(causal[i]-masked[i])) > 1e-6 || math.Abs(float64(causal[i]-windowed[i])) > 1e-6 {
			t.Fatalf("element %d: causal %v, mask %v, window %v", i, causal[i], masked[i], windowed[i])
		}
	}
}

// Dropout: one (P, Seed, Offset) gives the same output twice and changes it; another offset
// gives another mask; P outside [0, 1) is refused, naming it.
func TestDropout(t *testing.T) {
	ctx := newContext(t)
	const n = 1 * 32 * 2 * 16
	x := make([]float32, n)
	for i := range x {
		x[i] = float32(math.Sin(float64(i)))
	}
	in := ufa.NewF32(x, 1, 32, 2, 16)
	forward := func(d *ufa.Dropout) ([]float32, error) {
		out := make([]float32, n)
		err := ctx.Forward(in, in, in, ufa.NewF32(out, 1, 32, 2, 16), &ufa.Params{Dropout: d})
		return out, err
	}
	plain, err := forward(nil)
	if err != nil {
		t.Fatal(err)
	}
	a, err := forward(&ufa.Dropout{P: 0.5, Seed: 7, Offset: 1})
	if err != nil {
		t.Fatal(err)
	}
	b, _ := forward(&ufa.Dropout{P: 0.5, Seed: 7, Offset: 1})
	c, _ := forward(&ufa.Dropout{P: 0.5, Seed: 7, Offset: 2})
	if !slices.Equal(a, b) || slices.Equal(a, plain) || slices.Equal(a, c) {
		t.Fatal("dropout: not repeatable for one seed, no effect, or the same mask for two offsets")
	}
	if _, err := forward(&ufa.Dropout{P: 1}); err == nil || !strings.Contains(err.Error(), "dropout p=1") {
		t.Fatalf("P=1 gave %v", err)
	}
}
