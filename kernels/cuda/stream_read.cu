// gemmtune: the read-bandwidth ceiling. Streams `n` 16-byte words once, as a weight-streaming
// GEMV reads its weights (16-byte loads, evict-first), so "% of floor" figures compare a kernel
// with what a kernel can read, not with a copy engine (a torch copy_ captured in a CUDA graph
// runs at two thirds of this on an H200).
//
// Tunables:
//   UNROLL  independent 16-byte loads each thread issues before it consumes any (bytes in flight)
#include "common.cuh"

namespace gemmtune {

template <int UNROLL>
__global__ void __launch_bounds__(256)
stream_read(const uint4* __restrict__ src, long long n, uint32_t* __restrict__ out) {
  const long long stride = (long long)gridDim.x * blockDim.x;
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  uint32_t x = 0;
  for (; i + (UNROLL - 1) * stride < n; i += UNROLL * stride) {
    uint4 v[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) v[u] = load_stream(src + i + u * stride);
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) x ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
  for (; i < n; i += stride) {
    const uint4 v = load_stream(src + i);
    x ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  // Keeps the loads alive; with random data this store almost never happens.
  if (x == 0x9E3779B9u) out[blockIdx.x] = x;
}

}  // namespace gemmtune
