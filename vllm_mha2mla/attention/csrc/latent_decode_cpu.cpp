// Paged MQA decode over an MLA latent cache of any width, for x86 CPUs with AVX-512.
//
// One query token per request: out[b, h, :C] = softmax(scale * q[b, h] . K_b^T) V_b, where the
// rows of K_b are the request's cached rows [latent (C) | k_pe] (D values each, read through the
// block table) and V_b their first C values. Same contract as paged_latent_decode in
// paged_attention.py (the PyTorch reference the tests hold this to).
//
// Why a kernel: the cache is read in place (no gather copy), once per tile for all heads, with
// float32 scores, softmax and accumulation; requests are split along their context
// (flash-decoding) so that a few long requests still use every core.
//
// Per tile of up to 16 tokens of one block:
//  * scores, one vector of 16 token scores per head: bf16 dot products with float32 sums
//    (AVX512-BF16), or float32 FMAs on the converted rows (AVX-512 without BF16), then a 16-way
//    transpose-reduce. Chunks of a head's query that are all zero are skipped: an MHA2MLA query
//    head is zero on the rope columns of every kv-head but its own: a third of the score work at
//    SmolLM2's shape. Skipping adds exact zeros, so the result is unchanged.
//  * online softmax in float32;
//  * p * V: with AVX512-BF16, p rounded to bf16 (as FlashAttention does) and bf16 dot products
//    over token pairs into float32 sums (the value rows are interleaved pairwise once per tile for
//    all heads; the sums live in that interleaved column order until the merge writes them out);
//    without it, float32 FMAs.
// The rows two tiles ahead are prefetched into L2 while the current tile is computed.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VL__)
#error "latent_decode_cpu.cpp needs AVX-512 (F, BW, VL); the Python side only builds it where the CPU has them"
#endif

namespace {

constexpr int TILE = 16;  // tokens per tile (one float32 score vector)
#if defined(__AVX512BF16__)
constexpr int QCHUNK = 32;  // query/key values per bf16 dot product
#else
constexpr int QCHUNK = 16;
#endif

inline __m512 exp_ps(__m512 x) {
  // e^x for x <= 0 (softmax arguments); relative error ~1e-7. x = (n + f) ln2, |f| <= 1/2.
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.6931471805599453f));
  // Taylor series of e^r to r^8 / 8! (|r| <= 0.347: truncation < 1e-9)
  __m512 p = _mm512_set1_ps(1.0f / 40320.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 5040.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// 16 vectors a[i] -> one vector whose lane i is the sum of a[i]'s lanes.
inline __m512 transpose_reduce16(const __m512* a) {
  __m512 s[8];
  for (int k = 0; k < 8; ++k)
    s[k] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * k], a[2 * k + 1]), _mm512_unpackhi_ps(a[2 * k], a[2 * k + 1]));
  __m512 q[4];
  for (int k = 0; k < 4; ++k)
    q[k] = _mm512_add_ps(_mm512_shuffle_ps(s[2 * k], s[2 * k + 1], 0x44), _mm512_shuffle_ps(s[2 * k], s[2 * k + 1], 0xEE));
  const __m512 v01 = _mm512_add_ps(_mm512_shuffle_f32x4(q[0], q[1], 0x44), _mm512_shuffle_f32x4(q[0], q[1], 0xEE));
  const __m512 v23 = _mm512_add_ps(_mm512_shuffle_f32x4(q[2], q[3], 0x44), _mm512_shuffle_f32x4(q[2], q[3], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(v01, v23, 0x88), _mm512_shuffle_f32x4(v01, v23, 0xDD));
}

inline __m512 bf16_to_f32(__m256i v) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16)); }

inline __mmask16 mask16(int count) { return count >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << count) - 1); }
inline __mmask32 mask32(int count) { return count >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1ull << count) - 1); }

inline __m512 load_bf16_as_f32(const uint16_t* p, int count) {  // count values (<= 16 used), rest zero
  return bf16_to_f32(_mm256_maskz_loadu_epi16(mask16(count), p));
}

