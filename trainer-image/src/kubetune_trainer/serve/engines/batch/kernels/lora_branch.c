/* LoraBranch (domain `kubetune`): one fed LoRA branch in one ONNX Runtime node, in place of the
 * four (MatMul, Mul, MatMul, Add) the graph otherwise has per projection:
 *
 *     output = y + ((x @ A) * mask[row]) @ B
 *
 *   y     (rows, tokens, columns)   the base projection's output (written in place when ORT lets it)
 *   x     (rows, tokens, features)  the projection's input
 *   A     (features, rank)          the active adapters' lora_A side by side (lora.py)
 *   B     (rank, columns)           their lora_B stacked, scaling folded in
 *   mask  (rows, 1, rank)           1 (or int8 scales) on a row's own adapter's columns, else 0
 *
 * Why a kernel: a decode step through an adapter was four nodes per projection, 600 a step on
 * a 30-layer model, each a tiny GEMV or elementwise op whose dispatch costs more than its work
 * (bench/RESULTS.md). Here each row multiplies only its own adapter's columns (the mask's span
 * of non-zeros: Punica's BGMV, one row one adapter), a base row costs one look at its mask,
 * and every row is computed alone in one fixed order: a row's answer does not depend on what
 * shares its batch.
 *
 * A and B are float, or int8 (a quarter of the bytes a decode step reads: on a quantized base),
 * each rank column's scales then carried by the mask (lora.py: `mask` holds sA[c] * sB[c]
 * where it would hold 1).
 *
 * Built by kernels/lora_branch.py against the vendored ONNX Runtime C API header (API version
 * 24, include/); the functions come through the OrtApi table ORT hands RegisterCustomOps, so
 * the library links against no ONNX Runtime and loads into any runtime of API version >= 24.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "onnxruntime_c_api.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
/* One build for every x86-64 CPU: the loader picks AVX-512, AVX2+FMA or SSE2 at load time. */
#define KERNEL_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define KERNEL_CLONES
#endif

enum { IN_Y, IN_X, IN_A, IN_B, IN_MASK, INPUTS };

static const OrtApi *ort;

/* The two kernels, for A and B held in FP32 (`_f32`) or INT8 (`_i8`: a quarter of the bytes
 * a decode step reads, which is bound by reading them; each rank column's two scales are in
 * the mask, see lora.py).
 *
 * shrink: h[c] = sum_k x[k] * a[k * lda + c], c < width. Eight columns at a time in registers,
 * and four partial sums over k (a chain of dependent adds would wait on each one's latency);
 * the order is fixed, so a row's sums are the same whatever shares its batch.
 * expand: out[j] += sum_c h[c] * b[c * ldb + j], j < columns, c < width, in c's order. */
#define KERNELS(SUFFIX, W)                                                                     \
  KERNEL_CLONES static void shrink##SUFFIX(const float *restrict x, const W *restrict a,       \
                                           int64_t lda, int64_t width, int64_t features,       \
                                           float *restrict h) {                                \
    int64_t c0 = 0;                                                                            \
    for (; c0 + 8 <= width; c0 += 8) {                                                         \
      float s0[8] = {0}, s1[8] = {0}, s2[8] = {0}, s3[8] = {0};                                \
      int64_t k = 0;                                                                           \
      for (; k + 4 <= features; k += 4) {                                                      \
        const W *restrict r = a + k * lda + c0;                                                \
        for (int c = 0; c < 8; c++) {                                                          \
          s0[c] += x[k] * (float)r[c];                                                         \
          s1[c] += x[k + 1] * (float)r[lda + c];                                               \
          s2[c] += x[k + 2] * (float)r[2 * lda + c];                                           \
          s3[c] += x[k + 3] * (float)r[3 * lda + c];                                           \
        }                                                                                      \
      }                                                                                        \
      for (; k < features; k++) {                                                              \
        for (int c = 0; c < 8; c++) s0[c] += x[k] * (float)a[k * lda + c0 + c];                \
      }                                                                                        \
      for (int c = 0; c < 8; c++) h[c0 + c] = (s0[c] + s1[c]) + (s2[c] + s3[c]);               \
    }                                                                                          \
    for (; c0 < width; c0++) { /* a rank that is not a multiple of 8 */                       \
      float s = 0.0f;                                                                          \
      for (int64_t k = 0; k < features; k++) s += x[k] * (float)a[k * lda + c0];               \
      h[c0] = s;                                                                               \
    }                                                                                          \
  }                                                                                            \
  KERNEL_CLONES static void expand##SUFFIX(const float *restrict h, const W *restrict b,       \
                                           int64_t width, int64_t columns, int64_t ldb,        \
                                           float *restrict out) {                              \
    for (int64_t c = 0; c < width; c++) {                                                      \
      const float hc = h[c];                                                                   \
      const W *restrict bc = b + c * ldb;                                                      \
      for (int64_t j = 0; j < columns; j++) out[j] += hc * (float)bc[j];                       \
    }                                                                                          \
  }

