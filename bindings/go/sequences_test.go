package ufa_test

import (
	"errors"
	"math"
	"math/rand"
	"strings"
	"testing"

	ufa "example.invalid/ufa/bindings/go"
)

// layout3 is a packed [rows, heads, dim] view and its strides.
type layout3 struct {
	shape, strides [3]int
}

// packed3 lays out [rows, heads, dim] with each head's row padded to pad elements.
func packed3(rows, heads, dim, pad int) layout3 {
	return layout3{[3]int{rows, heads, dim}, [3]int{heads * pad, pad, 1}}
}

func (l layout3) size() int {
	n := 1
	for i := range l.shape {
		n += (l.shape[i] - 1) * l.strides[i]
	}
	return n
}

func (l layout3) at(r, h, x int) int { return r*l.strides[0] + h*l.strides[1] + x*l.strides[2] }

// rows copies rows [from, to) of data, viewed through l, into a dense row-major float64 slice.
func (l layout3) rows(data []float64, from, to int) []float64 {
	out := make([]float64, 0, (to-from)*l.shape[1]*l.shape[2])
	for r := from; r < to; r++ {
		for h := 0; h < l.shape[1]; h++ {
			for x := 0; x < l.shape[2]; x++ {
				out = append(out, data[l.at(r, h, x)])
			}
		}
	}
	return out
}

func (l layout3) tensor(data []float32) ufa.Tensor {
	return ufa.NewF32(data, l.shape[:]...).WithStrides(l.strides[:]...)
}

// attention64 is one sequence's attention in float64 over dense row-major q [sq, hq, d], k [sk,
// hk, d], v [sk, hk, dv] (causal: bottom-right aligned). It returns the output [sq, hq, dv], the
// log-sum-exp [hq, sq] (-inf where a row sees no key) and, when dout [sq, hq, dv] is not nil,
// the gradients dq, dk, dv (dk and dv summed over each KV head's query heads).
type attention64 struct {
	out, lse, dq, dk, dv []float64
}

func sequence64(q, k, v, dout []float64, sq, sk, hq, hk, d, dv int, causal bool) attention64 {
	r := attention64{
		out: make([]float64, sq*hq*dv), lse: make([]float64, hq*sq),
		dq: make([]float64, sq*hq*d), dk: make([]float64, sk*hk*d), dv: make([]float64, sk*hk*dv),
	}
	scale := 1 / math.Sqrt(float64(d))
	p := make([]float64, sk)
	for h := 0; h < hq; h++ {
		kh := h / (hq / hk)
		for i := 0; i < sq; i++ {
			best := math.Inf(-1)
			for j := 0; j < sk; j++ {
				p[j] = math.Inf(-1)
				if causal && j > i+sk-sq {
					continue
				}
				dot := 0.0
				for x := 0; x < d; x++ {
					dot += q[(i*hq+h)*d+x] * k[(j*hk+kh)*d+x]
				}
				p[j] = dot * scale
				best = math.Max(best, p[j])
			}
			r.lse[h*sq+i] = best
			if math.IsInf(best, -1) {
				continue // no visible key: zeros, LSE -inf, no gradient
			}
			sum := 0.0
			for j := range p {
				p[j] = math.Exp(p[j] - best)
				sum += p[j]
			}
			r.lse[h*sq+i] = best + math.Log(sum)
			o := r.out[(i*hq+h)*dv : (i*hq+h+1)*dv]
			for j := range p {
				p[j] /= sum
				for x := 0; x < dv; x++ {
					o[x] += p[j] * v[(j*hk+kh)*dv+x]
				}
			}
			if dout == nil {
				continue
			}
			do := dout[(i*hq+h)*dv : (i*hq+h+1)*dv]
			delta := 0.0 // sum_j p_j dp_j = dout . out
			for x := 0; x < dv; x++ {
				delta += do[x] * o[x]
			}
			for j := range p {
				if p[j] == 0 {
					continue
				}
				dp := 0.0
				for x := 0; x < dv; x++ {
					dp += do[x] * v[(j*hk+kh)*dv+x]
					r.dv[(j*hk+kh)*dv+x] += p[j] * do[x]
				}
				ds := p[j] * (dp - delta) * scale
				for x := 0; x < d; x++ {
					r.dq[(i*hq+h)*d+x] += ds * k[(j*hk+kh)*d+x]
					r.dk[(j*hk+kh)*d+x] += ds * q[(i*hq+h)*d+x]
				}
			}
		}
	}
	return r
}

// compare fails the test unless got matches want to a relative error (over the whole slice)
// under 1e-5; a want of all zeros must be matched exactly. NaN (an unwritten poisoned output)
// always fails. Equal infinities (an LSE of -inf) count as matching.
func compare(t *testing.T, what string, got, want []float64) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("%s: %d values, want %d", what, len(got), len(want))
	}
	var num, den float64
	for i := range got {
		if math.IsNaN(got[i]) {
			t.Fatalf("%s[%d] not written (or NaN)", what, i)
		}
		if math.IsInf(want[i], 0) || math.IsInf(got[i], 0) {
			if got[i] != want[i] {
				t.Fatalf("%s[%d] = %v, want %v", what, i, got[i], want[i])
			}
			continue
		}
		num += (got[i] - want[i]) * (got[i] - want[i])
		den += want[i] * want[i]
	}
	if den == 0 {
		if num != 0 {
			t.Fatalf("%s: want zeros, got a squared norm of %g", what, num)
		}
		return
	}
	if rel := math.Sqrt(num / den); !(rel < 1e-5) {
		t.Fatalf("%s: relative error %.3g, tolerance 1e-5", what, rel)
	}
}