#if defined(__AVX512BF16__)
// Value sums with bf16 dot products over token pairs: for 32 value columns starting at 32k, the pair
// interleave of rows (2j, 2j+1) gives two vectors ("lo", "hi"); sums are kept per 32 columns as
// [lo 16 | hi 16], lane 4L+k of lo = column 32k + 8L + k, of hi = column 32k + 8L + 4 + k.
inline int interleaved_column(int index) {  // position in the [lo | hi] layout -> column
  const int chunk = index / 32, half = (index % 32) / 16, lane = index % 16;
  return chunk * 32 + 8 * (lane / 4) + 4 * half + lane % 4;
}

template <int G>  // G chunks of 32 columns in registers
inline void pv_bf16(float* acc, const __m512i* vi, const uint32_t* pp, __m512 alpha) {
  __m512 r[2 * G];
  for (int g = 0; g < 2 * G; ++g) r[g] = _mm512_mul_ps(_mm512_loadu_ps(acc + 16 * g), alpha);
#pragma GCC unroll 8
  for (int j = 0; j < TILE / 2; ++j) {
    const __m512bh pj = (__m512bh)_mm512_set1_epi32((int)pp[j]);
    for (int g = 0; g < G; ++g) {
      r[2 * g] = _mm512_dpbf16_ps(r[2 * g], (__m512bh)vi[((int64_t)g * (TILE / 2) + j) * 2], pj);
      r[2 * g + 1] = _mm512_dpbf16_ps(r[2 * g + 1], (__m512bh)vi[((int64_t)g * (TILE / 2) + j) * 2 + 1], pj);
    }
  }
  for (int g = 0; g < 2 * G; ++g) _mm512_storeu_ps(acc + 16 * g, r[g]);
}
#endif

struct Partial {  // running softmax state of one (task, head)
  float m;
  float l;
};

struct Shape {
  int H, D, C;
  int Cp;       // float32 sums per head: C rounded up to 32 (bf16 PV) or 16
  int Dp;       // D rounded up to 16 (float32 rows without BF16)
  float scale;
};

