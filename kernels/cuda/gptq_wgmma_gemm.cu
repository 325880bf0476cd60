// gemmtune: Hopper GPTQ GEMM on wgmma (sm_90a)  C[M,N] = A[M,K] @ dequant(W)[K,N].
//
// Why a third kernel: mma.sync (the tiled kernel, gptq_tiled_gemm.cu) tops out near 300 TFLOP/s
// on an H100/H200; only the warpgroup-wide asynchronous MMA (`wgmma.mma_async`, sm_90a) reaches
// the chip's tensor rate. Same orientation as the other families: C^T = W^T A^T, so the
// dequantised weight is the 64-row operand of `wgmma.m64nNk16` and comes from REGISTERS (it is
// produced by arithmetic, never stored), the activations are the N side (the token tile, read by
// the tensor cores from shared memory through a matrix descriptor), fp32 accumulators.
//
// One weight layout (weights.py, shared with the decode and tiled kernels): for a 32-column block
// and a K step of 4 packed word rows, lane 4g+t of a warp reads 16 bytes = word row t of columns
// 4g..4g+3. A warpgroup covers 4 such blocks (128 columns) as two m64 tiles, and warp w of it takes
// block w whole, so each thread's one 16-byte read per step is its complete wgmma A fragment for
// both m64 tiles, for every k16 instruction of the step:
//   columns: fragment row g    of tile mt <-> column 4g + 2mt     of the warp's block,
//            fragment row g+8  of tile mt <-> column 4g + 2mt + 1  (relabelling output columns is
//            free: the epilogue writes C);
//   K:       fragment k slots {2t, 2t+1 | 2t+8, 2t+9} of instruction j hold the pairs the LOP3
//            trick yields from word row t: nibbles (P, P+4) of the word, P = 2j (+1 for the high
//            slots) -- bytes (P, P+2) at 8-bit. Lane t owns 8 consecutive K of the step, but the
//            fragment wants pairs of K 8 apart, so the K order the instruction sees is a fixed
//            permutation of the step's: position 8c + u of a step holds activation k = CH*u + c
//            (CH = step / 8 chunks: 4 at 4-bit, 2 at 8-bit). The tensor cores read B in any K order
//            we store it in, so the activations are permuted while they are staged (one PRMT per
//            stored word, the tiled kernel's byte_perm), not the weights: no second weight layout.
// Activations travel global -> registers -> shared (one 16-byte load per chunk, 4 PRMT, 4 (4-bit)
// or 2 (8-bit) stores), issued a stage ahead so the load latency hides behind a stage of MMAs;
// cp.async cannot permute 2-byte elements. The weights and the (scale, zero) rows stream through a
// STAGES-deep cp.async ring exactly as in the tiled kernel.
//
// Shared-memory B layout: K-major, no swizzle ("interleave"): chunk column q (8 K positions) of a
// stage is TILE_M rows x 16 bytes, rows contiguous, so an 8x16-byte core matrix is 128 contiguous
// bytes (stride byte offset 128 between 8-row groups, leading byte offset TILE_M*16 between the two
// K halves of an instruction). The staging stores of a warp then hit 32 distinct banks.
//
// Template parameters (kernels/config.py lists the instances built, for compile time):
//   BITS    4 or 8: V = 32 / BITS K values per packed word, a step is 4 words of K (32 or 16), and
//           4-bit steps hold two k16 instructions, 8-bit steps one.
//   WGM     warpgroups along the token (M) side, each with its own TN tokens: two of them share
//           every staged weight (at the cost of dequantising it twice) when the token tile is
//           wider than one warpgroup's accumulators allow.
//   WGN     warpgroups along N, 128 columns each: two share every staged activation tile.
//   TN      tokens per warpgroup = the N of wgmma.m64nTNk16 (16..128): 2 x TN/2 fp32 accumulators
//           per thread (the two m64 tiles), so 128 is the widest that leaves registers for the rest.
//   KS      K steps per pipeline stage (tile_k = KS x step: 64 or 128): longer stages mean fewer
//           barriers, shorter ones less shared memory and fewer prefetch registers.
//   STAGES  pipeline depth: STAGES - 1 stages of weights in flight while one is computed, and
//           STAGES - 2 of staged activations from 3 stages up, which keeps one wgmma group in
//           flight across the stage barrier (1 and a drain at 2 stages; see the main loop).
//   SPLIT   gridDim.y > 1 K slices, reduced through the fp32 workspace by the last block of each
//           output tile, which leaves workspace and counter at zero (the tiled kernel's scheme: no
//           memset per call, graph-capturable).
// Act-order weights are stored sorted by group (weights.py); the dispatch gathers A's columns into
// that order, so this kernel always reads A contiguously.
// Grid: x = M tiles (fastest: blocks sharing a weight tile run together, all but the first read it
// from L2), y = K slices, z = N tiles. Block: 128 x WGM x WGN threads. Dynamic shared memory:
// STAGES x stage bytes.
#include "common.cuh"

