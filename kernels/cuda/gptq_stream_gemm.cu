// gemmtune: the "stream" decode GEMM, C[M,N] = A[M,K] @ dequant(W)[K,N] for M <= 8, built to
// sit at the read floor on small layers as well as large ones.
//
// Why a second decode kernel: the decode kernel (gptq_gemm.cu) splits K across blocks through a
// global fp32 workspace, a counter and a last-block pass, fills its pipeline with one 16-byte
// copy per lane and step, and launches as many waves as its grid needs. On a 4096x4096 layer
// (8 MB of weights, ~2 us of reading on an H200) those fixed costs are most of the time.
//
// Work split. The weight is cut into units of WARPS_N 32-column tiles. A cluster of CLUSTER
// CTAs (a thread-block cluster, sm_90) covers one unit at a time, CTA rank r taking K slice r,
// and the clusters loop over the units (unit = cluster id, + clusters, ...): the host sizes the
// grid to one wave of resident CTAs, so there is no tail wave and no second launch.
// Inside a CTA, warp (wn, wk) streams tile `unit * WARPS_N + wn` over the wk-th part of the
// CTA's K slice, which is one contiguous piece of the tiled layout (weights.py).
//
// Weight stream. Each warp owns a ring of SLOTS shared-memory slots of CHUNK K steps (512 bytes
// a step): lane 0 fills a slot with one bulk copy (cp.async.bulk, the copy engine) plus the
// (scale, zero) rows of the groups the chunk touches, all completing on the slot's mbarrier.
// Every warp issues its first SLOTS chunks before it does anything else, and refills a slot as
// soon as it has consumed it, across unit boundaries: bytes are in flight from the first cycle
// to the last chunk. sm_80..sm_89 (no bulk copies) fill the same ring with per-lane cp.async
// that arrive on the same mbarriers; clusters need sm_90.
//
// Activations. The CTA's K slice of the (at most 8) rows of A is loaded into shared memory once,
// while the first chunks are in flight (gathered through `perm` with act-order), and read from
// there for every unit: the CTA's K slice never changes.
//
// Reduction, on chip. After a unit each warp leaves its 8x32 fp32 partial in shared memory; one
// barrier (the CTA's, or the cluster's) later the CTA -- or every CTA of the cluster for its share
// of the outputs, reading the other CTAs' partials through distributed shared memory -- sums the
// WARPS_K x CLUSTER partials and writes C in fp16. Partials are double-buffered by unit parity,
// so one barrier per unit suffices: a CTA can only overwrite a buffer after the next barrier,
// which every reader of it has passed.
//
// The inner math is the decode kernel's (transposed mma.m16n8k16, weight = 16-row operand,
// activations the 8-column one, exact (q - zero) integers scaled once per group in fp32).
//
// Shared memory (dynamic; `stream_smem_bytes` in kernels/config.py is the same formula):
//   ring  [WARPS][SLOTS][CHUNK * 512 weight bytes + CHUNK * 128 (scale, zero) bytes]
//   bars  [WARPS][SLOTS] mbarriers (8 bytes each), padded to a multiple of 16 bytes
//   red   [2][WARPS][8 rows][32 columns] fp32
//   A     [M rows][ceil(steps / CLUSTER) * KSTEP + 8] halves (+16 bytes a row: no bank conflicts)
#include "common.cuh"

#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ < 900)
#define GEMMTUNE_CLUSTER_DIMS(c)
#else
#define GEMMTUNE_CLUSTER_DIMS(c) __cluster_dims__(c, 1, 1)
#endif

#if !defined(__HIPCC__) && defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
#define GEMMTUNE_BULK 1
#endif

