// gemmtune: the "stream" decode GEMM, C[M,N] = A[M,K] @ dequant(W)[K,N] for M <= 8, built to
// sit at the read floor on small layers as well as large ones.
//
// Why a second decode kernel: the decode kernel (gptq_gemm.cu) splits K across blocks through a
// global fp32 workspace, a counter and a last-block pass, fills its pipeline with one 16-byte
// copy per lane and step, and launches as many waves as its grid needs. On a 4096x4096 layer
// (8 MB of weights, ~2 us of reading on an H200) those fixed costs are most of the time.
//
// Work split: every CTA the same number of weight bytes, one reduction at the end. The weight
// is 32-column tiles of K steps (512 bytes a step; one tile's steps are contiguous in the tiled
// layout, weights.py). A cluster of CLUSTER CTAs (a thread-block cluster, sm_90) takes an even
// share of the tiles, CTA rank r of it the K slice r of each: the host sizes the grid to one wave
// of resident CTAs, so no CTA starts late and none idles while another still reads. Inside a CTA
// the (tile, step) pairs of its share, tile-major (the order they lie in memory), are cut into
// WARPS equal runs, one per warp: a warp's run may end inside a tile and the next warp's begin
// there. So a layer whose tile count divides badly into the SM count (5120 columns = 160 tiles on
// 132 SMs) still spreads evenly, with clusters splitting K, and no warp waits for another until
// the end: an earlier revision gave each CTA whole tiles at a time and met at a barrier after
// each, which left CTAs with one tile more than others idle and made looping clusters slow.
//
// Weight stream. Each warp owns a ring of SLOTS shared-memory slots of up to CHUNK K steps: lane
// 0 fills a slot with one bulk copy (cp.async.bulk, the copy engine) plus the (scale, zero) rows
// of the groups the chunk touches, all completing on the slot's mbarrier. A warp's chunks follow
// its run, cut at multiples of CHUNK steps of a tile (and where the run starts and ends). Every
// warp issues its first SLOTS chunks before it does anything else, and refills a slot as soon as
// it has consumed it: bytes are in flight from the first cycle to the last chunk. sm_80..sm_89
// (no bulk copies) fill the same ring with per-lane cp.async that arrive on the same mbarriers;
// clusters need sm_90.
//
// Activations. The CTA's K slice of the (at most 8) rows of A is loaded into shared memory once
// and read from there for every tile: the CTA's K slice never changes. On sm_90 without
// act-order it is one bulk copy a row, issued by thread 0 before anything else, so its round trip
// overlaps the start; otherwise threads load it (gathered through `perm` with act-order) while
// the first chunks are in flight.
//
// Reduction, on chip and deterministic. When a warp's run leaves a tile, it stores its M x 32
// fp32 partial of that tile in its own slot, `tile + warp` (tile counted within the cluster's
// share): a warp's tiles begin where the previous warp's end, so no two (warp, tile) pairs share
// a slot. After one CTA barrier, the CTA sums each tile's slots over the warps whose runs cover
// it, in warp order. One CTA: that is C. A cluster: output quad i (4 columns of one row) belongs
// to CTA i % CLUSTER, and every other CTA pushes its sum of the quad into the owner's slot for its
// rank (st.async through distributed shared memory, completing on the owner's mbarrier); the
// owner adds the ranks' sums in rank order. A push is one way, so no CTA waits for a read of its
// shared memory to finish, and there is no cluster barrier at the end (an earlier revision read
// the other CTAs' partials between two cluster barriers: ncu put a quarter of the warps' time
// of a 5120x5120, M = 1 call in that epilogue). No atomics: a call's result does not depend on
// timing.
//
// The inner math is the decode kernel's (transposed mma.m16n8k16, weight = 16-row operand,
// activations the 8-column one, exact (q - zero) integers scaled per step in fp32).
//
// Shared memory (dynamic; `stream_smem_bytes` in kernels/config.py is the same formula):
//   ring  [WARPS][SLOTS][CHUNK * 512 weight bytes + CHUNK * 128 (scale, zero) bytes]
//   bars  [WARPS][SLOTS] ring mbarriers, then A's and the pushes' (8 bytes each), padded to a
//         multiple of 16 bytes
//   part  [TILES + WARPS - 1][M rows][32 columns] fp32 (TILES = ceil(tiles / clusters), the most
//         one cluster takes)
//   recv  clusters only: TILES * M * 8 quads (16 bytes each), rounded up to a multiple of CLUSTER
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

