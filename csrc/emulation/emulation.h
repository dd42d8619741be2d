// CPU emulation of the CUDA execution model and PTX primitives the kernels use, so the very
// same kernel sources (decode_attention.cuh, accept_drafts.cu) run on a host compiler.
// Included by csrc/ptx.cuh when __CUDACC__ is not defined; header-only.
//
// Execution: a launch runs its CTAs one after another; every CUDA thread of a CTA is an OS
// thread (std::thread), so the threads of a CTA really run concurrently and ThreadSanitizer
// sees a race that a missing __syncthreads leaves. __syncthreads is a barrier of the CTA's
// live threads; warp collectives (shuffles, ldmatrix, mma) meet at a barrier of the warp's
// 32 lanes and exchange values through double-buffered slots (one barrier per collective).
//
// Memory: dynamic shared memory is one heap block of exactly the size the launch asks for,
// filled with 0xFF bytes (NaN as fp16, bf16 and fp32) so a read of never-written shared memory
// shows; AddressSanitizer catches any access outside it. Static __shared__ variables are
// function-local statics (one CTA runs at a time). cp.async copies land late: the destination
// holds 0xFF bytes from issue until the cp.async.wait_group that covers the copy's group, and
// the source is read only then.
//
// Arithmetic: mma.sync multiplies the fp16/bf16 inputs exactly and sums the 16 products of a
// k16 step in double, rounding once to fp32 together with the accumulator (the hardware's order
// and internal width are unspecified; both are within the tolerance rule). ex2.approx and
// lg2.approx (__log2f) return the correctly rounded value moved by a deterministic amount within
// the documented error (CUDA Programming Guide, intrinsic functions: 2 ulp; __log2f: absolute
// 2^-22.6 on [0.5, 2], else 2 ulp), so code that relies on them being exact differs.
// __fadd_rn / __fmul_rn and plain fp32 ops are IEEE (build with -ffp-contract=off); the device's
// fast-math division (div.approx, <= 2 ulp) is computed exactly here.
//
// Bugs the emulation detects itself abort with a message, like a device-side fault: a
// collective with diverged or exited lanes, a shared address outside the launch's dynamic
// shared memory, a misaligned cp.async / ldmatrix address, a barrier nobody completes (60 s).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <chrono>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

#include "b16.h"

namespace tidar {
namespace emu {

[[noreturn]] inline void fail(const char* format, ...) {
  std::va_list args;
  va_start(args, format);
  std::fprintf(stderr, "tidar CUDA emulation: ");
  std::vfprintf(stderr, format, args);
  std::fprintf(stderr, "\n");
  va_end(args);
  std::fflush(stderr);
  std::abort();
}

// Barrier of a changing number of threads (exited threads leave it), with a deadlock timeout.
class Barrier {
 public:
  explicit Barrier(int expected) : expected_(expected) {}
  void arrive_and_wait(const char* what) {
    std::unique_lock<std::mutex> lock(mutex_);
    const uint64_t generation = generation_;
    if (++arrived_ == expected_) {
      release();
      return;
    }
    if (!cv_.wait_for(lock, std::chrono::seconds(60), [&] { return generation_ != generation; }))
      fail("%s: %d of %d threads arrived, the others never did (deadlock: a barrier in divergent code?)", what,
           arrived_, expected_);
  }
  void leave() {  // a thread exits
    std::lock_guard<std::mutex> lock(mutex_);
    --expected_;
    if (arrived_ > 0 && arrived_ == expected_) release();
  }
  int expected() {
    std::lock_guard<std::mutex> lock(mutex_);
    return expected_;
  }

