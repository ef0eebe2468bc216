// XLA:CPU FFI kernels for a stride-1 SAME 3x3 convolution of an input with few
// channels (the RGB layer of a CNN), NHWC input, HWIO kernel, float32:
//
//   JbnConv3x3SmallForward(x[N,H,W,C], kernel[3,3,C,O]) -> y[N,H,W,O]
//   JbnConv3x3SmallKernelGrad(x[N,H,W,C], dy[N,H,W,O]) -> dkernel[3,3,C,O]
//
// for C in 1..4 and O in {8, 16, 32}, W a multiple of kPixels(O). XLA's own
// kernels for this shape go through an im2col patch matrix (27 columns for RGB)
// and a matrix product with a tiny output; these loop over the images instead,
// keep the O outputs in 8-wide vector registers, and split the batch over XLA's
// intra-op thread pool, one image per task. The kernel gradient sums each
// image in blocks of rows and the images in float64, in a fixed order: the
// same bits whatever the number of threads. Indices are 64-bit. Built and
// registered by jbn/ops/native.py (through jbn/native/library.py, which adds
// jbn/native/csrc to the include path for parallel_for.h).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <vector>

#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using jbn::ParallelFor;
using jbn::Workers;

using Array4 = ffi::Buffer<ffi::F32, 4>;
using Result4 = ffi::ResultBuffer<ffi::F32, 4>;

typedef float v8 __attribute__((vector_size(32)));
inline v8 Load(const float* p) { v8 v; std::memcpy(&v, p, sizeof(v)); return v; }
inline void Store(float* p, v8 v) { std::memcpy(p, &v, sizeof(v)); }
inline v8 Broadcast(float s) { return v8{s, s, s, s, s, s, s, s}; }

// Output pixels computed together in the forward pass: 8 vector accumulators.
constexpr int Pixels(int64_t out) { return out <= 16 ? 4 : 2; }

// Pixels summed in float32 before the kernel gradient moves a partial sum to
// float64 (whole rows, about this many pixels; one block for a 32x32 image).
// Fixed, so the result does not depend on how many threads run. At the train
// step's shape (128 images of 32x32x3, 16 outputs) the relative error against
// float64 went from 1.0e-5 (one float32 chain per thread) to 8.4e-7.
constexpr int64_t kBlockPixels = 1024;

// Copies one (H, W, C) image into the middle of a zeroed (H + 2, W + 2, C) buffer.
template <int C>
void PadImage(const float* x, int64_t H, int64_t W, float* padded) {
  std::memset(padded, 0, sizeof(float) * (H + 2) * (W + 2) * C);
  for (int64_t h = 0; h < H; ++h) {
    std::memcpy(padded + ((h + 1) * (W + 2) + 1) * C, x + h * W * C, sizeof(float) * W * C);
  }
}

// The forward pass of image n: y[n] = conv(x[n], kernel).
template <int C, int O>
void ForwardImage(const float* x, const float* kernel, float* y, int64_t n, int64_t H, int64_t W,
                  std::vector<float>& padded) {
  constexpr int P = Pixels(O), B = O / 8;
  PadImage<C>(x + n * H * W * C, H, W, padded.data());
  float* yn = y + n * H * W * O;
  for (int64_t h = 0; h < H; ++h) {
    for (int64_t w = 0; w < W; w += P) {
      v8 acc[P][B] = {};
      for (int tap = 0; tap < 9; ++tap) {
        const int i = tap / 3, j = tap % 3;
        for (int c = 0; c < C; ++c) {
          const float* k = kernel + (tap * C + c) * O;
          const float* xs = padded.data() + ((h + i) * (W + 2) + w + j) * C + c;
          for (int b = 0; b < B; ++b) {
            const v8 kb = Load(k + 8 * b);
            for (int p = 0; p < P; ++p) acc[p][b] += Broadcast(xs[p * C]) * kb;
          }
        }
      }
      for (int p = 0; p < P; ++p) {
        for (int b = 0; b < B; ++b) Store(yn + (h * W + w + p) * O + 8 * b, acc[p][b]);
      }
    }
  }
}

// The kernel gradient of image n alone, into `partial` (9 * C * O doubles):
// float32 sums over blocks of rows, each added to `partial` in float64.
template <int C, int O>
void KernelGradImage(const float* x, const float* dy, double* partial, int64_t n, int64_t H,
                     int64_t W, std::vector<float>& padded) {
  constexpr int B = O / 8;
  const int64_t block_rows = std::max<int64_t>(1, kBlockPixels / W);
  PadImage<C>(x + n * H * W * C, H, W, padded.data());
  const float* dyn = dy + n * H * W * O;
  std::fill(partial, partial + 9 * C * O, 0.0);
  for (int tap = 0; tap < 9; ++tap) {
    const int i = tap / 3, j = tap % 3;
    double* dk = partial + tap * C * O;
    for (int64_t h0 = 0; h0 < H; h0 += block_rows) {
      v8 acc[C][B] = {};
      for (int64_t h = h0; h < std::min(H, h0 + block_rows); ++h) {
        const float* xs = padded.data() + ((h + i) * (W + 2) + j) * C;
        const float* g = dyn + h * W * O;
        for (int64_t w = 0; w < W; ++w) {
          v8 gb[B];
          for (int b = 0; b < B; ++b) gb[b] = Load(g + w * O + 8 * b);
          for (int c = 0; c < C; ++c) {
            const v8 xv = Broadcast(xs[w * C + c]);
            for (int b = 0; b < B; ++b) acc[c][b] += xv * gb[b];
          }
        }
      }
      for (int c = 0; c < C; ++c) {
        for (int b = 0; b < B; ++b) {
          float lanes[8];
          Store(lanes, acc[c][b]);
          for (int l = 0; l < 8; ++l) dk[c * O + 8 * b + l] += lanes[l];
        }
      }
    }
  }
}