#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "gptq_wgmma_gemm.cu needs sm_90a (wgmma.mma_async): build with --gpu-architecture=sm_90a"
#endif

namespace gemmtune {
namespace wg {

// Shared-memory matrix descriptor of a K-major, unswizzled operand (PTX ISA "matrix descriptor"):
// start address, leading byte offset (between the core matrices of the two K halves of a k16
// instruction) and stride byte offset (between 8-row groups), all in 16-byte units; layout 0.
__device__ __forceinline__ uint64_t desc_k_interleave(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (static_cast<uint64_t>(lbo >> 4) << 16) |
         (static_cast<uint64_t>(sbo >> 4) << 32);
}

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Orders this thread's register writes (A fragments, the zeroed accumulators) before the next
// wgmma of its warpgroup reads them.
__device__ __forceinline__ void fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
// Wait until at most N committed wgmma groups of this warpgroup are in flight.
template <int N>
__device__ __forceinline__ void wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" :: "n"(N) : "memory");
}
// Ordinary shared-memory stores that the tensor cores (the async proxy) read next.
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// Pins an accumulator after a wait, so no read of it is scheduled before the wgmma completes.
__device__ __forceinline__ void pin(float& x) { asm volatile("" : "+f"(x) :: "memory"); }

// D[64 x N] += A[64 x 16] (registers, the m16n8k16 A-fragment layout per warp) x B[16 x N]
// (shared memory, descriptor `b`), f16 inputs, f32 accumulators.
template <int N>
struct Mma;

template <>
struct Mma<16> {
  __device__ __forceinline__ static void run(float (&d)[8], const uint32_t (&a)[4], uint64_t b,
                                             int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %13, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n16k16.f32.f16.f16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7}, "
        "{%8, %9, %10, %11}, %12, p, 1, 1, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate));
  }
};

template <>
struct Mma<32> {
  __device__ __forceinline__ static void run(float (&d)[16], const uint32_t (&a)[4], uint64_t b,
                                             int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %21, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n32k16.f32.f16.f16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, "
        "{%16, %17, %18, %19}, %20, p, 1, 1, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate));
  }
};

template <>
struct Mma<64> {
  __device__ __forceinline__ static void run(float (&d)[32], const uint32_t (&a)[4], uint64_t b,
                                             int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
        "{%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate));
  }
};

template <>
struct Mma<128> {
  __device__ __forceinline__ static void run(float (&d)[64], const uint32_t (&a)[4], uint64_t b,
                                             int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "{%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate));
  }
};

}  // namespace wg