KERNELS(_f32, float)
KERNELS(_i8_portable, int8_t)

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define AVX2_TARGET __attribute__((target("avx2,fma")))
#define AVX512_TARGET __attribute__((target("avx512f,avx2,fma")))

/* INT8 by hand: GCC's vectorized int8-to-float conversion of the portable loops costs more
 * than the bytes saved. These widen 8 (AVX2) or 16 (AVX-512) weights at a time, and the
 * expand keeps a block of output columns in registers over all c (one load and store of
 * `out` a block, not one a rank column). Same sums in the same order as the portable ones,
 * up to FMA's single rounding. */
static inline AVX2_TARGET __m256 widen8(const int8_t *p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

static inline AVX512_TARGET __m512 widen16(const int8_t *p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}

AVX2_TARGET static void shrink_i8_avx2(const float *restrict x, const int8_t *restrict a,
                                       int64_t lda, int64_t width, int64_t features,
                                       float *restrict h) {
  int64_t c0 = 0;
  for (; c0 + 8 <= width; c0 += 8) {
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    int64_t k = 0;
    for (; k + 4 <= features; k += 4) {
      const int8_t *r = a + k * lda + c0;
      s0 = _mm256_fmadd_ps(_mm256_set1_ps(x[k]), widen8(r), s0);
      s1 = _mm256_fmadd_ps(_mm256_set1_ps(x[k + 1]), widen8(r + lda), s1);
      s2 = _mm256_fmadd_ps(_mm256_set1_ps(x[k + 2]), widen8(r + 2 * lda), s2);
      s3 = _mm256_fmadd_ps(_mm256_set1_ps(x[k + 3]), widen8(r + 3 * lda), s3);
    }
    for (; k < features; k++) {
      s0 = _mm256_fmadd_ps(_mm256_set1_ps(x[k]), widen8(a + k * lda + c0), s0);
    }
    _mm256_storeu_ps(h + c0, _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
  }
  if (c0 < width) shrink_i8_portable(x, a + c0, lda, width - c0, features, h + c0);
}

AVX2_TARGET static void expand_i8_avx2(const float *restrict h, const int8_t *restrict b,
                                       int64_t width, int64_t columns, int64_t ldb,
                                       float *restrict out) {
  int64_t j = 0;
  for (; j + 8 <= columns; j += 8) {
    __m256 o = _mm256_loadu_ps(out + j);
    for (int64_t c = 0; c < width; c++) {
      o = _mm256_fmadd_ps(_mm256_set1_ps(h[c]), widen8(b + c * ldb + j), o);
    }
    _mm256_storeu_ps(out + j, o);
  }
  for (; j < columns; j++) {
    for (int64_t c = 0; c < width; c++) out[j] += h[c] * (float)b[c * ldb + j];
  }
}

AVX512_TARGET static void shrink_i8_avx512(const float *restrict x, const int8_t *restrict a,
                                           int64_t lda, int64_t width, int64_t features,
                                           float *restrict h) {
  int64_t c0 = 0;
  for (; c0 + 16 <= width; c0 += 16) {
    __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    int64_t k = 0;
    for (; k + 4 <= features; k += 4) {
      const int8_t *r = a + k * lda + c0;
      s0 = _mm512_fmadd_ps(_mm512_set1_ps(x[k]), widen16(r), s0);
      s1 = _mm512_fmadd_ps(_mm512_set1_ps(x[k + 1]), widen16(r + lda), s1);
      s2 = _mm512_fmadd_ps(_mm512_set1_ps(x[k + 2]), widen16(r + 2 * lda), s2);
      s3 = _mm512_fmadd_ps(_mm512_set1_ps(x[k + 3]), widen16(r + 3 * lda), s3);
    }
    for (; k < features; k++) {
      s0 = _mm512_fmadd_ps(_mm512_set1_ps(x[k]), widen16(a + k * lda + c0), s0);
    }
    _mm512_storeu_ps(h + c0, _mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
  }
  if (c0 < width) shrink_i8_avx2(x, a + c0, lda, width - c0, features, h + c0);
}

AVX512_TARGET static void expand_i8_avx512(const float *restrict h, const int8_t *restrict b,
                                           int64_t width, int64_t columns, int64_t ldb,
                                           float *restrict out) {
  int64_t j = 0;
  for (; j + 16 <= columns; j += 16) {
    __m512 o = _mm512_loadu_ps(out + j);
    for (int64_t c = 0; c < width; c++) {
      o = _mm512_fmadd_ps(_mm512_set1_ps(h[c]), widen16(b + c * ldb + j), o);
    }
    _mm512_storeu_ps(out + j, o);
  }
  if (j < columns) expand_i8_avx2(h, b + j, width, columns - j, ldb, out + j);
}

static int has_avx2(void) {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
static int has_avx512(void) { return has_avx2() && __builtin_cpu_supports("avx512f"); }
#else
#define shrink_i8_avx2 shrink_i8_portable
#define expand_i8_avx2 expand_i8_portable
#define shrink_i8_avx512 shrink_i8_portable
#define expand_i8_avx512 expand_i8_portable
static int has_avx2(void) { return 0; }
static int has_avx512(void) { return 0; }
#endif

typedef void Shrink8(const float *, const int8_t *, int64_t, int64_t, int64_t, float *);
typedef void Expand8(const float *, const int8_t *, int64_t, int64_t, int64_t, float *);
static Shrink8 *shrink_i8 = shrink_i8_portable; /* chosen at registration */
static Expand8 *expand_i8 = expand_i8_portable;

typedef struct {
  const float *x, *mask;
  const void *a, *b; /* float or int8_t: `int8` */
  int int8;
  float *out;
  int64_t rows, tokens, features, rank, columns;
} Branch;

/* One (row, token) position: its adapter's span of the mask, shrink, mask, expand. */
static void position(void *data, size_t index) {
  const Branch *w = (const Branch *)data;
  const int64_t row = (int64_t)index / w->tokens;
  const float *m = w->mask + row * w->rank;
  int64_t lo = 0, hi = w->rank;
  while (lo < hi && m[lo] == 0.0f) lo++;
  while (hi > lo && m[hi - 1] == 0.0f) hi--;
  if (lo == hi) return; /* a base row: the base's output as it is */
  const int64_t width = hi - lo;
  float stack[256];
  float *h = width <= 256 ? stack : (float *)malloc((size_t)width * sizeof(float));
  if (h == NULL) abort(); /* out of memory for a few KB: nothing sane is left to do */
  const float *x = w->x + (int64_t)index * w->features;
  float *out = w->out + (int64_t)index * w->columns;
  if (w->int8) {
    shrink_i8(x, (const int8_t *)w->a + lo, w->rank, width, w->features, h);
  } else {
    shrink_f32(x, (const float *)w->a + lo, w->rank, width, w->features, h);
  }
  for (int64_t c = 0; c < width; c++) h[c] *= m[lo + c];
  if (w->int8) {
    expand_i8(h, (const int8_t *)w->b + lo * w->columns, width, w->columns, w->columns, out);
  } else {
    expand_f32(h, (const float *)w->b + lo * w->columns, width, w->columns, w->columns, out);
  }
  if (h != stack) free(h);
}

/* A tensor's element type and dimensions, read in place (no copy: this runs 150 times a
 * decode step). */
static OrtStatus *dims(const OrtValue *value, ONNXTensorElementDataType *type,
                       const int64_t **out, size_t want, const char *what) {
  size_t count = 0;
  OrtStatus *status = ort->GetTensorElementTypeAndShapeDataReference(value, type, out, &count);
  if (status == NULL && count != want) status = ort->CreateStatus(ORT_INVALID_ARGUMENT, what);
  return status;
}

#define CHECK(expr)                         \
  do {                                      \
    OrtStatus *status_ = (expr);            \
    if (status_ != NULL) return status_;    \
  } while (0)

static OrtStatus *ORT_API_CALL compute(void *kernel, OrtKernelContext *context) {
  (void)kernel;
  const OrtValue *in[INPUTS];
  for (size_t i = 0; i < INPUTS; i++) CHECK(ort->KernelContext_GetInput(context, i, &in[i]));
  const int64_t *y, *x, *a, *b, *mask;
  ONNXTensorElementDataType types[INPUTS];
  CHECK(dims(in[IN_Y], &types[IN_Y], &y, 3, "LoraBranch: y must be (rows, tokens, columns)"));
  CHECK(dims(in[IN_X], &types[IN_X], &x, 3, "LoraBranch: x must be (rows, tokens, features)"));
  CHECK(dims(in[IN_A], &types[IN_A], &a, 2, "LoraBranch: A must be (features, rank)"));
  CHECK(dims(in[IN_B], &types[IN_B], &b, 2, "LoraBranch: B must be (rank, columns)"));
  CHECK(dims(in[IN_MASK], &types[IN_MASK], &mask, 3, "LoraBranch: mask must be (rows, 1, rank)"));
  if (x[0] != y[0] || x[1] != y[1] || a[0] != x[2] || b[0] != a[1] || b[1] != y[2] ||
      mask[0] != y[0] || mask[1] != 1 || mask[2] != a[1]) {
    return ort->CreateStatus(ORT_INVALID_ARGUMENT, "LoraBranch: the inputs' shapes disagree");
  }
  const ONNXTensorElementDataType weights = types[IN_A];
  if (types[IN_B] != weights || (weights != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT &&
                                 weights != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8)) {
    return ort->CreateStatus(ORT_INVALID_ARGUMENT,
                             "LoraBranch: A and B must both be float or both int8");
  }
  Branch w = {.int8 = weights == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8, .rows = y[0], .tokens = y[1],
              .columns = y[2], .features = x[2], .rank = a[1]};
  OrtValue *output = NULL;
  CHECK(ort->KernelContext_GetOutput(context, 0, y, 3, &output));
  const void *data = NULL;
  CHECK(ort->GetTensorData(in[IN_Y], &data));
  const float *base = (const float *)data;
  CHECK(ort->GetTensorMutableData(output, (void **)&w.out));
  CHECK(ort->GetTensorData(in[IN_X], &data));
  w.x = (const float *)data;
  CHECK(ort->GetTensorData(in[IN_A], &data));
  w.a = data;
  CHECK(ort->GetTensorData(in[IN_B], &data));
  w.b = data;
  CHECK(ort->GetTensorData(in[IN_MASK], &data));
  w.mask = (const float *)data;
  const size_t positions = (size_t)(w.rows * w.tokens);
  if (w.out != base) memcpy(w.out, base, positions * (size_t)w.columns * sizeof(float));
  if (w.rank == 0 || positions == 0) return NULL; /* no adapter in the batch: nothing to add */
  if (positions < 8) { /* a decode step: the pool's hand-off costs more than the work */
    for (size_t i = 0; i < positions; i++) position(&w, i);
    return NULL;
  }
  return ort->KernelContext_ParallelFor(context, position, positions, 0, &w);
}

static OrtStatus *ORT_API_CALL create(const OrtCustomOp *op, const OrtApi *api,
                                      const OrtKernelInfo *info, void **kernel) {
  (void)api, (void)info;
  *kernel = (void *)op; /* stateless */
  return NULL;
}

static void ORT_API_CALL destroy(void *kernel) { (void)kernel; }
static const char *ORT_API_CALL name(const OrtCustomOp *op) { (void)op; return "LoraBranch"; }
static const char *ORT_API_CALL provider(const OrtCustomOp *op) {
  (void)op;
  return "CPUExecutionProvider";
}
static ONNXTensorElementDataType ORT_API_CALL input_type(const OrtCustomOp *op, size_t i) {
  (void)op;
  /* A and B: float or int8, checked when run (UNDEFINED: any type). */
  return i == IN_A || i == IN_B ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED
                                : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}
static ONNXTensorElementDataType ORT_API_CALL output_type(const OrtCustomOp *op, size_t i) {
  (void)op, (void)i;
  return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}
static size_t ORT_API_CALL input_count(const OrtCustomOp *op) { (void)op; return INPUTS; }
static size_t ORT_API_CALL output_count(const OrtCustomOp *op) { (void)op; return 1; }
static OrtCustomOpInputOutputCharacteristic ORT_API_CALL required(const OrtCustomOp *op,
                                                                  size_t i) {
  (void)op, (void)i;
  return INPUT_OUTPUT_REQUIRED;
}
static OrtMemType ORT_API_CALL cpu_memory(const OrtCustomOp *op, size_t i) {
  (void)op, (void)i;
  return OrtMemTypeDefault;
}

/* The output may take y's buffer: the branch adds to the base's output where it lies. */
static size_t ORT_API_CALL may_inplace(int **input_index, int **output_index) {
  *input_index = (int *)malloc(sizeof(int));
  *output_index = (int *)malloc(sizeof(int));
  if (*input_index == NULL || *output_index == NULL) {
    free(*input_index), free(*output_index);
    *input_index = *output_index = NULL;
    return 0;
  }
  (*input_index)[0] = IN_Y;
  (*output_index)[0] = 0;
  return 1;
}
static void ORT_API_CALL release_inplace(int *input_index, int *output_index) {
  free(input_index), free(output_index);
}

static OrtCustomOp lora_branch;

OrtStatus *ORT_API_CALL RegisterCustomOps(OrtSessionOptions *options, const OrtApiBase *base) {
  ort = base->GetApi(ORT_API_VERSION);
  if (ort == NULL) return NULL; /* cannot even say why: the caller's runtime is older */
  if (lora_branch.version == 0) { /* once: sessions registered earlier hold this op */
    /* KUBETUNE_LORA_ISA=avx2|portable caps the INT8 loops' instruction set (the tests run
     * each on a CPU that has them all). */
    const char *cap = getenv("KUBETUNE_LORA_ISA");
    const int avx512 = cap == NULL && has_avx512();
    const int avx2 = (cap == NULL || strcmp(cap, "avx2") == 0) && has_avx2();
    if (avx512) {
      shrink_i8 = shrink_i8_avx512, expand_i8 = expand_i8_avx512;
    } else if (avx2) {
      shrink_i8 = shrink_i8_avx2, expand_i8 = expand_i8_avx2;
    }
  lora_branch.GetName = name;
  lora_branch.GetExecutionProviderType = provider;
  lora_branch.GetInputType = input_type;
  lora_branch.GetInputTypeCount = input_count;
  lora_branch.GetOutputType = output_type;
  lora_branch.GetOutputTypeCount = output_count;
  lora_branch.KernelDestroy = destroy;
  lora_branch.GetInputCharacteristic = required;
  lora_branch.GetOutputCharacteristic = required;
  lora_branch.GetInputMemoryType = cpu_memory;
  lora_branch.CreateKernelV2 = create;
  lora_branch.KernelComputeV2 = compute;
  lora_branch.GetMayInplace = may_inplace;
  lora_branch.ReleaseMayInplace = release_inplace;
  lora_branch.version = ORT_API_VERSION;
  }
  OrtCustomOpDomain *domain = NULL;
  CHECK(ort->CreateCustomOpDomain("kubetune", &domain));
  CHECK(ort->CustomOpDomain_Add(domain, &lora_branch));
  return ort->AddCustomOpDomain(options, domain);
}
