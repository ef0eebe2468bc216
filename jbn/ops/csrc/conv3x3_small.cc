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
// intra-op thread pool. Built and registered by jbn/ops/native.py.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using Array4 = ffi::Buffer<ffi::F32, 4>;
using Result4 = ffi::ResultBuffer<ffi::F32, 4>;

typedef float v8 __attribute__((vector_size(32)));
inline v8 Load(const float* p) { v8 v; std::memcpy(&v, p, sizeof(v)); return v; }
inline void Store(float* p, v8 v) { std::memcpy(p, &v, sizeof(v)); }
inline v8 Broadcast(float s) { return v8{s, s, s, s, s, s, s, s}; }

// Output pixels computed together in the forward pass: 8 vector accumulators.
constexpr int Pixels(int out) { return out <= 16 ? 4 : 2; }

// Runs f(0) .. f(tasks - 1) on the calling thread and the pool, and returns
// when all have finished. Tasks are claimed from a shared counter, so the
// calling thread runs every task that no pool thread has started: it never
// waits for a task that is still queued (no deadlock when the pool is busy).
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int tasks, const F& f) {
  struct State {
    std::atomic<int> next{0};
    std::mutex mu;
    std::condition_variable cv;
    int finished = 0;
  };
  auto state = std::make_shared<State>();
  auto work = [state, tasks, &f] {
    int done = 0;
    for (int t; (t = state->next.fetch_add(1)) < tasks; ++done) f(t);
    if (done == 0) return;
    std::lock_guard<std::mutex> lock(state->mu);
    state->finished += done;
    state->cv.notify_all();
  };
  for (int t = 1; t < tasks; ++t) {
    // A late pool task finds no work left and touches only the shared state.
    pool.Schedule([state, tasks, work] {
      if (state->next.load() < tasks) work();
    });
  }
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->finished == tasks; });
}

// Copies one (H, W, C) image into the middle of a zeroed (H + 2, W + 2, C) buffer.
template <int C>
void PadImage(const float* x, int H, int W, float* padded) {
  std::memset(padded, 0, sizeof(float) * (H + 2) * (W + 2) * C);
  for (int h = 0; h < H; ++h) {
    std::memcpy(padded + ((h + 1) * (W + 2) + 1) * C, x + h * W * C, sizeof(float) * W * C);
  }
}