 private:
  void release() {
    arrived_ = 0;
    ++generation_;
    cv_.notify_all();
  }
  std::mutex mutex_;
  std::condition_variable cv_;
  int expected_;
  int arrived_ = 0;
  uint64_t generation_ = 0;
};

constexpr int kWarpSize = 32;
constexpr int kSlotWords = 8;  // 32-bit words one lane contributes to a collective (mma: a[4], b[2])

enum class Collective : int { kShuffle = 1, kLdmatrix, kMma };

struct Warp {
  explicit Warp(int lanes) : barrier(lanes), lanes(lanes) {}
  Barrier barrier;
  int lanes;
  struct Slots {
    uint32_t words[kWarpSize][kSlotWords];
    int kind[kWarpSize];
    int detail[kWarpSize];
  } slots[2];
};

struct Cta {
  Cta(int threads, size_t dynamic_bytes) : barrier(threads), dynamic_bytes(dynamic_bytes) {
    for (int first = 0; first < threads; first += kWarpSize)
      warps.emplace_back(std::make_unique<Warp>(std::min(kWarpSize, threads - first)));
    if (dynamic_bytes > 0) {
      dynamic = static_cast<unsigned char*>(std::malloc(dynamic_bytes));
      std::memset(dynamic, 0xFF, dynamic_bytes);
    }
  }
  ~Cta() { std::free(dynamic); }
  Barrier barrier;
  std::vector<std::unique_ptr<Warp>> warps;
  unsigned char* dynamic = nullptr;  // exactly dynamic_bytes
  size_t dynamic_bytes;
};

struct PendingCopy {
  unsigned char* dst;
  const unsigned char* src;
  int src_bytes;
};

struct Thread {
  uint3 thread_idx, block_idx;
  dim3 block_dim, grid_dim;
  Cta* cta;
  Warp* warp;
  int lane;
  int parity = 0;                                   // which slot set the next collective uses
  std::vector<PendingCopy> open_group;              // cp.async issued since the last commit
  std::deque<std::vector<PendingCopy>> committed;   // oldest first
};

inline thread_local Thread* current_thread = nullptr;

inline Thread& self() {
  if (current_thread == nullptr) fail("a device function was called outside an emulated kernel launch");
  return *current_thread;
}

// ---------------------------------------------------------------------------------------------
// Shared memory addresses
// ---------------------------------------------------------------------------------------------

inline uint32_t shared_address(const void* p) {
  const Cta& cta = *self().cta;
  const auto* byte = static_cast<const unsigned char*>(p);
  if (cta.dynamic == nullptr || byte < cta.dynamic || byte >= cta.dynamic + cta.dynamic_bytes)
    fail("__cvta_generic_to_shared of a pointer outside the launch's %zu bytes of dynamic shared memory",
         cta.dynamic_bytes);
  return static_cast<uint32_t>(byte - cta.dynamic);
}

// The bytes [addr, addr + bytes) of the dynamic shared memory, checked and aligned to `bytes`.
inline unsigned char* shared_bytes(uint32_t addr, uint32_t bytes, const char* what) {
  const Cta& cta = *self().cta;
  if (static_cast<size_t>(addr) + bytes > cta.dynamic_bytes)
    fail("%s: shared address %u + %u bytes is past the launch's %zu bytes of dynamic shared memory", what, addr,
         bytes, cta.dynamic_bytes);
  if (addr % bytes != 0) fail("%s: shared address %u is not %u-byte aligned", what, addr, bytes);
  return cta.dynamic + addr;
}

// ---------------------------------------------------------------------------------------------
// Warp collectives: every lane publishes words, all meet, each reads what it needs.
// ---------------------------------------------------------------------------------------------

template <int kWords>
inline const Warp::Slots& exchange(const uint32_t (&mine)[kWords], Collective kind, int detail) {
  static_assert(kWords <= kSlotWords, "too many words per lane");
  Thread& t = self();
  Warp& warp = *t.warp;
  if (warp.lanes != kWarpSize || warp.barrier.expected() != kWarpSize)
    fail("a full-warp collective (mask 0xffffffff) ran with %d of 32 lanes alive", warp.barrier.expected());
  Warp::Slots& slots = warp.slots[t.parity];
  t.parity ^= 1;
  std::memcpy(slots.words[t.lane], mine, sizeof(mine));
  slots.kind[t.lane] = static_cast<int>(kind);
  slots.detail[t.lane] = detail;
  warp.barrier.arrive_and_wait("warp collective");
  for (int lane = 0; lane < kWarpSize; ++lane)
    if (slots.kind[lane] != static_cast<int>(kind) || slots.detail[lane] != detail)
      fail("warp lanes diverged: lane %d runs collective %d/%d while lane %d runs %d/%d", t.lane,
           static_cast<int>(kind), detail, lane, slots.kind[lane], slots.detail[lane]);
  return slots;
}

template <typename T>
inline T shfl_xor(unsigned mask, T value, int lane_mask, int width) {
  static_assert(sizeof(T) == 4, "32-bit shuffles only");
  if (mask != 0xffffffffu || width != kWarpSize) fail("only full-warp shuffles are emulated");
  uint32_t word[1];
  std::memcpy(word, &value, 4);
  const Warp::Slots& slots = exchange(word, Collective::kShuffle, lane_mask);
  T out;
  std::memcpy(&out, slots.words[self().lane ^ (lane_mask & (kWarpSize - 1))], 4);
  return out;
}

// Shared-memory traffic of the emulated instructions goes through these byte loops, not
// memcpy/memset: GCC folds a small memset/memcpy into one aggregate store that ThreadSanitizer
// does not instrument, which would hide exactly the races (a stage refilled while read) the
// emulation exists to show.
inline void store_bytes(unsigned char* dst, const unsigned char* src, int count) {
  volatile unsigned char* to = dst;
  for (int i = 0; i < count; ++i) to[i] = src[i];
}
inline void fill_bytes(unsigned char* dst, unsigned char value, int count) {
  volatile unsigned char* to = dst;
  for (int i = 0; i < count; ++i) to[i] = value;
}

inline uint16_t load_b16(const unsigned char* p) {
  const volatile unsigned char* from = p;
  return static_cast<uint16_t>(from[0] | (from[1] << 8));  // little endian, like the device
}

// ldmatrix.sync.aligned.m8n8.x{1,2,4}{.trans}.shared.b16 (PTX ISA, "Warp-level matrix load
// instruction: ldmatrix"): lanes 8i..8i+7 give the row addresses of matrix i (16 bytes each);
// lane l receives, of every matrix, row l/4, columns 2(l%4) and 2(l%4)+1 (low half first), or
// with .trans the elements (2(l%4), l/4) and (2(l%4)+1, l/4).
template <int kMatrices, bool kTrans>
inline void ldmatrix(uint32_t (&r)[kMatrices], uint32_t addr) {
  static_assert(kMatrices == 1 || kMatrices == 2 || kMatrices == 4, "x1, x2 or x4");
  const uint32_t mine[1] = {addr};
  const Warp::Slots& slots = exchange(mine, Collective::kLdmatrix, kMatrices * 2 + kTrans);
  const int lane = self().lane;
  for (int m = 0; m < kMatrices; ++m) {
    uint16_t half[2];
    for (int j = 0; j < 2; ++j) {
      const int row = kTrans ? 2 * (lane % 4) + j : lane / 4;
      const int col = kTrans ? lane / 4 : 2 * (lane % 4) + j;
      const unsigned char* row_bytes = shared_bytes(slots.words[8 * m + row][0], 16, "ldmatrix row address");
      half[j] = load_b16(row_bytes + 2 * col);
    }
    r[m] = static_cast<uint32_t>(half[0]) | (static_cast<uint32_t>(half[1]) << 16);
  }
}

inline uint16_t half_of(uint32_t word, int which) { return static_cast<uint16_t>(which ? word >> 16 : word); }

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32 (PTX ISA, "Matrix Fragments for
// mma.m16n8k16 with floating point type"). With g = lane/4, t = lane%4:
//   A (16x16): a[0] = (g, 2t..2t+1), a[1] = (g+8, 2t..), a[2] = (g, 2t+8..), a[3] = (g+8, 2t+8..)
//   B (16x8, k x n): b0 = (k 2t..2t+1, n g), b1 = (k 2t+8..2t+9, n g)
//   C/D (16x8): d[0], d[1] = (g, 2t), (g, 2t+1); d[2], d[3] = (g+8, 2t), (g+8, 2t+1)
// So A(row, k) sits in lane 4(row%8) + (k%8)/2, register (row>=8) + 2(k>=8), half k%2, and
// B(k, n) in lane 4n + (k%8)/2, register k>=8, half k%2.
template <bool kBF16>
inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  const uint32_t mine[6] = {a[0], a[1], a[2], a[3], b0, b1};
  const Warp::Slots& slots = exchange(mine, Collective::kMma, kBF16);
  const int lane = self().lane;
  const int g = lane / 4, t = lane % 4;
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e / 2);
    const int col = 2 * t + (e % 2);
    double sum = 0.0;
    for (int k = 0; k < 16; ++k) {
      const uint32_t a_word = slots.words[4 * (row % 8) + (k % 8) / 2][(row >= 8) + 2 * (k >= 8)];
      const uint32_t b_word = slots.words[4 * col + (k % 8) / 2][4 + (k >= 8)];
      sum += static_cast<double>(b16_to_float(half_of(a_word, k % 2), kBF16)) *
             static_cast<double>(b16_to_float(half_of(b_word, k % 2), kBF16));
    }
    d[e] = static_cast<float>(static_cast<double>(d[e]) + sum);
  }
}