// Attends the query heads of one request to its tokens [t_begin, t_end).
//   q: [H, D] bf16 bits; qf: [H, Dp] the same in float32, zero-padded (used without AVX512-BF16)
//   chunks: for each head, the indices of its query's nonzero QCHUNK-value chunks (count first)
//   acc: [H, Cp] float32 sums, state: [H]; scratch: see the caller
// Every tile computes all TILE rows (rows past the tile's n repeat its first row and get p = 0), so the
// token loops have a compile-time trip count and their accumulators stay in registers.
void attend_range(const uint16_t* q, const float* qf, const int32_t* chunks, int chunk_stride, const uint16_t* cache,
                  int64_t block_stride, int64_t row_stride, const int32_t* blocks, int64_t BS, int64_t t_begin,
                  int64_t t_end, const Shape& sh, float* acc, Partial* state, void* scratch) {
  const int H = sh.H, D = sh.D, C = sh.C, Cp = sh.Cp;
  const uint16_t* rows[TILE];
  for (int h = 0; h < H; ++h) state[h] = {-std::numeric_limits<float>::infinity(), 0.0f};
  std::fill(acc, acc + (int64_t)H * Cp, 0.0f);
  float* alphas = static_cast<float*>(scratch);                       // [H]
  float* pbuf = alphas + ((H + 15) / 16 * 16);                        // [H, TILE]
  float* vbuf = pbuf + (int64_t)H * TILE;                             // [TILE, Cp] (f32 PV) / interleaved
  [[maybe_unused]] float* kbuf = vbuf + (int64_t)TILE * Cp;           // [TILE, Dp] (no BF16)
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const int64_t row_bytes = (int64_t)D * 2;

  int64_t t = t_begin;
  while (t < t_end) {
    const int64_t in_block = t % BS;
    const int n = (int)std::min<int64_t>({TILE, BS - in_block, t_end - t});
    const uint16_t* base = cache + (int64_t)blocks[t / BS] * block_stride + in_block * row_stride;
    for (int i = 0; i < TILE; ++i) rows[i] = base + (i < n ? i : 0) * row_stride;
    const __mmask16 valid = mask16(n);
    // prefetch the rows two tiles ahead into L2: blocks lie anywhere in memory, so the hardware
    // prefetcher only helps within one (measured, 30 layers at batch 16 x 2K: 50 ms without, 46 into
    // L1, 34 into L2; one to four tiles ahead alike)
    if (t + 2 * TILE < t_end) {
      const int64_t nt = t + 2 * TILE, nib = nt % BS;
      const int nn = (int)std::min<int64_t>({TILE, BS - nib, t_end - nt});
      const char* nb = reinterpret_cast<const char*>(cache + (int64_t)blocks[nt / BS] * block_stride + nib * row_stride);
      for (int i = 0; i < nn; ++i)
        for (int64_t off = 0; off < row_bytes; off += 64) _mm_prefetch(nb + i * row_stride * 2 + off, _MM_HINT_T1);
    }
#if !defined(__AVX512BF16__)
    for (int i = 0; i < TILE; ++i)
      for (int d = 0; d < D; d += 16)
        _mm512_storeu_ps(kbuf + (int64_t)i * sh.Dp + d, load_bf16_as_f32(rows[i] + d, D - d));
#endif
    // scores: one vector of TILE token scores per head
    for (int h = 0; h < H; ++h) {
      __m512 a[TILE];
#pragma GCC unroll 16
      for (int i = 0; i < TILE; ++i) a[i] = _mm512_setzero_ps();
      const int32_t* hc = chunks + (int64_t)h * chunk_stride;
      for (int k = 1; k <= hc[0]; ++k) {
        const int d = hc[k] * QCHUNK;
#if defined(__AVX512BF16__)
        const uint16_t* qh = q + (int64_t)h * D;
        if (d + 32 <= D) {
          const __m512bh qv = (__m512bh)_mm512_loadu_si512(qh + d);
#pragma GCC unroll 16
          for (int i = 0; i < TILE; ++i) a[i] = _mm512_dpbf16_ps(a[i], (__m512bh)_mm512_loadu_si512(rows[i] + d), qv);
        } else {
          const __mmask32 m = mask32(D - d);
          const __m512bh qv = (__m512bh)_mm512_maskz_loadu_epi16(m, qh + d);
#pragma GCC unroll 16
          for (int i = 0; i < TILE; ++i)
            a[i] = _mm512_dpbf16_ps(a[i], (__m512bh)_mm512_maskz_loadu_epi16(m, rows[i] + d), qv);
        }
#else
        const __m512 qv = _mm512_loadu_ps(qf + (int64_t)h * sh.Dp + d);
#pragma GCC unroll 16
        for (int i = 0; i < TILE; ++i) a[i] = _mm512_fmadd_ps(_mm512_loadu_ps(kbuf + (int64_t)i * sh.Dp + d), qv, a[i]);
#endif
      }
      __m512 s = _mm512_mul_ps(transpose_reduce16(a), _mm512_set1_ps(sh.scale));
      s = _mm512_mask_blend_ps(valid, neg_inf, s);
      const float tile_max = _mm512_reduce_max_ps(s);
      Partial& st = state[h];
      const float m_new = std::max(st.m, tile_max);
      const float alpha = std::exp(st.m - m_new);  // 0 on the first tile (m = -inf)
      const __m512 p = _mm512_maskz_mov_ps(valid, exp_ps(_mm512_sub_ps(s, _mm512_set1_ps(m_new))));
      st.l = st.l * alpha + _mm512_reduce_add_ps(p);
      st.m = m_new;
      alphas[h] = alpha;
      _mm512_storeu_ps(pbuf + h * TILE, p);
    }

#if defined(__AVX512BF16__)
    // value rows, pairwise interleaved: vi[(chunk * TILE/2 + j) * 2 + {lo, hi}]
    __m512i* vi = reinterpret_cast<__m512i*>(vbuf);
    const int chunks32 = Cp / 32;
    for (int c = 0; c < chunks32; ++c) {
      const __mmask32 m = mask32(C - 32 * c);
      for (int j = 0; j < TILE / 2; ++j) {
        const __m512i r0 = _mm512_maskz_loadu_epi16(m, rows[2 * j] + 32 * c);
        const __m512i r1 = _mm512_maskz_loadu_epi16(m, rows[2 * j + 1] + 32 * c);
        vi[((int64_t)c * (TILE / 2) + j) * 2] = _mm512_unpacklo_epi16(r0, r1);
        vi[((int64_t)c * (TILE / 2) + j) * 2 + 1] = _mm512_unpackhi_epi16(r0, r1);
      }
    }
    for (int h = 0; h < H; ++h) {
      // p as bf16 pairs (p_2j, p_2j+1), one 32-bit word per token pair
      alignas(64) uint32_t pp[TILE / 2];
      const __m256i pb = (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(pbuf + h * TILE));
      _mm256_store_si256(reinterpret_cast<__m256i*>(pp), pb);
      const __m512 av = _mm512_set1_ps(alphas[h]);
      float* ah = acc + (int64_t)h * Cp;
      int c = 0;
      for (; c + 4 <= chunks32; c += 4) pv_bf16<4>(ah + 32 * c, vi + (int64_t)c * TILE, pp, av);
      switch (chunks32 - c) {
        case 3: pv_bf16<3>(ah + 32 * c, vi + (int64_t)c * TILE, pp, av); break;
        case 2: pv_bf16<2>(ah + 32 * c, vi + (int64_t)c * TILE, pp, av); break;
        case 1: pv_bf16<1>(ah + 32 * c, vi + (int64_t)c * TILE, pp, av); break;
        default: break;
      }
    }
#else
    // values: the tile's first C columns in float32, once for all heads (rows past n: finite, p = 0)
    for (int i = 0; i < TILE; ++i)
      for (int c = 0; c < Cp; c += 16) _mm512_storeu_ps(vbuf + (int64_t)i * Cp + c, load_bf16_as_f32(rows[i] + c, C - c));
    for (int h = 0; h < H; ++h) {
      __m512 pb[TILE];
#pragma GCC unroll 16
      for (int i = 0; i < TILE; ++i) pb[i] = _mm512_set1_ps(pbuf[h * TILE + i]);
      const __m512 av = _mm512_set1_ps(alphas[h]);
      float* ah = acc + (int64_t)h * Cp;
      for (int c = 0; c < Cp; c += 16) {
        __m512 r0 = _mm512_mul_ps(_mm512_loadu_ps(ah + c), av), r1 = _mm512_setzero_ps();
#pragma GCC unroll 16
        for (int i = 0; i < TILE; i += 2) {
          r0 = _mm512_fmadd_ps(pb[i], _mm512_loadu_ps(vbuf + (int64_t)i * Cp + c), r0);
          r1 = _mm512_fmadd_ps(pb[i + 1], _mm512_loadu_ps(vbuf + (int64_t)(i + 1) * Cp + c), r1);
        }
        _mm512_storeu_ps(ah + c, _mm512_add_ps(r0, r1));
      }
    }
#endif
    t += n;
  }
}