func f64s(xs []float32) []float64 {
	out := make([]float64, len(xs))
	for i, x := range xs {
		out[i] = float64(x)
	}
	return out
}

// cumulative returns the int32 offsets [0, l0, l0+l1, ...] of lens.
func cumulative(lens []int) []int32 {
	cu := make([]int32, len(lens)+1)
	for i, n := range lens {
		cu[i+1] = cu[i] + int32(n)
	}
	return cu
}

func maxOf(xs []int) int {
	m := 0
	for _, x := range xs {
		m = max(m, x)
	}
	return m
}

// untouched fails unless every element i of xs with keep(i) is still NaN (the poison).
func untouched(t *testing.T, what string, xs []float32, keep func(i int) bool) {
	t.Helper()
	for i, x := range xs {
		if keep(i) && !math.IsNaN(float64(x)) {
			t.Fatalf("%s[%d] = %v was written; it lies outside every sequence", what, i, x)
		}
	}
}

// Three sequences (5 queries over 11 keys, an empty one, 8 queries over 6 keys: its first two
// rows see no key when causal) packed with padding rows after them, GQA, causal, keys in a
// padded (strided) layout; each sequence against the float64 reference, out and LSE.
func TestVarlenForward(t *testing.T) {
	ctx := newContext(t)
	rng := seeded(t)
	const hq, hk, d = 4, 2, 32
	lensQ, lensKV := []int{5, 0, 8}, []int{11, 0, 6}
	cuQ, cuKV := cumulative(lensQ), cumulative(lensKV)
	totalQ, totalKV := int(cuQ[3])+2, int(cuKV[3])+1 // rows past the last sequence
	lq, lkv := packed3(totalQ, hq, d, d), packed3(totalKV, hk, d, d+3)
	q := randomOperand(rng, ufa.F32, lq.size())
	k := randomOperand(rng, ufa.F32, lkv.size())
	v := randomOperand(rng, ufa.F32, lkv.size())
	out := poisoned(ufa.F32, lq.size()).f32
	lse := poisoned(ufa.F32, hq*totalQ).f32
	seqs := ufa.Varlen{
		CuSeqlensQ: ufa.NewI32(cuQ, len(cuQ)), CuSeqlensKV: ufa.NewI32(cuKV, len(cuKV)),
		MaxSeqlenQ: maxOf(lensQ), MaxSeqlenKV: maxOf(lensKV),
	}
	err := ctx.ForwardVarlen(lq.tensor(q.f32), lkv.tensor(k.f32), lkv.tensor(v.f32), lq.tensor(out),
		seqs, &ufa.Params{Causal: true, LSE: ptr(ufa.NewF32(lse, hq, totalQ))})
	if err != nil {
		t.Fatal(err)
	}
	for b := range lensQ {
		sq, sk := lensQ[b], lensKV[b]
		if sq == 0 {
			continue
		}
		qb := lq.rows(q.values, int(cuQ[b]), int(cuQ[b+1]))
		kb := lkv.rows(k.values, int(cuKV[b]), int(cuKV[b+1]))
		vb := lkv.rows(v.values, int(cuKV[b]), int(cuKV[b+1]))
		lo := rowMajor(1, sq, hq, d)
		// The forward reference of ufa_test.go, and sequence64 for the LSE.
		want := reference(qb, kb, vb, lo, rowMajor(1, sk, hk, d), lo, true)
		compare(t, "out of sequence "+string(rune('0'+b)), lq.rows(f64s(out), int(cuQ[b]), int(cuQ[b+1])), want)
		ref := sequence64(qb, kb, vb, nil, sq, sk, hq, hk, d, d, true)
		gotLSE := make([]float64, 0, hq*sq)
		for h := 0; h < hq; h++ {
			gotLSE = append(gotLSE, f64s(lse[h*totalQ+int(cuQ[b]):h*totalQ+int(cuQ[b+1])])...)
		}
		compare(t, "lse of sequence "+string(rune('0'+b)), gotLSE, ref.lse)
		if b == 2 && !math.IsInf(float64(lse[int(cuQ[2])]), -1) {
			t.Fatalf("sequence 2, row 0 sees no key: LSE %v, want -inf", lse[int(cuQ[2])])
		}
	}
	untouched(t, "out", out, func(i int) bool { return i >= int(cuQ[3])*hq*d })
	untouched(t, "lse", lse, func(i int) bool { return i%totalQ >= int(cuQ[3]) })
	t.Logf("varlen forward: %d sequences, lengths q %v kv %v", len(lensQ), lensQ, lensKV)
}