struct Shape {
  int64_t N, H, W, C, O;
};

template <int C, int O>
void Forward(ffi::ThreadPool& pool, const Shape& s, const float* x, const float* k, float* y) {
  const int64_t workers = Workers(pool);
  // One task per image; each worker pads into a buffer of its own.
  std::vector<std::vector<float>> padded(workers);
  ParallelFor(pool, workers, s.N, [&](int64_t n, int64_t worker) {
    padded[worker].resize((s.H + 2) * (s.W + 2) * C);
    ForwardImage<C, O>(x, k, y, n, s.H, s.W, padded[worker]);
  });
}

// Every image's gradient is summed in a fixed order (whatever the number of
// threads), so the result is the same bits on every machine.
template <int C, int O>
void KernelGrad(ffi::ThreadPool& pool, const Shape& s, const float* x, const float* dy,
                float* dkernel) {
  constexpr int64_t E = 9 * C * O;
  const int64_t workers = Workers(pool);
  std::vector<double> partial(s.N * E);
  std::vector<std::vector<float>> padded(workers);
  ParallelFor(pool, workers, s.N, [&](int64_t n, int64_t worker) {
    padded[worker].resize((s.H + 2) * (s.W + 2) * C);
    KernelGradImage<C, O>(x, dy, partial.data() + n * E, n, s.H, s.W, padded[worker]);
  });
  std::vector<double> total(E, 0.0);
  for (int64_t n = 0; n < s.N; ++n) {
    for (int64_t e = 0; e < E; ++e) total[e] += partial[n * E + e];
  }
  for (int64_t e = 0; e < E; ++e) dkernel[e] = float(total[e]);
}

// Calls fn.template operator()<C, O>() for the supported (C, O), else returns false.
template <typename Fn>
bool Dispatch(int64_t c, int64_t o, const Fn& fn) {
#define JBN_CASE(CC, OO) \
  if (c == CC && o == OO) return fn.template operator()<CC, OO>(), true;
  JBN_CASE(1, 8) JBN_CASE(1, 16) JBN_CASE(1, 32)
  JBN_CASE(2, 8) JBN_CASE(2, 16) JBN_CASE(2, 32)
  JBN_CASE(3, 8) JBN_CASE(3, 16) JBN_CASE(3, 32)
  JBN_CASE(4, 8) JBN_CASE(4, 16) JBN_CASE(4, 32)
#undef JBN_CASE
  return false;
}

ffi::Error CheckShape(const Shape& s) {
  const bool ok = s.C >= 1 && s.C <= 4 && (s.O == 8 || s.O == 16 || s.O == 32) && s.N >= 0 &&
                  s.H > 0 && s.W > 0 && s.W % Pixels(s.O) == 0;
  return ok ? ffi::Error::Success()
            : ffi::Error::InvalidArgument(
                  "jbn conv3x3_small: unsupported shape (needs 1-4 input channels, 8, 16 or 32 "
                  "outputs, and a width divisible by 4, or by 2 for 32 outputs)");
}

template <typename Dims>
bool DimsAre(const Dims& dims, std::initializer_list<int64_t> expected) {
  return std::equal(dims.begin(), dims.end(), expected.begin(), expected.end());
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, Array4 x, Array4 kernel, Result4 y) {
  const auto d = x.dimensions(), k = kernel.dimensions();
  const Shape s{d[0], d[1], d[2], d[3], k[3]};
  if (k[0] != 3 || k[1] != 3 || k[2] != d[3]) {
    return ffi::Error::InvalidArgument("jbn conv3x3_small: kernel must be (3, 3, C, O)");
  }
  if (auto error = CheckShape(s); error.failure()) return error;
  if (!DimsAre(y->dimensions(), {s.N, s.H, s.W, s.O})) {
    return ffi::Error::InvalidArgument("jbn conv3x3_small: the result must be (N, H, W, O)");
  }
  Dispatch(s.C, s.O, [&]<int C, int O>() {
    Forward<C, O>(pool, s, x.typed_data(), kernel.typed_data(), y->typed_data());
  });
  return ffi::Error::Success();
}

ffi::Error KernelGradImpl(ffi::ThreadPool pool, Array4 x, Array4 dy, Result4 dkernel) {
  const auto d = x.dimensions(), g = dy.dimensions();
  const Shape s{d[0], d[1], d[2], d[3], g[3]};
  if (g[0] != d[0] || g[1] != d[1] || g[2] != d[2]) {
    return ffi::Error::InvalidArgument("jbn conv3x3_small: dy must be (N, H, W, O) like x");
  }
  if (auto error = CheckShape(s); error.failure()) return error;
  if (!DimsAre(dkernel->dimensions(), {3, 3, s.C, s.O})) {
    return ffi::Error::InvalidArgument("jbn conv3x3_small: the result must be (3, 3, C, O)");
  }
  Dispatch(s.C, s.O, [&]<int C, int O>() {
    KernelGrad<C, O>(pool, s, x.typed_data(), dy.typed_data(), dkernel->typed_data());
  });
  return ffi::Error::Success();
}

// The signature of both handlers: the thread pool, two 4-D arrays in, one out.
auto TwoArraysToOne() {
  return ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<Array4>().Arg<Array4>().Ret<Array4>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JbnConv3x3SmallForward, ForwardImpl, TwoArraysToOne());
XLA_FFI_DEFINE_HANDLER_SYMBOL(JbnConv3x3SmallKernelGrad, KernelGradImpl, TwoArraysToOne());
