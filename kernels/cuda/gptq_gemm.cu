// gemmtune: fused GPTQ GEMM  C[M,N] = A[M,K] @ dequant(W)[K,N]  on tensor cores.
//
// The product is computed transposed, C^T = W^T A^T, so the weight is the 16-row MMA operand
// and the activations the 8-column one: at decode sizes (M <= 8) only the unused half of an
// 8-wide tile is wasted, not 15/16 of a 16-wide one.
//
// Each lane reads 16 bytes of qweight per K step: one packed word row (V = 32/BITS values of K)
// for 4 adjacent columns. The 4 lanes of an MMA group read 4 consecutive word rows, the 8
// groups of a warp 32 consecutive columns. The weight is stored tiled (QuantizedWeight): those
// 512 bytes are contiguous, and a warp walking K reads one contiguous stream.
// group_shift: log2 of the group size (31 for one group per column).
// The K order inside an MMA is permuted to match what a lane holds (MMA k index 2t,2t+1 <->
// word t, values {2s, 2s+V/2}); the activations are loaded with the same permutation, so the
// sum is unchanged. (1024+q) - (1024+z) is an exact integer in fp16; with few activation tiles
// the scale multiplies the fp32 sums once per group, otherwise each fp16 weight (one rounding).
//
// Tunables (template arguments, one compiled variant each):
//   M_COUNT  rows of A per block (ExLlamaV2's MAX_Q_GEMM_ROWS_KERNEL), 1..64
//   WARPS_N  warps side by side along N (block covers 32*WARPS_N columns)
//   WARPS_K  warps splitting the block's K range (reduced through shared memory)
//   UNROLL   pipeline depth. M_COUNT <= 16: the shared-memory ring holds 4 * UNROLL K steps
//            per warp (fewer when the block's warps would not fit 32 KB), 4 * UNROLL - 1 in
//            flight. More rows: K steps a lane loads per register batch.
//   ACT_ORDER  weight rows are stored sorted by group; A is gathered through `perm`
//   SPLIT    gridDim.y > 1 K slices: fp32 partials go to `ws`, the last block of a tile writes C
//            and restores `ws` and its counter to zero (no memset per call, graph-capturable)
#include "common.cuh"