// q: [B, H, D], or the query's latent part [B, H, C] with q_pe its rope part [B, H, D - C] (any
// strides with contiguous rows: vLLM hands over a transposed latent query; no concatenation needed).
at::Tensor latent_decode(const at::Tensor& q, const std::optional<at::Tensor>& q_pe, const at::Tensor& kv_cache,
                         const at::Tensor& block_table, const at::Tensor& seq_lens, double scale, int64_t kv_lora_rank) {
  TORCH_CHECK(q.dim() == 3 && kv_cache.dim() == 3, "q [B, H, D] and kv_cache [blocks, block_size, D]");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && kv_cache.scalar_type() == at::kBFloat16, "bf16 q and cache");
  const int64_t width = q.size(2) + (q_pe.has_value() ? q_pe->size(2) : 0);
  TORCH_CHECK(width == kv_cache.size(2), "query and cache rows differ in width");
  TORCH_CHECK(kv_cache.stride(2) == 1, "cache rows must be contiguous");
  TORCH_CHECK(kv_lora_rank > 0 && kv_lora_rank <= width, "kv_lora_rank out of range");
  TORCH_CHECK(block_table.dim() == 2 && block_table.size(0) == q.size(0) && seq_lens.numel() == q.size(0),
              "block_table [B, blocks] and seq_lens [B]");
  const int64_t B = q.size(0), H = q.size(1), D = width, C = kv_lora_rank, BS = kv_cache.size(1);
  Shape sh;
  sh.H = (int)H;
  sh.D = (int)D;
  sh.C = (int)C;