namespace gemmtune {
namespace stream {

constexpr int kStepBytes = 512;  // one K step of one 32-column tile (4 word rows x 32 columns)
constexpr int kSzRowBytes = 128;  // one group's (scale, 1024 + zero) for 32 columns

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void bar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared.b64 [%0], %1;\n" :: "r"(bar), "r"(count) : "memory");
}

// Make barrier initialisation visible to the copy engine (async proxy) before it completes on it.
__device__ __forceinline__ void bar_init_fence() {
#if defined(GEMMTUNE_BULK)
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void bar_arrive(uint32_t bar) {
  asm volatile("{\n .reg .b64 state;\n mbarrier.arrive.shared.b64 state, [%0];\n}\n" :: "r"(bar) : "memory");
}

__device__ __forceinline__ bool bar_test(uint32_t bar, uint32_t parity) {
  uint32_t done;
#if defined(GEMMTUNE_BULK)
  asm volatile(
      "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
      " selp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(done) : "r"(bar), "r"(parity) : "memory");
#else
  asm volatile(
      "{\n .reg .pred p;\n mbarrier.test_wait.parity.shared.b64 p, [%1], %2;\n"
      " selp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(done) : "r"(bar), "r"(parity) : "memory");
#endif
  return done != 0;
}

// Wait until the barrier's phase with this parity has completed.
__device__ __forceinline__ void bar_wait(uint32_t bar, uint32_t parity) {
  while (!bar_test(bar, parity)) {
  }
}

#if defined(GEMMTUNE_BULK)
__device__ __forceinline__ void bar_expect(uint32_t bar, uint32_t bytes) {
  asm volatile("{\n .reg .b64 state;\n mbarrier.arrive.expect_tx.shared.b64 state, [%0], %1;\n}\n"
               :: "r"(bar), "r"(bytes) : "memory");
}

// `bytes` (a multiple of 16) from global to this CTA's shared memory, completing on `bar`.
__device__ __forceinline__ void bulk_copy(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
      :: "r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
}

// Order this thread's earlier generic-proxy accesses of shared memory before later copy-engine
// writes to it (a slot is refilled right after the warp has read it).
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory");
  asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}

// A cluster barrier that orders nothing: for the last one, which only keeps every CTA's shared
// memory alive until the others have read it. Those reads were consumed before this thread's
// stores of C, so a relaxed arrival is late enough -- and a release here would hold every warp
// until its stores of C have reached L2 (a global round trip: "Stall Membar" was the top stall
// of the kernel at 4096x1024, M = 1 on an H100).
__device__ __forceinline__ void cluster_sync_relaxed() {
  asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory");
  asm volatile("barrier.cluster.wait.aligned;\n" ::: "memory");
}

// The float4 at this CTA's shared address `local`, as CTA `rank` of the cluster holds it.
__device__ __forceinline__ float4 load_remote(uint32_t local, uint32_t rank) {
  uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote) : "r"(local), "r"(rank));
  float4 v;
  asm volatile("ld.shared::cluster.v4.f32 {%0, %1, %2, %3}, [%4];\n"
               : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w) : "r"(remote) : "memory");
  return v;
}
#else
// Completion of this lane's earlier cp.async copies arrives on `bar` (init count 32).
__device__ __forceinline__ void bar_arrive_copies(uint32_t bar) {
#if !defined(__HIPCC__) && defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800)
  asm volatile("cp.async.mbarrier.arrive.noinc.shared.b64 [%0];\n" :: "r"(bar) : "memory");
#else
  bar_arrive(bar);
#endif
}
#endif

