// How the mma.sync kernels lay out a tile of 16-bit rows in shared memory, and the ldmatrix
// addresses of a lane in it. Two demands meet there:
//
// - ldmatrix: each phase reads one 16-byte chunk from each of 8 consecutive rows (the first a
//   multiple of 8); the 8 chunks must fall on distinct banks.
// - cp.async: each quarter warp of a copy writes 8 chunks, 128 bytes. Where they straddle two
//   128-byte lines of shared memory the copy unit splits them, and every piece is its own L2
//   request for sectors that another piece asks for too. Rows padded by 16 bytes (272 bytes at
//   head dim 128) made the decoding kernel's copies 10.5 L2 requests and 24 sectors each
//   instead of 4 and 16; rows 128-byte aligned brought it to 4 and 16 (ncu, H100, batch 32,
//   8k keys, 8 KV heads, d128; bench/results/decode_copy_2026-12-06_h100.md).
//
// PaddedRows: rows PITCH elements apart, an odd number of 16-byte chunks (head dim + 8 for a
// head dim a multiple of 16), so 8 rows' same chunk lie on 8 distinct bank groups; a row's
// chunks stay in place. Any row length.
// SwizzledRows: rows exactly D elements (128-byte multiples, or 32/64-byte rows that pack a line),
// and chunk c of row r stored at chunk c ^ sw(r), sw permuting the chunks of each 128-byte line
// so that the same chunk of 8 consecutive rows lands on 8 bank groups. A copy's quarter warp
// (8 consecutive chunks from a multiple of 8) then fills exactly one line.
//
// Both give `offset(r, c)`, the byte offset of chunk c of row r; `step(offset(a, c), b)`, that of
// chunk c of row a + b where b is a multiple of a power of two above a (so a + b = a | b, and a
// compile-time b makes it an XOR and an add of constants); and a Lane: an ldmatrix lane's row r
// and chunk offset h (0 or 1), whose `at(c)` is the shared address of chunk c + h for an even c,
// in that row or in one a multiple of 8 rows further (add kRowBytes times the rows).
#pragma once
#include "common.cuh"

template <int PITCH>
struct PaddedRows {
    static_assert(PITCH % 8 == 0 && PITCH / 8 % 2 == 1, "rows an odd number of chunks apart");
    static constexpr int kPitch = PITCH;  // elements
    static constexpr uint32_t kRowBytes = PITCH * 2;
    __device__ __forceinline__ static uint32_t offset(int r, int c) {
        return r * kRowBytes + c * 16;
    }
    __device__ __forceinline__ static uint32_t step(uint32_t off, int b) {
        return off + b * kRowBytes;
    }
    struct Lane {
        uint32_t addr;  // row r, chunk h
        __device__ __forceinline__ uint32_t at(int c) const { return addr + c * 16; }
    };
    __device__ __forceinline__ static Lane lane(uint32_t base, int r, int h) {
        return Lane{base + offset(r, h)};
    }
};

template <int D>
struct SwizzledRows {
    static constexpr int kChunks = D / 8;  // 16-byte chunks of a row
    static_assert(kChunks % 8 == 0 || 8 % kChunks == 0, "rows pack 128-byte lines");
    static constexpr int kPitch = D;
    static constexpr uint32_t kRowBytes = D * 2;
    // Rows of one 128-byte line, and the chunks one XOR permutes.
    static constexpr int kLineRows = kChunks >= 8 ? 1 : 8 / kChunks;
    static constexpr int kMask = (kChunks >= 8 ? 8 : kChunks) - 1;
    // sw(r) depends on r mod 8 only (8 rows are 8 lines, or 8 / kLineRows lines of kLineRows).
    __device__ __forceinline__ static int sw(int r) { return (r / kLineRows) & kMask; }
    __device__ __forceinline__ static uint32_t offset(int r, int c) {
        return r * kRowBytes + (c ^ sw(r)) * 16;
    }
    // sw(a | b) = sw(a) ^ sw(b) for disjoint bits, and offset(a, c)'s bits that hold the
    // permuted chunk (4-6 for whole lines, 4-5 or 4 for rows of 64 or 32 bytes) are clear in
    // its row part.
    __device__ __forceinline__ static uint32_t step(uint32_t off, int b) {
        return (off ^ (uint32_t)(sw(b) * 16)) + b * kRowBytes;
    }
    struct Lane {
        uint32_t row;  // the row's first byte
        uint32_t x16;  // (h ^ sw(r)) * 16: below 128, so the XOR stays within a line
        // c even and h <= 1, so c + h = c ^ h.
        __device__ __forceinline__ uint32_t at(int c) const { return row + ((c * 16) ^ x16); }
    };
    __device__ __forceinline__ static Lane lane(uint32_t base, int r, int h) {
        return Lane{base + r * kRowBytes, (uint32_t)((h ^ sw(r)) * 16)};
    }
};

// The layout of rows of head dim D stored PITCH elements apart (the host's choice): swizzled
// where rows are not padded.
template <int D, int PITCH, bool SWIZZLED = PITCH == D>
struct RowsFor {
    using type = PaddedRows<PITCH>;
};
template <int D, int PITCH>
struct RowsFor<D, PITCH, true> {
    using type = SwizzledRows<D>;
};