// The gradients of a varlen call (GQA, causal, head_dim_v != head_dim) against the float64
// reference's, per sequence: a sequence without queries gets zero dk and dv, one without keys
// zero dq; rows past the last sequence are not written.
func TestVarlenBackward(t *testing.T) {
	ctx := newContext(t)
	rng := seeded(t)
	const hq, hk, d, dv = 4, 2, 16, 24
	lensQ, lensKV := []int{4, 0, 3, 6}, []int{7, 3, 0, 6}
	cuQ, cuKV := cumulative(lensQ), cumulative(lensKV)
	totalQ, totalKV := int(cuQ[4])+1, int(cuKV[4])+2
	lq, lk := packed3(totalQ, hq, d, d), packed3(totalKV, hk, d, d)
	lo, lv := packed3(totalQ, hq, dv, dv), packed3(totalKV, hk, dv, dv)
	q := randomOperand(rng, ufa.F32, lq.size())
	k := randomOperand(rng, ufa.F32, lk.size())
	v := randomOperand(rng, ufa.F32, lv.size())
	dout := randomOperand(rng, ufa.F32, lo.size())
	out := poisoned(ufa.F32, lo.size()).f32
	lse := poisoned(ufa.F32, hq*totalQ).f32
	seqs := ufa.Varlen{
		CuSeqlensQ: ufa.NewI32(cuQ, len(cuQ)), CuSeqlensKV: ufa.NewI32(cuKV, len(cuKV)),
		MaxSeqlenQ: maxOf(lensQ), MaxSeqlenKV: maxOf(lensKV),
	}
	p := &ufa.Params{Causal: true}
	if err := ctx.ForwardVarlen(lq.tensor(q.f32), lk.tensor(k.f32), lv.tensor(v.f32), lo.tensor(out), seqs,
		&ufa.Params{Causal: true, LSE: ptr(ufa.NewF32(lse, hq, totalQ))}); err != nil {
		t.Fatal(err)
	}
	dq := poisoned(ufa.F32, lq.size()).f32
	dk := poisoned(ufa.F32, lk.size()).f32
	dV := poisoned(ufa.F32, lv.size()).f32
	err := ctx.BackwardVarlen(lq.tensor(q.f32), lk.tensor(k.f32), lv.tensor(v.f32), lo.tensor(out),
		lo.tensor(dout.f32), ufa.NewF32(lse, hq, totalQ), lq.tensor(dq), lk.tensor(dk), lv.tensor(dV), seqs, p)
	if err != nil {
		t.Fatal(err)
	}
	for b := range lensQ {
		q0, q1, k0, k1 := int(cuQ[b]), int(cuQ[b+1]), int(cuKV[b]), int(cuKV[b+1])
		ref := sequence64(lq.rows(q.values, q0, q1), lk.rows(k.values, k0, k1), lv.rows(v.values, k0, k1),
			lo.rows(dout.values, q0, q1), q1-q0, k1-k0, hq, hk, d, dv, true)
		name := func(what string) string { return what + " of sequence " + string(rune('0'+b)) }
		compare(t, name("out"), lo.rows(f64s(out), q0, q1), ref.out)
		compare(t, name("dq"), lq.rows(f64s(dq), q0, q1), ref.dq)
		compare(t, name("dk"), lk.rows(f64s(dk), k0, k1), ref.dk)
		compare(t, name("dv"), lv.rows(f64s(dV), k0, k1), ref.dv)
	}
	untouched(t, "dq", dq, func(i int) bool { return i >= int(cuQ[4])*hq*d })
	untouched(t, "dk", dk, func(i int) bool { return i >= int(cuKV[4])*hk*d })
	untouched(t, "dv", dV, func(i int) bool { return i >= int(cuKV[4])*hk*dv })
	t.Logf("varlen backward: lengths q %v kv %v", lensQ, lensKV)
}