#if defined(__AVX512BF16__)
  sh.Cp = (int)((C + 31) / 32 * 32);
#else
  sh.Cp = (int)((C + 15) / 16 * 16);
#endif
  sh.Dp = (int)((D + 15) / 16 * 16);
  sh.scale = (float)scale;
  const at::Tensor table = block_table.to(at::kInt).contiguous();
  const at::Tensor lens = seq_lens.to(at::kLong).contiguous();
  at::Tensor out = at::empty({B, H, C}, q.options().memory_format(at::MemoryFormat::Contiguous));
  if (B == 0 || H == 0) return out;
  const int64_t* len = lens.data_ptr<int64_t>();
  const int32_t* tp = table.data_ptr<int32_t>();
  const int64_t table_stride = table.size(1), num_blocks = kv_cache.size(0);
  for (int64_t b = 0; b < B; ++b) {  // every block the kernel will read must exist
    TORCH_CHECK(len[b] >= 0 && len[b] <= table_stride * BS, "seq_lens beyond the block table");
    for (int64_t k = 0; k < (len[b] + BS - 1) / BS; ++k)
      TORCH_CHECK(tp[b * table_stride + k] >= 0 && tp[b * table_stride + k] < num_blocks,
                  "block table entry outside the cache");
  }

  // the query rows, [B, H, D] contiguous
  std::vector<uint16_t> qrows((size_t)B * H * D);
  auto copy_part = [&](const at::Tensor& part, int64_t offset) {
    TORCH_CHECK(part.dim() == 3 && part.size(0) == B && part.size(1) == H && part.scalar_type() == at::kBFloat16 &&
                    (part.size(2) <= 1 || part.stride(2) == 1),
                "query parts must be bf16 [B, H, *] with contiguous rows");
    const uint16_t* src = reinterpret_cast<const uint16_t*>(part.data_ptr<at::BFloat16>());
    const int64_t w = part.size(2);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h)
        std::memcpy(&qrows[(b * H + h) * D + offset], src + b * part.stride(0) + h * part.stride(1), w * 2);
  };
  copy_part(q, 0);
  if (q_pe.has_value()) copy_part(*q_pe, q.size(2));
  const uint16_t* qp = qrows.data();
  // each (request, head)'s nonzero query chunks
  const int nchunks = (int)((D + QCHUNK - 1) / QCHUNK);
  const int chunk_stride = nchunks + 1;
  std::vector<int32_t> chunks((size_t)B * H * chunk_stride);
  for (int64_t bh = 0; bh < B * H; ++bh) {
    int32_t* hc = chunks.data() + bh * chunk_stride;
    int count = 0;
    for (int k = 0; k < nchunks; ++k) {
      bool nonzero = false;
      for (int64_t d = (int64_t)k * QCHUNK; d < std::min<int64_t>(D, (int64_t)(k + 1) * QCHUNK); ++d)
        nonzero |= (qp[bh * D + d] & 0x7FFF) != 0;
      if (nonzero) hc[++count] = k;
    }
    hc[0] = count;
  }

  // split each request's context so that there are a few tasks per thread, each >= 256 tokens
  const int threads = at::get_num_threads();
  int64_t total = 0;
  for (int64_t b = 0; b < B; ++b) total += len[b];
  const int64_t target = std::max<int64_t>(256, total / std::max<int64_t>(1, 4 * threads));
  std::vector<int64_t> task_req, task_begin, task_end, req_first(B + 1, 0);
  for (int64_t b = 0; b < B; ++b) {
    req_first[b] = (int64_t)task_req.size();
    const int64_t L = len[b];
    const int64_t splits = std::max<int64_t>(1, (L + target - 1) / target);
    const int64_t chunk = (L + splits - 1) / splits;
    for (int64_t s = 0; s < splits; ++s) {
      task_req.push_back(b);
      task_begin.push_back(std::min(L, s * chunk));
      task_end.push_back(std::min(L, (s + 1) * chunk));
    }
  }
  req_first[B] = (int64_t)task_req.size();
  const int64_t tasks = (int64_t)task_req.size();
  std::vector<float> acc((size_t)tasks * H * sh.Cp);
  std::vector<Partial> state((size_t)tasks * H);

  std::vector<float> qf;  // float32 copy of q, rows padded to Dp (the path without bf16 dot products)
