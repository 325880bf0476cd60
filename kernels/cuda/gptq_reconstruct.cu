// gemmtune: dequantize ("reconstruct") GPTQ weights to fp16 for the cuBLAS path.
//
// One lane turns one packed word row of 4 adjacent columns (16 bytes of the tiled qweight) into
// V rows of 4 fp16 values. Columns [n0, n0 + n_count) are written to `out` with leading dimension
// `ldo`, so the dispatch can reconstruct a slice of columns small enough to stay in L2 and have
// cuBLAS read it from there. With ACT_ORDER the stored rows are sorted by group and are written
// back to their original row `perm[k]`, so the result multiplies the caller's A unchanged.
#include "common.cuh"

namespace gemmtune {

template <int BITS, bool ACT_ORDER>
__global__ void __launch_bounds__(256)
gptq_reconstruct(const uint32_t* __restrict__ qweight,  // tiled, see weights.py
                 const half2* __restrict__ sz,          // [G, N]: (scale, 1024 + zero)
                 const int* __restrict__ perm,          // [K] (ACT_ORDER)
                 half* __restrict__ out,                // [K, ldo]
                 int K, int N, int group_shift, int n0, int n_count, int ldo) {
  static_assert(BITS == 4 || BITS == 8, "reconstruct handles 4- and 8-bit weights");
  constexpr int V = 32 / BITS;
  const int steps = K / (4 * V);  // 4-word-row steps per 32-column tile
  // Consecutive threads take consecutive column quads of one 4-row step: each thread reads the
  // 64 contiguous bytes (rows t = 0..3) of its quad in the tiled layout, and a warp writes
  // 32 x 8 contiguous bytes of each output row (the fp16 writes are 4x the bytes read).
  const int quads = (n_count + 3) / 4;
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  const int q = (int)(i % quads);
  const int step = (int)(i / quads);
  if (step >= steps) return;
  const int col = n0 + 4 * q;
  if (col >= N) return;
  const int col_block = col >> 5;
  const int g = (col & 31) >> 2;
  const uint4* src = reinterpret_cast<const uint4*>(qweight + ((size_t)col_block * steps + step) * 128) + 4 * g;
  uint4 wq[4];
#pragma unroll
  for (int t = 0; t < 4; ++t) wq[t] = load_stream(src + t);
  const int cl = col - n0;
#pragma unroll
  for (int t = 0; t < 4; ++t) {
    const int row = step * 4 + t;
    const int grp = (row * V) >> group_shift;
    const uint4 s = load_ro(reinterpret_cast<const uint4*>(sz + (size_t)grp * N + col));
    const uint32_t w[4] = {wq[t].x, wq[t].y, wq[t].z, wq[t].w};
    const uint32_t szc[4] = {s.x, s.y, s.z, s.w};
    half vals[4][V];  // [column][k within word]
#pragma unroll
    for (int cc = 0; cc < 4; ++cc) {
      const half2 s2 = __low2half2(u32_as_h2(szc[cc]));
      const half2 z2 = __high2half2(u32_as_h2(szc[cc]));
#pragma unroll
      for (int p = 0; p < V / 2; ++p) {
        const half2 d = __hmul2(__hsub2(unpack_pair<BITS>(w[cc], p), z2), s2);
        vals[cc][p] = __low2half(d);
        vals[cc][p + V / 2] = __high2half(d);
      }
    }
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const int k = row * V + j;
      const int dst = ACT_ORDER ? load_ro(perm + k) : k;
      const half2 h01 = __halves2half2(vals[0][j], vals[1][j]);
      const half2 h23 = __halves2half2(vals[2][j], vals[3][j]);
      *reinterpret_cast<uint2*>(out + (size_t)dst * ldo + cl) = make_uint2(h2_as_u32(h01), h2_as_u32(h23));
    }
  }
}

}  // namespace gemmtune