// Dense Backward: two batch entries, GQA, causal with seqlen_q < seqlen_kv.
func TestBackward(t *testing.T) {
	ctx := newContext(t)
	rng := seeded(t)
	const batch, sq, sk, hq, hk, d = 2, 7, 9, 4, 2, 16
	q := randomOperand(rng, ufa.F32, batch*sq*hq*d)
	k := randomOperand(rng, ufa.F32, batch*sk*hk*d)
	v := randomOperand(rng, ufa.F32, batch*sk*hk*d)
	dout := randomOperand(rng, ufa.F32, batch*sq*hq*d)
	out := make([]float32, batch*sq*hq*d)
	lse := make([]float32, batch*hq*sq)
	qt, kt, vt := ufa.NewF32(q.f32, batch, sq, hq, d), ufa.NewF32(k.f32, batch, sk, hk, d), ufa.NewF32(v.f32, batch, sk, hk, d)
	if err := ctx.Forward(qt, kt, vt, ufa.NewF32(out, batch, sq, hq, d),
		&ufa.Params{Causal: true, LSE: ptr(ufa.NewF32(lse, batch, hq, sq))}); err != nil {
		t.Fatal(err)
	}
	dq := poisoned(ufa.F32, len(q.f32)).f32
	dk := poisoned(ufa.F32, len(k.f32)).f32
	dV := poisoned(ufa.F32, len(v.f32)).f32
	if err := ctx.Backward(qt, kt, vt, ufa.NewF32(out, batch, sq, hq, d), ufa.NewF32(dout.f32, batch, sq, hq, d),
		ufa.NewF32(lse, batch, hq, sq), ufa.NewF32(dq, batch, sq, hq, d), ufa.NewF32(dk, batch, sk, hk, d),
		ufa.NewF32(dV, batch, sk, hk, d), &ufa.Params{Causal: true}); err != nil {
		t.Fatal(err)
	}
	nq, nk := sq*hq*d, sk*hk*d
	for b := 0; b < batch; b++ {
		ref := sequence64(q.values[b*nq:(b+1)*nq], k.values[b*nk:(b+1)*nk], v.values[b*nk:(b+1)*nk],
			dout.values[b*nq:(b+1)*nq], sq, sk, hq, hk, d, d, true)
		compare(t, "dq", f64s(dq[b*nq:(b+1)*nq]), ref.dq)
		compare(t, "dk", f64s(dk[b*nk:(b+1)*nk]), ref.dk)
		compare(t, "dv", f64s(dV[b*nk:(b+1)*nk]), ref.dv)
	}
	// The forward's LSE output must not be passed to a backward call.
	err := ctx.Backward(qt, kt, vt, ufa.NewF32(out, batch, sq, hq, d), ufa.NewF32(dout.f32, batch, sq, hq, d),
		ufa.NewF32(lse, batch, hq, sq), ufa.NewF32(dq, batch, sq, hq, d), ufa.NewF32(dk, batch, sk, hk, d),
		ufa.NewF32(dV, batch, sk, hk, d), &ufa.Params{LSE: ptr(ufa.NewF32(lse, batch, hq, sq))})
	if !errors.Is(err, ufa.ErrInvalidArgument) || !strings.Contains(err.Error(), "params->lse") {
		t.Errorf("backward with params.LSE: got %v", err)
	}
}

// pagedCase is a paged KV cache (page size 2, pages shuffled) of two sequences holding 3 and 6
// keys, to which a call appends 2 keys each, and a q of 3 rows a sequence.
type pagedCase struct {
	batch, hq, hk, d, page, pages, maxPages, seqNew, sq int
	seqlens                                             []int32
	table                                               []int32
	kCache, vCache, kNew, vNew, q                       operand
}

func newPagedCase(rng *rand.Rand) *pagedCase {
	c := &pagedCase{batch: 2, hq: 4, hk: 2, d: 16, page: 2, pages: 9, maxPages: 4, seqNew: 2, sq: 3}
	c.seqlens = []int32{3, 6}
	// Sequence 0 holds 5 keys after the append (3 pages), sequence 1 8 keys (4 pages); two pages
	// are used by no one. Entries past a sequence's last page are never read: -1.
	perm := rng.Perm(c.pages)
	c.table = []int32{int32(perm[0]), int32(perm[1]), int32(perm[2]), -1,
		int32(perm[3]), int32(perm[4]), int32(perm[5]), int32(perm[6])}
	n := c.pages * c.page * c.hk * c.d
	c.kCache, c.vCache = randomOperand(rng, ufa.F32, n), randomOperand(rng, ufa.F32, n)
	c.kNew = randomOperand(rng, ufa.F32, c.batch*c.seqNew*c.hk*c.d)
	c.vNew = randomOperand(rng, ufa.F32, c.batch*c.seqNew*c.hk*c.d)
	c.q = randomOperand(rng, ufa.F32, c.batch*c.sq*c.hq*c.d)
	return c
}

func (c *pagedCase) cache() ufa.KVCache {
	return ufa.KVCache{
		K:            ufa.NewF32(c.kCache.f32, c.pages, c.page, c.hk, c.d),
		V:            ufa.NewF32(c.vCache.f32, c.pages, c.page, c.hk, c.d),
		CacheSeqlens: ufa.NewI32(c.seqlens, c.batch),
		BlockTable:   ptr(ufa.NewI32(c.table, c.batch, c.maxPages)),
		KNew:         ptr(ufa.NewF32(c.kNew.f32, c.batch, c.seqNew, c.hk, c.d)),
		VNew:         ptr(ufa.NewF32(c.vNew.f32, c.batch, c.seqNew, c.hk, c.d)),
	}
}

// slot is the offset of key pos of sequence b, head h, in the paged cache.
func (c *pagedCase) slot(b, pos, h int) int {
	page := int(c.table[b*c.maxPages+pos/c.page])
	return ((page*c.page+pos%c.page)*c.hk + h) * c.d
}

// expected is the cache after the append: the old one with each sequence's new rows at
// cache_seqlens[b].
func (c *pagedCase) expected(old, add []float32) []float32 {
	want := append([]float32(nil), old...)
	for b := 0; b < c.batch; b++ {
		for i := 0; i < c.seqNew; i++ {
			for h := 0; h < c.hk; h++ {
				src := ((b*c.seqNew+i)*c.hk + h) * c.d
				copy(want[c.slot(b, int(c.seqlens[b])+i, h):][:c.d], add[src:src+c.d])
			}
		}
	}
	return want
}