#if !defined(__AVX512BF16__)
  qf.assign((size_t)B * H * sh.Dp, 0.0f);
  for (int64_t r = 0; r < B * H; ++r)
    for (int64_t d = 0; d < D; ++d) {
      uint32_t bits = (uint32_t)qp[r * D + d] << 16;
      std::memcpy(&qf[r * sh.Dp + d], &bits, 4);
    }
#endif
  const uint16_t* cp = reinterpret_cast<const uint16_t*>(kv_cache.data_ptr<at::BFloat16>());
  const size_t scratch_floats = (size_t)((H + 15) / 16 * 16) + (size_t)H * TILE + (size_t)TILE * sh.Cp +
                                (size_t)TILE * sh.Dp + 16;

  // tasks differ in length (ragged requests): hand them out one at a time. Each thread accumulates
  // in its own scratch and copies the result out once per task: adjacent tasks' sums share cache
  // lines, and writing them per tile from two threads measured 30% slower.
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> scratch_store(scratch_floats + (size_t)H * sh.Cp + 32);
    float* local_acc = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(scratch_store.data()) + 63) & ~uintptr_t(63));
    void* scratch = local_acc + (size_t)H * sh.Cp;  // Cp is a multiple of 16: stays 64-byte aligned
    std::vector<Partial> local_state(H);
#pragma omp for schedule(dynamic, 1)
    for (int64_t k = 0; k < tasks; ++k) {
      const int64_t b = task_req[k];
      attend_range(qp + b * H * D, qf.empty() ? nullptr : qf.data() + b * H * sh.Dp,
                   chunks.data() + b * H * chunk_stride, chunk_stride, cp, kv_cache.stride(0), kv_cache.stride(1),
                   tp + b * table_stride, BS, task_begin[k], task_end[k], sh, local_acc, local_state.data(), scratch);
      std::copy(local_acc, local_acc + (size_t)H * sh.Cp, acc.begin() + (size_t)k * H * sh.Cp);
      std::copy(local_state.begin(), local_state.end(), state.begin() + (size_t)k * H);
    }
  }

  // merge the splits of each request; write the columns back in order
  std::vector<int32_t> column(sh.Cp);
  for (int i = 0; i < sh.Cp; ++i) {
#if defined(__AVX512BF16__)
    column[i] = interleaved_column(i);
#else
    column[i] = i;
#endif
  }
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  at::parallel_for(0, B * H, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> sum(sh.Cp);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t k = req_first[b]; k < req_first[b + 1]; ++k) m = std::max(m, state[k * H + h].m);
      std::fill(sum.begin(), sum.end(), 0.0f);
      float l = 0.0f;
      if (m != -std::numeric_limits<float>::infinity()) {
        for (int64_t k = req_first[b]; k < req_first[b + 1]; ++k) {
          const Partial& st = state[k * H + h];
          if (st.l == 0.0f) continue;
          const float w = std::exp(st.m - m);
          l += st.l * w;
          const float* a = acc.data() + ((size_t)k * H + h) * sh.Cp;
          for (int c = 0; c < sh.Cp; ++c) sum[c] += w * a[c];
        }
      }
      const float inv = l > 0.0f ? 1.0f / l : 0.0f;
      at::BFloat16* o = op + bh * C;
      for (int i = 0; i < sh.Cp; ++i)
        if (column[i] < C) o[column[i]] = at::BFloat16(sum[i] * inv);
    }
  });
  return out;
}

