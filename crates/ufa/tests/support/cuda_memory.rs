//! Device memory, streams and device 0's primary context for the CUDA integration tests: the
//! set-up the tests do through the driver themselves (allocate, poison, copy back), outside
//! the code under test.

use cudarc::driver::{result as cu, sys};

/// Panics with `what` when a driver call fails (test set-up, not the code under test).
pub fn ok<X>(what: &str, r: Result<X, cu::DriverError>) -> X {
    r.unwrap_or_else(|e| panic!("{what}: {e:?}"))
}

/// Device 0's primary context (the one ufa computes in), to make current on every thread that
/// allocates, copies or creates streams.
#[derive(Clone, Copy)]
pub struct Primary(usize);

impl Primary {
    pub fn retain() -> Primary {
        ok("cuInit", cu::init());
        let dev = ok("cuDeviceGet", cu::device::get(0));
        // SAFETY: a device from cuDeviceGet; retained for the rest of the process.
        Primary(ok("cuDevicePrimaryCtxRetain", unsafe {
            cu::primary_ctx::retain(dev)
        }) as usize)
    }

    pub fn enter(self) {
        // SAFETY: a retained (never released) context.
        ok("cuCtxSetCurrent", unsafe {
            cu::ctx::set_current(self.0 as sys::CUcontext)
        });
    }
}

/// Device memory of device 0, freed on drop.
pub struct DevBuf {
    pub ptr: sys::CUdeviceptr,
    pub bytes: usize,
}

impl DevBuf {
    pub fn new(bytes: usize) -> DevBuf {
        // SAFETY: the primary context is current (Primary::enter).
        let ptr = ok("cuMemAlloc", unsafe { cu::malloc_sync(bytes.max(1)) });
        DevBuf { ptr, bytes }
    }

    pub fn upload(host: &[u8]) -> DevBuf {
        let b = DevBuf::new(host.len());
        // SAFETY: b holds host.len() bytes.
        ok("cuMemcpyHtoD", unsafe { cu::memcpy_htod_sync(b.ptr, host) });
        b
    }

    /// Every byte 0xff (NaN in every float type), in order on `stream`.
    pub fn poison(&self, stream: sys::CUstream) {
        // SAFETY: the buffer's own bytes; stream is live.
        ok("cuMemsetD8Async", unsafe {
            cu::memset_d8_async(self.ptr, 0xff, self.bytes, stream)
        });
    }

    /// The contents once `stream` has run everything queued on it so far.
    pub fn download(&self, stream: sys::CUstream) -> Vec<u8> {
        let mut host = vec![0u8; self.bytes];
        // SAFETY: host holds the buffer's size; the stream is waited for before host is read.
        unsafe {
            ok(
                "cuMemcpyDtoHAsync",
                cu::memcpy_dtoh_async(&mut host, self.ptr, stream),
            );
            ok("cuStreamSynchronize", cu::stream::synchronize(stream));
        }
        host
    }
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        // SAFETY: allocated by cuMemAlloc, freed once; errors are ignored in a destructor.
        let _ = unsafe { cu::free_sync(self.ptr) };
    }
}

/// A stream of the current context, destroyed on drop.
pub struct Stream(pub sys::CUstream);

impl Stream {
    pub fn new() -> Stream {
        Stream(ok(
            "cuStreamCreate",
            cu::stream::create(cu::stream::StreamKind::NonBlocking),
        ))
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        // SAFETY: created above and destroyed once, after its work has been waited for.
        let _ = unsafe { cu::stream::destroy(self.0) };
    }
}