// ---------------------------------------------------------------------------------------------
// cp.async: issue poisons the destination; a wait lands the groups it covers.
// ---------------------------------------------------------------------------------------------

inline void cp_async_16(uint32_t dst, const void* src, int src_bytes) {
  if (src_bytes < 0 || src_bytes > 16) fail("cp.async: src-size %d outside [0, 16]", src_bytes);
  if (src_bytes > 0 && reinterpret_cast<uintptr_t>(src) % 16 != 0)
    fail("cp.async.cg 16: global source %p is not 16-byte aligned", src);
  unsigned char* to = shared_bytes(dst, 16, "cp.async destination");
  fill_bytes(to, 0xFF, 16);  // in flight: whoever reads it before the wait sees NaN
  self().open_group.push_back({to, static_cast<const unsigned char*>(src), src_bytes});
}

inline void cp_async_commit() {
  Thread& t = self();
  t.committed.push_back(std::move(t.open_group));
  t.open_group.clear();
}

inline void cp_async_wait_group(int pending) {
  Thread& t = self();
  while (static_cast<int>(t.committed.size()) > pending) {
    for (const PendingCopy& copy : t.committed.front()) {
      store_bytes(copy.dst, copy.src, copy.src_bytes);
      fill_bytes(copy.dst + copy.src_bytes, 0, 16 - copy.src_bytes);  // zero fill
    }
    t.committed.pop_front();
  }
}