// The two halves of a cluster barrier, apart: a CTA arrives (relaxed) once its barriers are
// initialised, at the start, and waits only before its first store into another CTA, at the end,
// by which time every CTA of the cluster has long arrived: the wait costs nothing.
__device__ __forceinline__ void cluster_arrive_relaxed() {
  asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory");
}

__device__ __forceinline__ void cluster_wait() {
  asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}

// Wait until this CTA's barrier phase with this parity has completed, acquiring at cluster scope:
// for data other CTAs of the cluster stored (st.async) and completed on it.
__device__ __forceinline__ void bar_wait_cluster(uint32_t bar, uint32_t parity) {
  uint32_t done = 0;
  while (!done) {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%1], %2;\n"
        " selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done) : "r"(bar), "r"(parity) : "memory");
  }
}

// `v` into the shared address `local` as CTA `rank` of the cluster holds it, completing `bytes`
// on that CTA's mbarrier at `local_bar`: a one-way push (a read of another CTA's shared memory
// is a round trip, and its owner could not leave until every reader was done).
__device__ __forceinline__ void store_remote(uint32_t local, uint32_t rank, float4 v, uint32_t local_bar) {
  uint32_t remote, bar;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote) : "r"(local), "r"(rank));
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(bar) : "r"(local_bar), "r"(rank));
  asm volatile(
      "st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.f32 [%0], {%1, %2, %3, %4}, [%5];\n"
      :: "r"(remote), "f"(v.x), "f"(v.y), "f"(v.z), "f"(v.w), "r"(bar) : "memory");
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

// The first (tile, step) position of warp w's run when a CTA's share is `tiles` tiles of
// `slice` steps: the share cut into WARPS runs as equal as whole steps allow (w = WARPS: the end).
template <int WARPS>
__device__ __forceinline__ int run_begin(const int w, const int tiles, const int slice) {
  return w * tiles * slice / WARPS;
}

// The warp whose run holds position p (the last w with run_begin(w) <= p), for p < tiles * slice.
template <int WARPS>
__device__ __forceinline__ int run_of(const int p, const int tiles, const int slice) {
  return ((p + 1) * WARPS - 1) / (tiles * slice);
}

// The warps whose runs cover tile `tl`: w0 (its first position's) to w1 (its last's). Both runs
// are non-empty; one between them can be empty (fewer positions than warps) and wrote nothing.
template <int WARPS>
__device__ __forceinline__ void covering_warps(const int tl, const int tiles, const int slice, int& w0, int& w1) {
  w0 = run_of<WARPS>(tl * slice, tiles, slice);
  w1 = run_of<WARPS>((tl + 1) * slice - 1, tiles, slice);
}

