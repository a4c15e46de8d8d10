//! Device faults on CUDA, each a clear error (kind and message naming what is wrong) with every
//! output untouched, never a crash or a hang: a stream of another context,
//! tensors declared on another device than their memory or than each other, and device memory
//! running out for a call's workspace (the forward, which allocates nothing, still runs then).
//! Without a GPU these tests say so and pass, unless `UFA_REQUIRE_GPU=1` (scripts/gpu-check).
//!
//! A destroyed stream is not among them: its handle points into memory the driver has freed,
//! and every driver call that takes it reads there (on the H200 with driver 580, cuStreamGetCtx
//! on one segfaults inside libcuda), so no library can detect it; the API documents it as the
//! caller's error, as CUDA does.
//!
//! One test function, because the out-of-memory part fills the whole device, which no other
//! test of this binary may run beside.

mod support;

use cudarc::driver::{result as cu, sys};
use half::bf16;
use std::ffi::c_void;
use support::cuda_memory::{ok, DevBuf, Primary, Stream};
use ufa::{
    AttentionParams, BackwardInputs, Context, DType, Device, ErrorKind, Gradients, TensorView,
    TensorViewMut,
};
use ufa_testkit::cuda::gpu_present;

const SHAPE: [usize; 4] = [1, 512, 8, 128];
const LSE: [usize; 3] = [1, 8, 512];

fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len() - 1).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// A forward and backward problem in device memory, bf16, `[1, 512, 8, 128]`.
struct Tensors {
    q: DevBuf,
    k: DevBuf,
    v: DevBuf,
    out: DevBuf,
    lse: DevBuf,
    dout: DevBuf,
    dq: DevBuf,
    dk: DevBuf,
    dv: DevBuf,
}

impl Tensors {
    fn new() -> Tensors {
        let n: usize = SHAPE.iter().product();
        let data = |seed: usize| -> Vec<u8> {
            (0..n)
                .flat_map(|i| {
                    bf16::from_f32(((i * 7 + seed) % 13) as f32 / 13.0 - 0.5).to_le_bytes()
                })
                .collect()
        };
        Tensors {
            q: DevBuf::upload(&data(1)),
            k: DevBuf::upload(&data(2)),
            v: DevBuf::upload(&data(3)),
            out: DevBuf::new(n * 2),
            lse: DevBuf::new(LSE.iter().product::<usize>() * 4),
            dout: DevBuf::upload(&data(4)),
            dq: DevBuf::new(n * 2),
            dk: DevBuf::new(n * 2),
            dv: DevBuf::new(n * 2),
        }
    }

    fn view(b: &DevBuf, device: Device) -> TensorView<'static> {
        let shape: &[usize] = if b.bytes == SHAPE.iter().product::<usize>() * 2 {
            &SHAPE
        } else {
            &LSE
        };
        let dtype = if shape.len() == 4 {
            DType::BF16
        } else {
            DType::F32
        };
        // SAFETY: the buffer holds the view's bytes and outlives the calls of this test.
        unsafe {
            TensorView::from_raw_parts(
                b.ptr as *const c_void,
                dtype,
                device,
                shape,
                &strides(shape),
            )
        }
        .unwrap()
    }

    fn view_mut(b: &DevBuf, device: Device) -> TensorViewMut<'static> {
        let v = Tensors::view(b, device);
        // SAFETY: as above; the tests write each output through one view at a time.
        unsafe {
            TensorViewMut::from_raw_parts(
                b.ptr as *mut c_void,
                v.dtype(),
                device,
                v.layout().shape(),
                v.layout().strides(),
            )
        }
        .unwrap()
    }

    /// The forward with LSE, on `stream`, every tensor declared on `devices[i]` (q, k, v, out,
    /// lse).
    fn forward(
        &self,
        ctx: &Context,
        devices: [Device; 5],
        stream: sys::CUstream,
    ) -> ufa::Result<()> {
        let [dq, dk, dv, dout, dlse] = devices;
        let (q, k, v) = (
            Tensors::view(&self.q, dq),
            Tensors::view(&self.k, dk),
            Tensors::view(&self.v, dv),
        );
        let mut out = Tensors::view_mut(&self.out, dout);
        let mut lse = Tensors::view_mut(&self.lse, dlse);
        // SAFETY: null or a live stream this test made (of the primary context or another).
        unsafe {
            ctx.forward_on_stream(
                &q,
                &k,
                &v,
                &mut out,
                Some(&mut lse),
                &AttentionParams::default(),
                stream as *mut c_void,
            )
        }
    }

    fn backward(&self, ctx: &Context) -> ufa::Result<()> {
        let d = Device::Cuda(0);
        let inputs = BackwardInputs {
            q: Tensors::view(&self.q, d),
            k: Tensors::view(&self.k, d),
            v: Tensors::view(&self.v, d),
            out: Tensors::view(&self.out, d),
            dout: Tensors::view(&self.dout, d),
            lse: Tensors::view(&self.lse, d),
        };
        let mut grads = Gradients {
            dq: Tensors::view_mut(&self.dq, d),
            dk: Tensors::view_mut(&self.dk, d),
            dv: Tensors::view_mut(&self.dv, d),
        };
        ctx.backward(&inputs, &mut grads, &AttentionParams::default())
    }

    /// Poisons the outputs (every byte 0xff) and waits.
    fn poison(&self) {
        for b in [&self.out, &self.lse, &self.dq, &self.dk, &self.dv] {
            b.poison(std::ptr::null_mut());
        }
        ok("cuCtxSynchronize", cu::ctx::synchronize());
    }

    /// Whether every output still holds the poison (nothing was written).
    fn untouched(&self) -> bool {
        [&self.out, &self.lse, &self.dq, &self.dk, &self.dv]
            .iter()
            .all(|b| b.download(std::ptr::null_mut()).iter().all(|&x| x == 0xff))
    }
}

