// Stand-alone driver of the emulated kernels (no torch): runs a matrix of decode-attention and
// accept cases through the kernels' own launch functions and checks every result against a
// plain C++ reference. Built with sanitizers by scripts/emulated_sanitizers.sh (ASan + UBSan:
// any out-of-bounds global or shared access; TSan: races between the emulated threads) and by
// scripts/emulator_mutations.sh on mutated kernel sources. Exit status 1 on any wrong result.
//
// Usage: emulated_driver [--quick]   (--quick: the smaller matrix the mutation runs use)
//
// Buffers are heap blocks of exactly the tensor's size, so a read one row past a tensor is
// an AddressSanitizer report; unused cache rows hold NaN so a read of one poisons the output.
// Paged cases keep the cache in a pool of shuffled pages (plus spare pages nobody owns, NaN)
// addressed through a block table of exactly [batch, max_len / page_size] entries, so a wrong
// page, slot or table column reads NaN, writes the wrong bytes, or leaves the heap block.
// Tolerance of the attention output: the kernel rounds probabilities, the normalised split
// partials and the output to the element type (unit roundoff u = 2^-11 fp16, 2^-8 bf16) and
// keeps everything else in fp32, so |out - exact| <= (u for P + u for the partials + u for the
// output + fp32 terms) * max|v| < 4 u max|v|.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <string>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "b16.h"
#include "emulation_api.h"
#include "kernels.h"
#include "tidar_mask.h"

using tidar::emu::b16_to_float;
using tidar::emu::float_to_b16;

