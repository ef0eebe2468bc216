// An XLA:CPU FFI kernel for BatchNorm's batch statistics in one read of x:
//
//   JbnMoments(x[..., R, C]) -> mean[..., C], m2[..., C], deviation_sum[..., C]
//
// float32 in and out. Each group (the leading axes) is reduced over its R rows,
// independently per feature c:
//
//   mean = float(pivot + sum(x - pivot) / R)
//   m2 = sum((x - mean) ** 2)         (around the float32 mean, as jbn's two passes)
//   deviation_sum = sum(x - mean)     (zero but for the rounding of the mean)
//
// from the shifted sums s1 = sum(x - p) and s2 = sum((x - p) ** 2) around a
// per-feature pivot p, the average of kPivotRows rows spread over the group.
// The differences and squares are summed in float32 over runs of kRunRows rows,
// the runs in float64, and m2 is formed from s1 and s2 in float64. Its relative
// error is then at most about kRunRows / 2 float32 roundings (1e-6) times
// (1 + z ** 2) from s2 and 2 z sqrt(1 + z ** 2) from s1, z = (p - mean) / std:
// where some feature's |z| exceeds kMaxPivotDistance, the group is read again
// around its float32 mean (z about 0), so the bound (about 5e-6) holds whatever
// the data. A constant feature gives exactly 0.
//
// Rows are cut into blocks of kBlockRows, one task each on XLA's intra-op
// thread pool; the blocks are added in a fixed order, so the result is the
// same bits whatever the number of threads. Built and registered by
// jbn/native/moments.py.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kBlockRows = 1024;  // rows per task
constexpr int64_t kRunRows = 32;      // rows summed in float32 before float64
constexpr int64_t kPivotRows = 32;    // rows averaged into the pivot
constexpr double kMaxPivotDistance = 1.0;  // in standard deviations

typedef float v16f __attribute__((vector_size(64)));
typedef float v8f __attribute__((vector_size(32)));
typedef double v8d __attribute__((vector_size(64)));

template <typename V>
inline V Load(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// out[0:8] += v, widened to float64.
inline void AddWide(v8f v, double* out) {
  v8d acc;
  std::memcpy(&acc, out, sizeof(acc));
  acc += __builtin_convertvector(v, v8d);
  std::memcpy(out, &acc, sizeof(acc));
}
inline void AddWide(v16f v, double* out) {
  AddWide(v8f(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7)), out);
  AddWide(v8f(__builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15)), out + 8);
}

// Adds the shifted sums of features [c, c + 16 K) over rows [r0, r1) of x
// (row stride C) into s1 and s2: float32 within the run, row after row, the
// 2 K accumulators in registers.
template <int K>
inline void AddRunSums(const float* x, int64_t C, int64_t c, int64_t r0, int64_t r1,
                       const float* pivot, double* s1, double* s2) {
  v16f p[K], a[K], b[K];
  for (int k = 0; k < K; ++k) {
    p[k] = Load<v16f>(pivot + c + 16 * k);
    a[k] = v16f{};
    b[k] = v16f{};
  }
  for (int64_t r = r0; r < r1; ++r) {
    const float* row = x + r * C + c;
    for (int k = 0; k < K; ++k) {
      const v16f d = Load<v16f>(row + 16 * k) - p[k];
      a[k] += d;
      b[k] += d * d;
    }
  }
  for (int k = 0; k < K; ++k) {
    AddWide(a[k], s1 + c + 16 * k);
    AddWide(b[k], s2 + c + 16 * k);
  }
}

// The same for the features [c, c + 8) and then one at a time (C not a multiple of 16).
inline void AddRunSums8(const float* x, int64_t C, int64_t c, int64_t r0, int64_t r1,
                        const float* pivot, double* s1, double* s2) {
  const v8f p = Load<v8f>(pivot + c);
  v8f a = {}, b = {};
  for (int64_t r = r0; r < r1; ++r) {
    const v8f d = Load<v8f>(x + r * C + c) - p;
    a += d;
    b += d * d;
  }
  AddWide(a, s1 + c);
  AddWide(b, s2 + c);
}
inline void AddRunSums1(const float* x, int64_t C, int64_t c, int64_t r0, int64_t r1,
                        const float* pivot, double* s1, double* s2) {
  float a = 0, b = 0;
  for (int64_t r = r0; r < r1; ++r) {
    const float d = x[r * C + c] - pivot[c];
    a += d;
    b += d * d;
  }
  s1[c] += a;
  s2[c] += b;
}

// s1[c] = sum(x - pivot), s2[c] = sum((x - pivot) ** 2) over rows [r0, r1),
// run by run, up to 64 features per pass over a run.
void BlockSums(const float* x, int64_t C, int64_t r0, int64_t r1, const float* pivot, double* s1,
               double* s2) {
  std::fill(s1, s1 + C, 0.0);
  std::fill(s2, s2 + C, 0.0);
  for (int64_t run = r0; run < r1; run += kRunRows) {
    const int64_t end = std::min(r1, run + kRunRows);
    int64_t c = 0;
    for (; c + 64 <= C; c += 64) AddRunSums<4>(x, C, c, run, end, pivot, s1, s2);
    switch ((C - c) / 16) {
      case 3: AddRunSums<3>(x, C, c, run, end, pivot, s1, s2); c += 48; break;
      case 2: AddRunSums<2>(x, C, c, run, end, pivot, s1, s2); c += 32; break;
      case 1: AddRunSums<1>(x, C, c, run, end, pivot, s1, s2); c += 16; break;
      default: break;
    }
    if (c + 8 <= C) {
      AddRunSums8(x, C, c, run, end, pivot, s1, s2);
      c += 8;
    }
    for (; c < C; ++c) AddRunSums1(x, C, c, run, end, pivot, s1, s2);
  }
}