template <int BITS, int WARPS, int CHUNK, int SLOTS, bool ACT_ORDER, int CLUSTER>
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
  constexpr int THREADS = 32 * WARPS;
  constexpr int SLOT_BYTES = CHUNK * (kStepBytes + kSzRowBytes);

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int g = lane >> 2;
  const int t = lane & 3;

  const int steps = K / KSTEP;
  const int tiles = (N + 31) / 32;
  const int clusters = gridDim.x / CLUSTER;
  const int cid = blockIdx.x / CLUSTER;
  const int rank = blockIdx.x % CLUSTER;
  // This cluster's tiles [t_lo, t_lo + n_t) (the host launches no more clusters than tiles) and
  // the most any cluster takes, which sizes the partials' slot array alike in every CTA.
  const int t_lo = tiles * cid / clusters;
  const int n_t = tiles * (cid + 1) / clusters - t_lo;
  const int t_max = (tiles + clusters - 1) / clusters;

  // K steps of this CTA's slice [k_lo, k_lo + slice), and of rank r's (the host keeps every
  // slice at least one step long).
  auto slice_lo = [&](const int r) { return steps * r / CLUSTER; };
  const int k_lo = slice_lo(rank);
  const int slice = slice_lo(rank + 1) - k_lo;
  // This warp's run [p_lo, p_hi) of positions p = tile * slice + step (tile within the cluster's
  // share, step within the slice), and its chunks: each tile's slice is cut at multiples of CHUNK
  // steps, and the run takes the pieces it overlaps (chunk grid index gc = tile * cpt + piece).
  const int p_lo = run_begin<WARPS>(warp, n_t, slice);
  const int p_hi = run_begin<WARPS>(warp + 1, n_t, slice);
  const int cpt = (slice + CHUNK - 1) / CHUNK;
  const int tl0 = p_lo / slice;
  const int piece0 = (p_lo - tl0 * slice) / CHUNK;
  const int total = p_hi > p_lo ? (p_hi - 1) / slice * cpt + (p_hi - 1) % slice / CHUNK - (tl0 * cpt + piece0) + 1 : 0;
  // A chunk's place in the run, (tile within the share, piece of that tile's slice): the warp
  // walks its chunks in order, so a cursor steps from one to the next without a division (the
  // consumer's and the refill's cursors, SLOTS chunks apart).
  struct Cursor {
    int tl, piece;
  };
  auto next = [&](Cursor& at) {
    if (++at.piece == cpt) {
      at.piece = 0;
      ++at.tl;
    }
  };
  // Steps [s_a, s_b) of the slice that the chunk at `at` covers.
  auto steps_of = [&](const Cursor at, int& s_a, int& s_b) {
    s_a = max(at.piece * CHUNK, p_lo - at.tl * slice);
    s_b = min(min(at.piece * CHUNK + CHUNK, slice), p_hi - at.tl * slice);
  };

  // Shared memory (the header's layout): the rings, their barriers and the A and push barriers,
  // the partials, the pushed sums a cluster reduces (none without one), this CTA's slice of A.
  extern __shared__ __align__(128) unsigned char smem[];
  unsigned char* ring = smem + warp * SLOTS * SLOT_BYTES;
  constexpr int BAR_BYTES = ((WARPS * SLOTS + 2) * 8 + 15) / 16 * 16;  // keeps what follows 16-byte aligned
  unsigned long long* bars = reinterpret_cast<unsigned long long*>(smem + WARPS * SLOTS * SLOT_BYTES);
  float* part = reinterpret_cast<float*>(smem + WARPS * SLOTS * SLOT_BYTES + BAR_BYTES);
  const int slot_floats = M * 32;  // one slot: M rows of 32 columns
  float4* recv = reinterpret_cast<float4*>(part + (t_max + WARPS - 1) * slot_floats);
  const int recv_quads = CLUSTER > 1 ? (t_max * M * 8 + CLUSTER - 1) / CLUSTER * CLUSTER : 0;
  half* as = reinterpret_cast<half*>(recv + recv_quads);
  const int a_stride = ((steps + CLUSTER - 1) / CLUSTER) * KSTEP + 8;  // halves per row of A
  const uint32_t bar0 = smem_addr(bars + warp * SLOTS);
  [[maybe_unused]] const uint32_t a_bar = smem_addr(bars + WARPS * SLOTS);  // A has landed
  [[maybe_unused]] const uint32_t push_bar = a_bar + 8;  // the other CTAs' sums of my quads have landed
  // The outputs of this cluster's share, in quads (4 columns of one row of one tile): quad i is
  // reduced over the cluster by CTA i % CLUSTER, which the others push their sums of it to.
  const int quads = n_t * M * 8;
  const int kk0 = k_lo * KSTEP;
  const int a_len = slice * KSTEP;  // halves of each row of A this CTA reads
