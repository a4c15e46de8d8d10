package ufa

import "math"

// F16FromFloat32 rounds x to the nearest IEEE half-precision value (ties to even) and returns its
// bits. Values beyond the f16 range become ±Inf; NaN stays NaN.
func F16FromFloat32(x float32) uint16 {
	b := math.Float32bits(x)
	sign := uint16(b>>16) & 0x8000
	exp := int32(b>>23) & 0xff
	man := b & 0x7fffff
	switch {
	case exp == 0xff: // Inf or NaN
		if man != 0 {
			return sign | 0x7e00
		}
		return sign | 0x7c00
	case exp > 127+15: // overflow
		return sign | 0x7c00
	case exp >= 127-14: // normal f16
		h := uint32(exp-127+15)<<10 | man>>13
		rest := man & 0x1fff
		if rest > 0x1000 || (rest == 0x1000 && h&1 == 1) {
			h++ // may carry into the exponent, up to Inf: still correct
		}
		return sign | uint16(h)
	case exp >= 127-25: // subnormal f16 (or rounds up to the smallest one)
		m := man | 0x800000
		shift := uint32(127 - 14 - exp + 13)
		h := m >> shift
		rest := m & (1<<shift - 1)
		half := uint32(1) << (shift - 1)
		if rest > half || (rest == half && h&1 == 1) {
			h++
		}
		return sign | uint16(h)
	}
	return sign // underflow to ±0
}

// F16ToFloat32 converts IEEE half-precision bits to float32 (exactly).
func F16ToFloat32(h uint16) float32 {
	sign := uint32(h&0x8000) << 16
	exp := uint32(h>>10) & 0x1f
	man := uint32(h & 0x3ff)
	switch {
	case exp == 0x1f:
		return math.Float32frombits(sign | 0x7f800000 | man<<13)
	case exp != 0:
		return math.Float32frombits(sign | (exp+127-15)<<23 | man<<13)
	case man == 0:
		return math.Float32frombits(sign)
	}
	// subnormal: man * 2^-24
	v := float32(man) * (1.0 / (1 << 24))
	if sign != 0 {
		v = -v
	}
	return v
}

// BF16FromFloat32 rounds x to the nearest bfloat16 (ties to even) and returns its bits.
func BF16FromFloat32(x float32) uint16 {
	b := math.Float32bits(x)
	if b&0x7fffffff > 0x7f800000 { // NaN: keep it quiet
		return uint16(b>>16) | 0x40
	}
	b += 0x7fff + (b>>16)&1
	return uint16(b >> 16)
}

// BF16ToFloat32 converts bfloat16 bits to float32 (exactly).
func BF16ToFloat32(h uint16) float32 { return math.Float32frombits(uint32(h) << 16) }

// F16s converts a float32 slice to f16 bits.
func F16s(xs []float32) []uint16 { return convert(xs, F16FromFloat32) }

// BF16s converts a float32 slice to bfloat16 bits.
func BF16s(xs []float32) []uint16 { return convert(xs, BF16FromFloat32) }

// F16sToFloat32 converts f16 bits to float32.
func F16sToFloat32(hs []uint16) []float32 { return convert(hs, F16ToFloat32) }

// BF16sToFloat32 converts bfloat16 bits to float32.
func BF16sToFloat32(hs []uint16) []float32 { return convert(hs, BF16ToFloat32) }

func convert[A, B any](xs []A, f func(A) B) []B {
	out := make([]B, len(xs))
	for i, x := range xs {
		out[i] = f(x)
	}
	return out
}