/// Expects `r` to fail with `kind` and a message holding every needle, and the outputs to be
/// untouched.
fn expect_fault(t: &Tensors, what: &str, r: ufa::Result<()>, kind: ErrorKind, needles: &[&str]) {
    let e = r.expect_err(what);
    assert_eq!(e.kind(), kind, "{what}: {e}");
    for n in needles {
        assert!(e.message().contains(n), "{what}: message lacks {n:?}: {e}");
    }
    assert!(
        t.untouched(),
        "{what}: an output was written by a failing call"
    );
    println!("ok   {what}: {e}");
}

#[test]
fn device_faults_are_clear_errors_and_write_nothing() {
    let ctx = Context::new().unwrap();
    if !gpu_present(&ctx) {
        return;
    }
    let primary = Primary::retain();
    primary.enter();
    let t = Tensors::new();
    let cuda0 = [Device::Cuda(0); 5];
    t.poison();
    t.forward(&ctx, cuda0, std::ptr::null_mut())
        .expect("a valid forward");
    t.backward(&ctx)
        .expect("a valid backward (loads the kernels)");
    ok("cuCtxSynchronize", cu::ctx::synchronize());
    assert!(!t.untouched(), "the valid calls wrote their outputs");

    // A live stream of another context on the same device.
    t.poison();
    let mut other: sys::CUcontext = std::ptr::null_mut();
    let dev = ok("cuDeviceGet", cu::device::get(0));
    // SAFETY: out-pointer to a handle; the context is destroyed below.
    unsafe { sys::cuCtxCreate_v4(&mut other, std::ptr::null_mut(), 0, dev) }
        .result()
        .expect("cuCtxCreate");
    let foreign = Stream::new(); // created while `other` is current
    primary.enter();
    expect_fault(
        &t,
        "stream of another context",
        t.forward(&ctx, cuda0, foreign.0),
        ErrorKind::InvalidArgument,
        &[
            "belongs to another CUDA context",
            "cuda:0's primary context",
        ],
    );
    // SAFETY: the stream and context made above, destroyed once, with `other` current for the
    // stream.
    unsafe {
        ok("cuCtxSetCurrent", cu::ctx::set_current(other));
        drop(foreign);
        sys::cuCtxDestroy_v2(other).result().expect("cuCtxDestroy");
    }
    primary.enter();

    // Tensors declared on different devices, or on a device their memory is not on.
    let n = ctx.cuda_devices().map(|d| d.len()).unwrap_or(0) as u32;
    let mut mixed = cuda0;
    mixed[1] = Device::Cuda(1);
    expect_fault(
        &t,
        "k on another device than q",
        t.forward(&ctx, mixed, std::ptr::null_mut()),
        ErrorKind::InvalidArgument,
        &["k is on cuda:1 but q is on cuda:0"],
    );
    if n >= 2 {
        expect_fault(
            &t,
            "cuda:0 memory declared as cuda:1",
            t.forward(&ctx, [Device::Cuda(1); 5], std::ptr::null_mut()),
            ErrorKind::InvalidArgument,
            &["q is declared on cuda:1 but its memory belongs to cuda:0"],
        );
    }
    let absent = Device::Cuda(n);
    expect_fault(
        &t,
        "a device that does not exist",
        t.forward(&ctx, [absent; 5], std::ptr::null_mut()),
        ErrorKind::DeviceUnavailable,
        &[&format!("cuda:{n} does not exist")],
    );

    // The device full: the backward cannot allocate its workspace; the forward needs none.
    // ufa's scratch pool keeps what the backward above freed, which would serve it again: it
    // is handed back first.
    ufa::internals::release_scratch(0).expect("releasing ufa's scratch pool");
    let mut hoard = Vec::new();
    for chunk in [1usize << 30, 1 << 26, 1 << 22, 1 << 20] {
        // SAFETY: the primary context is current; every allocation is freed below.
        while let Ok(p) = unsafe { cu::malloc_sync(chunk) } {
            hoard.push(p);
        }
    }
    let (mut free, mut total) = (0usize, 0usize);
    // SAFETY: out-pointers to live integers.
    unsafe { sys::cuMemGetInfo_v2(&mut free, &mut total) }
        .result()
        .expect("cuMemGetInfo");
    println!(
        "device filled: {} allocations, {free} of {total} bytes free",
        hoard.len()
    );
    t.poison();
    expect_fault(
        &t,
        "backward with the device full",
        t.backward(&ctx),
        ErrorKind::OutOfMemory,
        &["the backward's workspace", "CUDA_ERROR_OUT_OF_MEMORY"],
    );
    t.forward(&ctx, cuda0, std::ptr::null_mut())
        .expect("the forward allocates nothing");
    ok("cuCtxSynchronize", cu::ctx::synchronize());
    for p in hoard {
        // SAFETY: allocated above, freed once.
        ok("cuMemFree", unsafe { cu::free_sync(p) });
    }
    t.backward(&ctx)
        .expect("the backward once memory is free again");
    ok("cuCtxSynchronize", cu::ctx::synchronize());
    assert!(
        t.dq.download(std::ptr::null_mut())
            .iter()
            .any(|&x| x != 0xff),
        "the backward after the fault wrote dq"
    );
}
