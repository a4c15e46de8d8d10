# UFA.jl against a Float64 reference: the column-major layout mapping, every dtype, GQA with causal
# masking, views (strides), the log-sum-exp, and bad input throwing the library's message.
using Test
using Random
using UFA

const seed = rand(UInt32)
println("seed ", seed)
Random.seed!(seed)

# Attention in Float64, in Julia's order: q[d, h, i, b], k and v [d, hk, j, b], out[d, h, i, b].
function reference(q, k, v; causal = false)
    D, HQ, SQ, B = size(q)
    _, HK, SK, _ = size(k)
    out = zeros(Float64, size(v, 1), HQ, SQ, B)
    for b in 1:B, h in 1:HQ, i in 1:SQ
        kh = (h - 1) ÷ (HQ ÷ HK) + 1
        visible = causal ? (1:min(SK, i + SK - SQ)) : (1:SK)
        isempty(visible) && continue
        s = [sum(Float64(q[x, h, i, b]) * Float64(k[x, kh, j, b]) for x in 1:D) / sqrt(D) for j in visible]
        p = exp.(s .- maximum(s))
        p ./= sum(p)
        for x in 1:size(v, 1)
            out[x, h, i, b] = sum(p[n] * Float64(v[x, kh, j, b]) for (n, j) in enumerate(visible))
        end
    end
    return out
end

relerr(got, ref) = sqrt(sum(abs2, Float64.(got) .- ref) / sum(abs2, ref))
tolerance(T) = T == Float32 ? 1e-5 : 1e-2
randn_as(T, dims...) = T.(randn(Float32, dims...))

const ctx = Context(num_threads = 2)

