// The CPU decode path's Sinkhorn rounds after the row softmax (ds4mlx/ops.py sinkhorn_host,
// called from kernels/hyper.py): numpy spends ~1 us per call on each of a round's six steps over
// a 4x4 matrix, 120 calls per HC pre; this does a token's rounds in well under a microsecond.
// Same float32 operations in the same order (checked against numpy at load): eps added once,
// then per round the row sums (row steps after the first round) and the column sums, each sum
// of M terms in index order plus eps, and a correctly rounded division.
#include <stddef.h>

static void norm_cols(float* a, int m, float eps) {
  for (int j = 0; j < m; ++j) {
    float s = a[j];
    for (int i = 1; i < m; ++i) s += a[i * m + j];
    s += eps;
    for (int i = 0; i < m; ++i) a[i * m + j] /= s;
  }
}

static void norm_rows(float* a, int m, float eps) {
  for (int i = 0; i < m; ++i) {
    float* r = a + i * m;
    float s = r[0];
    for (int j = 1; j < m; ++j) s += r[j];
    s += eps;
    for (int j = 0; j < m; ++j) r[j] /= s;
  }
}

// c: n matrices [m, m], row-major float32, overwritten
void ds4_sinkhorn_f32(float* c, long n, int m, int iters, float eps) {
  for (long t = 0; t < n; ++t) {
    float* a = c + t * (long)m * m;
    for (int i = 0; i < m * m; ++i) a[i] += eps;
    norm_cols(a, m, eps);
    for (int r = 1; r < iters; ++r) {
      norm_rows(a, m, eps);
      norm_cols(a, m, eps);
    }
  }
}