// Writes each token's cache row [kv_c | k_pe] at its slot (block * block_size + offset); slots < 0
// (padding) are skipped. One pass and no host sync, instead of a validity check and two indexed writes.
void write_latent_rows(const at::Tensor& kv_c, const at::Tensor& k_pe, at::Tensor& kv_cache,
                       const at::Tensor& slot_mapping) {
  TORCH_CHECK(kv_cache.dim() == 3 && kv_cache.stride(2) == 1 && kv_cache.stride(0) == kv_cache.size(1) * kv_cache.stride(1),
              "kv_cache must be [blocks, block_size, D] with whole blocks contiguous");
  const int64_t T = slot_mapping.numel(), C = kv_c.size(-1), R = k_pe.size(-1), D = kv_cache.size(2);
  TORCH_CHECK(C + R == D, "kv_c and k_pe do not fill a cache row");
  TORCH_CHECK(kv_c.scalar_type() == kv_cache.scalar_type() && k_pe.scalar_type() == kv_cache.scalar_type(),
              "rows and cache must share a dtype");
  TORCH_CHECK(kv_c.size(0) >= T && k_pe.size(0) >= T, "fewer rows than slots");
  const at::Tensor c2 = kv_c.reshape({kv_c.size(0), C}), r2 = k_pe.reshape({k_pe.size(0), R});
  TORCH_CHECK(c2.stride(1) == 1 && r2.stride(1) == 1, "rows must be contiguous");
  const at::Tensor slots = slot_mapping.to(at::kLong).contiguous();
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t rows = kv_cache.size(0) * kv_cache.size(1), row_stride = kv_cache.stride(1);
  const int64_t elem = kv_cache.element_size();
  char* dst = static_cast<char*>(kv_cache.data_ptr());
  const char* src_c = static_cast<const char*>(c2.data_ptr());
  const char* src_r = static_cast<const char*>(r2.data_ptr());
  for (int64_t t = 0; t < T; ++t) {
    const int64_t slot = sp[t];
    if (slot < 0) continue;
    TORCH_CHECK(slot < rows, "slot beyond the cache");
    char* row = dst + slot * row_stride * elem;
    std::memcpy(row, src_c + t * c2.stride(0) * elem, C * elem);
    if (R > 0) std::memcpy(row + C * elem, src_r + t * r2.stride(0) * elem, R * elem);
  }
}

}  // namespace

// The op namespace is the extension's name (one per instruction-set variant, so two variants can be
// loaded side by side, as the tests do); two macro levels so that the name is expanded first.
#ifndef MHA2MLA_OPS
#define MHA2MLA_OPS mha2mla_cpu
#endif
#define MHA2MLA_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define MHA2MLA_LIBRARY_IMPL(ns, m) TORCH_LIBRARY_IMPL(ns, CPU, m)

MHA2MLA_LIBRARY(MHA2MLA_OPS, m) {
  m.def("latent_decode(Tensor q, Tensor? q_pe, Tensor kv_cache, Tensor block_table, Tensor seq_lens, float scale, "
        "int kv_lora_rank) -> Tensor");
  m.def("write_latent_rows(Tensor kv_c, Tensor k_pe, Tensor(a!) kv_cache, Tensor slot_mapping) -> ()");
}

MHA2MLA_LIBRARY_IMPL(MHA2MLA_OPS, m) {
  m.impl("latent_decode", &latent_decode);
  m.impl("write_latent_rows", &write_latent_rows);
}
