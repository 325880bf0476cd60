// gemmtune: helpers shared by the GPTQ kernels.
//
// Portability: the only inline PTX is the tensor-core MMA, and it has a plain C++ fallback
// (warp shuffles + fp32 FMA) selected on non-NVIDIA or pre-sm_80 targets, or when
// GEMMTUNE_PORTABLE_MMA is defined, so HIP builds of CuPy stay possible.
#pragma once

#include <cuda_fp16.h>

#if defined(__CUDACC_RTC__)
// NVRTC ships no C++ standard headers.
typedef unsigned int uint32_t;
typedef unsigned long long uint64_t;
#else
#include <cstdint>
#endif

namespace gemmtune {

// Streaming load for data read exactly once (the packed weights): evict-first.
template <typename T>
__device__ __forceinline__ T load_stream(const T* p) {
#if defined(__HIPCC__)
  return *p;
#else
  return __ldcs(p);
#endif
}

// Read-only cached load (activations, scales: re-read by many warps).
template <typename T>
__device__ __forceinline__ T load_ro(const T* p) {
#if defined(__HIPCC__)
  return *p;
#else
  return __ldg(p);
#endif
}

// Load that bypasses L1: reads values other blocks produced with atomics (which live in L2).
__device__ __forceinline__ float load_l2(const float* p) {
#if defined(__HIPCC__)
  return __atomic_load_n(p, __ATOMIC_RELAXED);
#else
  return __ldcg(p);
#endif
}

__device__ __forceinline__ uint32_t shfl(uint32_t v, int lane) {
#if defined(__HIPCC__)
  return __shfl(v, lane);
#else
  return __shfl_sync(0xffffffffu, v, lane);
#endif
}

__device__ __forceinline__ uint32_t h2_as_u32(half2 h) {
  return *reinterpret_cast<uint32_t*>(&h);
}

__device__ __forceinline__ half2 u32_as_h2(uint32_t u) {
  return *reinterpret_cast<half2*>(&u);
}

// Two quantized values of one packed word as a half2 holding (1024 + q_lo, 1024 + q_hi):
// OR-ing the value into the mantissa of 1024.0 (0x6400) is exact for q < 1024.
// For BITS=4 `pair` i picks the nibbles i and i+4; for BITS=8 the bytes i and i+2.
template <int BITS>
__device__ __forceinline__ half2 unpack_pair(uint32_t word, int pair) {
  constexpr uint32_t mask = BITS == 4 ? 0x000F000Fu : 0x00FF00FFu;
  return u32_as_h2(((word >> (BITS * pair)) & mask) | 0x64006400u);
}

// 16-byte global -> shared copy that completes asynchronously (cp.async, sm_80+), so a thread
// can keep many loads in flight without holding registers for them. `valid == false` fills the
// destination with zeros and reads nothing. Elsewhere (HIP, older targets) it is a plain copy and
// the commit/wait calls are no-ops.
// CACHE_L1: allocate in L1 too (data other lanes or steps re-read), else L2 only (streams).
template <bool CACHE_L1 = false>
__device__ __forceinline__ void copy16_async(uint4* smem_dst, const void* gmem_src, bool valid) {
#if !defined(__HIPCC__) && defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800)
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  if constexpr (CACHE_L1) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 16, %2;\n"
                 :: "r"(dst), "l"(gmem_src), "r"(valid ? 16 : 0) : "memory");
  } else {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                 :: "r"(dst), "l"(gmem_src), "r"(valid ? 16 : 0) : "memory");
  }
#else
  *smem_dst = valid ? *reinterpret_cast<const uint4*>(gmem_src) : make_uint4(0u, 0u, 0u, 0u);
#endif
}

__device__ __forceinline__ void copy_async_commit() {
#if !defined(__HIPCC__) && defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800)
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Wait until at most N of this thread's committed copy groups are still in flight.
template <int N>
__device__ __forceinline__ void copy_async_wait() {
#if !defined(__HIPCC__) && defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800)
  asm volatile("cp.async.wait_group %0;\n" :: "n"(N) : "memory");
#endif
}

// body(i) for thread `tid`'s share of COUNT items (i = tid, tid + THREADS, ...), fully unrolled.
template <int COUNT, int THREADS, typename F>
__device__ __forceinline__ void for_share(const int tid, F&& body) {
#pragma unroll
  for (int it = 0; it < (COUNT + THREADS - 1) / THREADS; ++it) {
    const int i = tid + it * THREADS;
    if (COUNT % THREADS == 0 || i < COUNT) body(i);
  }
}

// Split-K fix-up of a TILE_M x TILE_N output tile (rows m0.., columns n0..), shared by the
// kernels whose K slices add fp32 partials into `ws`: the last of the tile's gridDim.y blocks to
// arrive converts the sums to C and leaves `ws` and the tile's counter at zero, so no memset
// precedes the next call (graph-capturable). Four columns at a time: N is a multiple of 4
// (qzeros pack 8 or 4 columns a word). Every thread of the block must call it.
template <int TILE_M, int TILE_N, int THREADS>
__device__ __forceinline__ void split_k_fixup(float* __restrict__ ws, int* __restrict__ counters,
                                              half* __restrict__ c, const int m0, const int n0,
                                              const int M, const int N, const int tid) {
  __shared__ int is_last;
  __threadfence();
  __syncthreads();
  const int tile = blockIdx.z * gridDim.x + blockIdx.x;
  if (tid == 0) is_last = atomicAdd(counters + tile, 1) == (int)gridDim.y - 1;
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  const int rows = min(TILE_M, M - m0);
  for (int i = tid; i < rows * (TILE_N / 4); i += THREADS) {
    const int r = i / (TILE_N / 4);
    const int n = n0 + 4 * (i % (TILE_N / 4));
    if (n >= N) continue;
    float4* p = reinterpret_cast<float4*>(ws + (size_t)(m0 + r) * N + n);
    const float4 v = __ldcg(p);
    const half2 h01 = __floats2half2_rn(v.x, v.y);
    const half2 h23 = __floats2half2_rn(v.z, v.w);
    *reinterpret_cast<uint2*>(c + (size_t)(m0 + r) * N + n) = make_uint2(h2_as_u32(h01), h2_as_u32(h23));
    *p = make_float4(0.f, 0.f, 0.f, 0.f);
  }
  if (tid == 0) counters[tile] = 0;
}

// (a & mask) | bits in one LOP3. Written as two C operators, ptxas emits two LOP3s here
// because one instruction cannot encode two immediates; the inline PTX makes it keep `bits` in
// a register instead (one instruction per dequantised pair in the kernels' inner loop).
template <uint32_t MASK, uint32_t BITS_OR>
__device__ __forceinline__ uint32_t and_or(uint32_t a) {
#if !defined(__HIPCC__) && defined(__CUDA_ARCH__)
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(r) : "r"(a), "n"(MASK), "r"(BITS_OR));
  return r;
#else
  return (a & MASK) | BITS_OR;
#endif
}