// gather returns sequence b's keys (or values) 0..n from a paged cache, dense [n, hk, d].
func (c *pagedCase) gather(cache []float32, b, n int) []float64 {
	out := make([]float64, 0, n*c.hk*c.d)
	for pos := 0; pos < n; pos++ {
		for h := 0; h < c.hk; h++ {
			out = append(out, f64s(cache[c.slot(b, pos, h):][:c.d])...)
		}
	}
	return out
}

func sameBits(t *testing.T, what string, got, want []float32) {
	t.Helper()
	for i := range want {
		if math.Float32bits(got[i]) != math.Float32bits(want[i]) {
			t.Fatalf("%s[%d] = %v (%#08x), want %v (%#08x)", what, i, got[i], math.Float32bits(got[i]),
				want[i], math.Float32bits(want[i]))
		}
	}
}

// A paged cache (page size 2, shuffled pages, GQA): the call appends 2 keys and values a
// sequence, bitwise, in the right slots and nowhere else, then attends causally over the
// sequence's old and new keys (the float64 reference over the gathered keys; out and LSE).
func TestKVCachePaged(t *testing.T) {
	ctx := newContext(t)
	rng := seeded(t)
	c := newPagedCase(rng)
	wantK, wantV := c.expected(c.kCache.f32, c.kNew.f32), c.expected(c.vCache.f32, c.vNew.f32)
	out := poisoned(ufa.F32, len(c.q.f32)).f32
	lse := poisoned(ufa.F32, c.batch*c.hq*c.sq).f32
	err := ctx.ForwardKVCache(ufa.NewF32(c.q.f32, c.batch, c.sq, c.hq, c.d), c.cache(),
		ufa.NewF32(out, c.batch, c.sq, c.hq, c.d),
		&ufa.Params{Causal: true, LSE: ptr(ufa.NewF32(lse, c.batch, c.hq, c.sq))})
	if err != nil {
		t.Fatal(err)
	}
	sameBits(t, "k_cache", c.kCache.f32, wantK)
	sameBits(t, "v_cache", c.vCache.f32, wantV)
	if c.seqlens[0] != 3 || c.seqlens[1] != 6 {
		t.Fatalf("cache_seqlens changed to %v", c.seqlens)
	}
	nq := c.sq * c.hq * c.d
	for b := 0; b < c.batch; b++ {
		n := int(c.seqlens[b]) + c.seqNew
		qb := c.q.values[b*nq : (b+1)*nq]
		kb, vb := c.gather(wantK, b, n), c.gather(wantV, b, n)
		lo := rowMajor(1, c.sq, c.hq, c.d)
		compare(t, "out", f64s(out[b*nq:(b+1)*nq]), reference(qb, kb, vb, lo, rowMajor(1, n, c.hk, c.d), lo, true))
		ref := sequence64(qb, kb, vb, nil, c.sq, n, c.hq, c.hk, c.d, c.d, true)
		compare(t, "lse", f64s(lse[b*c.hq*c.sq:(b+1)*c.hq*c.sq]), ref.lse)
	}
	if n, err := ufa.KVCacheWorkspaceSize(ufa.NewF32(c.q.f32, c.batch, c.sq, c.hq, c.d), c.cache()); err != nil || n != 0 {
		t.Errorf("KVCacheWorkspaceSize without rotary = %d, %v; want 0", n, err)
	}
	t.Logf("block table %v", c.table)
}

// A varlen call over a paged k/v (the paged case's cache, no append) with seqused_kv: packed
// queries (3 and 2 rows) attend causally to the first seqused_kv[b] of each sequence's keys.
func TestVarlenPaged(t *testing.T) {
	ctx := newContext(t)
	rng := seeded(t)
	c := newPagedCase(rng)
	lensQ, lensKV, used := []int{3, 2}, []int{5, 8}, []int32{4, 8}
	cuQ, cuKV := cumulative(lensQ), cumulative(lensKV)
	lq := packed3(int(cuQ[2]), c.hq, c.d, c.d)
	q := randomOperand(rng, ufa.F32, lq.size())
	out := poisoned(ufa.F32, lq.size()).f32
	cache := c.cache()
	seqs := ufa.Varlen{
		CuSeqlensQ: ufa.NewI32(cuQ, 3), CuSeqlensKV: ufa.NewI32(cuKV, 3), MaxSeqlenQ: 3, MaxSeqlenKV: 8,
		SeqUsedKV: ptr(ufa.NewI32(used, 2)), BlockTable: cache.BlockTable,
	}
	if err := ctx.ForwardVarlen(lq.tensor(q.f32), cache.K, cache.V, lq.tensor(out), seqs, &ufa.Params{Causal: true}); err != nil {
		t.Fatal(err)
	}
	for b := range lensQ {
		n := int(used[b])
		qb := lq.rows(q.values, int(cuQ[b]), int(cuQ[b+1]))
		lo := rowMajor(1, lensQ[b], c.hq, c.d)
		want := reference(qb, c.gather(c.kCache.f32, b, n), c.gather(c.vCache.f32, b, n), lo, rowMajor(1, n, c.hk, c.d), lo, true)
		compare(t, "out", lq.rows(f64s(out), int(cuQ[b]), int(cuQ[b+1])), want)
	}
}

