// gemmtune: Hopper GPTQ GEMM on wgmma (sm_90a)  C[M,N] = A[M,K] @ dequant(W)[K,N].
//
// Why a third kernel: mma.sync (the tiled kernel, gptq_tiled_gemm.cu) tops out near 300 TFLOP/s
// on an H100/H200; only the warpgroup-wide asynchronous MMA (`wgmma.mma_async`, sm_90a) reaches
// the chip's tensor rate. Same orientation as the other families: C^T = W^T A^T, so the
// dequantised weight is the 64-row operand of `wgmma.m64nNk16` and comes from REGISTERS (it is
// produced by arithmetic, never stored), the activations are the N side (the token tile, read by
// the tensor cores from shared memory through a matrix descriptor), fp32 accumulators.
//
// Roles (warp specialisation). A block is WGM x WGN *consumer* warpgroups and one *producer*
// warpgroup. The producer only copies: for each pipeline stage it waits until the stage's slot
// is empty, then fills it -- the weights and the (scale, zero) rows by bulk copies
// (`cp.async.bulk`, the copy engine; one thread issues them) and the activation tile by 16-byte
// cp.async from all 128 of its threads -- and every copy completes on the slot's `full`
// mbarrier. The consumers wait on `full`, dequantise the weights from shared memory into their
// wgmma A fragments and issue the MMAs; a consumer warp frees the slot (its `empty` mbarrier)
// once the MMAs that read it have completed, which it learns at the first `wait<1>` of the next
// stage: so wgmma stays in flight across stage boundaries, and no block-wide barrier remains in
// the main loop. With two consumer warpgroups the producer gives up registers (`setmaxnreg`) for
// them: 40 a thread for the copies, 232 for the accumulators and fragments.
//
// Persistent grid over output tiles. The host launches at most one wave (gridDim.x blocks per K
// slice, gridDim.y = K slices); block x takes output tiles x, x + gridDim.x, ... (M tiles
// fastest, so the blocks running together share weight tiles through L2). The producer runs
// ahead into the next tile while the consumers write the last one's outputs, so the copy
// stream does not stop at tile edges and there is no tail wave of whole blocks.
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
//            we store it in, so the *activations* are permuted, not the weights (no second
//            weight layout): the dispatch gathers A's columns into that order (in the same
//            gather that act-order needs anyway; `dispatch.wgmma_gather_index`), and the kernel
//            then only copies 16-byte chunks, which cp.async can do without registers.
//
// Shared-memory B layout: K-major, no swizzle ("interleave"): chunk column q (8 K positions) of a
// stage is TILE_M rows x 16 bytes, rows contiguous, so an 8x16-byte core matrix is 128 contiguous
// bytes (stride byte offset 128 between 8-row groups, leading byte offset TILE_M*16 between the two
// K halves of an instruction). The producer's copies of a warp land as 4 chunk columns x 8 rows:
// 128 contiguous bytes per 8 lanes (no bank conflict), 64 contiguous bytes of each row read.
//
// Template parameters (kernels/config.py lists the instances built, for compile time):
//   BITS    4 or 8: V = 32 / BITS K values per packed word, a step is 4 words of K (32 or 16), and
//           4-bit steps hold two k16 instructions, 8-bit steps one.
//   WGM     consumer warpgroups along the token (M) side, each with its own TN tokens (they
//           share every staged weight, at the cost of dequantising it twice).
//   WGN     consumer warpgroups along N, 128 columns each: they share every staged activation
//           tile.
//   TN      tokens per warpgroup = the N of wgmma.m64nTNk16 (16..128): 2 x TN/2 fp32 accumulators
//           per thread (the two m64 tiles), so 128 is the widest that leaves registers for the rest.
//   KS      K steps per pipeline stage (tile_k = KS x step: 64 or 128): longer stages mean fewer
//           barrier waits, shorter ones less shared memory per stage.
//   STAGES  slots in the ring: the producer runs up to STAGES - 1 stages ahead of the consumers
//           (STAGES - 2 while the consumers' last MMAs of a stage are still reading it).
//   SPLIT   gridDim.y > 1 K slices, reduced through the fp32 workspace by the last block of each
//           output tile, which leaves workspace and counter at zero (the tiled kernel's scheme: no
//           memset per call, graph-capturable).
// Block: 128 x (WGM x WGN + 1) threads (the producer is the last warpgroup). Dynamic shared
// memory: STAGES x stage bytes; the mbarriers are static.
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

