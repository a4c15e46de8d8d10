package ufa_test

import (
	"fmt"

	ufa "example.invalid/ufa/bindings/go"
)

// One query attending over three keys: batch 1, one head, head_dim 2.
func Example() {
	ctx, err := ufa.NewContext(nil)
	if err != nil {
		panic(err)
	}
	defer ctx.Close()

	q := []float32{1, 0}             // [batch=1, seqlen_q=1, heads=1, head_dim=2]
	k := []float32{1, 0, 0, 1, 0, 0} // [1, 3, 1, 2]
	v := []float32{1, 0, 0, 1, 1, 1} // [1, 3, 1, 2]
	out := make([]float32, 2)        // [1, 1, 1, 2]
	err = ctx.Forward(ufa.NewF32(q, 1, 1, 1, 2), ufa.NewF32(k, 1, 3, 1, 2), ufa.NewF32(v, 1, 3, 1, 2),
		ufa.NewF32(out, 1, 1, 1, 2), &ufa.Params{SoftmaxScale: 1})
	if err != nil {
		panic(err)
	}
	fmt.Printf("%.4f\n", out)

	// Errors carry the library's status and message.
	err = ctx.Forward(ufa.NewF32(q, 1, 1, 1, 2), ufa.NewF32(k, 1, 1, 3, 2), ufa.NewF32(v, 1, 1, 3, 2),
		ufa.NewF32(out, 1, 1, 1, 2), nil)
	fmt.Println(err)
	// Output:
	// [0.7881 0.4239]
	// ufa: invalid argument: k.shape[2]=3 (heads_kv) does not divide q.shape[2]=1 (heads_q)
}