// ---------------------------------------------------------------------------------------------
// Fast-math intrinsics with their documented error
// ---------------------------------------------------------------------------------------------

// A deterministic pseudo-random integer in [-range, range] from a float's bits.
inline int wobble(float x, int range) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  bits ^= bits >> 16;
  bits *= 0x7feb352dU;
  bits ^= bits >> 15;
  bits *= 0x846ca68bU;
  bits ^= bits >> 16;
  return static_cast<int>(bits % static_cast<uint32_t>(2 * range + 1)) - range;
}

// `exact` moved by `ulps` units in the last place (finite, nonzero values only).
inline float move_ulps(float exact, int ulps) {
  if (!std::isfinite(exact) || exact == 0.f || ulps == 0) return exact;
  float moved = exact;
  const float toward = ulps > 0 ? INFINITY : -INFINITY;
  for (int i = 0; i < std::abs(ulps); ++i) moved = std::nextafter(moved, toward);
  return std::isfinite(moved) ? moved : exact;
}

// ex2.approx.f32: 2^x within 2 ulp; exact at integers (where 2^x is a power of two).
inline float ex2_approx(float x) {
  const float exact = static_cast<float>(std::exp2(static_cast<double>(x)));
  if (x == std::floor(x)) return exact;
  return move_ulps(exact, wobble(x, 2));
}