#if defined(GEMMTUNE_BULK)
  constexpr bool kBulkA = !ACT_ORDER;  // contiguous: one bulk copy a row
#else
  constexpr bool kBulkA = false;
#endif

  if (threadIdx.x == 0) {
#if defined(GEMMTUNE_BULK)
    // A first: it is small, and its round trip then overlaps everything up to the first step.
    if constexpr (kBulkA) {
      bar_init(a_bar, 1);
      bar_init_fence();
      bar_expect(a_bar, M * a_len * 2);
      for (int m = 0; m < M; ++m)
        bulk_copy(smem_addr(as + m * a_stride), a + (size_t)m * K + kk0, a_len * 2, a_bar);
    }
    if constexpr (CLUSTER > 1) {
      // Armed for the bytes the other CTAs will push: (CLUSTER - 1) sums of each quad it owns.
      const int owned = quads > rank ? (quads - rank + CLUSTER - 1) / CLUSTER : 0;
      bar_init(push_bar, 1);
      bar_init_fence();
      bar_expect(push_bar, (CLUSTER - 1) * owned * 16);
    }
#endif
  }
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

  // The chunk at `at` of this warp's run into ring slot j % SLOTS. Called by lane 0 alone where
  // the copy engine fills the ring, by every lane otherwise.
  auto issue = [&](const int j, const Cursor at) {
    int s_a, s_b;
    steps_of(at, s_a, s_b);
    const int tile = t_lo + at.tl;
    const uint32_t bar = bar0 + 8 * (j % SLOTS);
    unsigned char* dst = ring + (j % SLOTS) * SLOT_BYTES;
    const int s0 = k_lo + s_a;
    const int cnt = s_b - s_a;
    const int g0 = (s0 * KSTEP) >> group_shift;
    const int g1 = ((s0 + cnt) * KSTEP - 1) >> group_shift;
    const int row_bytes = min(32, N - tile * 32) * 4;
    const uint32_t* wsrc = qweight + ((size_t)tile * steps + s0) * (kStepBytes / 4);
    const half2* ssrc = sz + tile * 32;
#if defined(GEMMTUNE_BULK)
    if (j >= SLOTS) fence_proxy_async();  // the warp has read this slot before (not the first fills)
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
      const int piece = v % 8;
      if (piece * 16 < row_bytes)
        copy16_async(reinterpret_cast<uint4*>(dst + CHUNK * kStepBytes + (gr - g0) * kSzRowBytes) + piece,
                     ssrc + (size_t)gr * N + piece * 4, true);
    }
    bar_arrive_copies(bar);
#endif
  };

  // Chunk j of the run (at the refill cursor, which then moves on); past the end, nothing.
  Cursor fill = {tl0, piece0};
  auto refill = [&](const int j) {
    if (j >= total) return;
#if defined(GEMMTUNE_BULK)
    if (lane == 0) issue(j, fill);
#else
    issue(j, fill);
#endif
    next(fill);
  };

  // The weight stream first: SLOTS chunks in flight before anything else happens.
#pragma unroll
  for (int j = 0; j < SLOTS; ++j) refill(j);

  // This CTA's K slice of A into shared memory where no bulk copy brought it: gathered with
  // act-order, by per-thread copies before sm_90.
  if constexpr (!kBulkA) {
    if constexpr (ACT_ORDER) {
      for (int i = threadIdx.x; i < a_len; i += THREADS) {
        const int col = load_ro(perm + kk0 + i);
        for (int m = 0; m < M; ++m) as[m * a_stride + i] = load_ro(a + (size_t)m * K + col);
      }
    } else {
      const int vecs = a_len / 8;
      for (int i = threadIdx.x; i < M * vecs; i += THREADS) {
        const int m = i / vecs;
        const int v = i - m * vecs;
        copy16_async(reinterpret_cast<uint4*>(as + m * a_stride) + v, a + (size_t)m * K + kk0 + v * 8, true);
      }
      copy_async_commit();
      copy_async_wait<0>();
    }
  }
  // Every thread sees the barriers thread 0 initialised (and A, where threads loaded it).
  __syncthreads();