template <int BITS, int WARPS_N, int WARPS_K, int CHUNK, int SLOTS, bool ACT_ORDER, int CLUSTER>
__device__ __forceinline__ void body(const half* __restrict__ a, const uint32_t* __restrict__ qweight,
                                     const half2* __restrict__ sz, const int* __restrict__ perm,
                                     half* __restrict__ c, int M, int K, int N, int group_shift) {
  static_assert(BITS == 4 || BITS == 8, "the stream kernel handles 4- and 8-bit weights");
  static_assert(CHUNK >= 1 && SLOTS >= 2, "a ring needs two slots of at least one step");
#if !defined(GEMMTUNE_BULK)
  static_assert(CLUSTER == 1, "thread-block clusters need sm_90");
#endif
  constexpr int V = 32 / BITS;        // values of K per packed word
  constexpr int KSTEP = 4 * V;        // K per step (4 word rows)
  constexpr int KS_PER_WORD = V / 4;  // MMA k16 steps per step
  constexpr int AWORDS = V / 2;       // 32-bit words of activations per lane per step
  constexpr int WARPS = WARPS_N * WARPS_K;
  constexpr int THREADS = 32 * WARPS;
  constexpr int SLOT_BYTES = CHUNK * (kStepBytes + kSzRowBytes);

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int wn = warp % WARPS_N;
  const int wk = warp / WARPS_N;
  const int g = lane >> 2;
  const int t = lane & 3;

  const int steps = K / KSTEP;
  const int tiles = (N + 31) / 32;
  const int units = (tiles + WARPS_N - 1) / WARPS_N;
  const int clusters = gridDim.x / CLUSTER;
  const int cid = blockIdx.x / CLUSTER;
  const int rank = blockIdx.x % CLUSTER;
  const int n_units = cid < units ? (units - 1 - cid) / clusters + 1 : 0;

  // K steps of this CTA [k_lo, k_hi) and of this warp [w_lo, w_hi).
  const int k_lo = steps * rank / CLUSTER;
  const int k_hi = steps * (rank + 1) / CLUSTER;
  const int w_lo = k_lo + (k_hi - k_lo) * wk / WARPS_K;
  const int w_hi = k_lo + (k_hi - k_lo) * (wk + 1) / WARPS_K;
  const int n_chunks = (w_hi - w_lo + CHUNK - 1) / CHUNK;  // per unit
  const int total = n_units * n_chunks;                     // this warp's chunks in all

  extern __shared__ __align__(128) unsigned char smem[];
  unsigned char* ring = smem + warp * SLOTS * SLOT_BYTES;
  constexpr int BAR_BYTES = (WARPS * SLOTS * 8 + 15) / 16 * 16;  // keeps what follows 16-byte aligned
  unsigned long long* bars = reinterpret_cast<unsigned long long*>(smem + WARPS * SLOTS * SLOT_BYTES);
  float* red = reinterpret_cast<float*>(smem + WARPS * SLOTS * SLOT_BYTES + BAR_BYTES);
  half* as = reinterpret_cast<half*>(red + 2 * WARPS * 256);
  const int a_stride = ((steps + CLUSTER - 1) / CLUSTER) * KSTEP + 8;  // halves per row of A
  const uint32_t bar0 = smem_addr(bars + warp * SLOTS);

  if (lane == 0) {
    for (int s = 0; s < SLOTS; ++s) {
#if defined(GEMMTUNE_BULK)
      bar_init(bar0 + 8 * s, 1);  // lane 0's arrive (with the expected bytes)
#else
      bar_init(bar0 + 8 * s, 32);  // every lane's copies
#endif
    }
    bar_init_fence();
  }
  __syncwarp();

  // Chunk j of this warp's sequence into slot j % SLOTS (j past the end: nothing). Called by
  // lane 0 alone where the copy engine fills the ring, by every lane otherwise.
  auto issue = [&](const int j) {
    if (j >= total) return;
    const int it = j / n_chunks;
    const int ch = j - it * n_chunks;
    const int tile = (cid + it * clusters) * WARPS_N + wn;
    const int slot = j % SLOTS;
    const uint32_t bar = bar0 + 8 * slot;
    unsigned char* dst = ring + slot * SLOT_BYTES;
    if (tile >= tiles) {  // past the last tile of a partial unit: an empty chunk
      bar_arrive(bar);
      return;
    }
    const int s0 = w_lo + ch * CHUNK;
    const int cnt = min(CHUNK, w_hi - s0);
    const int g0 = (s0 * KSTEP) >> group_shift;
    const int g1 = ((s0 + cnt) * KSTEP - 1) >> group_shift;
    const int row_bytes = min(32, N - tile * 32) * 4;
    const uint32_t* wsrc = qweight + ((size_t)tile * steps + s0) * (kStepBytes / 4);
    const half2* ssrc = sz + tile * 32;
#if defined(GEMMTUNE_BULK)
    fence_proxy_async();
    bar_expect(bar, cnt * kStepBytes + (g1 - g0 + 1) * row_bytes);
    bulk_copy(smem_addr(dst), wsrc, cnt * kStepBytes, bar);
    for (int gr = g0; gr <= g1; ++gr)
      bulk_copy(smem_addr(dst + CHUNK * kStepBytes + (gr - g0) * kSzRowBytes),
                ssrc + (size_t)gr * N, row_bytes, bar);
#else
    for (int s = 0; s < cnt; ++s)
      copy16_async(reinterpret_cast<uint4*>(dst + s * kStepBytes) + lane, wsrc + s * 128 + lane * 4, true);
    for (int v = lane; v < (g1 - g0 + 1) * 8; v += 32) {
      const int gr = g0 + v / 8;
      const int part = v % 8;
      if (part * 16 < row_bytes)
        copy16_async(reinterpret_cast<uint4*>(dst + CHUNK * kStepBytes + (gr - g0) * kSzRowBytes) + part,
                     ssrc + (size_t)gr * N + part * 4, true);
    }
    bar_arrive_copies(bar);
#endif
  };

  auto refill = [&](const int j) {
#if defined(GEMMTUNE_BULK)
    if (lane == 0) issue(j);
#else
    issue(j);
#endif
  };

  // The weight stream first: SLOTS chunks in flight before anything else happens.
#pragma unroll
  for (int j = 0; j < SLOTS; ++j) refill(j);

  // This CTA's K slice of A into shared memory, gathered with act-order.
  {
    const int kk0 = k_lo * KSTEP;
    const int len = (k_hi - k_lo) * KSTEP;
    if constexpr (ACT_ORDER) {
      for (int i = threadIdx.x; i < len; i += THREADS) {
        const int col = load_ro(perm + kk0 + i);
        for (int m = 0; m < M; ++m) as[m * a_stride + i] = load_ro(a + (size_t)m * K + col);
      }
    } else {
      const int vecs = len / 8;
      for (int i = threadIdx.x; i < M * vecs; i += THREADS) {
        const int m = i / vecs;
        const int v = i - m * vecs;
        copy16_async(reinterpret_cast<uint4*>(as + m * a_stride) + v, a + (size_t)m * K + kk0 + v * 8, true);
      }
      copy_async_commit();
      copy_async_wait<0>();
    }
  }
  __syncthreads();

  // Accumulators: lane (g, t) holds C[2t + e][col0 + 2x + h] in acc[x][2h + e] (col0 = 4g).
  // Each step's MMAs start from zero and the step's exact (q - zero) x A sums are scaled into
  // `acc` in fp32 right away: steps carry no dependency through the tensor cores (only through
  // 8 FMAs), and no branch on the group, so the unrolled steps of a chunk overlap (a warp works
  // through its few steps at the rate of issue, not of MMA latency). Scaling once per group
  // instead (as the decode kernel does) chains every MMA of a group on the one before: on an
  // H100 that version sat ~4 us above the read floor whatever the layer's size, 2 MB included.
  float acc[2][4];
  // Pair p of a packed word as the exact integers (q - zero): common.cuh `minus_zero`.
  auto dequant = [&](const uint32_t w, const uint32_t w8, const int p, const half2 z2,
                     const half2 nz2) -> uint32_t {
    half2 d = minus_zero<BITS>(w, w8, p, z2, nz2);
    return h2_as_u32(d);
  };

  const bool row_ok = g < M;
  const half* arow = as + g * a_stride + t * V;
  // One K step: weights, (scale, zero) of its group and activations from shared memory.
  auto step_mma = [&](const unsigned char* src, const int s, const int step, const int g0) {
    const int gi = ((step * KSTEP) >> group_shift) - g0;
    const uint4 szv = *reinterpret_cast<const uint4*>(src + CHUNK * kStepBytes + gi * kSzRowBytes + g * 16);
    const uint4 wq = reinterpret_cast<const uint4*>(src + s * kStepBytes)[lane];
    uint32_t av[AWORDS];
    if (row_ok) {
      const half* ap = arow + (step - k_lo) * KSTEP;
      if constexpr (AWORDS == 4) {
        const uint4 v = *reinterpret_cast<const uint4*>(ap);
        av[0] = v.x; av[1] = v.y; av[2] = v.z; av[3] = v.w;
      } else {
        const uint2 v = *reinterpret_cast<const uint2*>(ap);
        av[0] = v.x; av[1] = v.y;
      }
    } else {
#pragma unroll
      for (int w = 0; w < AWORDS; ++w) av[w] = 0u;
    }
    const uint32_t szc[4] = {szv.x, szv.y, szv.z, szv.w};
    half2 z2[4], nz2[4];
    float sf[4];
#pragma unroll
    for (int cc = 0; cc < 4; ++cc) {
      const half2 v = u32_as_h2(szc[cc]);
      z2[cc] = __high2half2(v);
      nz2[cc] = __hsub2(__float2half2_rn(960.f), z2[cc]);
      sf[cc] = __low2float(v);
    }
    const uint32_t wcol[4] = {wq.x, wq.y, wq.z, wq.w};
    const uint32_t wcol8[4] = {wcol[0] >> 8, wcol[1] >> 8, wcol[2] >> 8, wcol[3] >> 8};
    float part[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
    for (int ks = 0; ks < KS_PER_WORD; ++ks) {
      uint32_t p0[4], p1[4];
#pragma unroll
      for (int cc = 0; cc < 4; ++cc) {
        p0[cc] = dequant(wcol[cc], wcol8[cc], 2 * ks, z2[cc], nz2[cc]);
        p1[cc] = dequant(wcol[cc], wcol8[cc], 2 * ks + 1, z2[cc], nz2[cc]);
      }
      const uint32_t fa0[4] = {p0[0], p0[1], p1[0], p1[1]};
      const uint32_t fa1[4] = {p0[2], p0[3], p1[2], p1[3]};
      const uint32_t lo = av[ks];
      const uint32_t hi = av[ks + V / 4];
      const uint32_t fb[2] = {__byte_perm(lo, hi, 0x5410), __byte_perm(lo, hi, 0x7632)};
      mma_16816(part[0], fa0, fb);
      mma_16816(part[1], fa1, fb);
    }
#pragma unroll
    for (int x = 0; x < 2; ++x)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[x][e] = fmaf(part[x][e], sf[2 * x + e / 2], acc[x][e]);
  };

  int j = 0;  // this warp's chunk counter
  for (int it = 0; it < n_units; ++it) {
    const int unit = cid + it * clusters;
    const bool tile_ok = unit * WARPS_N + wn < tiles;
#pragma unroll
    for (int x = 0; x < 2; ++x)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[x][e] = 0.f;
    for (int ch = 0; ch < n_chunks; ++ch, ++j) {
      const int slot = j % SLOTS;
      bar_wait(bar0 + 8 * slot, (uint32_t)(j / SLOTS) & 1u);
      if (tile_ok) {
        const unsigned char* src = ring + slot * SLOT_BYTES;
        const int s0 = w_lo + ch * CHUNK;
        const int cnt = min(CHUNK, w_hi - s0);
        const int g0 = (s0 * KSTEP) >> group_shift;
        if (cnt == CHUNK) {  // warp-uniform; every chunk but a warp's last
#pragma unroll
          for (int s = 0; s < CHUNK; ++s) step_mma(src, s, s0 + s, g0);
        } else {
#pragma unroll 1
          for (int s = 0; s < cnt; ++s) step_mma(src, s, s0 + s, g0);
        }
      }
      __syncwarp();
      refill(j + SLOTS);  // the slot just consumed
    }

    // This warp's 8 x 32 partial into red[it & 1][warp].
    float* buf = red + (it & 1) * WARPS * 256;
    float* mine = buf + warp * 256;
#pragma unroll
    for (int e = 0; e < 2; ++e)
      *reinterpret_cast<float4*>(mine + (2 * t + e) * 32 + 4 * g) =
          make_float4(acc[0][e], acc[0][2 + e], acc[1][e], acc[1][2 + e]);
    __syncthreads();
    // The CTA's sum over its WARPS_K warps of each output quad (4 columns), by as many threads
    // as there are quads. One CTA: that is C. A cluster: it goes back into the first warp row's
    // partial (only this thread touches that quad), and after the cluster barrier each CTA sums
    // its share of the quads over the cluster's CTAs.
    const int quads = M * WARPS_N * 8;
    for (int i = threadIdx.x; i < quads; i += THREADS) {
      const int r = i / (WARPS_N * 8);
      const int rem = i - r * (WARPS_N * 8);
      const int tn = rem / 8;
      const int q4 = rem % 8;
      float* p0 = buf + tn * 256 + r * 32 + q4 * 4;  // warp (wk 0, tn)
      float4 sum = *reinterpret_cast<const float4*>(p0);
#pragma unroll
      for (int k2 = 1; k2 < WARPS_K; ++k2) {
        const float4 v = *reinterpret_cast<const float4*>(p0 + k2 * WARPS_N * 256);
        sum.x += v.x; sum.y += v.y; sum.z += v.z; sum.w += v.w;
      }
      if constexpr (CLUSTER == 1) {
        const int col = (unit * WARPS_N + tn) * 32 + q4 * 4;
        if (col < N) {
          const half2 h01 = __floats2half2_rn(sum.x, sum.y);
          const half2 h23 = __floats2half2_rn(sum.z, sum.w);
          *reinterpret_cast<uint2*>(c + (size_t)r * N + col) = make_uint2(h2_as_u32(h01), h2_as_u32(h23));
        }
      } else {
        *reinterpret_cast<float4*>(p0) = sum;
      }
    }
#if defined(GEMMTUNE_BULK)
    if constexpr (CLUSTER > 1) {
      cluster_sync();
      for (int i = rank * THREADS + threadIdx.x; i < quads; i += CLUSTER * THREADS) {
        const int r = i / (WARPS_N * 8);
        const int rem = i - r * (WARPS_N * 8);
        const int tn = rem / 8;
        const int q4 = rem % 8;
        const int col = (unit * WARPS_N + tn) * 32 + q4 * 4;
        if (col >= N) continue;
        const uint32_t p0 = smem_addr(buf + tn * 256 + r * 32 + q4 * 4);
        float4 sum = load_remote(p0, 0u);
#pragma unroll
        for (int rr = 1; rr < CLUSTER; ++rr) {
          const float4 v = load_remote(p0, (uint32_t)rr);
          sum.x += v.x; sum.y += v.y; sum.z += v.z; sum.w += v.w;
        }
        const half2 h01 = __floats2half2_rn(sum.x, sum.y);
        const half2 h23 = __floats2half2_rn(sum.z, sum.w);
        *reinterpret_cast<uint2*>(c + (size_t)r * N + col) = make_uint2(h2_as_u32(h01), h2_as_u32(h23));
      }
    }
#endif
  }
#if defined(GEMMTUNE_BULK)
  // No CTA leaves while another may still read its partials.
  if constexpr (CLUSTER > 1) cluster_sync_relaxed();
#endif
}

}  // namespace stream