// rotate64 rotates the first rd columns of the row x at position pos as the library does: in
// float64 from float32 values, rounded to float32.
func rotate64(x []float32, cos, sin []float32, pos, rd int, interleaved bool) []float32 {
	out := append([]float32(nil), x...)
	half := rd / 2
	for i := 0; i < half; i++ {
		c, s := float64(cos[pos*half+i]), float64(sin[pos*half+i])
		ia, ib := i, i+half
		if interleaved {
			ia, ib = 2*i, 2*i+1
		}
		a, b := float64(x[ia]), float64(x[ib])
		out[ia] = float32(a*c - b*s)
		out[ib] = float32(b*c + a*s)
	}
	return out
}

// A dense cache read through cache_batch_idx, with rotary embedding (GPT-NeoX and GPT-J pairs,
// rotary_dim < head_dim): the appended keys are the rotated new keys, bitwise, and the output is
// the reference attention of the rotated q (causal: row i at position cache_seqlens[b] + i).
func TestKVCacheRotary(t *testing.T) {
	for _, interleaved := range []bool{false, true} {
		name := "neox"
		if interleaved {
			name = "gptj"
		}
		t.Run(name, func(t *testing.T) {
			ctx := newContext(t)
			rng := seeded(t)
			const batch, entries, capacity, hq, hk, d, rd, seqNew, seqRO = 2, 3, 8, 2, 1, 16, 8, 2, 12
			seqlens := []int32{1, 4}
			batchIdx := []int32{2, 0} // sequence 0 lives in entry 2, sequence 1 in entry 0
			kc := randomOperand(rng, ufa.F32, entries*capacity*hk*d)
			vc := randomOperand(rng, ufa.F32, entries*capacity*hk*d)
			kNew := randomOperand(rng, ufa.F32, batch*seqNew*hk*d)
			vNew := randomOperand(rng, ufa.F32, batch*seqNew*hk*d)
			q := randomOperand(rng, ufa.F32, batch*seqNew*hq*d)
			cos, sin := make([]float32, seqRO*rd/2), make([]float32, seqRO*rd/2)
			for pos := 0; pos < seqRO; pos++ {
				for i := 0; i < rd/2; i++ {
					theta := float64(pos) * math.Pow(10000, -2*float64(i)/rd)
					cos[pos*rd/2+i], sin[pos*rd/2+i] = float32(math.Cos(theta)), float32(math.Sin(theta))
				}
			}
			// The expected cache, and q rotated, both as the library computes them.
			wantK, wantV := append([]float32(nil), kc.f32...), append([]float32(nil), vc.f32...)
			qRot := make([]float64, 0, len(q.f32))
			for b := 0; b < batch; b++ {
				for i := 0; i < seqNew; i++ {
					pos := int(seqlens[b]) + i
					for h := 0; h < hk; h++ {
						src := ((b*seqNew+i)*hk + h) * d
						dst := ((int(batchIdx[b])*capacity+pos)*hk + h) * d
						copy(wantK[dst:dst+d], rotate64(kNew.f32[src:src+d], cos, sin, pos, rd, interleaved))
						copy(wantV[dst:dst+d], vNew.f32[src:src+d])
					}
					for h := 0; h < hq; h++ {
						src := ((b*seqNew+i)*hq + h) * d
						qRot = append(qRot, f64s(rotate64(q.f32[src:src+d], cos, sin, pos, rd, interleaved))...)
					}
				}
			}
			out := poisoned(ufa.F32, len(q.f32)).f32
			cache := ufa.KVCache{
				K:             ufa.NewF32(kc.f32, entries, capacity, hk, d),
				V:             ufa.NewF32(vc.f32, entries, capacity, hk, d),
				CacheSeqlens:  ufa.NewI32(seqlens, batch),
				CacheBatchIdx: ptr(ufa.NewI32(batchIdx, batch)),
				KNew:          ptr(ufa.NewF32(kNew.f32, batch, seqNew, hk, d)),
				VNew:          ptr(ufa.NewF32(vNew.f32, batch, seqNew, hk, d)),
				Rotary: &ufa.Rotary{Cos: ufa.NewF32(cos, seqRO, rd/2), Sin: ufa.NewF32(sin, seqRO, rd/2),
					Interleaved: interleaved},
			}
			qt := ufa.NewF32(q.f32, batch, seqNew, hq, d)
			if n, err := ufa.KVCacheWorkspaceSize(qt, cache); err != nil || n < 4*len(q.f32) {
				t.Errorf("KVCacheWorkspaceSize with rotary = %d, %v; want at least q's %d bytes", n, err, 4*len(q.f32))
			}
			if err := ctx.ForwardKVCache(qt, cache, ufa.NewF32(out, batch, seqNew, hq, d), &ufa.Params{Causal: true}); err != nil {
				t.Fatal(err)
			}
			sameBits(t, "k_cache", kc.f32, wantK)
			sameBits(t, "v_cache", vc.f32, wantV)
			nq := seqNew * hq * d
			for b := 0; b < batch; b++ {
				n := int(seqlens[b]) + seqNew
				e := int(batchIdx[b]) * capacity * hk * d
				kb, vb := f64s(wantK[e:e+n*hk*d]), f64s(wantV[e:e+n*hk*d])
				lo := rowMajor(1, seqNew, hq, d)
				compare(t, "out", f64s(out[b*nq:(b+1)*nq]),
					reference(qRot[b*nq:(b+1)*nq], kb, vb, lo, rowMajor(1, n, hk, d), lo, true))
			}
		})
	}
}