// lg2.approx.f32 (__log2f): absolute error <= 2^-22.6 on [0.5, 2], else 2 ulp.
inline float lg2_approx(float x) {
  const float exact = static_cast<float>(std::log2(static_cast<double>(x)));
  if (!std::isfinite(exact) || x == 1.f) return exact;
  // Up to half the bound moved, so the two fp32 roundings (<= 2^-25 each here) stay within it.
  if (x >= 0.5f && x <= 2.f) return exact + static_cast<float>(wobble(x, 2)) * 0.25f * std::exp2(-22.6f);
  return move_ulps(exact, wobble(x, 2));
}

// ---------------------------------------------------------------------------------------------
// Launch
// ---------------------------------------------------------------------------------------------

inline std::mutex& launch_mutex() {  // one launch at a time: static __shared__ are shared statics
  static std::mutex m;
  return m;
}

inline cudaError_t& last_error() {
  static thread_local cudaError_t error = cudaSuccess;
  return error;
}

// The launch error since the last call (cudaGetLastError), and reset it.
inline cudaError_t take_last_error() {
  const cudaError_t error = last_error();
  last_error() = cudaSuccess;
  return error;
}

inline std::mutex& attribute_mutex() {
  static std::mutex m;
  return m;
}
inline std::vector<std::pair<const void*, int>>& max_dynamic_smem_table() {
  static std::vector<std::pair<const void*, int>> table;
  return table;
}
constexpr int kDefaultDynamicSmem = 48 * 1024;
constexpr int kMaxOptInDynamicSmem = 227 * 1024;  // sm_90 (sm_80: 163 KB)

inline int max_dynamic_smem(const void* kernel) {
  std::lock_guard<std::mutex> lock(attribute_mutex());
  for (const auto& [k, bytes] : max_dynamic_smem_table())
    if (k == kernel) return bytes;
  return kDefaultDynamicSmem;
}

template <typename Kernel>
void run_cta(Kernel&& body, dim3 grid, dim3 block, uint3 block_idx, size_t smem) {
  const int threads = static_cast<int>(block.x * block.y * block.z);
  Cta cta(threads, smem);
  std::vector<std::thread> workers;
  workers.reserve(threads);
  for (int linear = 0; linear < threads; ++linear) {
    workers.emplace_back([&, linear] {
      Thread t;
      t.thread_idx = make_uint3(linear % block.x, linear / block.x % block.y, linear / (block.x * block.y));
      t.block_idx = block_idx;
      t.block_dim = block;
      t.grid_dim = grid;
      t.cta = &cta;
      t.warp = cta.warps[linear / kWarpSize].get();
      t.lane = linear % kWarpSize;
      current_thread = &t;
      body();
      current_thread = nullptr;
      t.warp->barrier.leave();
      cta.barrier.leave();
    });
  }
  for (std::thread& w : workers) w.join();
}

}  // namespace emu