template <int BITS, int KS, int TILE_M, int TILE_N>
struct WgmmaStage {
  static constexpr int V = 32 / BITS;
  static constexpr int KSTEP = 4 * V;                  // K of one step (4 packed word rows)
  static constexpr int CH = KSTEP / 8;                 // 16-byte activation chunks per step and row
  static constexpr int TILE_K = KS * KSTEP;
  static constexpr int NB = TILE_N / 32;               // 32-column weight blocks
  static constexpr int W_BYTES = NB * KS * 512;
  static constexpr int A_BYTES = TILE_M * TILE_K * 2;
  static constexpr int SZ_BYTES = KS * TILE_N * 4;     // one (scale, zero) half2 per column and step
  static constexpr int BYTES = W_BYTES + A_BYTES + SZ_BYTES;
  static constexpr int A_ITEMS = TILE_M * KS * CH;     // 16-byte activation chunks per stage
  static constexpr int CPR = KS * CH;                  // chunks per row and stage
};

template <int BITS, int WGM, int WGN, int TN, int KS, int STAGES, bool SPLIT>
__global__ void __launch_bounds__(128 * WGM * WGN, 1)
gptq_wgmma_gemm(const half* __restrict__ a,           // [M, K], columns in stored-row order
                const uint32_t* __restrict__ qweight,  // tiled, see weights.py
                const half2* __restrict__ sz,          // [G, N]: (scale, 1024 + zero)
                half* __restrict__ c,                  // [M, N]
                float* __restrict__ ws,                // [M, N] fp32, all zero between calls (SPLIT)
                int* __restrict__ counters,            // [gridDim.x * gridDim.z], zero between calls
                int M, int K, int N, int group_shift) {
  static_assert(BITS == 4 || BITS == 8, "wgmma kernel handles 4- and 8-bit weights");
  static_assert(TN == 16 || TN == 32 || TN == 64 || TN == 128, "token tile: a built wgmma N");
  static_assert(STAGES >= 2, "one stage computed while the next loads");
  constexpr int THREADS = 128 * WGM * WGN;
  constexpr int TILE_M = WGM * TN;
  constexpr int TILE_N = WGN * 128;
  using S = WgmmaStage<BITS, KS, TILE_M, TILE_N>;
  constexpr int KSTEP = S::KSTEP;
  constexpr int CH = S::CH;
  constexpr int INSTR = KSTEP / 16;  // k16 instructions per step
  static_assert(S::CPR % 8 == 0, "staging maps a warp onto 4 rows x 8 chunks: tile_k % 64 == 0");
  constexpr int A_PER_THREAD = (S::A_ITEMS + THREADS - 1) / THREADS;

  extern __shared__ uint4 smem[];
  unsigned char* const smem_bytes = reinterpret_cast<unsigned char*>(smem);
  auto a_base = [&](int slot) -> unsigned char* { return smem_bytes + slot * S::BYTES; };
  auto w_base = [&](int slot) -> unsigned char* { return smem_bytes + slot * S::BYTES + S::A_BYTES; };
  auto sz_at = [&](int slot, int ks, int quad) -> uint4* {
    return reinterpret_cast<uint4*>(smem_bytes + slot * S::BYTES + S::A_BYTES + S::W_BYTES) +
           ks * (TILE_N / 4) + quad;
  };

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int wgi = warp >> 2;       // warpgroup
  const int wq = warp & 3;         // warp within its warpgroup
  const int wm = wgi % WGM;
  const int wn = wgi / WGM;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int m0 = blockIdx.x * TILE_M;
  const int n0 = blockIdx.z * TILE_N;

  const int total_steps = K / KSTEP;
  const int s_begin = (int)(((long long)total_steps * blockIdx.y) / gridDim.y);
  const int s_end = (int)(((long long)total_steps * (blockIdx.y + 1)) / gridDim.y);
  const int n_stages = (s_end - s_begin + KS - 1) / KS;

  auto group_of = [&](const int step) { return (step * KSTEP) >> group_shift; };
  auto starts_group = [&](const int step) {
    return step == s_begin || group_of(step) != group_of(step - 1);
  };

  // Weights and (scale, zero) rows of one stage through cp.async (one commit group per stage,
  // empty ones too, so the wait count stays uniform). Past N or this slice's K: zero-filled.
  auto issue_w = [&](const int st) {
    const int slot = st % STAGES;
    const int s0 = s_begin + st * KS;
    const bool live = st < n_stages;
    for_share<S::NB * KS * 32, THREADS>(tid, [&](const int i) {
      const int nb = i / (KS * 32);
      const int ks = (i / 32) % KS;
      const int ln = i % 32;
      const int cb = blockIdx.z * S::NB + nb;
      const bool ok = live && cb * 32 < N && s0 + ks < s_end;
      copy16_async(reinterpret_cast<uint4*>(w_base(slot) + ((nb * KS + ks) * 32 + ln) * 16),
                   qweight + ((size_t)cb * total_steps + s0 + ks) * 128 + ln * 4, ok);
    });
    for_share<KS * TILE_N / 4, THREADS>(tid, [&](const int i) {
      const int ks = i / (TILE_N / 4);
      const int quad = i % (TILE_N / 4);
      const int col = n0 + 4 * quad;
      const int step = s0 + ks;
      // Only the row of a step that starts a group is read (into registers, kept until the next).
      const bool ok = live && col < N && step < s_end && starts_group(step);
      copy16_async<true>(sz_at(slot, ks, quad), sz + (size_t)group_of(step) * N + col, ok);
    });
    copy_async_commit();
  };

  // Activation chunk i of a stage: a warp covers 4 rows x 8 consecutive chunks (128 contiguous
  // bytes of each row). Returns false for chunks past M or this slice's K (staged as zeros, so
  // whatever the weights there dequantise to adds nothing).
  auto a_item = [&](const int i, int& row, int& ks, int& x) {
    const int q = (i % 8) + 8 * (i / (8 * TILE_M));
    row = (i / 8) % TILE_M;
    ks = q / CH;
    x = q % CH;
  };
  auto load_a = [&](const int st, uint4 (&r)[A_PER_THREAD]) {
    const bool live = st < n_stages;
    const int s0 = s_begin + st * KS;
#pragma unroll
    for (int it = 0; it < A_PER_THREAD; ++it) {
      const int i = tid + it * THREADS;
      int row, ks, x;
      a_item(i, row, ks, x);
      const bool ok = (S::A_ITEMS % THREADS == 0 || i < S::A_ITEMS) && live && m0 + row < M &&
                      s0 + ks < s_end;
      r[it] = ok ? load_ro(reinterpret_cast<const uint4*>(a + (size_t)(m0 + row) * K +
                                                          (size_t)(s0 + ks) * KSTEP + 8 * x))
                 : make_uint4(0u, 0u, 0u, 0u);
    }
  };
  // Chunk x of a step (activations k = 8x..8x+7 of it) -> the words it owns of each permuted
  // chunk c: position 8c + u holds k = CH*u + c, so word v = x*(4/CH) + i of chunk c is the pair
  // (c + 2CH*i, c + 2CH*i + CH) of this chunk's elements.
  auto store_a = [&](const int st, const uint4 (&r)[A_PER_THREAD]) {
    unsigned char* const base = a_base(st % STAGES);
#pragma unroll
    for (int it = 0; it < A_PER_THREAD; ++it) {
      const int i = tid + it * THREADS;
      if (S::A_ITEMS % THREADS != 0 && i >= S::A_ITEMS) continue;
      int row, ks, x;
      a_item(i, row, ks, x);
      const uint32_t e[4] = {r[it].x, r[it].y, r[it].z, r[it].w};
#pragma unroll
      for (int cc = 0; cc < CH; ++cc) {
        unsigned char* const dst = base + ((ks * CH + cc) * TILE_M + row) * 16;
        const uint32_t sel = (cc % 2) ? 0x7632u : 0x5410u;
        if constexpr (CH == 4) {
          *reinterpret_cast<uint32_t*>(dst + 4 * x) = __byte_perm(e[cc / 2], e[2 + cc / 2], sel);
        } else {
          *reinterpret_cast<uint2*>(dst + 8 * x) =
              make_uint2(__byte_perm(e[0], e[1], sel), __byte_perm(e[2], e[3], sel));
        }
      }
    }
  };

  // Not zeroed: the block's first MMA overwrites (scale-d = 0). Constant zeros here would make
  // ptxas serialise every wgmma (C7515: non-wgmma definitions of accumulator registers).
  float acc[2][TN / 2];

  // This thread's 4 columns: scale, 1024 + zero and -(64 + zero) (4-bit odd pairs) as half2,
  // refreshed when a group starts.
  half2 s2[4], z2[4], nz2[4];
  auto new_group = [&](const int slot, const int ks) {
    const uint4 v = *sz_at(slot, ks, wn * 32 + wq * 8 + g);
    const uint32_t u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int cc = 0; cc < 4; ++cc) {
      const half2 h = u32_as_h2(u[cc]);
      s2[cc] = __low2half2(h);
      z2[cc] = __high2half2(h);
      nz2[cc] = __hsub2(__float2half2_rn(960.f), z2[cc]);
    }
  };
  // Pair p of a packed word as (q - zero) * scale in a half2 (common.cuh `minus_zero`).
  auto dequant = [&](const uint32_t w, const uint32_t w8, const int p, const int cc) -> uint32_t {
    half2 d = minus_zero<BITS>(w, w8, p, z2[cc], nz2[cc]);
    return h2_as_u32(__hmul2(d, s2[cc]));
  };

  // Consumer: one stage. Per step, one 16-byte shared read of the weights gives this thread its
  // fragments of both m64 tiles for every k16 instruction of the step; each instruction is one
  // wgmma group (fence, two MMAs, commit), and waiting for all but the newest keeps the
  // dequantisation of the next instruction overlapped with the tensor cores.
  auto compute = [&](const int st) {
    const int slot = st % STAGES;
    const uint32_t a_addr = wg::smem_u32(a_base(slot)) + wm * TN * 16;
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
      if (starts_group(s_begin + st * KS + ks)) new_group(slot, ks);  // block-uniform
      const uint4 wv = *reinterpret_cast<const uint4*>(
          w_base(slot) + (((wn * 4 + wq) * KS + ks) * 32 + lane) * 16);
      const uint32_t w4[4] = {wv.x, wv.y, wv.z, wv.w};
      uint32_t w8[4];
#pragma unroll
      for (int cc = 0; cc < 4; ++cc) w8[cc] = w4[cc] >> 8;
#pragma unroll
      for (int j = 0; j < INSTR; ++j) {
        // a[2h + rh]: slot half h (k 2t.. or 2t+8..) of fragment row g (rh 0) or g + 8 (rh 1);
        // row g + 8 rh of tile mt is column 4g + 2mt + rh, slot half h is pair 2j + h (4-bit) / h.
        uint32_t fr[2][4];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
          for (int h = 0; h < 2; ++h)
#pragma unroll
            for (int rh = 0; rh < 2; ++rh) {
              const int cc = 2 * mt + rh;
              fr[mt][2 * h + rh] = dequant(w4[cc], w8[cc], BITS == 4 ? 2 * j + h : h, cc);
            }
        const int q0 = ks * CH + (BITS == 4 ? 2 * j : 0);  // first chunk column of the instruction
        const uint64_t desc = wg::desc_k_interleave(a_addr + q0 * TILE_M * 16, TILE_M * 16, 128);
        const int accumulate = st > 0 || ks > 0 || j > 0;
        wg::fence();
        wg::Mma<TN>::run(acc[0], fr[0], desc, accumulate);
        wg::Mma<TN>::run(acc[1], fr[1], desc, accumulate);
        wg::commit();
        wg::wait<1>();
      }
    }
  };

  // Pipeline: STAGES - 1 stages of weights issued ahead, AHEAD = STAGES - 2 of activations: those
  // of stage st + AHEAD are loaded into registers during stage st - 1 and stored (permuted) after
  // stage st's MMAs are issued, into slot (st - 2) % STAGES. One barrier per stage and no wgmma
  // drain before it: each warpgroup's newest group (stage st - 1's last, reading slot
  // (st - 1) % STAGES) stays in flight across it. Why that is safe:
  //  - MMAs read stored activations: a stage's were stored at least one stage earlier (or before
  //    the loop), each thread fenced the async proxy after its stores, and a barrier since then
  //    ordered every thread's stores before every warpgroup's MMAs.
  //  - stores into a slot MMAs read: slot (st - 2) % STAGES was last read by stage st - 2, whose
  //    groups each warpgroup retired at the first wait<1> of its stage st - 1, before this stage's
  //    barrier; the group still in flight reads slot (st - 1) % STAGES, which is not stored to
  //    until the next barrier.
  //  - cp.async refills slot (st - 1) % STAGES under that group: only its weights and (scale, zero)
  //    rows, which no wgmma reads (ld.shared, complete at the barrier).
  // With 2 stages slot (st - 2) % 2 is the one computed: AHEAD = 1 stores into slot (st - 1) % 2,
  // so every warpgroup drains its MMAs (wait<0>) before the barrier instead.
  constexpr int AHEAD = STAGES >= 3 ? STAGES - 2 : 1;