namespace wg {

// mbarrier and bulk-copy primitives (PTX ISA "mbarrier", "cp.async.bulk"), CTA scope.
__device__ __forceinline__ void bar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" :: "r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void bar_arrive(uint32_t bar) {
  asm volatile("{\n .reg .b64 st;\n mbarrier.arrive.shared::cta.b64 st, [%0];\n}\n" :: "r"(bar) : "memory");
}
// This thread's arrival, expecting `bytes` more from the copy engine before the phase completes.
__device__ __forceinline__ void bar_arrive_expect(uint32_t bar, uint32_t bytes) {
  asm volatile("{\n .reg .b64 st;\n mbarrier.arrive.expect_tx.shared::cta.b64 st, [%0], %1;\n}\n"
               :: "r"(bar), "r"(bytes) : "memory");
}
// Arrives once every cp.async this thread issued so far has landed (counted in the init count).
__device__ __forceinline__ void bar_arrive_copies(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" :: "r"(bar) : "memory");
}
__device__ __forceinline__ void bar_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n .reg .pred p;\n"
      "WAIT_%=:\n mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n @!p bra WAIT_%=;\n}\n"
      :: "r"(bar), "r"(parity) : "memory");
}
__device__ __forceinline__ void bulk_copy(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
      :: "r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
}
// Registers per thread of this warpgroup from here on (a multiple of 8, 24..256).
template <int N>
__device__ __forceinline__ void regs_dec() { asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" :: "n"(N)); }
template <int N>
__device__ __forceinline__ void regs_inc() { asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" :: "n"(N)); }
// Barrier 1 over the consumer warpgroups only (barrier 0 is __syncthreads).
template <int THREADS>
__device__ __forceinline__ void consumers_sync() {
  asm volatile("bar.sync 1, %0;\n" :: "n"(THREADS) : "memory");
}

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
  static constexpr int CPR = KS * CH;                  // 16-byte chunks per row and stage
  static constexpr int A_ITEMS = TILE_M * CPR;         // 16-byte activation chunks per stage
};

template <int BITS, int WGM, int WGN, int TN, int KS, int STAGES, bool SPLIT>
__global__ void __launch_bounds__(128 * (WGM * WGN + 1), 1)
gptq_wgmma_gemm(const half* __restrict__ a,           // [M, K]: stored-row order, steps permuted
                const uint32_t* __restrict__ qweight,  // tiled, see weights.py
                const half2* __restrict__ sz,          // [G, N]: (scale, 1024 + zero)
                half* __restrict__ c,                  // [M, N]
                float* __restrict__ ws,                // [M, N] fp32, all zero between calls (SPLIT)
                int* __restrict__ counters,            // [M tiles x N tiles], zero between calls
                int M, int K, int N, int group_shift) {
  static_assert(BITS == 4 || BITS == 8, "wgmma kernel handles 4- and 8-bit weights");
  static_assert(TN == 16 || TN == 32 || TN == 64 || TN == 128, "token tile: a built wgmma N");
  static_assert(STAGES >= 2, "one slot computed while the next fills");
  constexpr int CONSUMERS = WGM * WGN;
  constexpr int CTHREADS = 128 * CONSUMERS;
  constexpr int TILE_M = WGM * TN;
  constexpr int TILE_N = WGN * 128;
  using S = WgmmaStage<BITS, KS, TILE_M, TILE_N>;
  constexpr int KSTEP = S::KSTEP;
  constexpr int CH = S::CH;
  constexpr int INSTR = KSTEP / 16;  // k16 instructions per step
  static_assert(S::CPR % 4 == 0 && TILE_M % 8 == 0, "a producer warp copies 8 rows x 4 chunks");
  // Registers a thread after setmaxnreg (two consumer warpgroups: 128 x 40 + 256 x 232 <= 64K).
  constexpr int PRODUCER_REGS = 40;
  constexpr int CONSUMER_REGS = 232;

  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ __align__(8) uint64_t bars[2 * STAGES];  // full[0..STAGES), empty[STAGES..2 STAGES)
  auto a_base = [&](int slot) -> unsigned char* { return smem + slot * S::BYTES; };
  auto w_base = [&](int slot) -> unsigned char* { return smem + slot * S::BYTES + S::A_BYTES; };
  auto sz_row = [&](int slot, int ks) -> unsigned char* {
    return smem + slot * S::BYTES + S::A_BYTES + S::W_BYTES + ks * TILE_N * 4;
  };
  const uint32_t full0 = wg::smem_u32(bars);
  auto full = [&](int slot) { return full0 + 8u * slot; };
  auto empty = [&](int slot) { return full0 + 8u * (STAGES + slot); };

  const int tid = threadIdx.x;
  const int wgi = tid >> 7;  // warpgroup; CONSUMERS = the producer

  const int m_tiles = (M + TILE_M - 1) / TILE_M;
  const int tiles = m_tiles * ((N + TILE_N - 1) / TILE_N);
  const int total_steps = K / KSTEP;
  const int s_begin = (int)(((long long)total_steps * blockIdx.y) / gridDim.y);
  const int s_end = (int)(((long long)total_steps * (blockIdx.y + 1)) / gridDim.y);
  const int n_stages = (s_end - s_begin + KS - 1) / KS;

  auto group_of = [&](const int step) { return (step * KSTEP) >> group_shift; };
  auto starts_group = [&](const int step) {
    return step == s_begin || group_of(step) != group_of(step - 1);
  };

  if (tid == 0) {
    for (int s = 0; s < STAGES; ++s) {
      wg::bar_init(full(s), 128 + 1);    // each producer thread's cp.async + the bulk copies' bytes
      wg::bar_init(empty(s), 4 * CONSUMERS);  // one arrival per consumer warp
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  if (wgi == CONSUMERS) {
    // ---- producer ------------------------------------------------------------------------------
    if constexpr (CONSUMERS > 1) wg::regs_dec<PRODUCER_REGS>();
    const int p = tid - CTHREADS;
    int g = 0;  // stages produced by this block (all tiles): slot g % STAGES, pass g / STAGES
#pragma unroll 1
    for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
      const int m0 = (tile % m_tiles) * TILE_M;
      const int n0 = (tile / m_tiles) * TILE_N;
#pragma unroll 1
      for (int st = 0; st < n_stages; ++st, ++g) {
        const int slot = g % STAGES;
        if (g >= STAGES) wg::bar_wait(empty(slot), ((g / STAGES) - 1) & 1);
        const int s0 = s_begin + st * KS;
        const int steps = min(KS, s_end - s0);
        if (p == 0) {
          // Weights: per 32-column block, this stage's steps are contiguous (steps x 512 bytes);
          // blocks past N and steps past the slice are not copied (a column past N only feeds
          // its own, unwritten, output; a missing step is read as zero words by the consumers).
          const int blocks = min(S::NB, (N - n0 + 31) / 32);
          const uint32_t row_bytes = 4u * min(TILE_N, N - n0);
          uint32_t bytes = (uint32_t)blocks * steps * 512u;
          for (int ks = 0; ks < steps; ++ks)
            if (starts_group(s0 + ks)) bytes += row_bytes;
          wg::bar_arrive_expect(full(slot), bytes);
          for (int nb = 0; nb < blocks; ++nb) {
            const int cb = n0 / 32 + nb;
            wg::bulk_copy(wg::smem_u32(w_base(slot) + nb * KS * 512),
                          qweight + ((size_t)cb * total_steps + s0) * 128, steps * 512u, full(slot));
          }
          for (int ks = 0; ks < steps; ++ks)
            if (starts_group(s0 + ks))
              wg::bulk_copy(wg::smem_u32(sz_row(slot, ks)), sz + (size_t)group_of(s0 + ks) * N + n0,
                            row_bytes, full(slot));
        }
        // Activations: item i = (8-row group, 4-chunk group) x lane; rows past M and chunks past
        // the slice are zero-filled (so the weights there, whatever they hold, add nothing).
        unsigned char* const dst = a_base(slot);
#pragma unroll 1  // at 40 registers an unrolled copy loop spills
        for (int i = p; i < S::A_ITEMS; i += 128) {
          const int rest = i >> 5;
          const int row = (rest % (TILE_M / 8)) * 8 + (i & 7);
          const int q = (rest / (TILE_M / 8)) * 4 + ((i >> 3) & 3);
          const bool ok = m0 + row < M && s0 + q / CH < s_end;
          const half* src = ok ? a + (size_t)(m0 + row) * K + (size_t)s0 * KSTEP + 8 * q : a;
          copy16_async(reinterpret_cast<uint4*>(dst + (q * TILE_M + row) * 16), src, ok);
        }
        wg::bar_arrive_copies(full(slot));
      }
    }
    copy_async_wait<0>();
    return;
  }

  // ---- consumers -------------------------------------------------------------------------------
  if constexpr (CONSUMERS > 1) wg::regs_inc<CONSUMER_REGS>();
  const int lane = tid & 31;
  const int wq = (tid >> 5) & 3;  // warp within its warpgroup
  const int wm = wgi % WGM;
  const int wn = wgi / WGM;
  const int g8 = lane >> 2;
  const int t = lane & 3;

  // Not zeroed: a tile's first MMA overwrites (scale-d = 0). Constant zeros here would make
  // ptxas serialise every wgmma (C7515: non-wgmma definitions of accumulator registers).
  float acc[2][TN / 2];

  // This thread's 4 columns: scale, 1024 + zero and -(64 + zero) (4-bit odd pairs) as half2,
  // refreshed when a group starts.
  half2 s2[4], z2[4], nz2[4];
  auto new_group = [&](const int slot, const int ks) {
    const uint4 v = reinterpret_cast<const uint4*>(sz_row(slot, ks))[wn * 32 + wq * 8 + g8];
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
  auto dequant = [&](const uint32_t w, const uint32_t w8, const int pr, const int cc) -> uint32_t {
    half2 d = minus_zero<BITS>(w, w8, pr, z2[cc], nz2[cc]);
    return h2_as_u32(__hmul2(d, s2[cc]));
  };

  // Hands a slot back to the producer once this warp's MMAs and shared reads of it are done:
  // the proxy fence orders the warp's reads before the copy engine's next writes to the slot.
  auto release = [&](const int slot) {
    wg::fence_proxy_async();
    __syncwarp();
    if (lane == 0) wg::bar_arrive(empty(slot));
  };

  // One stage of one tile: per step, one 16-byte shared read of the weights gives this thread
  // its fragments of both m64 tiles for every k16 instruction of the step; each instruction is
  // one wgmma group (fence, two MMAs, commit), and waiting for all but the newest keeps the
  // dequantisation of the next instruction overlapped with the tensor cores. After the stage's
  // first wait every MMA of the previous stage has completed, so its slot is handed back there.
  auto compute = [&](const int slot, const int st, const int prev_slot) {
    const uint32_t a_addr = wg::smem_u32(a_base(slot)) + wm * TN * 16;
    const int s0 = s_begin + st * KS;
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
      // A slice's last stage may be short: its missing steps were not copied, so they run as
      // zero words (finite after dequantisation) against the zero-filled activations. Skipping
      // them instead (a branch between MMAs) makes ptxas serialise every wgmma at 8 bits.
      const bool live = s0 + ks < s_end;  // block-uniform
      if (live && starts_group(s0 + ks)) new_group(slot, ks);
      const uint4 wv = live ? *reinterpret_cast<const uint4*>(
                                  w_base(slot) + (((wn * 4 + wq) * KS + ks) * 32 + lane) * 16)
                            : make_uint4(0u, 0u, 0u, 0u);
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
        if (ks == 0 && j == 0 && prev_slot >= 0) release(prev_slot);
      }
    }
  };

  int g = 0;  // stages consumed by this block (all tiles), in the producer's order
#pragma unroll 1
  for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int m_tile = tile % m_tiles;
    const int m0 = m_tile * TILE_M;
    const int n0 = (tile / m_tiles) * TILE_N;
#pragma unroll 1
    for (int st = 0; st < n_stages; ++st, ++g) {
      const int slot = g % STAGES;
      wg::bar_wait(full(slot), (g / STAGES) & 1);
      // The activations arrived through cp.async (generic proxy); the MMAs read them through the
      // async proxy.
      wg::fence_proxy_async();
      compute(slot, st, st > 0 ? (g - 1) % STAGES : -1);
    }
    wg::wait<0>();
    if (n_stages > 0) release((g - 1) % STAGES);
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int i = 0; i < TN / 2; ++i) wg::pin(acc[mt][i]);

    // acc[mt][4j + 2rh + e] = C[token 8j + 2t + e][column 4g + 2mt + rh of block wn*4 + wq].
    const int col = n0 + (wn * 4 + wq) * 32 + 4 * g8;
    if (col < N && n_stages > 0) {
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

    if constexpr (SPLIT) {
      // The last K slice of this tile to arrive converts the sums (common.cuh's rule, with the
      // consumers' own barrier: the producer is already copying the next tile).
      __shared__ int is_last;
      __threadfence();
      wg::consumers_sync<CTHREADS>();
      if (tid == 0) is_last = atomicAdd(counters + tile, 1) == (int)gridDim.y - 1;
      wg::consumers_sync<CTHREADS>();
      if (is_last) {
        __threadfence();
        split_k_finish<TILE_M, TILE_N, CTHREADS>(ws, counters + tile, c, m0, n0, M, N, tid);
      }
    }
  }
}

}  // namespace gemmtune