// The average of kPivotRows rows evenly spread over the R rows of x (R > 0).
void Pivot(const float* x, int64_t R, int64_t C, float* pivot) {
  const int64_t rows = std::min(R, kPivotRows);
  std::vector<double> sum(C, 0.0);
  for (int64_t i = 0; i < rows; ++i) {
    const float* row = x + (i * R / rows) * C;
    for (int64_t c = 0; c < C; ++c) sum[c] += row[c];
  }
  for (int64_t c = 0; c < C; ++c) pivot[c] = float(sum[c] / double(rows));
}

struct Layout {
  int64_t groups, rows, features;
};

// Shifted sums of every group around `pivot` ([groups, C]), totalled per group
// in block order into s1 and s2 ([groups, C]).
void GroupSums(ffi::ThreadPool& pool, const Layout& s, const float* x, const float* pivot,
               const std::vector<int64_t>& groups, double* s1, double* s2) {
  const int64_t C = s.features, blocks = (s.rows + kBlockRows - 1) / kBlockRows;
  const int64_t tasks = int64_t(groups.size()) * blocks;
  std::vector<double> partial(tasks * 2 * C);
  jbn::ParallelFor(pool, jbn::Workers(pool), tasks, [&](int64_t t, int64_t) {
    const int64_t g = groups[t / blocks], b = t % blocks;
    double* out = partial.data() + t * 2 * C;
    BlockSums(x + g * s.rows * C, C, b * kBlockRows, std::min(s.rows, (b + 1) * kBlockRows),
              pivot + g * C, out, out + C);
  });
  for (int64_t i = 0; i < int64_t(groups.size()); ++i) {
    const int64_t g = groups[i];
    std::fill(s1 + g * C, s1 + (g + 1) * C, 0.0);
    std::fill(s2 + g * C, s2 + (g + 1) * C, 0.0);
    for (int64_t b = 0; b < blocks; ++b) {
      const double* block = partial.data() + (i * blocks + b) * 2 * C;
      for (int64_t c = 0; c < C; ++c) {
        s1[g * C + c] += block[c];
        s2[g * C + c] += block[C + c];
      }
    }
  }
}

// Whether the pivot lies farther than kMaxPivotDistance standard deviations
// from the mean (or the spread is lost to cancellation).
bool PivotTooFar(double s1, double s2, double n) {
  const double offset = s1 / n, var = s2 / n - offset * offset;
  return offset * offset > kMaxPivotDistance * kMaxPivotDistance * var;
}

ffi::Error MomentsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                       ffi::ResultBuffer<ffi::F32> mean, ffi::ResultBuffer<ffi::F32> m2,
                       ffi::ResultBuffer<ffi::F32> deviation_sum) {
  const auto dims = x.dimensions();
  if (dims.size() < 2) return ffi::Error::InvalidArgument("jbn moments: x must be (..., R, C)");
  Layout s{1, dims[dims.size() - 2], dims[dims.size() - 1]};
  for (size_t i = 0; i + 2 < dims.size(); ++i) s.groups *= dims[i];
  if (s.rows == 0) return ffi::Error::InvalidArgument("jbn moments: no rows to reduce");
  for (auto* result : {&mean, &m2, &deviation_sum}) {
    if ((*result)->element_count() != size_t(s.groups * s.features)) {
      return ffi::Error::InvalidArgument("jbn moments: each result must be (..., C) like x");
    }
  }
  const int64_t C = s.features;
  const float* data = x.typed_data();
  std::vector<float> pivot(s.groups * C);
  for (int64_t g = 0; g < s.groups; ++g) Pivot(data + g * s.rows * C, s.rows, C, &pivot[g * C]);
  std::vector<double> s1(s.groups * C), s2(s.groups * C);
  std::vector<int64_t> groups(s.groups);
  for (int64_t g = 0; g < s.groups; ++g) groups[g] = g;
  GroupSums(pool, s, data, pivot.data(), groups, s1.data(), s2.data());

  const double n = double(s.rows);
  std::vector<int64_t> again;
  for (int64_t g = 0; g < s.groups; ++g) {
    bool far = false;
    for (int64_t c = 0; c < C; ++c) far |= PivotTooFar(s1[g * C + c], s2[g * C + c], n);
    if (!far) continue;
    // The group's float32 mean as its new pivot; then z is about 0.
    for (int64_t c = 0; c < C; ++c) pivot[g * C + c] = float(pivot[g * C + c] + s1[g * C + c] / n);
    again.push_back(g);
  }
  if (!again.empty()) GroupSums(pool, s, data, pivot.data(), again, s1.data(), s2.data());

  for (int64_t i = 0; i < s.groups * C; ++i) {
    const float mean_f = float(pivot[i] + s1[i] / n);
    const double offset = double(mean_f) - double(pivot[i]);  // mean_f - p
    mean->typed_data()[i] = mean_f;
    m2->typed_data()[i] = float(std::max(s2[i] - offset * (2 * s1[i] - n * offset), 0.0));
    deviation_sum->typed_data()[i] = float(s1[i] - n * offset);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JbnMoments, MomentsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