template <int C, int O>
void ForwardImages(const float* x, const float* kernel, float* y, int n0, int n1, int H, int W) {
  constexpr int P = Pixels(O), B = O / 8;
  std::vector<float> padded((H + 2) * (W + 2) * C);
  for (int n = n0; n < n1; ++n) {
    PadImage<C>(x + size_t(n) * H * W * C, H, W, padded.data());
    float* yn = y + size_t(n) * H * W * O;
    for (int h = 0; h < H; ++h) {
      for (int w = 0; w < W; w += P) {
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
}

// Adds the kernel gradient of images [n0, n1) to dkernel (9 * C * O floats).
template <int C, int O>
void KernelGradImages(const float* x, const float* dy, float* dkernel, int n0, int n1, int H,
                      int W) {
  constexpr int B = O / 8;
  std::vector<float> padded((H + 2) * (W + 2) * C);
  for (int n = n0; n < n1; ++n) {
    PadImage<C>(x + size_t(n) * H * W * C, H, W, padded.data());
    const float* dyn = dy + size_t(n) * H * W * O;
    for (int tap = 0; tap < 9; ++tap) {
      const int i = tap / 3, j = tap % 3;
      float* dk = dkernel + tap * C * O;
      v8 acc[C][B];
      for (int c = 0; c < C; ++c) {
        for (int b = 0; b < B; ++b) acc[c][b] = Load(dk + c * O + 8 * b);
      }
      for (int h = 0; h < H; ++h) {
        const float* xs = padded.data() + ((h + i) * (W + 2) + j) * C;
        const float* g = dyn + h * W * O;
        for (int w = 0; w < W; ++w) {
          v8 gb[B];
          for (int b = 0; b < B; ++b) gb[b] = Load(g + w * O + 8 * b);
          for (int c = 0; c < C; ++c) {
            const v8 xv = Broadcast(xs[w * C + c]);
            for (int b = 0; b < B; ++b) acc[c][b] += xv * gb[b];
          }
        }
      }
      for (int c = 0; c < C; ++c) {
        for (int b = 0; b < B; ++b) Store(dk + c * O + 8 * b, acc[c][b]);
      }
    }
  }
}

struct Shape {
  int N, H, W, C, O;
};

template <int C, int O>
void Forward(ffi::ThreadPool& pool, const Shape& s, const float* x, const float* k, float* y) {
  const int tasks = std::min<int>(s.N, std::max<int>(1, int(pool.num_threads())));
  ParallelFor(pool, tasks, [&](int t) {
    ForwardImages<C, O>(x, k, y, s.N * t / tasks, s.N * (t + 1) / tasks, s.H, s.W);
  });
}

template <int C, int O>
void KernelGrad(ffi::ThreadPool& pool, const Shape& s, const float* x, const float* dy,
                float* dkernel) {
  const int tasks = std::min<int>(s.N, std::max<int>(1, int(pool.num_threads())));
  std::vector<std::vector<float>> partial(tasks, std::vector<float>(9 * C * O, 0.f));
  ParallelFor(pool, tasks, [&](int t) {
    KernelGradImages<C, O>(x, dy, partial[t].data(), s.N * t / tasks, s.N * (t + 1) / tasks,
                           s.H, s.W);
  });
  for (int e = 0; e < 9 * C * O; ++e) {
    float sum = 0.f;
    for (int t = 0; t < tasks; ++t) sum += partial[t][e];
    dkernel[e] = sum;
  }
}

// Calls fn.template operator()<C, O>() for the supported (C, O), else returns false.
template <typename Fn>
bool Dispatch(int c, int o, const Fn& fn) {
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
  const bool ok = s.C >= 1 && s.C <= 4 && (s.O == 8 || s.O == 16 || s.O == 32) && s.N > 0 &&
                  s.H > 0 && s.W > 0 && s.W % Pixels(s.O) == 0;
  return ok ? ffi::Error::Success()
            : ffi::Error::InvalidArgument(
                  "jbn conv3x3_small: unsupported shape (needs 1-4 input channels, 8, 16 or 32 "
                  "outputs, and a width divisible by 4, or by 2 for 32 outputs)");
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, Array4 x, Array4 kernel, Result4 y) {
  const auto d = x.dimensions(), k = kernel.dimensions();
  const Shape s{int(d[0]), int(d[1]), int(d[2]), int(d[3]), int(k[3])};
  if (k[0] != 3 || k[1] != 3 || k[2] != d[3]) {
    return ffi::Error::InvalidArgument("jbn conv3x3_small: kernel must be (3, 3, C, O)");
  }
  if (auto error = CheckShape(s); error.failure()) return error;
  Dispatch(s.C, s.O, [&]<int C, int O>() {
    Forward<C, O>(pool, s, x.typed_data(), kernel.typed_data(), y->typed_data());
  });
  return ffi::Error::Success();
}

ffi::Error KernelGradImpl(ffi::ThreadPool pool, Array4 x, Array4 dy, Result4 dkernel) {
  const auto d = x.dimensions(), g = dy.dimensions();
  const Shape s{int(d[0]), int(d[1]), int(d[2]), int(d[3]), int(g[3])};
  if (g[0] != d[0] || g[1] != d[1] || g[2] != d[2]) {
    return ffi::Error::InvalidArgument("jbn conv3x3_small: dy must be (N, H, W, O) like x");
  }
  if (auto error = CheckShape(s); error.failure()) return error;
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