namespace ptx {

inline uint32_t smem_addr(const void* p) { return emu::shared_address(p); }
inline void cp_async_16(uint32_t dst, const void* src, int src_bytes) { emu::cp_async_16(dst, src, src_bytes); }
inline void cp_async_commit() { emu::cp_async_commit(); }
template <int kPending>
inline void cp_async_wait() {
  emu::cp_async_wait_group(kPending);
}
inline void ldmatrix_x1(uint32_t (&r)[1], uint32_t addr) { emu::ldmatrix<1, false>(r, addr); }
inline void ldmatrix_x1_trans(uint32_t (&r)[1], uint32_t addr) { emu::ldmatrix<1, true>(r, addr); }
inline void ldmatrix_x2(uint32_t (&r)[2], uint32_t addr) { emu::ldmatrix<2, false>(r, addr); }
inline void ldmatrix_x2_trans(uint32_t (&r)[2], uint32_t addr) { emu::ldmatrix<2, true>(r, addr); }
inline void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) { emu::ldmatrix<4, false>(r, addr); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) { emu::ldmatrix<4, true>(r, addr); }
template <bool kIsBF16>
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  emu::mma_m16n8k16<kIsBF16>(d, a, b0, b1);
}
inline float ex2_approx(float x) { return emu::ex2_approx(x); }

}  // namespace ptx

// Launch: CTAs in order (x fastest), each with its threads running concurrently. A bad
// configuration sets the error cudaGetLastError would report and runs nothing.
template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t /*stream*/,
                   Args&&... args) {
  const uint64_t threads = static_cast<uint64_t>(block.x) * block.y * block.z;
  const bool bad_config = threads == 0 || threads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 ||
                          grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535 ||
                          smem > static_cast<size_t>(emu::max_dynamic_smem(reinterpret_cast<const void*>(kernel)));
  if (bad_config) {
    emu::last_error() = cudaErrorInvalidConfiguration;
    return;
  }
  std::lock_guard<std::mutex> lock(emu::launch_mutex());
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x)
        emu::run_cta([&] { kernel(args...); }, grid, block, make_uint3(x, y, z), smem);
}

template <typename... Params>
void set_max_dynamic_smem(void (*kernel)(Params...), int bytes) {
  if (bytes > emu::kMaxOptInDynamicSmem) {
    emu::last_error() = cudaErrorInvalidValue;
    return;
  }
  std::lock_guard<std::mutex> lock(emu::attribute_mutex());
  auto& table = emu::max_dynamic_smem_table();
  const void* key = reinterpret_cast<const void*>(kernel);
  for (auto& entry : table)
    if (entry.first == key) {
      entry.second = bytes;
      return;
    }
  table.emplace_back(key, bytes);
}

}  // namespace tidar

// ---------------------------------------------------------------------------------------------
// CUDA built-ins by their CUDA names (host compilers do not have them)
// ---------------------------------------------------------------------------------------------

#define threadIdx (::tidar::emu::self().thread_idx)
#define blockIdx (::tidar::emu::self().block_idx)
#define blockDim (::tidar::emu::self().block_dim)
#define gridDim (::tidar::emu::self().grid_dim)

// Static shared memory: one copy, used by the one CTA that runs at a time.
#undef __shared__
#define __shared__ static

#define TIDAR_DYNAMIC_SHARED(type, name, alignment)                                                     \
  type* const name = [] {                                                                               \
    static_assert((alignment) >= alignof(type), "dynamic shared memory alignment");                     \
    auto* base = ::tidar::emu::self().cta->dynamic;                                                     \
    if (reinterpret_cast<uintptr_t>(base) % (alignment) != 0) ::tidar::emu::fail("misaligned smem"); \
    return reinterpret_cast<type*>(base);                                                               \
  }()

inline void __syncthreads() { ::tidar::emu::self().cta->barrier.arrive_and_wait("__syncthreads"); }

inline float __shfl_xor_sync(unsigned mask, float value, int lane_mask, int width = 32) {
  return ::tidar::emu::shfl_xor(mask, value, lane_mask, width);
}
inline int __shfl_xor_sync(unsigned mask, int value, int lane_mask, int width = 32) {
  return ::tidar::emu::shfl_xor(mask, value, lane_mask, width);
}

inline float __log2f(float x) { return ::tidar::emu::lg2_approx(x); }
inline float __fadd_rn(float a, float b) { return a + b; }  // IEEE round-to-nearest, never contracted
inline float __fmul_rn(float a, float b) { return a * b; }
inline int min(int a, int b) { return a < b ? a : b; }
using std::isnan;

#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