#if defined(GEMMTUNE_BULK)
  if constexpr (CLUSTER > 1) cluster_arrive_relaxed();  // this CTA's push barrier is ready
  if constexpr (kBulkA) bar_wait(a_bar, 0);
#endif

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
    float sum[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
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
      mma_16816(sum[0], fa0, fb);
      mma_16816(sum[1], fa1, fb);
    }
#pragma unroll
    for (int x = 0; x < 2; ++x)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[x][e] = fmaf(sum[x][e], sf[2 * x + e / 2], acc[x][e]);
  };

  // The warp's partial of tile tl into its slot (tl + warp), rows below M only.
  auto flush = [&](const int tl) {
    float* mine = part + (tl + warp) * slot_floats;
#pragma unroll
    for (int e = 0; e < 2; ++e)
      if (2 * t + e < M)
        *reinterpret_cast<float4*>(mine + (2 * t + e) * 32 + 4 * g) =
            make_float4(acc[0][e], acc[0][2 + e], acc[1][e], acc[1][2 + e]);
  };

  int cur = -1;  // the tile (within the share) `acc` holds
  Cursor at = {tl0, piece0};
  for (int j = 0; j < total; ++j, next(at)) {
    const int slot = j % SLOTS;
    bar_wait(bar0 + 8 * slot, (uint32_t)(j / SLOTS) & 1u);
    int s_a, s_b;
    steps_of(at, s_a, s_b);
    if (at.tl != cur) {  // warp-uniform
      if (cur >= 0) flush(cur);
#pragma unroll
      for (int x = 0; x < 2; ++x)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[x][e] = 0.f;
      cur = at.tl;
    }
    const unsigned char* src = ring + slot * SLOT_BYTES;
    const int s0 = k_lo + s_a;
    const int cnt = s_b - s_a;
    const int g0 = (s0 * KSTEP) >> group_shift;
    if (cnt == CHUNK) {  // warp-uniform; every chunk but those cut by a tile's or a run's end
#pragma unroll
      for (int s = 0; s < CHUNK; ++s) step_mma(src, s, s0 + s, g0);
    } else {
#pragma unroll 1
      for (int s = 0; s < cnt; ++s) step_mma(src, s, s0 + s, g0);
    }
    __syncwarp();
    refill(j + SLOTS);  // the slot just consumed
  }
  if (cur >= 0) flush(cur);
  __syncthreads();
#if defined(GEMMTUNE_BULK)
  // Every CTA of the cluster has initialised its push barrier (they arrived at their start).
  if constexpr (CLUSTER > 1) cluster_wait();