// Attention over the first 5 of 12 keys and over the other 7 (strided views of one buffer),
// merged by their LSEs, equals attention over all 12 keys (float64 reference), out and LSE; the
// merge also works in place, into the first state.
func TestMergeStates(t *testing.T) {
	ctx := newContext(t)
	rng := seeded(t)
	const batch, sq, sk, split, hq, hk, d = 2, 5, 12, 5, 4, 2, 16
	q := randomOperand(rng, ufa.F32, batch*sq*hq*d)
	k := randomOperand(rng, ufa.F32, batch*sk*hk*d)
	v := randomOperand(rng, ufa.F32, batch*sk*hk*d)
	kvStrides := []int{sk * hk * d, hk * d, d, 1}
	half := func(x []float32, from, n int) ufa.Tensor {
		return ufa.NewF32(x[from*hk*d:], batch, n, hk, d).WithStrides(kvStrides...)
	}
	qt := ufa.NewF32(q.f32, batch, sq, hq, d)
	var states [2]ufa.State
	var outs, lses [2][]float32
	for i, part := range [][2]int{{0, split}, {split, sk - split}} {
		outs[i], lses[i] = make([]float32, len(q.f32)), make([]float32, batch*hq*sq)
		states[i] = ufa.State{Out: ufa.NewF32(outs[i], batch, sq, hq, d), LSE: ufa.NewF32(lses[i], batch, hq, sq)}
		if err := ctx.Forward(qt, half(k.f32, part[0], part[1]), half(v.f32, part[0], part[1]), states[i].Out,
			&ufa.Params{LSE: &states[i].LSE}); err != nil {
			t.Fatal(err)
		}
	}
	out := poisoned(ufa.F32, len(q.f32)).f32
	lse := poisoned(ufa.F32, batch*hq*sq).f32
	if err := ctx.MergeStates(states[:], ufa.NewF32(out, batch, sq, hq, d), ptr(ufa.NewF32(lse, batch, hq, sq))); err != nil {
		t.Fatal(err)
	}
	nq, nk := sq*hq*d, sk*hk*d
	for b := 0; b < batch; b++ {
		ref := sequence64(q.values[b*nq:(b+1)*nq], k.values[b*nk:(b+1)*nk], v.values[b*nk:(b+1)*nk], nil,
			sq, sk, hq, hk, d, d, false)
		compare(t, "merged out", f64s(out[b*nq:(b+1)*nq]), ref.out)
		compare(t, "merged lse", f64s(lse[b*hq*sq:(b+1)*hq*sq]), ref.lse)
	}
	// In place: the first state becomes the merged one, bit for bit.
	if err := ctx.MergeStates(states[:], states[0].Out, &states[0].LSE); err != nil {
		t.Fatal(err)
	}
	sameBits(t, "in-place merge: out", outs[0], out)
	sameBits(t, "in-place merge: lse", lses[0], lse)
}