#pragma unroll
  for (int st = 0; st < STAGES - 1; ++st) issue_w(st);
  uint4 ar[A_PER_THREAD];
#pragma unroll 1
  for (int st = 0; st < AHEAD; ++st) {
    load_a(st, ar);
    store_a(st, ar);
  }
  load_a(AHEAD, ar);
  wg::fence_proxy_async();
#pragma unroll 1
  for (int st = 0; st < n_stages; ++st) {
    if constexpr (STAGES == 2) wg::wait<0>();
    copy_async_wait<STAGES - 2>();
    __syncthreads();
    issue_w(st + STAGES - 1);
    compute(st);
    store_a(st + AHEAD, ar);
    wg::fence_proxy_async();
    load_a(st + (AHEAD + 1), ar);
  }
  wg::wait<0>();
  copy_async_wait<0>();
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int i = 0; i < TN / 2; ++i) {
      wg::pin(acc[mt][i]);
      if (n_stages == 0) acc[mt][i] = 0.f;  // a K slice with no step (the dispatch never makes one)
    }

  // acc[mt][4j + 2rh + e] = C[token 8j + 2t + e][column 4g + 2mt + rh of block wn*4 + wq].
  const int col = n0 + (wn * 4 + wq) * 32 + 4 * g;
  if (col < N) {
#pragma unroll
    for (int j = 0; j < TN / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int m = m0 + wm * TN + 8 * j + 2 * t + e;
        if (m >= M) continue;
        const float v0 = acc[0][4 * j + e], v1 = acc[0][4 * j + 2 + e];
        const float v2 = acc[1][4 * j + e], v3 = acc[1][4 * j + 2 + e];
        if constexpr (SPLIT) {
          atomicAdd(reinterpret_cast<float4*>(ws + (size_t)m * N + col), make_float4(v0, v1, v2, v3));
        } else {
          const half2 h01 = __floats2half2_rn(v0, v1);
          const half2 h23 = __floats2half2_rn(v2, v3);
          *reinterpret_cast<uint2*>(c + (size_t)m * N + col) = make_uint2(h2_as_u32(h01), h2_as_u32(h23));
        }
      }
    }
  }

  if constexpr (SPLIT) split_k_fixup<TILE_M, TILE_N, THREADS>(ws, counters, c, m0, n0, M, N, tid);
}

}  // namespace gemmtune