// Pair p of a lane's packed weight word as the exact integers (q - zero) in a half2, the one
// dequantisation every fused kernel uses: q is OR-ed into the mantissa of 1024 (0x6400) and
// z = 1024 + zero subtracted, exact in fp16. `w8` is the word shifted right by 8 (the pairs in
// the upper byte of each half). For 4 bits, odd pairs are masked in place (1024 + 16q) and
// brought back by x/16 + nz, nz = 960 - z = -(64 + zero), in one exact FMA, so a word
// costs one shift and four masks instead of a shift and mask per pair.
template <int BITS>
__device__ __forceinline__ half2 minus_zero(const uint32_t w, const uint32_t w8, const int p,
                                            const half2 z, const half2 nz) {
  if constexpr (BITS == 4) {
    const uint32_t src = p < 2 ? w : w8;
    if (p % 2 == 0) return __hsub2(u32_as_h2(and_or<0x000F000Fu, 0x64006400u>(src)), z);
    return __hfma2(u32_as_h2(and_or<0x00F000F0u, 0x64006400u>(src)), __float2half2_rn(0.0625f), nz);
  } else {
    const uint32_t src = p == 0 ? w : w8;
    return __hsub2(u32_as_h2(and_or<0x00FF00FFu, 0x64006400u>(src)), z);
  }
}

// D += A(16x16, row) * B(16x8, col), fp16 inputs, fp32 accumulators, in the register fragment
// layout of PTX mma.m16n8k16 (lane = 4*group + tig):
//   a[0]=(row g, k 2t..2t+1) a[1]=(row g+8, k 2t..) a[2]=(row g, k 2t+8..) a[3]=(row g+8, k 2t+8..)
//   b[0]=(k 2t..2t+1, col g) b[1]=(k 2t+8.., col g)
//   d[0..1]=(row g, col 2t..2t+1) d[2..3]=(row g+8, col 2t..2t+1)
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4],
                                          const uint32_t (&b)[2]) {
#if !defined(__HIPCC__) && defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800) && \
    !defined(GEMMTUNE_PORTABLE_MMA)
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  const int lane = threadIdx.x & 31;
  const int g = lane >> 2;
  const int t = lane & 3;
#pragma unroll
  for (int tq = 0; tq < 4; ++tq) {
    // A rows g and g+8, k pairs (2tq, 2tq+1) and (2tq+8, 2tq+9), held by lane 4g+tq.
    const int src_a = 4 * g + tq;
    const float2 a_lo0 = __half22float2(u32_as_h2(shfl(a[0], src_a)));
    const float2 a_hi0 = __half22float2(u32_as_h2(shfl(a[1], src_a)));
    const float2 a_lo1 = __half22float2(u32_as_h2(shfl(a[2], src_a)));
    const float2 a_hi1 = __half22float2(u32_as_h2(shfl(a[3], src_a)));
    // B columns 2t and 2t+1, same k pairs, held by lanes 4*(2t)+tq and 4*(2t+1)+tq.
    const int src_b0 = 4 * (2 * t) + tq;
    const int src_b1 = 4 * (2 * t + 1) + tq;
    const float2 b00 = __half22float2(u32_as_h2(shfl(b[0], src_b0)));
    const float2 b01 = __half22float2(u32_as_h2(shfl(b[1], src_b0)));
    const float2 b10 = __half22float2(u32_as_h2(shfl(b[0], src_b1)));
    const float2 b11 = __half22float2(u32_as_h2(shfl(b[1], src_b1)));
    d[0] += a_lo0.x * b00.x + a_lo0.y * b00.y + a_lo1.x * b01.x + a_lo1.y * b01.y;
    d[1] += a_lo0.x * b10.x + a_lo0.y * b10.y + a_lo1.x * b11.x + a_lo1.y * b11.y;
    d[2] += a_hi0.x * b00.x + a_hi0.y * b00.y + a_hi1.x * b01.x + a_hi1.y * b01.y;
    d[3] += a_hi0.x * b10.x + a_hi0.y * b10.y + a_hi1.x * b11.x + a_hi1.y * b11.y;
  }
#endif
}

}  // namespace gemmtune
