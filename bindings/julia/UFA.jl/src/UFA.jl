"""
    UFA

ufa (Universal Flash Attention) for Julia: `@ccall`s into libufa's C API (ufa.h), reading and
writing Julia arrays in place.

Layout: ufa's tensors are row-major `[batch, seq, heads, head_dim]`; Julia arrays are
column-major, so a Julia array of size `(head_dim, heads, seq, batch)` is exactly that buffer.
Every dimension is reversed: shape and strides passed to ufa are `reverse(size(A))` and
`reverse(strides(A))`. Views (`view`, `PermutedDimsArray`) map to strides, without copies; the
first Julia dimension (head_dim) must be contiguous.

Failures throw [`UFAError`](@ref) with the library's status and message.

The library is `ENV["UFA_LIBRARY"]` (a name or path) when the package is loaded, else `"libufa"`
found through the system's search path (`LD_LIBRARY_PATH`).
"""
module UFA

export Context, UFAError, BF16, forward!, attention, version

const libufa = get(ENV, "UFA_LIBRARY", "libufa")

# The constants of ufa.h.
const STATUS_SUCCESS = Int32(0)
const STATUS_INVALID_ARGUMENT = Int32(1)
const STATUS_UNSUPPORTED = Int32(2)
const STATUS_DEVICE_UNAVAILABLE = Int32(3)
const STATUS_OUT_OF_MEMORY = Int32(4)
const STATUS_BACKEND_FAILURE = Int32(5)
const STATUS_INTERNAL = Int32(6)
const DTYPE_F16 = Int32(1)
const DTYPE_BF16 = Int32(2)
const DTYPE_F32 = Int32(3)
const DTYPE_BOOL = Int32(4)
const DEVICE_CPU = Int32(0)
const CAUSAL_TOP_LEFT = Int32(1)

# The structs of ufa.h, field for field (Julia lays out isbits structs as C does).
struct CTensor                 # ufa_tensor
    data::Ptr{Cvoid}
    dtype::Int32
    device_type::Int32
    device_ordinal::Int32
    ndim::Int32
    shape::Ptr{Int64}
    strides::Ptr{Int64}
    nbytes::UInt64             # the allocation's bytes, checked by the library; 0 = unknown
end

struct CContextOptions         # ufa_context_options
    struct_size::UInt32
    num_threads::UInt32
    device_ordinal::Int32
    cpu_isa::Ptr{Cchar}
end

struct CAttentionParams        # ufa_attention_params
    struct_size::UInt32
    causal::Int32
    softmax_scale::Float32
    softcap::Float32
    causal_alignment::Int32
    deterministic::Int32
    window_left::Int64
    window_right::Int64
    alibi_slopes::Ptr{CTensor}
    mask::Ptr{CTensor}
    lse::Ptr{CTensor}
    fp32_precision::Int32
    dropout_seed::UInt64
    dropout_offset::UInt64
    dropout_p::Float32
end

"""
    UFAError(status, message)

A failed ufa call: `status` is the `ufa_status` code (1 = invalid argument, ...), `message` the
library's `ufa_last_error_message()`.
"""
struct UFAError <: Exception
    status::Int32
    message::String
end

Base.showerror(io::IO, e::UFAError) = print(io, "UFAError (status ", e.status, "): ", e.message)

# Throws the library's error unless `status` is success. Called right after the failing call, with
# no yield point in between, so the thread-local message is that call's.
function check(status::Int32)
    status == STATUS_SUCCESS && return nothing
    throw(UFAError(status, unsafe_string(@ccall libufa.ufa_last_error_message()::Cstring)))
end

"""The loaded library's version, "major.minor.patch"."""
version() = unsafe_string(@ccall libufa.ufa_version()::Cstring)

"""
    BF16

A bfloat16 value (its 16 bits). `BF16(x)` rounds to nearest (ties to even); `Float32(b)` and
`Float64(b)` convert back exactly.
"""
primitive type BF16 16 end

function BF16(x::Float32)
    bits = reinterpret(UInt32, x)
    isnan(x) && return reinterpret(BF16, UInt16(bits >> 16) | 0x0040)
    bits += 0x00007fff + ((bits >> 16) & 0x00000001)
    return reinterpret(BF16, UInt16(bits >> 16))
end
BF16(x::Real) = BF16(Float32(x))
Base.Float32(x::BF16) = reinterpret(Float32, UInt32(reinterpret(UInt16, x)) << 16)
Base.Float64(x::BF16) = Float64(Float32(x))

dtype_of(::Type{Float32}) = DTYPE_F32
dtype_of(::Type{Float16}) = DTYPE_F16
dtype_of(::Type{BF16}) = DTYPE_BF16
dtype_of(::Type{Bool}) = DTYPE_BOOL
dtype_of(::Type{T}) where {T} = throw(ArgumentError("ufa tensors hold Float32, Float16, UFA.BF16 or Bool, not $T"))

"""
    Context(; num_threads = 0, cpu_isa = nothing)

The library's thread pool and kernel caches (`ufa_context`); safe to share between tasks. Freed by
`close(ctx)` or the garbage collector. `num_threads = 0` means `ENV["UFA_NUM_THREADS"]` if set,
else every core; `cpu_isa` names a CPU kernel family ("avx2", ...), `nothing` the best available.
"""
mutable struct Context
    ptr::Ptr{Cvoid}

    function Context(; num_threads::Integer = 0, cpu_isa::Union{Nothing,AbstractString} = nothing)
        defaults = @ccall libufa.ufa_context_options_default()::CContextOptions
        isa = cpu_isa === nothing ? nothing : String(cpu_isa)
        out = Ref{Ptr{Cvoid}}(C_NULL)
        status = GC.@preserve isa begin
            options = Ref(CContextOptions(defaults.struct_size, UInt32(num_threads), defaults.device_ordinal,
                                          isa === nothing ? Ptr{Cchar}(C_NULL) : Ptr{Cchar}(pointer(isa))))
            @ccall libufa.ufa_context_create(options::Ref{CContextOptions}, out::Ref{Ptr{Cvoid}})::Int32
        end
        check(status)
        return finalizer(close, new(out[]))
    end