namespace {

int failures = 0;

void report(const std::string& name, const char* what) {
  ++failures;
  std::fprintf(stderr, "FAILED %s: %s\n", name.c_str(), what);
}

struct Random {  // deterministic, platform independent
  uint64_t state;
  float uniform(float lo, float hi) {
    state = state * 6364136223846793005ULL + 1442695040888963407ULL;
    return lo + (hi - lo) * static_cast<float>((state >> 40) & 0xFFFFFF) / 16777216.f;
  }
};

// ---------------------------------------------------------------------------------------------
// Decode attention
// ---------------------------------------------------------------------------------------------

struct DecodeCase {
  bool bf16;
  int head_dim, k, q_heads, kv_heads, max_len, splits;
  std::vector<int> lengths;
  int page_size = 0;  // > 0: a paged cache (max_len a multiple of it), else contiguous
};

constexpr int kSparePages = 2;  // pages of a paged pool that no sequence owns

std::string describe(const DecodeCase& c) {
  std::string lengths;
  for (int n : c.lengths) lengths += (lengths.empty() ? "" : ",") + std::to_string(n);
  return std::string("decode ") + (c.bf16 ? "bf16" : "fp16") + " d" + std::to_string(c.head_dim) + " k" +
         std::to_string(c.k) + " heads " + std::to_string(c.q_heads) + "/" + std::to_string(c.kv_heads) + " n [" +
         lengths + "] max_len " + std::to_string(c.max_len) + " splits " + std::to_string(c.splits) +
         (c.page_size > 0 ? " page " + std::to_string(c.page_size) : "");
}

void run_decode(const DecodeCase& c) {
  const std::string name = describe(c);
  const int batch = static_cast<int>(c.lengths.size()), steps = c.k + c.k * c.k, d = c.head_dim;
  const int group = c.q_heads / c.kv_heads;
  Random rng{static_cast<uint64_t>(d * 1000 + c.k * 10 + c.q_heads)};
  auto fill = [&](size_t count) {
    std::vector<uint16_t> v(count);
    for (auto& x : v) x = float_to_b16(rng.uniform(-2.f, 2.f), c.bf16);
    return v;
  };
  std::vector<uint16_t> q = fill(static_cast<size_t>(batch) * steps * c.q_heads * d);
  std::vector<uint16_t> k_new = fill(static_cast<size_t>(batch) * steps * c.kv_heads * d);
  std::vector<uint16_t> v_new = fill(k_new.size());
  // Contiguous: [batch, max_len, kv_heads, d]. Paged: a pool [num_pages, page_size, kv_heads, d]
  // whose pages are dealt to the sequences in a shuffled order through block_table.
  const bool paged = c.page_size > 0;
  const int columns = paged ? c.max_len / c.page_size : 0;
  const int num_pages = paged ? batch * columns + kSparePages : 0;
  std::vector<int32_t> pages(num_pages);
  std::iota(pages.begin(), pages.end(), 0);
  for (size_t i = pages.size(); i > 1; --i)  // Fisher-Yates: the spares land anywhere in the pool
    std::swap(pages[i - 1], pages[static_cast<size_t>(rng.uniform(0.f, 1.f) * i) % i]);
  const std::vector<int32_t> block_table(pages.begin(), pages.begin() + static_cast<size_t>(batch) * columns);
  const size_t cache_elems =
      (paged ? static_cast<size_t>(num_pages) * c.page_size : static_cast<size_t>(batch) * c.max_len) * c.kv_heads * d;
  const uint16_t nan_bits = c.bf16 ? 0x7FC0 : 0x7E00;
  std::vector<uint16_t> k_cache(cache_elems, nan_bits), v_cache(cache_elems, nan_bits);
  auto cache_at = [&](int b, int row, int h) {  // element offset of (sequence b, row, KV head h)
    size_t pool_row = static_cast<size_t>(b) * c.max_len + row;
    if (paged) {
      const size_t page = block_table[static_cast<size_t>(b) * columns + row / c.page_size];
      pool_row = page * c.page_size + row % c.page_size;
    }
    return (pool_row * c.kv_heads + h) * d;
  };
  for (int b = 0; b < batch; ++b)
    for (int row = 0; row < c.lengths[b]; ++row)
      for (int h = 0; h < c.kv_heads; ++h)
        for (int i = 0; i < d; ++i) {
          k_cache[cache_at(b, row, h) + i] = float_to_b16(rng.uniform(-2.f, 2.f), c.bf16);
          v_cache[cache_at(b, row, h) + i] = float_to_b16(rng.uniform(-2.f, 2.f), c.bf16);
        }
  const std::vector<uint16_t> k_before = k_cache, v_before = v_cache;
  std::vector<int32_t> seqlens(c.lengths.begin(), c.lengths.end());
  std::vector<uint16_t> out(q.size());
  std::vector<uint16_t> out_partial(static_cast<size_t>(c.splits + 1) * q.size());  // the element type
  std::vector<float> lse_partial(static_cast<size_t>(c.splits + 1) * batch * steps * c.q_heads);

  tidar::DecodeParams p{};
  p.q = q.data();
  p.k_new = k_new.data();
  p.v_new = v_new.data();
  p.k_cache = k_cache.data();
  p.v_cache = v_cache.data();
  p.cache_seqlens = seqlens.data();
  p.out = out.data();
  p.out_partial = out_partial.data();
  p.lse_partial = lse_partial.data();
  const int64_t q_strides[3] = {static_cast<int64_t>(steps) * c.q_heads * d, static_cast<int64_t>(c.q_heads) * d, d};
  const int64_t kv_strides[3] = {static_cast<int64_t>(steps) * c.kv_heads * d, static_cast<int64_t>(c.kv_heads) * d, d};
  const int64_t cache_strides[3] = {static_cast<int64_t>(paged ? c.page_size : c.max_len) * c.kv_heads * d,
                                    static_cast<int64_t>(c.kv_heads) * d, d};
  for (int i = 0; i < 3; ++i) {
    p.q_stride[i] = q_strides[i];
    p.knew_stride[i] = p.vnew_stride[i] = kv_strides[i];
    p.kcache_stride[i] = p.vcache_stride[i] = cache_strides[i];
  }
  p.batch = batch;
  p.steps = steps;
  p.draft_len = c.k;
  p.q_heads = c.q_heads;
  p.kv_heads = c.kv_heads;
  p.max_len = c.max_len;
  p.num_splits = c.splits;
  p.scale = 1.f / std::sqrt(static_cast<float>(d));
  if (paged) {
    p.block_table = block_table.data();
    p.block_table_stride[0] = columns;
    p.block_table_stride[1] = 1;
    p.page_size = c.page_size;
  }
  if (c.bf16 && d == 64) tidar::run_decode_attention<true, 64>(p, nullptr);
  else if (c.bf16) tidar::run_decode_attention<true, 128>(p, nullptr);
  else if (d == 64) tidar::run_decode_attention<false, 64>(p, nullptr);
  else tidar::run_decode_attention<false, 128>(p, nullptr);
  if (tidar::emulated_launch_error() != cudaSuccess) return report(name, "launch failed");

  // Reference: the committed cache [0, n) plus the local keys the TiDAR rule shows the row.
  const tidar::LayoutParams layout{tidar::Layout::kDecode, c.k, c.k, 0};
  const double unit = c.bf16 ? std::exp2(-8.0) : std::exp2(-11.0);
  double worst = 0.0, allowed = 0.0;
  for (int b = 0; b < batch; ++b)
    for (int t = 0; t < steps; ++t)
      for (int h = 0; h < c.q_heads; ++h) {
        const int kvh = h / group;
        const size_t q_at = ((static_cast<size_t>(b) * steps + t) * c.q_heads + h) * d;
        std::vector<double> scores;
        std::vector<const uint16_t*> values;
        auto add_key = [&](const uint16_t* key, const uint16_t* value) {
          double dot = 0.0;
          for (int i = 0; i < d; ++i) dot += static_cast<double>(b16_to_float(q[q_at + i], c.bf16)) * b16_to_float(key[i], c.bf16);
          scores.push_back(dot * p.scale);
          values.push_back(value);
        };
        for (int row = 0; row < c.lengths[b]; ++row)
          add_key(&k_before[cache_at(b, row, kvh)], &v_before[cache_at(b, row, kvh)]);
        const tidar::KeyRanges ranges = tidar::key_ranges(layout, t);
        for (int j = 0; j < steps; ++j) {
          if (!tidar::row_sees(ranges, j)) continue;
          const size_t at = ((static_cast<size_t>(b) * steps + j) * c.kv_heads + kvh) * d;
          add_key(&k_new[at], &v_new[at]);
        }
        double top = -INFINITY, total = 0.0, v_max = 0.0;
        for (double s : scores) top = std::max(top, s);
        for (double& s : scores) total += (s = std::exp(s - top));
        for (int i = 0; i < d; ++i) {
          double want = 0.0;
          for (size_t j = 0; j < scores.size(); ++j) {
            const double v = b16_to_float(values[j][i], c.bf16);
            want += scores[j] / total * v;
            v_max = std::max(v_max, std::fabs(v));
          }
          const double got = b16_to_float(out[q_at + i], c.bf16);
          const double error = std::isnan(got) ? INFINITY : std::fabs(got - want);
          worst = std::max(worst, error);
          allowed = 4.0 * unit * v_max;
          if (!(error <= allowed)) {
            char text[200];
            std::snprintf(text, sizeof(text), "out[b=%d, t=%d, h=%d, %d] = %g, reference %g (allowed error %.3g)", b,
                          t, h, i, got, want, allowed);
            return report(name, text);
          }
        }
      }
  // The drafts' K/V at rows [n, n + k) (never past max_len; paged: through the table); every
  // other byte unchanged, spare pages included.
  std::vector<uint16_t> k_want = k_before, v_want = v_before;
  for (int b = 0; b < batch; ++b)
    for (int i = 0; i < c.k && c.lengths[b] + i < c.max_len; ++i)
      for (int h = 0; h < c.kv_heads; ++h) {
        const size_t at = cache_at(b, c.lengths[b] + i, h);
        const size_t src = ((static_cast<size_t>(b) * steps + i) * c.kv_heads + h) * d;
        std::memcpy(&k_want[at], &k_new[src], d * sizeof(uint16_t));
        std::memcpy(&v_want[at], &v_new[src], d * sizeof(uint16_t));
      }
  if (k_cache != k_want || v_cache != v_want) return report(name, "cache rows differ");
  std::printf("ok  %s (max error %.3g)\n", name.c_str(), worst);
}

// ---------------------------------------------------------------------------------------------
// Accept and commit
// ---------------------------------------------------------------------------------------------

struct AcceptCase {
  tidar::LogitsType dtype;
  int batch, k, vocab;
  float beta;
  const char* variant;  // "random", "ties", "nan", "subnormal"
};

void run_accept(const AcceptCase& c) {
  const std::string name = std::string("accept ") + std::to_string(static_cast<int>(c.dtype)) + " B" +
                           std::to_string(c.batch) + " k" + std::to_string(c.k) + " V" + std::to_string(c.vocab) +
                           " beta " + std::to_string(c.beta) + " " + c.variant;
  const bool wide = c.dtype == tidar::LogitsType::kFloat32, bf16 = c.dtype == tidar::LogitsType::kBFloat16;
  const size_t count = static_cast<size_t>(c.batch) * c.k * c.vocab;
  Random rng{static_cast<uint64_t>(c.vocab + c.k)};
  std::vector<float> a(count), b(count);
  for (size_t i = 0; i < count; ++i) {
    const bool ties = std::string(c.variant) == "ties";
    a[i] = ties ? std::floor(rng.uniform(0.f, 4.f)) : rng.uniform(-3.f, 3.f);
    b[i] = ties ? std::floor(rng.uniform(0.f, 4.f)) : rng.uniform(-3.f, 3.f);
    if (std::string(c.variant) == "subnormal") a[i] = b[i] = 0.f;
  }
  if (std::string(c.variant) == "nan") a[c.vocab + 17] = a[count - 3] = NAN;
  if (std::string(c.variant) == "subnormal") {
    a[5] = 1e-40f;                 // row 0: a lone subnormal
    b[c.vocab + 9] = 2e-45f;       // row 1: the two smallest subnormals
    b[c.vocab + 11] = 3e-45f;
  }
  // The kernel's inputs in their dtype; the reference reads the same rounded values.
  std::vector<uint16_t> a16(wide ? 0 : count), b16(wide ? 0 : count);
  if (!wide)
    for (size_t i = 0; i < count; ++i) {
      a16[i] = float_to_b16(a[i], bf16), b16[i] = float_to_b16(b[i], bf16);
      a[i] = b16_to_float(a16[i], bf16), b[i] = b16_to_float(b16[i], bf16);
    }
  const float one_minus_beta = static_cast<float>(1.0 - static_cast<double>(c.beta));
  std::vector<int64_t> want_targets(static_cast<size_t>(c.batch) * c.k);
  for (size_t row = 0; row < want_targets.size(); ++row) {  // torch.argmax: NaN wins, then the lowest index
    int best = 0;
    float best_v = 0.f;
    for (int i = 0; i < c.vocab; ++i) {
      const float v = c.beta * a[row * c.vocab + i] + one_minus_beta * b[row * c.vocab + i];
      if (i == 0 || (!std::isnan(best_v) && (std::isnan(v) || v > best_v))) best = i, best_v = v;
    }
    want_targets[row] = best;
  }
  std::vector<int64_t> drafts(want_targets.size());
  for (int s = 0; s < c.batch; ++s)
    for (int j = 0; j < c.k; ++j)  // accept about half: match the targets up to j = k / 2 + s
      drafts[s * c.k + j] = j == 0 ? 7 : (j <= c.k / 2 + s ? want_targets[s * c.k + j - 1] : c.vocab - 1 - j);
  std::vector<int32_t> seqlens(c.batch), accepted(c.batch);
  for (int s = 0; s < c.batch; ++s) seqlens[s] = 10 * s + 3;  // ragged
  std::vector<uint8_t> active_bytes(c.batch);
  for (int s = 0; s < c.batch; ++s) active_bytes[s] = s % 3 != 2;  // some inactive
  std::vector<bool> active_flags(active_bytes.begin(), active_bytes.end());
  bool* active = reinterpret_cast<bool*>(active_bytes.data());
  std::vector<int64_t> targets(want_targets.size());

  tidar::AcceptParams p{};
  p.drafts = drafts.data();
  p.draft_logits = wide ? static_cast<const void*>(a.data()) : a16.data();
  p.block_logits = wide ? static_cast<const void*>(b.data()) : b16.data();
  p.draft_stride[0] = p.block_stride[0] = static_cast<int64_t>(c.k) * c.vocab;
  p.draft_stride[1] = p.block_stride[1] = c.vocab;
  p.cache_seqlens = seqlens.data();
  p.active = active;
  p.accepted = accepted.data();
  p.targets = targets.data();
  p.batch = c.batch;
  p.draft_len = c.k;
  p.vocab = c.vocab;
  p.beta = c.beta;
  p.one_minus_beta = one_minus_beta;
  p.dtype = c.dtype;
  tidar::accept_drafts_plan(p, 132);
  std::vector<float> partial_value(static_cast<size_t>(c.batch) * c.k * p.num_chunks);
  std::vector<int32_t> partial_index(partial_value.size());
  p.partial_value = partial_value.data();
  p.partial_index = partial_index.data();
  tidar::run_accept_drafts(p, nullptr);
  if (tidar::emulated_launch_error() != cudaSuccess) return report(name, "launch failed");
  if (targets != want_targets) return report(name, "targets differ from the reference argmax");
  for (int s = 0; s < c.batch; ++s) {
    int want = 1;
    while (want < c.k && drafts[s * c.k + want] == want_targets[s * c.k + want - 1]) ++want;
    if (!active_flags[s]) want = 0;
    if (accepted[s] != want || seqlens[s] != 10 * s + 3 + want) return report(name, "accepted count or lengths differ");
  }
  std::printf("ok  %s\n", name.c_str());
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
  std::vector<DecodeCase> decode = {
      {false, 64, 2, 4, 2, 160, 1, {150, 0}},      // 3 key tiles through both stages, a partial last
                                                   // tile, an empty sequence, GQA 2
      {true, 128, 3, 6, 2, 40, 1, {37}},           // cache filled to max_len, GQA 3
      {false, 64, 2, 2, 1, 96, 2, {70, 9}, 16},    // paged: pages of 16, a split boundary at row 64, GQA 2
  };
  std::vector<AcceptCase> accept = {
      {tidar::LogitsType::kFloat16, 3, 4, 5000, 0.5f, "random"},
      {tidar::LogitsType::kFloat32, 2, 3, 300, 0.5f, "subnormal"},
  };
  if (!quick) {
    decode.push_back({false, 128, 1, 8, 1, 140, 3, {130, 5}});  // k = 1, GQA 8, three splits
    decode.push_back({true, 64, 4, 4, 4, 90, 7, {81}});         // seven splits, most empty
    decode.push_back({true, 128, 3, 6, 2, 39, 1, {36}, 3});     // paged, pages of 3, filled to capacity
    decode.push_back({false, 64, 1, 2, 1, 130, 3, {129, 0}, 1});  // paged, SGLang's page size 1, three splits
    decode.push_back({true, 64, 2, 4, 1, 256, 2, {200, 62}, 128});  // paged, two key tiles per page
    accept.push_back({tidar::LogitsType::kBFloat16, 2, 5, 4100, 0.f, "ties"});
    accept.push_back({tidar::LogitsType::kFloat32, 2, 3, 700, 1.f, "nan"});
  }
  for (const auto& c : decode) run_decode(c);
  for (const auto& c : accept) run_accept(c);
  if (failures) {
    std::fprintf(stderr, "%d case(s) failed\n", failures);
    return 1;
  }
  std::printf("all %zu cases passed\n", decode.size() + accept.size());
  return 0;
}