#endif

  // Output quad q (row q / 8, columns 4 (q % 8) ..) of share tile tl into C, where it lies in N.
  auto store_quad = [&](const int tl, const int q, const float4 sum) {
    const int col = (t_lo + tl) * 32 + (q % 8) * 4;
    if (col < N) {
      const half2 h01 = __floats2half2_rn(sum.x, sum.y);
      const half2 h23 = __floats2half2_rn(sum.z, sum.w);
      *reinterpret_cast<uint2*>(c + (size_t)(q / 8) * N + col) = make_uint2(h2_as_u32(h01), h2_as_u32(h23));
    }
  };

  // The CTA's sum of each output quad (4 columns of one row of one tile) over the warps that
  // cover its tile, by as many threads as there are quads. One CTA: that is C. A cluster: quad i
  // goes to CTA i % CLUSTER, into its slot for this rank (pushed, or stored where that is this
  // CTA), and each CTA then sums the quads it owns over the ranks, in rank order.
  for (int i = threadIdx.x; i < quads; i += THREADS) {
    const int tl = i / (M * 8);
    const int q = i - tl * (M * 8);  // row * 8 + quad
    int w0, w1;
    covering_warps<WARPS>(tl, n_t, slice, w0, w1);
    float4 sum = *reinterpret_cast<const float4*>(part + (tl + w0) * slot_floats + q * 4);
    for (int w = w0 + 1; w <= w1; ++w) {
      if (run_begin<WARPS>(w + 1, n_t, slice) == run_begin<WARPS>(w, n_t, slice)) continue;  // empty run
      const float4 v = *reinterpret_cast<const float4*>(part + (tl + w) * slot_floats + q * 4);
      sum.x += v.x; sum.y += v.y; sum.z += v.z; sum.w += v.w;
    }
    if constexpr (CLUSTER == 1) {
      store_quad(tl, q, sum);
    } else {
#if defined(GEMMTUNE_BULK)
      const int owner = i % CLUSTER;
      float4* slot = recv + (i - owner) + rank;
      if (owner == rank) {
        *slot = sum;
      } else {
        store_remote(smem_addr(slot), (uint32_t)owner, sum, push_bar);
      }
#endif
    }
  }
#if defined(GEMMTUNE_BULK)
  if constexpr (CLUSTER > 1) {
    bar_wait_cluster(push_bar, 0);  // the other CTAs' sums of my quads
    __syncthreads();        // and this CTA's own, stored by other threads
    for (int i = rank + CLUSTER * threadIdx.x; i < quads; i += CLUSTER * THREADS) {
      const int tl = i / (M * 8);
      const float4* from = recv + (i - rank);
      float4 sum = from[0];
#pragma unroll
      for (int rr = 1; rr < CLUSTER; ++rr) {
        const float4 v = from[rr];
        sum.x += v.x; sum.y += v.y; sum.z += v.z; sum.w += v.w;
      }
      store_quad(tl, i - tl * (M * 8), sum);
    }
    // No barrier at the end: nothing reads another CTA's shared memory, and a CTA leaves only
    // once everything pushed to it has landed.
  }
#endif
}

}  // namespace stream

// One CTA per K slice (CLUSTER = 1): works on sm_80 and later.
template <int BITS, int WARPS, int CHUNK, int SLOTS, bool ACT_ORDER>
__global__ void __launch_bounds__(WARPS * 32, 1)
gptq_stream_gemm(const half* __restrict__ a, const uint32_t* __restrict__ qweight,
                 const half2* __restrict__ sz, const int* __restrict__ perm, half* __restrict__ c,
                 int M, int K, int N, int group_shift) {
  stream::body<BITS, WARPS, CHUNK, SLOTS, ACT_ORDER, 1>(a, qweight, sz, perm, c, M, K, N, group_shift);
}

// CLUSTER CTAs split K and reduce through distributed shared memory (sm_90; the cluster shape is
// compiled in, so an ordinary launch of a grid that is a multiple of CLUSTER runs it).
template <int BITS, int WARPS, int CHUNK, int SLOTS, bool ACT_ORDER, int CLUSTER>
__global__ void GEMMTUNE_CLUSTER_DIMS(CLUSTER) __launch_bounds__(WARPS * 32, 1)
gptq_stream_gemm_cluster(const half* __restrict__ a, const uint32_t* __restrict__ qweight,
                         const half2* __restrict__ sz, const int* __restrict__ perm,
                         half* __restrict__ c, int M, int K, int N, int group_shift) {
  stream::body<BITS, WARPS, CHUNK, SLOTS, ACT_ORDER, CLUSTER>(a, qweight, sz, perm, c, M, K, N, group_shift);
}

}  // namespace gemmtune