end

function Base.close(ctx::Context)
    ctx.ptr == C_NULL && return nothing
    @ccall libufa.ufa_context_destroy(ctx.ptr::Ptr{Cvoid})::Cvoid
    ctx.ptr = C_NULL
    return nothing
end

"""Number of CPU threads `ctx` computes with."""
function num_threads(ctx::Context)
    n = Ref{UInt32}(0)
    check(@ccall libufa.ufa_context_num_threads(ctx.ptr::Ptr{Cvoid}, n::Ref{UInt32})::Int32)
    return Int(n[])
end

"""Name of the CPU kernel family `ctx` uses."""
function cpu_isa(ctx::Context)
    name = Ref{Cstring}()
    check(@ccall libufa.ufa_context_cpu_isa(ctx.ptr::Ptr{Cvoid}, name::Ref{Cstring})::Int32)
    return unsafe_string(name[])
end

"""
    layout(A) -> (shape, strides)

ufa's (row-major) shape and strides of the Julia array `A`: its dimensions reversed.
"""
function layout(A::AbstractArray)
    A isa StridedArray || (A isa PermutedDimsArray && parent(A) isa StridedArray) ||
        throw(ArgumentError("ufa reads arrays in place: pass an Array, a strided view or a PermutedDimsArray of one, not $(typeof(A))"))
    return Int64[reverse(size(A))...], Int64[reverse(strides(A))...]
end

"""
    forward!(ctx, out, q, k, v; causal=false, causal_top_left=false, softmax_scale=0,
             softcap=0, window=(-1, -1), alibi_slopes=nothing, mask=nothing, lse=nothing) -> out

Attention into `out`, in place. In Julia's (column-major) order q is `(head_dim, heads_q,
seqlen_q, batch)`, k and v `(head_dim, heads_kv, seqlen_kv, batch)`, out `(head_dim, heads_q,
seqlen_q, batch)`, `lse` (Float32) `(seqlen_q, heads_q, batch)`, a mask broadcastable to
`(seqlen_kv, seqlen_q, heads_q, batch)`. `softmax_scale = 0` means `1/sqrt(head_dim)`; `window`
is (left, right) with -1 unbounded. On failure nothing is written and a `UFAError` is thrown.
"""
function forward!(ctx::Context, out::AbstractArray, q::AbstractArray, k::AbstractArray, v::AbstractArray;
                  causal::Bool = false, causal_top_left::Bool = false, softmax_scale::Real = 0,
                  softcap::Real = 0, window::Tuple{Integer,Integer} = (-1, -1),
                  alibi_slopes::Union{Nothing,AbstractArray} = nothing,
                  mask::Union{Nothing,AbstractArray} = nothing, lse::Union{Nothing,AbstractArray} = nothing)
    arrays = (q, k, v, out, alibi_slopes, mask, lse)
    keep = Any[]                                   # what C reads during the call: arrays, shapes, strides
    descs = Vector{CTensor}(undef, length(arrays)) # the descriptors, at stable addresses
    ptrs = fill(Ptr{CTensor}(C_NULL), length(arrays))
    status = GC.@preserve keep descs begin
        for (i, A) in enumerate(arrays)
            A === nothing && continue
            shape, strd = layout(A)
            push!(keep, A, shape, strd)
            descs[i] = CTensor(Ptr{Cvoid}(pointer(A)), dtype_of(eltype(A)), DEVICE_CPU, Int32(0),
                               Int32(length(shape)), pointer(shape), pointer(strd),
                               UInt64(A isa Array ? sizeof(A) : 0))  # views: the parent's size is not theirs
            ptrs[i] = pointer(descs, i)
        end
        d = @ccall libufa.ufa_attention_params_default()::CAttentionParams
        params = Ref(CAttentionParams(d.struct_size, Int32(causal), Float32(softmax_scale), Float32(softcap),
                                      causal_top_left ? CAUSAL_TOP_LEFT : d.causal_alignment, d.deterministic,
                                      Int64(window[1]), Int64(window[2]), ptrs[5], ptrs[6], ptrs[7],
                                      d.fp32_precision, d.dropout_seed, d.dropout_offset, d.dropout_p))
        @ccall libufa.ufa_attention_forward(ctx.ptr::Ptr{Cvoid}, ptrs[1]::Ptr{CTensor}, ptrs[2]::Ptr{CTensor},
                                            ptrs[3]::Ptr{CTensor}, ptrs[4]::Ptr{CTensor},
                                            params::Ref{CAttentionParams}, C_NULL::Ptr{Cvoid})::Int32
    end
    check(status)
    return out
end

"""
    attention(ctx, q, k, v; kwargs...) -> out

As [`forward!`](@ref) into a new `Array` of size `(size(v, 1), size(q, 2), size(q, 3), size(q, 4))`.
"""
function attention(ctx::Context, q::AbstractArray{T,4}, k::AbstractArray, v::AbstractArray; kwargs...) where {T}
    out = Array{T}(undef, size(v, 1), size(q, 2), size(q, 3), size(q, 4))
    return forward!(ctx, out, q, k, v; kwargs...)
end

end # module