// Bad metadata: an *Error whose message names the argument and its value, and nothing written
// (poisoned outputs keep their poison, the cache its bytes).
func TestSequencesBadInput(t *testing.T) {
	ctx := newContext(t)
	rng := seeded(t)
	const hq, d = 2, 8
	q := randomOperand(rng, ufa.F32, 13*hq*d).f32
	out := poisoned(ufa.F32, len(q)).f32
	lse := poisoned(ufa.F32, hq*13).f32
	varlen := func(cuQ, cuKV ufa.Tensor, p *ufa.Params) error {
		return ctx.ForwardVarlen(ufa.NewF32(q, 13, hq, d), ufa.NewF32(q, 13, hq, d), ufa.NewF32(q, 13, hq, d),
			ufa.NewF32(out, 13, hq, d), ufa.Varlen{CuSeqlensQ: cuQ, CuSeqlensKV: cuKV, MaxSeqlenQ: 13, MaxSeqlenKV: 13}, p)
	}
	good := ufa.NewI32([]int32{0, 5, 8, 13}, 4)
	unwritten := func(what string) {
		t.Helper()
		untouched(t, what+": out", out, func(int) bool { return true })
		untouched(t, what+": lse", lse, func(int) bool { return true })
	}
	expect := func(err error, kind *ufa.Error, what string) {
		t.Helper()
		var e *ufa.Error
		if !errors.As(err, &e) || !errors.Is(err, kind) || !strings.Contains(e.Message, what) {
			t.Fatalf("want %q naming %q, got %v", kind.Status, what, err)
		}
		t.Logf("error: %v", err)
	}

	// Decreasing offsets.
	err := varlen(ufa.NewI32([]int32{0, 5, 3, 13}, 4), good, &ufa.Params{LSE: ptr(ufa.NewF32(lse, hq, 13))})
	expect(err, ufa.ErrInvalidArgument, "cu_seqlens_q[2]=3")
	unwritten("decreasing cu_seqlens_q")
	// Offsets past the rows of k.
	err = varlen(good, ufa.NewI32([]int32{0, 5, 8, 14}, 4), &ufa.Params{LSE: ptr(ufa.NewF32(lse, hq, 13))})
	expect(err, ufa.ErrInvalidArgument, "cu_seqlens_kv[3]=14")
	unwritten("cu_seqlens_kv past k")
	// Metadata of the wrong dtype.
	err = varlen(ufa.NewF32([]float32{0, 5, 8, 13}, 4), good, nil)
	expect(err, ufa.ErrInvalidArgument, "cu_seqlens_q.dtype")
	unwritten("f32 cu_seqlens_q")
	// A metadata view past the end of its slice.
	err = varlen(good, ufa.NewI32([]int32{0, 5, 8}, 4), nil)
	expect(err, ufa.ErrInvalidArgument, "cu_seqlens_kv.nbytes=12")
	unwritten("short cu_seqlens_kv")
	// The backward of a paged call is not implemented.
	grad := poisoned(ufa.F32, len(q)).f32
	qt := ufa.NewF32(q, 13, hq, d)
	err = ctx.BackwardVarlen(qt, ufa.NewF32(q, 13, 1, 2, d), ufa.NewF32(q, 13, 1, 2, d), qt, qt, ufa.NewF32(q, hq, 13),
		ufa.NewF32(grad, 13, hq, d), ufa.NewF32(grad, 13, 1, 2, d), ufa.NewF32(grad, 13, 1, 2, d),
		ufa.Varlen{CuSeqlensQ: good, CuSeqlensKV: good, MaxSeqlenQ: 13, MaxSeqlenKV: 13,
			BlockTable: ptr(ufa.NewI32([]int32{0, 1, 2}, 3, 1))}, nil)
	expect(err, ufa.ErrUnsupported, "block_table")
	untouched(t, "dq", grad, func(int) bool { return true })

	// KV cache: a block table entry past the cache's pages, a length past its capacity.
	c := newPagedCase(rng)
	before := [][]float32{append([]float32(nil), c.kCache.f32...), append([]float32(nil), c.vCache.f32...)}
	kvOut := poisoned(ufa.F32, len(c.q.f32)).f32
	call := func() error {
		return ctx.ForwardKVCache(ufa.NewF32(c.q.f32, c.batch, c.sq, c.hq, c.d), c.cache(),
			ufa.NewF32(kvOut, c.batch, c.sq, c.hq, c.d), &ufa.Params{Causal: true})
	}
	unchanged := func(what string) {
		t.Helper()
		sameBits(t, what+": k_cache", c.kCache.f32, before[0])
		sameBits(t, what+": v_cache", c.vCache.f32, before[1])
		untouched(t, what+": out", kvOut, func(int) bool { return true })
	}
	saved := c.table[1]
	c.table[1] = 99
	expect(call(), ufa.ErrInvalidArgument, "block_table[0][1]=99")
	unchanged("block_table[0][1]=99")
	c.table[1] = saved
	c.seqlens[1] = 7 // 7 + 2 new keys > the 8 that 4 pages of 2 hold
	expect(call(), ufa.ErrInvalidArgument, "cache_seqlens[1]=7")
	unchanged("cache_seqlens[1]=7")
	c.seqlens[1] = 6
	// Two sequences appending to one slot: sequence 1's last page (keys 6, 7, both new) made
	// sequence 0's third (keys 4, new, and 5).
	saved = c.table[7]
	c.table[7] = c.table[2]
	expect(call(), ufa.ErrInvalidArgument, "both append")
	unchanged("shared append slot")
	c.table[7] = saved

	// Merge: states of different shapes.
	s0 := ufa.State{Out: ufa.NewF32(make([]float32, 2*hq*d), 1, 2, hq, d), LSE: ufa.NewF32(make([]float32, hq*2), 1, hq, 2)}
	s1 := ufa.State{Out: ufa.NewF32(make([]float32, 2*hq*d), 1, 2, hq, d), LSE: ufa.NewF32(make([]float32, hq*3), 1, hq, 3)}
	mOut := poisoned(ufa.F32, 2*hq*d).f32
	err = ctx.MergeStates([]ufa.State{s0, s1}, ufa.NewF32(mOut, 1, 2, hq, d), nil)
	expect(err, ufa.ErrInvalidArgument, "states[1].lse")
	untouched(t, "merged out", mOut, func(int) bool { return true })
	err = ctx.MergeStates(nil, ufa.NewF32(mOut, 1, 2, hq, d), nil)
	expect(err, ufa.ErrInvalidArgument, "at least one state")
}
