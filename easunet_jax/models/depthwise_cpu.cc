// Depthwise 3x3 convolution on NHWC float32 maps for XLA:CPU, called through jax.ffi (see depthwise_cpu.py).
//
// XLA:CPU runs a grouped convolution far slower than nine shifted multiply-adds, and even those leave the
// kernel gradient at nine separate passes over a shifted copy of the input each. Here each pass over the
// map is one loop: the forward (and, with the kernel mirrored, the input gradient) adds the nine taps into
// an output row that stays in cache, and the kernel gradient reads x and the incoming gradient once for
// all nine taps.
//
// Work is split into row chunks run on XLA's intra-op thread pool. The kernel gradient sums per-chunk
// partials in chunk order, so results do not depend on which thread ran which chunk.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kMaxChunks = 32;

// Runs fn(chunk) for chunk in [0, num_chunks) on the caller and the pool's other threads. Chunks are
// claimed from a shared counter: the caller never waits for a task that has not started (a queued task
// that starts late finds nothing left), so a pool whose threads are all inside such calls cannot deadlock.
template <typename Fn>
void ParallelFor(ffi::ThreadPool& pool, int64_t num_chunks, Fn fn) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto state = std::make_shared<State>();
  auto work = [state, num_chunks, fn]() {
    for (int64_t chunk; (chunk = state->next.fetch_add(1)) < num_chunks;) {
      fn(chunk);
      state->done.fetch_add(1);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), num_chunks) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule(decltype(work)(work));  // each task its own copy
  work();
  while (state->done.load() < num_chunks) std::this_thread::yield();
}

// An NHWC map and a (3, 3, C) kernel; the FFI bindings below check the ranks. (Aliases also keep the
// commas of the template arguments out of the binding macro's arguments.)
using Map = ffi::Buffer<ffi::F32, 4>;
using Taps = ffi::Buffer<ffi::F32, 3>;

struct Shape {
  int64_t n, h, w, c;
  explicit Shape(const Map& x)
      : n(x.dimensions()[0]), h(x.dimensions()[1]), w(x.dimensions()[2]), c(x.dimensions()[3]) {}
};

// o[c] += a[c] * b[c] for c < channels, in fixed blocks of 16 (one or two vector registers) when they
// divide the channels, which the compiler unrolls.
inline void MultiplyAdd(float* __restrict__ o, const float* __restrict__ a, const float* __restrict__ b,
                        int64_t channels) {
  constexpr int64_t kBlock = 16;
  if (channels % kBlock == 0) {
    for (int64_t c0 = 0; c0 < channels; c0 += kBlock) {
      for (int64_t c = c0; c < c0 + kBlock; ++c) o[c] += a[c] * b[c];
    }
  } else {
    for (int64_t c = 0; c < channels; ++c) o[c] += a[c] * b[c];
  }
}

// Calls tap_fn(t, in, w0, w1, off) for each tap t = (i + 1) * 3 + (j + 1) of output row r (= n * H + h)
// whose source row h + i d lies in the map: `in` is that source row, and the tap reads its pixel w + off
// for output pixels w in [w0, w1), the ones whose source column lies in the map too.
template <typename TapFn>
inline void ForEachTap(const Shape& s, int64_t d, const float* x, int64_t r, TapFn tap_fn) {
  const int64_t n = r / s.h, h = r % s.h;
  for (int64_t i = -1; i <= 1; ++i) {
    const int64_t src_h = h + i * d;
    if (src_h < 0 || src_h >= s.h) continue;
    const float* in = x + (n * s.h + src_h) * s.w * s.c;
    for (int64_t j = -1; j <= 1; ++j) {
      const int64_t off = j * d;
      tap_fn((i + 1) * 3 + (j + 1), in, std::max<int64_t>(0, -off), std::min<int64_t>(s.w, s.w - off), off);
    }
  }
}

// y[n, h, w, c] = sum_{i, j in -1..1} x[n, h + i d, w + j d, c] * k[i + 1, j + 1, c], zero padding.
ffi::Error Forward(ffi::ThreadPool pool, Map x, Taps k, ffi::Result<Map> y,
                   int64_t dilation) {
  const Shape s(x);
  const int64_t d = dilation, row_len = s.w * s.c, rows = s.n * s.h;
  const float* __restrict__ xd = x.typed_data();
  const float* __restrict__ kd = k.typed_data();
  float* __restrict__ yd = y->typed_data();
  const int64_t num_chunks = std::min(rows, kMaxChunks);
  ParallelFor(pool, num_chunks, [=](int64_t chunk) {
    for (int64_t r = rows * chunk / num_chunks; r < rows * (chunk + 1) / num_chunks; ++r) {
      float* out = yd + r * row_len;
      std::fill(out, out + row_len, 0.0f);
      ForEachTap(s, d, xd, r, [&](int64_t t, const float* in, int64_t w0, int64_t w1, int64_t off) {
        for (int64_t w = w0; w < w1; ++w) MultiplyAdd(out + w * s.c, in + (w + off) * s.c, kd + t * s.c, s.c);
      });
    }
  });
  return ffi::Error::Success();
}

// dk[i + 1, j + 1, c] = sum_{n, h, w} x[n, h + i d, w + j d, c] * g[n, h, w, c], zero padding.
ffi::Error KernelGrad(ffi::ThreadPool pool, Map x, Map g, ffi::Result<Taps> dk,
                      int64_t dilation) {
  const Shape s(x);
  const int64_t d = dilation, row_len = s.w * s.c, rows = s.n * s.h, taps_len = 9 * s.c;
  const float* __restrict__ xd = x.typed_data();
  const float* __restrict__ gd = g.typed_data();
  const int64_t num_chunks = std::min(rows, kMaxChunks);
  std::vector<float> partials(num_chunks * taps_len, 0.0f);
  float* partial_data = partials.data();
  ParallelFor(pool, num_chunks, [=](int64_t chunk) {
    float* __restrict__ part = partial_data + chunk * taps_len;
    std::vector<float> row_sums(taps_len);
    for (int64_t r = rows * chunk / num_chunks; r < rows * (chunk + 1) / num_chunks; ++r) {
      const float* grad = gd + r * row_len;
      std::fill(row_sums.begin(), row_sums.end(), 0.0f);
      ForEachTap(s, d, xd, r, [&](int64_t t, const float* in, int64_t w0, int64_t w1, int64_t off) {
        float* acc = row_sums.data() + t * s.c;
        for (int64_t w = w0; w < w1; ++w) MultiplyAdd(acc, in + (w + off) * s.c, grad + w * s.c, s.c);
      });
      for (int64_t t = 0; t < taps_len; ++t) part[t] += row_sums[t];
    }
  });
  float* __restrict__ out = dk->typed_data();
  std::fill(out, out + taps_len, 0.0f);
  for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
    for (int64_t t = 0; t < taps_len; ++t) out[t] += partial_data[chunk * taps_len + t];
  }
  return ffi::Error::Success();
}

// The binding both handlers share: XLA's intra-op thread pool, two arrays in, one out, the dilation.
template <typename In0, typename In1, typename Out>
auto DepthwiseBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<In0>()
      .template Arg<In1>()
      .template Ret<Out>()
      .template Attr<int64_t>("dilation");
}

}  // namespace

// The bindings are parenthesised: the macro would split their template arguments at the commas.
XLA_FFI_DEFINE_HANDLER_SYMBOL(EasunetDepthwiseForward, Forward, (DepthwiseBinding<Map, Taps, Map>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(EasunetDepthwiseKernelGrad, KernelGrad, (DepthwiseBinding<Map, Map, Taps>()));