// One CTA per K slice (CLUSTER = 1): works on sm_80 and later.
template <int BITS, int WARPS_N, int WARPS_K, int CHUNK, int SLOTS, bool ACT_ORDER>
__global__ void __launch_bounds__(WARPS_N * WARPS_K * 32, 1)
gptq_stream_gemm(const half* __restrict__ a, const uint32_t* __restrict__ qweight,
                 const half2* __restrict__ sz, const int* __restrict__ perm, half* __restrict__ c,
                 int M, int K, int N, int group_shift) {
  stream::body<BITS, WARPS_N, WARPS_K, CHUNK, SLOTS, ACT_ORDER, 1>(a, qweight, sz, perm, c, M, K, N, group_shift);
}

// CLUSTER CTAs split K and reduce through distributed shared memory (sm_90; the cluster shape is
// compiled in, so an ordinary launch of a grid that is a multiple of CLUSTER runs it).
template <int BITS, int WARPS_N, int WARPS_K, int CHUNK, int SLOTS, bool ACT_ORDER, int CLUSTER>
__global__ void GEMMTUNE_CLUSTER_DIMS(CLUSTER) __launch_bounds__(WARPS_N * WARPS_K * 32, 1)
gptq_stream_gemm_cluster(const half* __restrict__ a, const uint32_t* __restrict__ qweight,
                         const half2* __restrict__ sz, const int* __restrict__ perm,
                         half* __restrict__ c, int M, int K, int N, int group_shift) {
  stream::body<BITS, WARPS_N, WARPS_K, CHUNK, SLOTS, ACT_ORDER, CLUSTER>(a, qweight, sz, perm, c, M, K, N, group_shift);
}

}  // namespace gemmtune
