"""Coverage-guided fuzzing of ufa's Python import path: DLPack capsules (legacy and versioned)
with arbitrary metadata handed to the extension's ``forward`` and ``merge_states``.

Run by ``scripts/fuzz python-dlpack SECONDS`` (atheris drives libFuzzer over the extension, which
is built with SanitizerCoverage, so the Rust code's edges guide the search) and replayed by
``scripts/fuzz replay``. Each input describes up to six producers: the tensor roles, sizes,
dtype (code, bits, lanes), device, strides, byte offset, capsule kind, flags and version, with
one field in four made hostile. The memory is honest, as it is in the C harness: a descriptor
the library may accept describes exactly the bytes the harness allocated, placed against a
PROT_NONE page so that one byte read or written past them faults; a descriptor the library must
reject (a negative size or stride, a bad dtype, device or version, a read-only output) gets
memory it must not touch. Findings: a crash, a panic (pyo3's PanicException is not an
Exception), an exception of an unexpected type, a success where rejection was due, and a
failed call that wrote into its outputs.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys

# The extension's coverage callbacks resolve against the libFuzzer runtime preloaded by
# scripts/fuzz; symbols of modules loaded from here on are made global for the same reason.
sys.setdlopenflags(sys.getdlopenflags() | os.RTLD_GLOBAL)

import atheris  # noqa: E402

# ---------------------------------------------------------------------------------------------
# DLPack structures (dlpack.h, v1.x)
# ---------------------------------------------------------------------------------------------


class DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p), ("device", DLDevice), ("ndim", ctypes.c_int32),
        ("dtype", DLDataType), ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
        ("byte_offset", ctypes.c_uint64),
    ]


class DLManaged(ctypes.Structure):
    pass


class DLVersion(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32)]


class DLManagedVersioned(ctypes.Structure):
    pass


DELETER = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
DLManaged._fields_ = [("dl_tensor", DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", DELETER)]
DLManagedVersioned._fields_ = [
    ("version", DLVersion), ("manager_ctx", ctypes.c_void_p), ("deleter", DELETER),
    ("flags", ctypes.c_uint64), ("dl_tensor", DLTensor),
]
READ_ONLY = 1

capsule_new = ctypes.pythonapi.PyCapsule_New
capsule_new.restype = ctypes.py_object
capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]

# (code, bits, lanes) -> element bytes, for the dtypes ufa takes (python/src/lib.rs).
ACCEPTED = {(2, 16, 1): 2, (4, 16, 1): 2, (2, 32, 1): 4, (6, 8, 1): 1, (0, 32, 1): 4}
DTYPES = [(2, 32, 1), (2, 16, 1), (4, 16, 1)]  # the float dtypes attention computes in

# ---------------------------------------------------------------------------------------------
# Guarded memory
# ---------------------------------------------------------------------------------------------

PAGE = mmap.PAGESIZE
CAP = 1 << 20  # bytes a descriptor may span; larger legal ones are skipped
DIM_CAP = 64  # largest size of a dimension a legal descriptor may have
libc = ctypes.CDLL(None, use_errno=True)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


class Guarded:
    """`size` bytes that end where a PROT_NONE page begins."""

    def __init__(self, size: int, fill: bytes):
        self.size = size
        pages = (size + PAGE - 1) // PAGE + 1
        self.map = mmap.mmap(-1, pages * PAGE)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self.map))
        guard = base + (pages - 1) * PAGE
        if libc.mprotect(guard, PAGE, 0) != 0:
            raise OSError(ctypes.get_errno(), "mprotect")
        self.start = guard - size
        self.offset = self.start - base
        self.map[self.offset:self.offset + size] = (fill * (size // max(len(fill), 1) + 1))[:size]

    def snapshot(self) -> bytes:
        return self.map[self.offset:self.offset + self.size]


# ---------------------------------------------------------------------------------------------
# Producers
# ---------------------------------------------------------------------------------------------


class Producer:
    """An array that exports one fixed DLTensor through ``__dlpack__``."""

    def __init__(self, spec: dict, memory: Guarded | None):
        self.spec, self.memory = spec, memory
        nd = max(spec["ndim_given"], 0)
        self._shape = (ctypes.c_int64 * max(nd, 1))(*spec["shape"][:nd])
        self._strides = (ctypes.c_int64 * max(nd, 1))(*spec["strides"][:nd]) if spec["strides"] else None
        self._deleter = DELETER(lambda _p: None)
        self._keep = []
        self.shape = tuple(spec["shape"][:nd])

    def __dlpack_device__(self):
        return (self.spec["device"][0], self.spec["device"][1])

    def _tensor(self, t: DLTensor) -> None:
        s = self.spec
        t.data = s["data"]
        t.device = DLDevice(*s["device"])
        t.ndim = s["ndim_given"]
        t.dtype = DLDataType(*s["dtype"])
        t.shape = None if s["null_shape"] else ctypes.addressof(self._shape)
        t.strides = ctypes.addressof(self._strides) if self._strides is not None else None
        t.byte_offset = s["byte_offset"]

    def __dlpack__(self, stream=None, max_version=None, dl_device=None, copy=None):
        s = self.spec
        if s["versioned"] and max_version is not None:
            m = DLManagedVersioned()
            m.version = DLVersion(*s["version"])
            m.flags = s["flags"]
            m.deleter = self._deleter
            self._tensor(m.dl_tensor)
            self._keep.append(m)
            return capsule_new(ctypes.addressof(m), b"dltensor_versioned", None)
        m = DLManaged()
        m.deleter = self._deleter
        self._tensor(m.dl_tensor)
        self._keep.append(m)
        return capsule_new(ctypes.addressof(m), b"dltensor", None)


HOSTILE_INTS = [0, -1, 1, 2, 3, 7, 64, 1 << 20, 1 << 31, (1 << 31) - 1, 1 << 40, (1 << 62), (1 << 63) - 1,
                -(1 << 63), -(1 << 31)]


def hostile_int(fdp) -> int:
    if fdp.ConsumeBool():
        return HOSTILE_INTS[fdp.ConsumeIntInRange(0, len(HOSTILE_INTS) - 1)]
    return fdp.ConsumeIntInRange(-(1 << 63), (1 << 63) - 1)


def describe(fdp, shape: list, dtype: tuple, writable: bool) -> dict:
    """A descriptor of role shape `shape`, usually as wanted; sometimes hostile in one field."""
    spec = {"shape": list(shape), "ndim_given": len(shape), "dtype": dtype, "device": (1, 0),
            "strides": None, "byte_offset": 0, "null_shape": False, "null_data": False,
            "versioned": fdp.ConsumeBool(), "version": (1, fdp.ConsumeIntInRange(0, 3)),
            "flags": 0, "must_fail": False, "writable": writable}
    nd = len(shape)
    mode = fdp.ConsumeIntInRange(0, 15)
    if mode == 1:  # padded row-major strides
        acc, strides = 1, [0] * nd
        for i in range(nd - 1, -1, -1):
            strides[i] = acc
            acc = acc * max(shape[i], 1) + (0 if i == nd - 1 else fdp.ConsumeIntInRange(0, 3))
        spec["strides"] = strides
    elif mode == 2:  # permuted storage ([b, h, s, d] viewed as [b, s, h, d])
        if nd == 4:
            b, s, h, d = shape
            spec["strides"] = [h * s * d, d, s * d, 1]
    elif mode == 3:  # one hostile size
        spec["shape"][fdp.ConsumeIntInRange(0, nd - 1)] = hostile_int(fdp)
    elif mode == 4:  # one hostile stride
        spec["strides"] = [1] * nd
        spec["strides"][fdp.ConsumeIntInRange(0, nd - 1)] = hostile_int(fdp)
    elif mode == 5:  # another ndim; the shape and stride arrays hold as many entries, as a
        # producer's must (a negative one gets none: it must be refused before any is read)
        spec["ndim_given"] = [0, -1, 1, 3, 5, 9, 64, -(1 << 31)][fdp.ConsumeIntInRange(0, 7)]
        spec["shape"] = (spec["shape"] + [2] * 64)[:max(spec["ndim_given"], 0)]
    elif mode == 6:  # another dtype
        spec["dtype"] = (fdp.ConsumeIntInRange(0, 255), fdp.ConsumeIntInRange(0, 255),
                         fdp.ConsumeIntInRange(0, 65535))
    elif mode == 7:  # another device
        spec["device"] = (fdp.ConsumeIntInRange(-2, 20), fdp.ConsumeIntInRange(-(1 << 31), (1 << 31) - 1))
    elif mode == 8:  # a byte offset into honest memory
        spec["byte_offset"] = fdp.ConsumeIntInRange(0, 64)
    elif mode == 9:  # NULL data or shape
        spec["null_data" if fdp.ConsumeBool() else "null_shape"] = True
    elif mode == 10:  # read-only or odd flags, odd versions
        spec["versioned"] = True
        spec["flags"] = fdp.ConsumeIntInRange(0, 7)
        spec["version"] = (fdp.ConsumeIntInRange(0, 3), fdp.ConsumeIntInRange(0, 1 << 32 - 1))
    elif mode == 11:  # small random sizes and strides
        spec["ndim_given"] = fdp.ConsumeIntInRange(1, 4)
        spec["shape"] = [fdp.ConsumeIntInRange(0, 6) for _ in range(spec["ndim_given"])]
        spec["strides"] = [fdp.ConsumeIntInRange(0, 40) for _ in range(spec["ndim_given"])]
    return spec


def judge_and_place(spec: dict, fill: bytes):
    """Decides whether the library may accept the descriptor, and gives it memory: the exact
    bytes it spans (legal ones) or a fresh page it must not touch. Returns None to skip."""
    nd = spec["ndim_given"]
    must_fail = False
    if nd < 1 or nd > 4 or spec["null_shape"]:
        must_fail = True
    shape = spec["shape"][:max(nd, 0)]
    elem = ACCEPTED.get(tuple(spec["dtype"]))
    if elem is None:
        must_fail = True
    if spec["device"][0] not in (1, 3):  # kDLCPU, kDLCUDAHost; CUDA is refused here (no GPU
        must_fail = True                 # is used by the fuzzer) or never read
    if spec["versioned"]:
        if spec["version"][0] != 1:
            must_fail = True
        if spec["writable"] and spec["flags"] & READ_ONLY:
            must_fail = True
    if not must_fail:
        if any(n < 0 for n in shape) or (spec["strides"] and any(s < 0 for s in spec["strides"][:nd])):
            must_fail = True
    span = 0
    if not must_fail:
        strides = spec["strides"]
        if strides is None:
            acc, strides = 1, [0] * nd
            for i in range(nd - 1, -1, -1):
                strides[i] = acc
                acc *= max(shape[i], 1)
        span = 0 if 0 in shape else sum((n - 1) * s for n, s in zip(shape, strides)) + 1
        if span * elem + spec["byte_offset"] > CAP:
            return None  # legal or not, too large to allocate honestly: skip
        if any(n > DIM_CAP for n in shape):
            return None  # legal, but (broadcast over stride 0) too much work for one execution
    spec["must_fail"] = must_fail
    nbytes = span * (elem or 1) + spec["byte_offset"]
    memory = Guarded(max(nbytes, 1), fill)
    spec["data"] = None if spec["null_data"] else memory.start + (memory.size - nbytes)
    if spec["null_data"] and span > 0:
        spec["must_fail"] = True
    return memory


# ---------------------------------------------------------------------------------------------
# The target
# ---------------------------------------------------------------------------------------------

native = None  # ufa._ufa, imported after atheris.Setup so that its counters register


class Finding(Exception):
    """What the fuzzer reports (an uncaught exception ends the run with the input saved)."""


def fail(what: str, detail: str = "") -> None:
    raise Finding(f"{what}: {detail}")


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    which = fdp.ConsumeIntInRange(0, 3)
    b, sq, skv = fdp.ConsumeIntInRange(0, 2), fdp.ConsumeIntInRange(0, 9), fdp.ConsumeIntInRange(0, 9)
    hkv = fdp.ConsumeIntInRange(1, 2)
    hq = hkv * fdp.ConsumeIntInRange(1, 2)
    d = [8, 16, 3, 32][fdp.ConsumeIntInRange(0, 3)]
    dtype = DTYPES[fdp.ConsumeIntInRange(0, 2)]
    fill = fdp.ConsumeBytes(4) or b"\x3c"
    kwargs = {}
    if which in (0, 1, 2):
        roles = [("q", [b, sq, hq, d], False), ("k", [b, skv, hkv, d], False),
                 ("v", [b, skv, hkv, d], False), ("out", [b, sq, hq, d], True)]
        if fdp.ConsumeBool():
            roles.append(("lse", [b, hq, sq], True))
        if which == 1:
            mdt = [(6, 8, 1), dtype][fdp.ConsumeIntInRange(0, 1)]
            roles.append(("mask", [b, hq, sq, skv][4 - fdp.ConsumeIntInRange(1, 4):], False))
        if which == 2:
            roles.append(("alibi_slopes", [hq], False))
    else:
        n = fdp.ConsumeIntInRange(1, 3)
        roles = [(f"outs{i}", [b, sq, hq, d], False) for i in range(n)]
        roles += [(f"lses{i}", [b, hq, sq], False) for i in range(n)]
        roles.append(("out", [b, sq, hq, d], True))
        if fdp.ConsumeBool():
            roles.append(("lse", [b, hq, sq], True))
    specs, mems, arrays = {}, {}, {}
    for name, shape, writable in roles:
        dt = dtype
        if name == "mask":
            dt = mdt
        elif name.startswith("lses") or name in ("alibi_slopes", "lse"):
            dt = (2, 32, 1)
        spec = describe(fdp, shape, dt, writable)
        mem = judge_and_place(spec, fill)
        if mem is None:
            return
        specs[name], mems[name] = spec, mem
        arrays[name] = Producer(spec, mem)
    before = {n: m.snapshot() for n, m in mems.items() if specs[n]["writable"]}
    must_fail = any(s["must_fail"] for s in specs.values())
    # The extension's entry points themselves: what every wrapper above them hands the arrays to.
    try:
        if which in (0, 1, 2):
            if which == 1:
                kwargs["mask"] = arrays["mask"]
            if which == 2:
                kwargs["alibi_slopes"] = arrays["alibi_slopes"]
            native.forward(arrays["q"], arrays["k"], arrays["v"], arrays["out"], arrays.get("lse"),
                           causal=fdp.ConsumeBool(), **kwargs)
        else:
            n = len([r for r in roles if r[0].startswith("outs")])
            native.merge_states([arrays[f"outs{i}"] for i in range(n)],
                                [arrays[f"lses{i}"] for i in range(n)], arrays["out"], arrays.get("lse"))
    except (TypeError, ValueError, NotImplementedError, RuntimeError, BufferError) as e:
        message = str(e)
        if not message:
            fail("an exception without a message", repr(e))
        for n, snap in before.items():
            if mems[n].snapshot() != snap:
                fail("a failed call wrote into its output", f"{n}: {message}")
        return
    if must_fail:
        fail("accepted a descriptor it must refuse",
             "; ".join(f"{n}={s}" for n, s in specs.items() if s["must_fail"]))


def main() -> None:
    global native
    # libFuzzer's -merge re-runs argv[0] as a command: scripts/fuzz names a wrapper that starts
    # this interpreter on this file with the same environment.
    argv = [os.environ.get("UFA_FUZZ_SELF", sys.argv[0])] + sys.argv[1:]
    atheris.Setup(argv, one_input)
    from ufa import _ufa

    native = _ufa
    atheris.Fuzz()


if __name__ == "__main__":
    main()
