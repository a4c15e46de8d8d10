//! UMFA's README Rust example, completed into a program and run against ufa: it declares the
//! mfa_* functions itself, as the README does; only how it links changed (through the ufa-ffi
//! crate instead of UMFA's Swift library). The result is checked against ufa's f64 reference.
//!
//! Run: cargo run --release -p ufa-ffi --example umfa_readme

use std::ffi::c_void;
use ufa::half::f16;

// Link line: the mfa_* symbols come from this crate (libufa).
use ufa_ffi as _;

extern "C" {
    fn mfa_create_context(context: *mut *mut c_void) -> i32;
    fn mfa_destroy_context(context: *mut c_void);
    fn mfa_create_buffer(context: *mut c_void, size: usize, buffer: *mut *mut c_void) -> i32;
    fn mfa_buffer_contents(buffer: *mut c_void) -> *mut c_void;
    fn mfa_destroy_buffer(buffer: *mut c_void);
    #[allow(clippy::too_many_arguments)]
    fn mfa_attention_forward(
        context: *mut c_void,
        q: *mut c_void,
        k: *mut c_void,
        v: *mut c_void,
        out: *mut c_void,
        batch_size: u32,
        seq_len_q: u32,
        seq_len_kv: u32,
        num_heads: u32,
        head_dim: u16,
        softmax_scale: f32,
        causal: bool,
        input_precision: i32,
        intermediate_precision: i32,
        output_precision: i32,
        transpose_q: bool,
        transpose_k: bool,
        transpose_v: bool,
        transpose_o: bool,
    ) -> i32;
}

fn main() {
    let (batch_size, seq_len_q, seq_len_kv, num_heads, head_dim) =
        (1u32, 128u32, 128u32, 4u32, 64u16);
    let elems = (batch_size * seq_len_q * num_heads) as usize * head_dim as usize;
    let q_size_bytes = elems * std::mem::size_of::<f16>();

    // Create context
    let mut context: *mut c_void = std::ptr::null_mut();
    assert_eq!(unsafe { mfa_create_context(&mut context) }, 0);

    // Create buffers for your tensors (FP16, [batch, heads, seq, head_dim])
    let mut bufs = [std::ptr::null_mut::<c_void>(); 4];
    let mut host: Vec<Vec<f16>> = Vec::new();
    for (i, buf) in bufs.iter_mut().enumerate() {
        assert_eq!(unsafe { mfa_create_buffer(context, q_size_bytes, buf) }, 0);
        let data =
            unsafe { std::slice::from_raw_parts_mut(mfa_buffer_contents(*buf) as *mut f16, elems) };
        for (j, x) in data.iter_mut().enumerate() {
            *x = f16::from_f32(((j * 7 + i * 13) % 101) as f32 / 50.0 - 1.0);
        }
        host.push(data.to_vec());
    }
    let [q_buffer, k_buffer, v_buffer, out_buffer] = bufs;

    // Run attention
    let status = unsafe {
        mfa_attention_forward(
            context,
            q_buffer,
            k_buffer,
            v_buffer,
            out_buffer,
            batch_size,
            seq_len_q,
            seq_len_kv,
            num_heads,
            head_dim,
            1.0 / (head_dim as f32).sqrt(), // softmax_scale
            false,                          // causal
            0,
            0,
            0, // precision: FP16
            false,
            false,
            false,
            false, // no transpose
        )
    };
    assert_eq!(status, 0, "mfa_attention_forward failed");

    let out =
        unsafe { std::slice::from_raw_parts(mfa_buffer_contents(out_buffer) as *const f16, elems) };
    let [b, s, h, d] = [batch_size, seq_len_q, num_heads, head_dim as u32].map(|x| x as usize);
    // The buffers are [b, h, s, d]; ufa's views are [b, s, h, d], so permute the strides.
    let strides = [h * s * d, d, s * d, 1];
    fn view<'a>(x: &'a [f16], shape: &[usize], strides: &[usize]) -> ufa::TensorView<'a> {
        ufa::TensorView::with_strides(x, shape, strides).unwrap()
    }
    let shape = [b, s, h, d];
    let reference = ufa_testkit::reference::reference_forward(
        &view(&host[0], &shape, &strides),
        &view(&host[1], &shape, &strides),
        &view(&host[2], &shape, &strides),
        &ufa::AttentionParams::default(),
    )
    .unwrap();
    let (mut num, mut den) = (0f64, 0f64);
    for bi in 0..b {
        for si in 0..s {
            for hi in 0..h {
                for di in 0..d {
                    let want = reference.out[((bi * s + si) * h + hi) * d + di];
                    let at = bi * strides[0] + si * strides[1] + hi * strides[2] + di;
                    let diff = out[at].to_f64() - want;
                    num += diff * diff;
                    den += want * want;
                }
            }
        }
    }
    let rel = (num / den).sqrt();
    println!("umfa_readme (Rust): relative error vs f64 reference {rel:.2e}");
    assert!(rel < 1e-2, "relative error {rel} too large");

    for buf in bufs {
        unsafe { mfa_destroy_buffer(buf) };
    }
    unsafe { mfa_destroy_context(context) };
}
