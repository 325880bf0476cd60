// gemmtune: tiled GPTQ GEMM  C[M,N] = A[M,K] @ dequant(W)[K,N]  for M past decode sizes.
//
// Why a second kernel: the decode kernel (gptq_gemm.cu) gives every warp its own 32 columns and
// lets each warp read its rows of A itself. Past ~16 rows those private activation reads cost
// more L1/L2 traffic than the weights, and the warp's registers bound how many rows it can hold.
// Here a block stages a tile of A (TILE_M rows x TILE_K) and of the weights (TILE_N columns x
// TILE_K) through shared memory in a STAGES-deep cp.async pipeline; every weight byte is read
// from DRAM once per block and reused by all WARPS_M warps, every activation by all WARPS_N
// warps.
//
// Same orientation, weight layout and dequantisation as the decode kernel: C^T = W^T A^T on
// mma.m16n8k16, the weight the 16-row operand (16 columns of N), the activations the 8-column
// one (8 rows of M), fp32 accumulators. The load-time tiled layout (weights.py) already puts the
// 16 bytes a lane dequantises into one MMA fragment side by side, so the weights need no second
// layout: shared memory holds them exactly as they arrive, and one 16-byte read gives a lane its
// 4 columns x one packed word row. A lane's activations for one K step are one 16-byte (4-bit)
// or 8-byte (8-bit) read of the A tile, stored with an XOR swizzle so the warp's reads hit
// distinct banks.
//
// Template parameters (one compiled variant each; kernels/config.py lists the tiles built):
//   BITS     4 or 8. V = 32 / BITS values of K per packed word; a K step is 4 words (4 V).
//   WARPS_M  warps along M; each covers MT 8-row MMA tiles (TILE_M = 8 MT WARPS_M). More warps
//            along M reuse each staged weight more (the mid-M band is memory-bound).
//   MT       8-row tiles per warp: each dequantised weight fragment feeds MT MMAs, so larger MT
//            amortises the dequantisation (the compute-bound band), at MT x 16 accumulators.
//   WARPS_N  warps along N; each covers NW 32-column blocks (TILE_N = 32 NW WARPS_N).
//   NW       32-column blocks per warp: a staged activation fragment feeds NW x 2 MMAs.
//   KS       K steps per pipeline stage (TILE_K = KS x 4V: 64 or 128). Longer stages mean
//            fewer barriers; shorter ones less shared memory per stage.
//   STAGES   pipeline depth: STAGES - 1 stages of loads are in flight while one is computed,
//            which is what keeps HBM busy when a block has little to compute.
//   SPLIT    gridDim.y > 1 K slices: fp32 partials are added into `ws`, the last block of an
//            output tile converts them to C and leaves `ws` and its counter at zero (no memset
//            per call, graph-capturable; the decode kernel's scheme).
// Act-order weights are stored sorted by group (weights.py); the dispatch gathers A's columns
// into that order once per call, so this kernel always reads A contiguously.
// Grid: x = M tiles (fastest, so the blocks that share a weight tile run together and all but the
// first read it from L2), y = K slices, z = N tiles. Dynamic shared memory: STAGES x stage bytes.
#include "common.cuh"