namespace gemmtune {

__host__ __device__ constexpr int floor_pow2(int x) { return x < 2 ? 1 : 2 * floor_pow2(x / 2); }

template <int BITS, int M_COUNT, int WARPS_N, int WARPS_K, int UNROLL, bool ACT_ORDER, bool SPLIT>
__global__ void __launch_bounds__(WARPS_N * WARPS_K * 32, 1)
gptq_gemm(const half* __restrict__ a,           // [M, K]
          const uint32_t* __restrict__ qweight,  // tiled, see weights.py
          const half2* __restrict__ sz,          // [G, N]: (scale, 1024 + zero)
          const int* __restrict__ perm,          // [K]: column of A for stored row k (ACT_ORDER)
          half* __restrict__ c,                  // [M, N]
          float* __restrict__ ws,                // [M, N] fp32, all zero between calls (SPLIT)
          int* __restrict__ counters,            // [gridDim.x * gridDim.z], zero between calls
          int M, int K, int N, int group_shift) {
  static_assert(BITS == 4 || BITS == 8, "fused kernel handles 4- and 8-bit weights");
  constexpr int V = 32 / BITS;           // values of K per packed word
  constexpr int KSTEP = 4 * V;           // K per step (4 word rows)
  constexpr int KS_PER_WORD = V / 4;     // MMA k16 steps per step
  constexpr int NT = (M_COUNT + 7) / 8;  // 8-row activation tiles
  constexpr int BLOCK_N = 32 * WARPS_N;
  constexpr int AWORDS = V / 2;          // 32-bit words of activations per lane per tile

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int wn = warp % WARPS_N;
  const int wk = warp / WARPS_N;
  const int g = lane >> 2;
  const int t = lane & 3;

  const int col_block = blockIdx.x * WARPS_N + wn;  // 32-column tile of this warp
  const int col0 = col_block * 32 + 4 * g;
  const bool col_ok = col0 < N;
  const int m0 = blockIdx.z * M_COUNT;

  const int total_steps = K / KSTEP;
  const int s_begin = (int)(((long long)total_steps * blockIdx.y) / gridDim.y);
  const int s_end = (int)(((long long)total_steps * (blockIdx.y + 1)) / gridDim.y);

  float acc[2][NT][4];
#pragma unroll
  for (int x = 0; x < 2; ++x)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[x][j][e] = 0.f;

  // Scale in fp32, once per group: with few activation tiles, the MMAs of one quantisation
  // group accumulate the exact integers (q - zero) times A into `part`, and the group's scale
  // multiplies `part` into `acc` when the group ends. That takes one fp16 multiply per two
  // weights out of the inner loop (the decode kernel is issue-bound, not memory-bound), and
  // rounds less. Many tiles would need too many registers for `part`: they scale in fp16.
  constexpr bool GROUP_SCALE = NT <= 2;
  float part[2][GROUP_SCALE ? NT : 1][4];
  auto clear_part = [&]() {
#pragma unroll
    for (int x = 0; x < 2; ++x)
#pragma unroll
      for (int j = 0; j < (GROUP_SCALE ? NT : 1); ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) part[x][j][e] = 0.f;
  };
  clear_part();
  // Per-group constants of this lane's 4 columns (refreshed when a step starts a new group).
  int cur_grp = -1;
  float sf[4] = {0.f, 0.f, 0.f, 0.f};  // scale (GROUP_SCALE)
  half2 s2[4], z2[4], nz2[4];          // scale, 1024 + zero, and -(64 + zero) (4-bit odd pairs)
  auto flush = [&]() {
    if constexpr (GROUP_SCALE) {
      // acc[x][j][2h + e] is column col0 + 2x + h.
#pragma unroll
      for (int x = 0; x < 2; ++x)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[x][j][e] = fmaf(part[x][j][e], sf[2 * x + e / 2], acc[x][j][e]);
      clear_part();
    }
  };
  auto new_group = [&](const uint4 szv) {
    const uint32_t szc[4] = {szv.x, szv.y, szv.z, szv.w};
#pragma unroll
    for (int cc = 0; cc < 4; ++cc) {
      const half2 v = u32_as_h2(szc[cc]);
      s2[cc] = __low2half2(v);
      z2[cc] = __high2half2(v);
      nz2[cc] = __hsub2(__float2half2_rn(960.f), z2[cc]);
      sf[cc] = __low2float(v);
    }
  };

  // Two pipelines. Up to two 8-row tiles (M <= 16, the decode band): the shared-memory ring
  // below. More tiles: register batches, which need fewer registers there (measured on an H200:
  // with 8 tiles the ring variant held 146-156 registers against 128, a block less per SM, and
  // ran 5-40 % slower at M = 32-64, while it is 8-24 % faster at M <= 16).
  constexpr bool RING = NT <= 2;
  if constexpr (RING) {
    // Pipeline: each lane streams its own 16 bytes of qweight per K step (and, where needed, of
    // (scale, zero) and of its activation tiles) into a private ring of STAGES slots in shared
    // memory with cp.async, STAGES - 1 steps ahead of the step it computes. HBM latency is covered
    // by bytes in flight, and those cost shared memory instead of registers (a register double
    // buffer held 1 KB of weights per warp; the ring up to 8 KB). A lane reads back only what it
    // copied itself, so no barrier is needed. Act-order and many-tile activations are loaded
    // into registers instead (one step ahead while the tiles are few).
    constexpr int WARPS = WARPS_N * WARPS_K;
    constexpr int STAGES_WANT = 4 * UNROLL;
    // At most 32 KB of ring per block (7 blocks fit an SM), less the WARPS_K reduction buffer so
    // the block stays under the 48 KB of static shared memory; a power of two of slots (cheap slot
    // index). Activations of up to two 8-row tiles travel in the ring too (4-bit, no act-order
    // gather) when at least two slots of them fit.
    constexpr int RED_BYTES = WARPS_K > 1 ? 8 * 32 * WARPS_N * 4 : 0;
    constexpr int RING_BYTES = (32 * 1024 < 46 * 1024 - RED_BYTES) ? 32 * 1024 : 46 * 1024 - RED_BYTES;
    constexpr int VEC_BYTES = WARPS * 32 * 16;  // one 16-byte vector per lane of every warp
    constexpr bool RING_A = !ACT_ORDER && BITS == 4 && NT <= 2 && RING_BYTES / (VEC_BYTES * (2 + NT)) >= 2;
    constexpr int SLOT_VECS = 2 + (RING_A ? NT : 0);  // qweight, sz, activation tiles
    constexpr int STAGES_FIT = floor_pow2(RING_BYTES / (VEC_BYTES * SLOT_VECS));
    constexpr int STAGES = STAGES_WANT < STAGES_FIT ? STAGES_WANT : (STAGES_FIT < 2 ? 2 : STAGES_FIT);
    static_assert((STAGES & (STAGES - 1)) == 0, "ring slots must be a power of two");
    __shared__ uint4 ring[WARPS][STAGES][SLOT_VECS][32];  // [warp][slot][qweight, sz, A tiles][lane]

    const int first = s_begin + wk;  // this warp's steps: first, first + WARPS_K, ... < s_end
    const int n_my = first < s_end ? (s_end - first + WARPS_K - 1) / WARPS_K : 0;
    // Per-lane base pointers: a step only adds an offset (the loop is short, address math counts).
    const uint32_t* wbase = qweight + (size_t)col_block * total_steps * 128 + lane * 4;
    const half2* sbase = sz + col0;
    // Row 8j + g of this block's A tile; one base pointer for all tiles (a pointer per tile
    // would hold 2 * NT registers at M_COUNT = 64, costing a block per SM).
    const half* abase = a + (size_t)(m0 + g) * K + (ACT_ORDER ? 0 : t * V);
    auto arow = [&](const int j) { return abase + (size_t)j * 8 * K; };
    auto arow_ok = [&](const int j) { return 8 * j + g < M_COUNT && m0 + 8 * j + g < M; };
    auto issue = [&](const int i) {
      const int step = first + i * WARPS_K;
      const bool ok = i < n_my && col_ok;  // false: zero-fill, nothing read
      const int slot = i % STAGES;
      // Tiled layout: this warp's 4 word rows x 32 columns are 512 contiguous bytes.
      copy16_async(&ring[warp][slot][0][lane], wbase + (unsigned)step * 128u, ok);
      // (scale, zero) only for a step that starts a group of this warp (the only steps that read
      // it), through L1: the 4 lanes of a column quad and the other K warps read the same bytes.
      const int grp = (step * KSTEP) >> group_shift;
      const bool starts = i == 0 || grp != (((step - WARPS_K) * KSTEP) >> group_shift);
      copy16_async<true>(&ring[warp][slot][1][lane], sbase + (size_t)grp * N, ok && starts);
      if constexpr (RING_A) {
#pragma unroll
        for (int j = 0; j < NT; ++j)
          copy16_async<true>(&ring[warp][slot][2 + j][lane], arow(j) + step * KSTEP, i < n_my && arow_ok(j));
      }
      copy_async_commit();  // one group per step, empty ones too: the wait count stays uniform
    };
    auto load_a = [&](uint32_t (&av)[NT][AWORDS], const int i) {
      const int step = first + i * WARPS_K;
      const bool ok = i < n_my;
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        if (ok && arow_ok(j)) {
          if constexpr (ACT_ORDER) {
            const int row = step * 4 + t;  // packed word row of this lane
#pragma unroll
            for (int w = 0; w < AWORDS; ++w) {
              const half lo = load_ro(arow(j) + load_ro(perm + row * V + 2 * w));
              const half hi = load_ro(arow(j) + load_ro(perm + row * V + 2 * w + 1));
              av[j][w] = h2_as_u32(__halves2half2(lo, hi));
            }
          } else if constexpr (AWORDS == 4) {
            const uint4 v = load_ro(reinterpret_cast<const uint4*>(arow(j) + step * KSTEP));
            av[j][0] = v.x; av[j][1] = v.y; av[j][2] = v.z; av[j][3] = v.w;
          } else {
            const uint2 v = load_ro(reinterpret_cast<const uint2*>(arow(j) + step * KSTEP));
            av[j][0] = v.x; av[j][1] = v.y;
          }
        } else {
#pragma unroll
          for (int w = 0; w < AWORDS; ++w) av[j][w] = 0u;
        }
      }
    };
    // Pair p of a packed word as (q - zero) in a half2 (common.cuh `minus_zero`), times the scale
    // unless GROUP_SCALE.
    auto dequant = [&](const uint32_t w, const uint32_t w8, const int p, const int cc) -> uint32_t {
      half2 d = minus_zero<BITS>(w, w8, p, z2[cc], nz2[cc]);
      if constexpr (!GROUP_SCALE) d = __hmul2(d, s2[cc]);
      return h2_as_u32(d);
    };
    auto compute = [&](const uint4 wq, const uint32_t (&av)[NT][AWORDS]) {
      const uint32_t wcol[4] = {wq.x, wq.y, wq.z, wq.w};
      const uint32_t wcol8[4] = {wcol[0] >> 8, wcol[1] >> 8, wcol[2] >> 8, wcol[3] >> 8};
#pragma unroll
      for (int ks = 0; ks < KS_PER_WORD; ++ks) {
        uint32_t p0[4], p1[4];
#pragma unroll
        for (int cc = 0; cc < 4; ++cc) {
          p0[cc] = dequant(wcol[cc], wcol8[cc], 2 * ks, cc);
          p1[cc] = dequant(wcol[cc], wcol8[cc], 2 * ks + 1, cc);
        }
        // MMA row g <-> column col0+2x, row g+8 <-> column col0+2x+1.
        const uint32_t fa0[4] = {p0[0], p0[1], p1[0], p1[1]};
        const uint32_t fa1[4] = {p0[2], p0[3], p1[2], p1[3]};
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          const uint32_t lo = av[j][ks];
          const uint32_t hi = av[j][ks + V / 4];
          const uint32_t fb[2] = {__byte_perm(lo, hi, 0x5410), __byte_perm(lo, hi, 0x7632)};
          if constexpr (GROUP_SCALE) {
            mma_16816(part[0][j], fa0, fb);
            mma_16816(part[1][j], fa1, fb);
          } else {
            mma_16816(acc[0][j], fa0, fb);
            mma_16816(acc[1][j], fa1, fb);
          }
        }
      }
    };

#pragma unroll
    for (int i = 0; i < STAGES - 1; ++i) issue(i);
    // Activations outside the ring: one step ahead while the tiles are few (two register copies
    // of many tiles would cost occupancy); otherwise issued before the ring wait, so their L1/L2
    // latency overlaps it.
    constexpr bool PREFETCH_A = !RING_A && NT <= 4;
    uint32_t av[NT][AWORDS];
    if constexpr (PREFETCH_A) load_a(av, 0);
    for (int i = 0; i < n_my; ++i) {
      if constexpr (!RING_A && !PREFETCH_A) load_a(av, i);
      copy_async_wait<STAGES - 2>();  // step i has landed (this lane's own copies)
      const int slot = i % STAGES;
      const uint4 wq = ring[warp][slot][0][lane];
      const uint4 szv = ring[warp][slot][1][lane];
      issue(i + STAGES - 1);  // refills the slot step i - 1 used
      const int grp = ((first + i * WARPS_K) * KSTEP) >> group_shift;  // warp-uniform
      if (grp != cur_grp) {
        flush();
        cur_grp = grp;
        new_group(szv);
      }
      if constexpr (RING_A) {
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          const uint4 v = ring[warp][slot][2 + j][lane];
          av[j][0] = v.x; av[j][1] = v.y; av[j][2] = v.z; av[j][3] = v.w;
        }
        compute(wq, av);
      } else if constexpr (PREFETCH_A) {
        uint32_t av_next[NT][AWORDS];
        load_a(av_next, i + 1);
        compute(wq, av);
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
          for (int w = 0; w < AWORDS; ++w) av[j][w] = av_next[j][w];
      } else {
        compute(wq, av);
      }
    }
    copy_async_wait<0>();
    flush();
  } else {
    // Software pipeline: the next batch's loads are issued before the current batch is
    // computed, so every warp keeps loads in flight while it does arithmetic. Skipped when the
    // two register buffers would not fit (large UNROLL * NT).
    constexpr bool PREFETCH = UNROLL * NT <= 4;
    constexpr int STRIDE = WARPS_K * UNROLL;
    struct Batch {
      uint4 wq[UNROLL];
      uint4 szv[UNROLL];
      uint32_t av[UNROLL][NT][AWORDS];
    };
    auto load = [&](Batch& b, const int base) {
    #pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
          const int step = base + u * WARPS_K;
          const int row = step * 4 + t;  // packed word row of this lane
          const bool ok = step < s_end;
          if (ok && col_ok) {
            // Tiled layout: this warp's 4 word rows x 32 columns are 512 contiguous bytes.
            b.wq[u] = load_stream(reinterpret_cast<const uint4*>(
                qweight + ((size_t)col_block * total_steps + step) * 128 + lane * 4));
            const int grp = (row * V) >> group_shift;
            b.szv[u] = load_ro(reinterpret_cast<const uint4*>(sz + (size_t)grp * N + col0));
          } else {
            b.wq[u] = make_uint4(0u, 0u, 0u, 0u);
            b.szv[u] = make_uint4(0u, 0u, 0u, 0u);
          }
    #pragma unroll
          for (int j = 0; j < NT; ++j) {
            const int mr = 8 * j + g;
            const int m = m0 + mr;
            if (ok && mr < M_COUNT && m < M) {
              const half* arow = a + (size_t)m * K;
              if constexpr (ACT_ORDER) {
    #pragma unroll
                for (int w = 0; w < AWORDS; ++w) {
                  const half lo = load_ro(arow + load_ro(perm + row * V + 2 * w));
                  const half hi = load_ro(arow + load_ro(perm + row * V + 2 * w + 1));
                  b.av[u][j][w] = h2_as_u32(__halves2half2(lo, hi));
                }
              } else if constexpr (AWORDS == 4) {
                const uint4 v = load_ro(reinterpret_cast<const uint4*>(arow + row * V));
                b.av[u][j][0] = v.x; b.av[u][j][1] = v.y; b.av[u][j][2] = v.z; b.av[u][j][3] = v.w;
              } else {
                const uint2 v = load_ro(reinterpret_cast<const uint2*>(arow + row * V));
                b.av[u][j][0] = v.x; b.av[u][j][1] = v.y;
              }
            } else {
    #pragma unroll
              for (int w = 0; w < AWORDS; ++w) b.av[u][j][w] = 0u;
            }
          }
        }
    };
    auto compute = [&](const Batch& b, const int base) {
    #pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
          if (base + u * WARPS_K >= s_end) break;  // warp-uniform
          const uint32_t wcol[4] = {b.wq[u].x, b.wq[u].y, b.wq[u].z, b.wq[u].w};
          const uint32_t szc[4] = {b.szv[u].x, b.szv[u].y, b.szv[u].z, b.szv[u].w};
          half2 s2[4], z2[4];
    #pragma unroll
          for (int cc = 0; cc < 4; ++cc) {
            s2[cc] = __low2half2(u32_as_h2(szc[cc]));
            z2[cc] = __high2half2(u32_as_h2(szc[cc]));
          }
    #pragma unroll
          for (int ks = 0; ks < KS_PER_WORD; ++ks) {
            uint32_t p0[4], p1[4];
    #pragma unroll
            for (int cc = 0; cc < 4; ++cc) {
              p0[cc] = h2_as_u32(__hmul2(__hsub2(unpack_pair<BITS>(wcol[cc], 2 * ks), z2[cc]), s2[cc]));
              p1[cc] = h2_as_u32(__hmul2(__hsub2(unpack_pair<BITS>(wcol[cc], 2 * ks + 1), z2[cc]), s2[cc]));
            }
            // MMA row g <-> column col0+2x, row g+8 <-> column col0+2x+1.
            const uint32_t fa0[4] = {p0[0], p0[1], p1[0], p1[1]};
            const uint32_t fa1[4] = {p0[2], p0[3], p1[2], p1[3]};
    #pragma unroll
            for (int j = 0; j < NT; ++j) {
              const uint32_t lo = b.av[u][j][ks];
              const uint32_t hi = b.av[u][j][ks + V / 4];
              const uint32_t fb[2] = {__byte_perm(lo, hi, 0x5410), __byte_perm(lo, hi, 0x7632)};
              mma_16816(acc[0][j], fa0, fb);
              mma_16816(acc[1][j], fa1, fb);
            }
          }
        }
    };

    if constexpr (PREFETCH) {
      Batch cur, nxt;
      int base = s_begin + wk;
      if (base < s_end) load(cur, base);
      for (; base < s_end; base += STRIDE) {
        if (base + STRIDE < s_end) load(nxt, base + STRIDE);  // warp-uniform
        compute(cur, base);
        cur = nxt;
      }
    } else {
      Batch cur;
      for (int base = s_begin + wk; base < s_end; base += STRIDE) {
        load(cur, base);
        compute(cur, base);
      }
    }
  }

  // Lane (g, t) now holds C[m0 + 8j + 2t + e][col0 + 2x + h] = acc[x][j][2h + e].
  if constexpr (WARPS_K == 1) {
#pragma unroll
    for (int j = 0; j < NT; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int mr = 8 * j + 2 * t + e;
        const int m = m0 + mr;
        if (!col_ok || mr >= M_COUNT || m >= M) continue;
        const float v0 = acc[0][j][e], v1 = acc[0][j][2 + e];
        const float v2 = acc[1][j][e], v3 = acc[1][j][2 + e];
        if constexpr (SPLIT) {
          float* dst = ws + (size_t)m * N + col0;
          atomicAdd(dst + 0, v0); atomicAdd(dst + 1, v1);
          atomicAdd(dst + 2, v2); atomicAdd(dst + 3, v3);
        } else {
          const half2 h01 = __floats2half2_rn(v0, v1);
          const half2 h23 = __floats2half2_rn(v2, v3);
          *reinterpret_cast<uint2*>(c + (size_t)m * N + col0) = make_uint2(h2_as_u32(h01), h2_as_u32(h23));
        }
      }
    }
  } else {
    // Reduce the WARPS_K partial tiles through shared memory, one 8-row tile at a time.
    __shared__ float red[8][BLOCK_N];
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      for (int i = threadIdx.x; i < 8 * BLOCK_N; i += blockDim.x) (&red[0][0])[i] = 0.f;
      __syncthreads();
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int r = 2 * t + e;
        const int cl = wn * 32 + 4 * g;
        atomicAdd(&red[r][cl + 0], acc[0][j][e]);
        atomicAdd(&red[r][cl + 1], acc[0][j][2 + e]);
        atomicAdd(&red[r][cl + 2], acc[1][j][e]);
        atomicAdd(&red[r][cl + 3], acc[1][j][2 + e]);
      }
      __syncthreads();
      for (int i = threadIdx.x; i < 8 * BLOCK_N; i += blockDim.x) {
        const int r = i / BLOCK_N;
        const int cl = i % BLOCK_N;
        const int mr = 8 * j + r;
        const int m = m0 + mr;
        const int n = blockIdx.x * BLOCK_N + cl;
        if (mr >= M_COUNT || m >= M || n >= N) continue;
        if constexpr (SPLIT) {
          atomicAdd(ws + (size_t)m * N + n, red[r][cl]);
        } else {
          c[(size_t)m * N + n] = __float2half_rn(red[r][cl]);
        }
      }
      __syncthreads();
    }
  }

  if constexpr (SPLIT) {
    // Last block of this output tile converts the fp32 sums and leaves ws/counter at zero.
    __shared__ int is_last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
      const int tile = blockIdx.z * gridDim.x + blockIdx.x;
      is_last = atomicAdd(counters + tile, 1) == (int)gridDim.y - 1;
    }
    __syncthreads();
    if (is_last) {
      __threadfence();
      const int rows = min(M_COUNT, M - m0);
      for (int i = threadIdx.x; i < rows * BLOCK_N; i += blockDim.x) {
        const int r = i / BLOCK_N;
        const int n = blockIdx.x * BLOCK_N + i % BLOCK_N;
        if (n >= N) continue;
        float* p = ws + (size_t)(m0 + r) * N + n;
        c[(size_t)(m0 + r) * N + n] = __float2half_rn(load_l2(p));
        *p = 0.f;
      }
      if (threadIdx.x == 0) counters[blockIdx.z * gridDim.x + blockIdx.x] = 0;
    }
  }
}

}  // namespace gemmtune