@testset "UFA.jl" begin
    @testset "layout: a (head_dim, heads, seq, batch) array is the row-major [batch, seq, heads, head_dim] buffer" begin
        D, H, S, B = 3, 4, 5, 2
        A = zeros(Float32, D, H, S, B)
        @test UFA.layout(A) == ([B, S, H, D], [S * H * D, H * D, D, 1])
        for b in 1:B, s in 1:S, h in 1:H, d in 1:D
            @test LinearIndices(A)[d, h, s, b] - 1 == (((b - 1) * S + (s - 1)) * H + (h - 1)) * D + (d - 1)
        end
        P = zeros(Float32, D + 2, H, S, B)
        @test UFA.layout(view(P, 1:D, :, :, :)) == ([B, S, H, D], [S * H * (D + 2), H * (D + 2), D + 2, 1])
    end

    @testset "$T matches the Float64 reference" for T in (Float32, Float16, BF16)
        q, k, v = randn_as(T, 32, 2, 17, 2), randn_as(T, 32, 2, 9, 2), randn_as(T, 32, 2, 9, 2)
        out = fill(T(NaN), 32, 2, 17, 2)
        forward!(ctx, out, q, k, v)
        @test !any(isnan ∘ Float32, out)
        @test relerr(out, reference(q, k, v)) < tolerance(T)
    end

    @testset "GQA (8 query heads on 2 KV heads) with causal masking, $T" for T in (Float32, Float16, BF16)
        q, k, v = randn_as(T, 32, 8, 7, 1), randn_as(T, 32, 2, 19, 1), randn_as(T, 32, 2, 19, 1)
        out = attention(ctx, q, k, v; causal = true)
        @test relerr(out, reference(q, k, v; causal = true)) < tolerance(T)
    end

    @testset "views map to strides, $T" for T in (Float32, BF16)
        # head_dim padded from 48 to 51 in the parent, every other batch of 4
        Q = randn_as(T, 51, 4, 13, 4)
        K = randn_as(T, 53, 2, 21, 4)
        V = randn_as(T, 53, 2, 21, 4)
        q, k, v = view(Q, 1:48, :, :, 1:2:4), view(K, 1:48, :, :, 1:2:4), view(V, 1:48, :, :, 1:2:4)
        O = fill(T(NaN), 50, 4, 13, 2)
        out = view(O, 2:49, :, :, :)
        forward!(ctx, out, q, k, v; causal = true)
        @test relerr(out, reference(q, k, v; causal = true)) < tolerance(T)
        @test all(isnan ∘ Float32, O[1, :, :, :]) && all(isnan ∘ Float32, O[50, :, :, :])  # outside the view: untouched
        # A [batch, heads, seq, dim] buffer (PyTorch's layout) is a (dim, seq, heads, batch) array;
        # PermutedDimsArray presents it as (dim, heads, seq, batch) without a copy.
        qh = randn_as(T, 48, 13, 4, 2)
        out2 = attention(ctx, PermutedDimsArray(qh, (1, 3, 2, 4)), copy(k), copy(v))
        @test relerr(out2, reference(permutedims(qh, (1, 3, 2, 4)), k, v)) < tolerance(T)
    end

    @testset "a Bool mask spelling out causal masking, and a (-1, 0) window, give the causal result" begin
        q, k, v = randn(Float32, 16, 2, 5, 1), randn(Float32, 16, 2, 9, 1), randn(Float32, 16, 2, 9, 1)
        mask = [j <= i + 9 - 5 for j in 1:9, i in 1:5]    # (seqlen_kv, seqlen_q, 1, 1): broadcast over heads, batch
        causal = attention(ctx, q, k, v; causal = true)
        @test attention(ctx, q, k, v; mask = reshape(mask, 9, 5, 1, 1)) ≈ causal atol = 1e-6
        @test attention(ctx, q, k, v; window = (-1, 0)) ≈ causal atol = 1e-6
    end

    @testset "log-sum-exp" begin
        q = Float32[1 0; 0 1]            # (head_dim=2, seq=2): queries e1, e2
        q = reshape(q, 2, 1, 2, 1)
        k = copy(q)
        v = reshape(Float32[1 3; 2 4], 2, 1, 2, 1)
        lse = zeros(Float32, 2, 1, 1)     # (seqlen_q, heads_q, batch)
        forward!(ctx, similar(q), q, k, v; softmax_scale = 1, lse = lse)
        @test all(abs.(lse .- log(exp(1) + 1)) .< 1e-5)
    end

    @testset "bad input throws the library's message, nothing written" begin
        q, kv = rand(Float32, 32, 8, 4, 1), rand(Float32, 32, 3, 4, 1)
        out = fill(42.0f0, 32, 8, 4, 1)
        err = try
            forward!(ctx, out, q, kv, kv)
            nothing
        catch e
            e
        end
        @test err isa UFAError
        @test err.status == UFA.STATUS_INVALID_ARGUMENT
        @test occursin("k.shape[2]=3", err.message) && occursin("q.shape[2]=8", err.message)
        @test all(==(42.0f0), out)
        println("message: ", err.message)
        # A first (head_dim) dimension that is not contiguous
        kv8 = rand(Float32, 16, 8, 4, 1)
        e2 = try
            forward!(ctx, zeros(Float32, 16, 8, 4, 1), view(q, 1:2:32, :, :, :), kv8, kv8)
        catch e
            e
        end
        @test e2 isa UFAError && occursin("contiguous", e2.message)
        @test_throws ArgumentError forward!(ctx, zeros(Float64, 4, 1, 1, 1), zeros(Float64, 4, 1, 1, 1),
                                            zeros(Float64, 4, 1, 1, 1), zeros(Float64, 4, 1, 1, 1))
    end

    @testset "context and BF16" begin
        @test UFA.num_threads(ctx) == 2
        @test !isempty(UFA.cpu_isa(ctx))
        @test !isempty(version())
        @test_throws UFAError Context(cpu_isa = "no-such-isa")
        @test reinterpret(UInt16, BF16(1.0f0)) == 0x3f80
        @test reinterpret(UInt16, BF16(1.00390625f0)) == 0x3f80   # tie: to even
        @test reinterpret(UInt16, BF16(1.01171875f0)) == 0x3f82   # tie: to even
        @test Float32(BF16(-2.5)) == -2.5f0
    end
end