namespace gemmtune {

template <int BITS, int KS, int TILE_M, int TILE_N>
struct TiledStage {
  static constexpr int V = 32 / BITS;
  static constexpr int KSTEP = 4 * V;
  static constexpr int TILE_K = KS * KSTEP;
  static constexpr int NB = TILE_N / 32;         // 32-column blocks in the tile
  static constexpr int A_CHUNKS = TILE_K / 8;    // 16-byte chunks per A row
  static constexpr int W_VECS = NB * KS * 32;    // 16 bytes per lane per step per column block
  static constexpr int A_VECS = TILE_M * A_CHUNKS;
  static constexpr int SZ_VECS = KS * TILE_N / 4; // one (scale, zero) row per step, 4 columns a vector
  static constexpr int VECS = W_VECS + A_VECS + SZ_VECS;
  static constexpr int BYTES = VECS * 16;
  // Chunks of one row a warp's lanes read per step (4-bit: 16 bytes each of 4 lanes; 8-bit: 8
  // bytes each, two lanes a chunk), and the XOR that spreads neighbouring rows over the banks.
  static constexpr int CPS = KSTEP * 2 / 16;
  static constexpr int SWZ_ROWS = 8 / CPS;
  __device__ static __forceinline__ int swizzle(int row, int chunk) {
    return chunk ^ ((row % SWZ_ROWS) * CPS);
  }
};

template <int BITS, int WARPS_M, int MT, int WARPS_N, int NW, int KS, int STAGES, bool SPLIT>
__global__ void __launch_bounds__(WARPS_M * WARPS_N * 32, 1)
gptq_tiled_gemm(const half* __restrict__ a,           // [M, K], columns in stored-row order
                const uint32_t* __restrict__ qweight,  // tiled, see weights.py
                const half2* __restrict__ sz,          // [G, N]: (scale, 1024 + zero)
                half* __restrict__ c,                  // [M, N]
                float* __restrict__ ws,                // [M, N] fp32, all zero between calls (SPLIT)
                int* __restrict__ counters,            // [gridDim.x * gridDim.z], zero between calls
                int M, int K, int N, int group_shift) {
  static_assert(BITS == 4 || BITS == 8, "tiled kernel handles 4- and 8-bit weights");
  constexpr int THREADS = WARPS_M * WARPS_N * 32;
  constexpr int TILE_M = 8 * MT * WARPS_M;
  constexpr int TILE_N = 32 * NW * WARPS_N;
  using S = TiledStage<BITS, KS, TILE_M, TILE_N>;
  constexpr int V = S::V;
  constexpr int KSTEP = S::KSTEP;
  constexpr int KS_PER_WORD = V / 4;  // MMA k16 steps per K step
  constexpr int AWORDS = V / 2;       // 32-bit words of activations per lane per tile and step
  static_assert(S::A_CHUNKS >= 8, "the A swizzle spans 8 chunks: TILE_K >= 64");

  extern __shared__ uint4 smem[];
  auto w_at = [&](int slot, int nb, int ks, int ln) -> uint4* {
    return smem + slot * S::VECS + (nb * KS + ks) * 32 + ln;
  };
  auto a_at = [&](int slot, int row, int chunk) -> uint4* {
    return smem + slot * S::VECS + S::W_VECS + row * S::A_CHUNKS + S::swizzle(row, chunk);
  };
  auto sz_at = [&](int slot, int ks, int quad) -> uint4* {
    return smem + slot * S::VECS + S::W_VECS + S::A_VECS + ks * (TILE_N / 4) + quad;
  };

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int wm = warp % WARPS_M;
  const int wn = warp / WARPS_M;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int m0 = blockIdx.x * TILE_M;
  const int n0 = blockIdx.z * TILE_N;

  const int total_steps = K / KSTEP;
  const int s_begin = (int)(((long long)total_steps * blockIdx.y) / gridDim.y);
  const int s_end = (int)(((long long)total_steps * (blockIdx.y + 1)) / gridDim.y);
  const int n_stages = (s_end - s_begin + KS - 1) / KS;

  // Scale in fp32, once per group, when the row tiles are few (the memory-bound band, where the
  // dequantisation is most of the instruction stream): the MMAs of one quantisation group sum
  // the exact integers (q - zero) times A into `part`, and the group's scale multiplies `part`
  // into `acc` when the group ends (one FMA per accumulator per group instead of one multiply per
  // two weights per step; it also rounds less), and the (scale, zero) of a group is read once.
  // More row tiles would double too many accumulators: those scale each weight in fp16 and read
  // (scale, zero) every step (holding them across steps spilled 128x256).
  constexpr bool GROUP_SCALE = MT <= 2;
  auto group_of = [&](const int step) { return (step * KSTEP) >> group_shift; };
  auto starts_group = [&](const int step) {
    return step == s_begin || group_of(step) != group_of(step - 1);
  };

  // Producer: every thread copies its share of one stage (weights, activations, and the
  // (scale, zero) row of each step that starts a group); what lies past M, N or this slice's K
  // is zero-filled. Zero activations past the slice make whatever the weights there dequantise
  // to add nothing.
  auto issue = [&](const int st) {
    const int slot = st % STAGES;
    const int s0 = s_begin + st * KS;
    const bool live = st < n_stages;
    for_share<S::W_VECS, THREADS>(tid, [&](const int i) {
      const int nb = i / (KS * 32);
      const int ks = (i / 32) % KS;
      const int ln = i % 32;
      const int cb = blockIdx.z * S::NB + nb;
      const bool ok = live && cb * 32 < N && s0 + ks < s_end;
      copy16_async(w_at(slot, nb, ks, ln), qweight + ((size_t)cb * total_steps + s0 + ks) * 128 + ln * 4, ok);
    });
    for_share<S::A_VECS, THREADS>(tid, [&](const int i) {
      const int row = i / S::A_CHUNKS;
      const int ch = i % S::A_CHUNKS;
      const int kk = s0 * KSTEP + ch * 8;
      const bool ok = live && m0 + row < M && kk < s_end * KSTEP;
      copy16_async<true>(a_at(slot, row, ch), a + (size_t)(m0 + row) * K + kk, ok);
    });
    for_share<S::SZ_VECS, THREADS>(tid, [&](const int i) {
      const int ks = i / (TILE_N / 4);
      const int quad = i % (TILE_N / 4);
      const int col = n0 + 4 * quad;
      const int step = s0 + ks;
      // With GROUP_SCALE only a step that starts a group (or this block's first step) is read.
      const bool ok = live && col < N && step < s_end && (!GROUP_SCALE || starts_group(step));
      copy16_async<true>(sz_at(slot, ks, quad), sz + (size_t)group_of(step) * N + col, ok);
    });
    copy_async_commit();  // one group per stage, empty ones too: the wait count stays uniform
  };

  float acc[NW][2][MT][4];
#pragma unroll
  for (int nb = 0; nb < NW; ++nb)
#pragma unroll
    for (int x = 0; x < 2; ++x)
#pragma unroll
      for (int j = 0; j < MT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[nb][x][j][e] = 0.f;

  float part[NW][2][GROUP_SCALE ? MT : 1][4];
  auto clear_part = [&]() {
#pragma unroll
    for (int nb = 0; nb < NW; ++nb)
#pragma unroll
      for (int x = 0; x < 2; ++x)
#pragma unroll
        for (int j = 0; j < (GROUP_SCALE ? MT : 1); ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) part[nb][x][j][e] = 0.f;
  };
  clear_part();
  // GROUP_SCALE: this lane's 4 columns of each column block as scale, 1024 + zero and
  // -(64 + zero) (4-bit odd pairs) in half2, the scale as float; refreshed when a group starts.
  half2 s2[GROUP_SCALE ? NW : 1][4], z2[GROUP_SCALE ? NW : 1][4], nz2[GROUP_SCALE ? NW : 1][4];
  float sf[GROUP_SCALE ? NW : 1][4];  // zero: the first flush (of no group) adds 0 * sf
#pragma unroll
  for (int nb = 0; nb < (GROUP_SCALE ? NW : 1); ++nb)
#pragma unroll
    for (int cc = 0; cc < 4; ++cc) sf[nb][cc] = 0.f;
  auto unpack_sz = [](const uint4 szv, half2 (&s)[4], half2 (&z)[4], half2 (&nz)[4], float (&f)[4]) {
    const uint32_t szc[4] = {szv.x, szv.y, szv.z, szv.w};
#pragma unroll
    for (int cc = 0; cc < 4; ++cc) {
      const half2 v = u32_as_h2(szc[cc]);
      s[cc] = __low2half2(v);
      z[cc] = __high2half2(v);
      nz[cc] = __hsub2(__float2half2_rn(960.f), z[cc]);
      f[cc] = __low2float(v);
    }
  };
  auto flush = [&]() {
    if constexpr (GROUP_SCALE) {
      // acc[nb][x][j][2h + e] is column 4g + 2x + h of block nb.
#pragma unroll
      for (int nb = 0; nb < NW; ++nb)
#pragma unroll
        for (int x = 0; x < 2; ++x)
#pragma unroll
          for (int j = 0; j < MT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e)
              acc[nb][x][j][e] = fmaf(part[nb][x][j][e], sf[nb][2 * x + e / 2], acc[nb][x][j][e]);
      clear_part();
    }
  };
  auto new_group = [&](const int slot, const int ks) {
    if constexpr (GROUP_SCALE) {
#pragma unroll
      for (int nb = 0; nb < NW; ++nb)
        unpack_sz(*sz_at(slot, ks, (wn * NW + nb) * 8 + g), s2[nb], z2[nb], nz2[nb], sf[nb]);
    }
  };

  // Pair p of a packed word as (q - zero) in a half2 (common.cuh `minus_zero`), times the scale
  // unless GROUP_SCALE.
  auto dequant = [&](const uint32_t w, const uint32_t w8, const int p, const half2 s, const half2 z,
                     const half2 nz) -> uint32_t {
    half2 d = minus_zero<BITS>(w, w8, p, z, nz);
    if constexpr (!GROUP_SCALE) d = __hmul2(d, s);
    return h2_as_u32(d);
  };

  // Consumer: one stage. Per K step, the lane's activation words of its MT row tiles are read
  // once and reused for every column block; each column block's 16 bytes of weights become the
  // two 16x16 fragments of one or two k16 steps and meet every row tile.
  int cur_grp = -1;
  auto compute = [&](const int st) {
    const int slot = st % STAGES;
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
      if constexpr (GROUP_SCALE) {
        const int grp = group_of(s_begin + st * KS + ks);  // block-uniform
        if (grp != cur_grp) {
          flush();
          cur_grp = grp;
          new_group(slot, ks);
        }
      }
      uint32_t av[MT][AWORDS];
#pragma unroll
      for (int j = 0; j < MT; ++j) {
        const int row = wm * 8 * MT + 8 * j + g;
        if constexpr (AWORDS == 4) {
          const uint4 v = *a_at(slot, row, ks * 4 + t);
          av[j][0] = v.x; av[j][1] = v.y; av[j][2] = v.z; av[j][3] = v.w;
        } else {
          const uint2 v = reinterpret_cast<const uint2*>(a_at(slot, row, ks * 2 + t / 2))[t % 2];
          av[j][0] = v.x; av[j][1] = v.y;
        }
      }
#pragma unroll
      for (int nb = 0; nb < NW; ++nb) {
        const int cbl = wn * NW + nb;  // column block within the tile
        const uint4 wq = *w_at(slot, cbl, ks, lane);
        half2 ls2[4], lz2[4], lnz2[4];  // !GROUP_SCALE: this step's (scale, zero)
        float lsf[4];
        if constexpr (!GROUP_SCALE) unpack_sz(*sz_at(slot, ks, cbl * 8 + g), ls2, lz2, lnz2, lsf);
        const half2 (&cs2)[4] = GROUP_SCALE ? s2[GROUP_SCALE ? nb : 0] : ls2;
        const half2 (&cz2)[4] = GROUP_SCALE ? z2[GROUP_SCALE ? nb : 0] : lz2;
        const half2 (&cnz2)[4] = GROUP_SCALE ? nz2[GROUP_SCALE ? nb : 0] : lnz2;
        const uint32_t wcol[4] = {wq.x, wq.y, wq.z, wq.w};
#pragma unroll
        for (int kw = 0; kw < KS_PER_WORD; ++kw) {
          uint32_t p0[4], p1[4];
#pragma unroll
          for (int cc = 0; cc < 4; ++cc) {
            const uint32_t w8 = wcol[cc] >> 8;
            p0[cc] = dequant(wcol[cc], w8, 2 * kw, cs2[cc], cz2[cc], cnz2[cc]);
            p1[cc] = dequant(wcol[cc], w8, 2 * kw + 1, cs2[cc], cz2[cc], cnz2[cc]);
          }
          // MMA row g <-> column 4g + 2x, row g + 8 <-> column 4g + 2x + 1 of the block.
          const uint32_t fa0[4] = {p0[0], p0[1], p1[0], p1[1]};
          const uint32_t fa1[4] = {p0[2], p0[3], p1[2], p1[3]};
#pragma unroll
          for (int j = 0; j < MT; ++j) {
            const uint32_t lo = av[j][kw];
            const uint32_t hi = av[j][kw + V / 4];
            const uint32_t fb[2] = {__byte_perm(lo, hi, 0x5410), __byte_perm(lo, hi, 0x7632)};
            if constexpr (GROUP_SCALE) {
              mma_16816(part[nb][0][j], fa0, fb);
              mma_16816(part[nb][1][j], fa1, fb);
            } else {
              mma_16816(acc[nb][0][j], fa0, fb);
              mma_16816(acc[nb][1][j], fa1, fb);
            }
          }
        }
      }
    }
  };

  // Pipeline: STAGES - 1 stages issued ahead; one barrier per stage, after which every thread
  // has finished computing the previous stage, so its slot can be refilled.
#pragma unroll
  for (int st = 0; st < STAGES - 1; ++st) issue(st);
  for (int st = 0; st < n_stages; ++st) {
    copy_async_wait<STAGES - 2>();
    __syncthreads();
    issue(st + STAGES - 1);
    compute(st);
  }
  copy_async_wait<0>();
  flush();

  // Lane (g, t) holds C[row 8j + 2t + e][column 4g + 2x + h of its block nb] = acc[nb][x][j][2h + e].
#pragma unroll
  for (int nb = 0; nb < NW; ++nb) {
    const int col = n0 + (wn * NW + nb) * 32 + 4 * g;
    if (col >= N) continue;
#pragma unroll
    for (int j = 0; j < MT; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int m = m0 + wm * 8 * MT + 8 * j + 2 * t + e;
        if (m >= M) continue;
        const float v0 = acc[nb][0][j][e], v1 = acc[nb][0][j][2 + e];
        const float v2 = acc[nb][1][j][e], v3 = acc[nb][1][j][2 + e];
        if constexpr (SPLIT) {
          float* dst = ws + (size_t)m * N + col;
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900) && !defined(__HIPCC__)
          atomicAdd(reinterpret_cast<float4*>(dst), make_float4(v0, v1, v2, v3));
#else
          atomicAdd(dst + 0, v0); atomicAdd(dst + 1, v1);
          atomicAdd(dst + 2, v2); atomicAdd(dst + 3, v3);
#endif
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
