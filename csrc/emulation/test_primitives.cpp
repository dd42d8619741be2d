// Unit tests of the emulated CUDA primitives (csrc/emulation/emulation.h), independent of the
// kernels: each primitive runs inside an emulated launch and every lane's result is checked
// against the PTX ISA's tables (which lane holds which element), written out here from the
// ISA's figures rather than taken from the emulation. Run by CTest (CMakeLists.txt).
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "ptx.cuh"

using tidar::emu::float_to_b16;

namespace {

int failures = 0;
#define EXPECT(cond, ...)                                                 \
  do {                                                                    \
    if (!(cond)) {                                                        \
      ++failures;                                                         \
      std::fprintf(stderr, "%s:%d: FAILED %s: ", __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, __VA_ARGS__);                                  \
      std::fprintf(stderr, "\n");                                         \
    }                                                                     \
  } while (0)

// Test kernels write their per-lane results here (one launch at a time).
struct Results {
  uint32_t regs[32][4];
  float values[32][4];
};

uint32_t code(int matrix, int row, int col) { return static_cast<uint32_t>(matrix * 64 + row * 8 + col); }

// ---- ldmatrix: 4 matrices of 8x8 b16 at a padded pitch; lanes 8i..8i+7 address matrix i's rows.
constexpr int kPitch = 24;  // elements per shared row: not 8, so row addresses are really per-row

template <int kMatrices, bool kTrans>
void ldmatrix_kernel(Results* out) {
  TIDAR_DYNAMIC_SHARED(uint16_t, smem, 16);
  const int lane = threadIdx.x;
  if (lane == 0)
    for (int m = 0; m < 4; ++m)
      for (int r = 0; r < 8; ++r)
        for (int c = 0; c < 8; ++c) smem[(m * 8 + r) * kPitch + c] = static_cast<uint16_t>(code(m, r, c));
  __syncthreads();
  const uint32_t addr = tidar::ptx::smem_addr(smem + ((lane / 8) * 8 + lane % 8) * kPitch);
  uint32_t r[kMatrices];
  if constexpr (kMatrices == 1) kTrans ? tidar::ptx::ldmatrix_x1_trans(r, addr) : tidar::ptx::ldmatrix_x1(r, addr);
  if constexpr (kMatrices == 2) kTrans ? tidar::ptx::ldmatrix_x2_trans(r, addr) : tidar::ptx::ldmatrix_x2(r, addr);
  if constexpr (kMatrices == 4) kTrans ? tidar::ptx::ldmatrix_x4_trans(r, addr) : tidar::ptx::ldmatrix_x4(r, addr);
  for (int m = 0; m < kMatrices; ++m) out->regs[lane][m] = r[m];
}

template <int kMatrices, bool kTrans>
void test_ldmatrix() {
  Results out{};
  tidar::launch_kernel(ldmatrix_kernel<kMatrices, kTrans>, dim3(1), dim3(32), 32 * kPitch * 2, nullptr, &out);
  // PTX ISA, ldmatrix, "fragment layout": without .trans lane l holds row l/4, columns 2(l%4)
  // and 2(l%4)+1 of each matrix; .trans delivers the transpose: rows 2(l%4), 2(l%4)+1 of column l/4.
  for (int lane = 0; lane < 32; ++lane)
    for (int m = 0; m < kMatrices; ++m) {
      const int row0 = kTrans ? 2 * (lane % 4) : lane / 4, col0 = kTrans ? lane / 4 : 2 * (lane % 4);
      const int row1 = kTrans ? row0 + 1 : row0, col1 = kTrans ? col0 : col0 + 1;
      const uint32_t want = code(m, row0, col0) | (code(m, row1, col1) << 16);
      EXPECT(out.regs[lane][m] == want, "x%d%s lane %d matrix %d: got %08x want %08x", kMatrices,
             kTrans ? ".trans" : "", lane, m, out.regs[lane][m], want);
    }
  // The ISA figure's corners, spelled out: lane 0 = (0,0),(0,1); lane 5 = (1,2),(1,3); lane 31 = (7,6),(7,7).
  if (!kTrans) {
    EXPECT(out.regs[0][0] == (code(0, 0, 0) | code(0, 0, 1) << 16), "lane 0");
    EXPECT(out.regs[5][0] == (code(0, 1, 2) | code(0, 1, 3) << 16), "lane 5");
    EXPECT(out.regs[31][0] == (code(0, 7, 6) | code(0, 7, 7) << 16), "lane 31");
  } else {  // lane 0 = (0,0),(1,0); lane 5 = (2,1),(3,1); lane 31 = (6,7),(7,7)
    EXPECT(out.regs[0][0] == (code(0, 0, 0) | code(0, 1, 0) << 16), "trans lane 0");
    EXPECT(out.regs[5][0] == (code(0, 2, 1) | code(0, 3, 1) << 16), "trans lane 5");
    EXPECT(out.regs[31][0] == (code(0, 6, 7) | code(0, 7, 7) << 16), "trans lane 31");
  }
}

// ---- mma.sync.m16n8k16.row.col: fragments distributed per the ISA tables, D checked per lane.
struct MmaCase {
  float a[16][16], b[16][8], c[16][8];
  bool bf16;
};

uint32_t pack(float lo, float hi, bool bf16) {
  return float_to_b16(lo, bf16) | (static_cast<uint32_t>(float_to_b16(hi, bf16)) << 16);
}

template <bool kBF16>
void mma_kernel(const MmaCase* in, Results* out) {
  const int lane = threadIdx.x, group = lane / 4, tig = lane % 4;  // groupID, threadID_in_group
  // PTX ISA "mma.m16n8k16 fragment layouts" (.f16/.bf16 A): a_i for i = 0..7 sits at
  //   row = group for a0, a1, a4, a5 and group + 8 for a2, a3, a6, a7,
  //   col = tig * 2 + (i & 1) for a0..a3 and tig * 2 + (i & 1) + 8 for a4..a7,
  // two per register: {a0,a1}, {a2,a3}, {a4,a5}, {a6,a7}.
  const uint32_t a[4] = {pack(in->a[group][tig * 2], in->a[group][tig * 2 + 1], kBF16),
                         pack(in->a[group + 8][tig * 2], in->a[group + 8][tig * 2 + 1], kBF16),
                         pack(in->a[group][tig * 2 + 8], in->a[group][tig * 2 + 9], kBF16),
                         pack(in->a[group + 8][tig * 2 + 8], in->a[group + 8][tig * 2 + 9], kBF16)};
  // B (16x8): b_i at row (k) = tig * 2 + (i & 1) for b0, b1 and + 8 for b2, b3; col (n) = group.
  const uint32_t b0 = pack(in->b[tig * 2][group], in->b[tig * 2 + 1][group], kBF16);
  const uint32_t b1 = pack(in->b[tig * 2 + 8][group], in->b[tig * 2 + 9][group], kBF16);
  // C/D: c_i at row = group for c0, c1 and group + 8 for c2, c3; col = tig * 2 + (i & 1).
  float d[4] = {in->c[group][tig * 2], in->c[group][tig * 2 + 1], in->c[group + 8][tig * 2],
                in->c[group + 8][tig * 2 + 1]};
  tidar::ptx::mma_16816<kBF16>(d, a, b0, b1);
  for (int i = 0; i < 4; ++i) out->values[lane][i] = d[i];
}

template <bool kBF16>
void test_mma() {
  MmaCase in{};
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) in.a[i][j] = static_cast<float>((i * 7 + j * 3) % 11 - 5);  // exact in fp16/bf16
  for (int k = 0; k < 16; ++k)
    for (int n = 0; n < 8; ++n) in.b[k][n] = static_cast<float>((k * 5 + n * 13) % 9 - 4) * 0.5f;
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 8; ++n) in.c[m][n] = static_cast<float>(m * 8 + n) * 0.25f;
  Results out{};
  tidar::launch_kernel(mma_kernel<kBF16>, dim3(1), dim3(32), 0, nullptr, &in, &out);
  for (int lane = 0; lane < 32; ++lane)
    for (int i = 0; i < 4; ++i) {
      const int row = lane / 4 + 8 * (i / 2), col = (lane % 4) * 2 + (i & 1);
      double want = in.c[row][col];
      for (int k = 0; k < 16; ++k) want += static_cast<double>(in.a[row][k]) * in.b[k][col];
      EXPECT(out.values[lane][i] == static_cast<float>(want), "%s lane %d d%d (row %d col %d): got %g want %g",
             kBF16 ? "bf16" : "f16", lane, i, row, col, out.values[lane][i], want);
    }
}

// ---- __shfl_xor_sync
void shfl_kernel(Results* out) {
  const int lane = threadIdx.x;
  const float f = __shfl_xor_sync(0xffffffffu, static_cast<float>(lane) * 10.f, 1);
  const int i = __shfl_xor_sync(0xffffffffu, lane * 3, 18);
  out->values[lane][0] = f;
  out->regs[lane][0] = static_cast<uint32_t>(i);
}

void test_shfl() {
  Results out{};
  tidar::launch_kernel(shfl_kernel, dim3(1), dim3(32), 0, nullptr, &out);
  for (int lane = 0; lane < 32; ++lane) {
    EXPECT(out.values[lane][0] == static_cast<float>(lane ^ 1) * 10.f, "shfl float lane %d", lane);
    EXPECT(out.regs[lane][0] == static_cast<uint32_t>((lane ^ 18) * 3), "shfl int lane %d", lane);
  }
}

// ---- cp.async: poison until the covering wait, src-size zero fill, wait_group N.
struct CopyProbe {
  unsigned char before_wait[16], after_wait1[2][16], after_wait0[2][16];
};

void cp_async_kernel(const unsigned char* global, CopyProbe* probe) {
  TIDAR_DYNAMIC_SHARED(unsigned char, smem, 16);
  if (threadIdx.x != 0) return;
  tidar::ptx::cp_async_16(tidar::ptx::smem_addr(smem), global, 16);       // group 0: full copy
  tidar::ptx::cp_async_commit();
  tidar::ptx::cp_async_16(tidar::ptx::smem_addr(smem + 16), global, 6);   // group 1: 6 bytes, 10 zeros
  tidar::ptx::cp_async_commit();
  std::memcpy(probe->before_wait, smem, 16);
  tidar::ptx::cp_async_wait<1>();  // group 0 landed, group 1 may not have
  std::memcpy(probe->after_wait1, smem, 32);
  tidar::ptx::cp_async_wait<0>();
  std::memcpy(probe->after_wait0, smem, 32);
}

void test_cp_async() {
  alignas(16) unsigned char global[16];
  for (int i = 0; i < 16; ++i) global[i] = static_cast<unsigned char>(i + 1);
  CopyProbe probe{};
  tidar::launch_kernel(cp_async_kernel, dim3(1), dim3(32), 32, nullptr, static_cast<const unsigned char*>(global),
                       &probe);
  for (int i = 0; i < 16; ++i) {
    EXPECT(probe.before_wait[i] == 0xFF, "byte %d before the wait must hold the NaN poison", i);
    EXPECT(probe.after_wait1[0][i] == global[i], "group 0 byte %d after wait_group 1", i);
    EXPECT(probe.after_wait1[1][i] == 0xFF, "group 1 byte %d must still be in flight after wait_group 1", i);
    EXPECT(probe.after_wait0[1][i] == (i < 6 ? global[i] : 0), "group 1 byte %d after wait_group 0 (zero fill)", i);
  }
  __half poison;
  std::memcpy(static_cast<void*>(&poison), probe.before_wait, 2);
  EXPECT(std::isnan(__half2float(poison)), "the poison must read as NaN");
}

// ---- __syncthreads across warps, dynamic shared memory of exactly the launch's size.
void sync_kernel(int* out) {
  TIDAR_DYNAMIC_SHARED(int, smem, 4);
  const int t = threadIdx.x;
  smem[t] = t * t;
  __syncthreads();
  out[t] = smem[(t + 37) % 96];
}

void test_syncthreads_and_launch_limits() {
  std::vector<int> out(96);
  tidar::launch_kernel(sync_kernel, dim3(1), dim3(96), 96 * sizeof(int), nullptr, out.data());
  EXPECT(tidar::emu::take_last_error() == cudaSuccess, "launch");
  for (int t = 0; t < 96; ++t) EXPECT(out[t] == ((t + 37) % 96) * ((t + 37) % 96), "thread %d", t);
  // More than 48 KB of dynamic shared memory needs the opt-in attribute, as on the device.
  tidar::launch_kernel(sync_kernel, dim3(1), dim3(96), 64 * 1024, nullptr, out.data());
  EXPECT(tidar::emu::take_last_error() == cudaErrorInvalidConfiguration, "64 KB without opt-in must fail");
  tidar::launch_kernel(sync_kernel, dim3(1, 65536), dim3(96), 0, nullptr, out.data());
  EXPECT(tidar::emu::take_last_error() == cudaErrorInvalidConfiguration, "grid y > 65535 must fail");
  tidar::launch_kernel(sync_kernel, dim3(1), dim3(2048), 0, nullptr, out.data());
  EXPECT(tidar::emu::take_last_error() == cudaErrorInvalidConfiguration, "2048 threads must fail");
}

// ---- fast-math intrinsics and conversions
int ulps_apart(float a, float b) {
  int32_t ia, ib;
  std::memcpy(&ia, &a, 4);
  std::memcpy(&ib, &b, 4);
  return std::abs(ia - ib);
}

void test_math_and_conversions() {
  int moved = 0;
  for (float x = -30.f; x < 30.f; x += 0.0137f) {
    const float want = static_cast<float>(std::exp2(static_cast<double>(x)));
    const float got = tidar::ptx::ex2_approx(x);
    EXPECT(ulps_apart(got, want) <= 2, "ex2.approx(%g) = %g, 2^x = %g: more than 2 ulp", x, got, want);
    moved += got != want;
  }
  EXPECT(moved > 0, "ex2.approx must not be exact everywhere (it models an approximation)");
  EXPECT(tidar::ptx::ex2_approx(-INFINITY) == 0.f && tidar::ptx::ex2_approx(0.f) == 1.f, "ex2 specials");
  for (float x = 0.01f; x < 100.f; x *= 1.013f) {
    const double want = std::log2(static_cast<double>(x));
    const float got = __log2f(x);
    if (x >= 0.5f && x <= 2.f)
      EXPECT(std::fabs(got - want) <= std::exp2(-22.6), "__log2f(%g) absolute error", x);
    else
      EXPECT(ulps_apart(got, static_cast<float>(want)) <= 2, "__log2f(%g) more than 2 ulp", x);
  }
  // Round to nearest even, as cvt.rn: 1 + 2^-11 is a tie in fp16 (goes to 1), 1 + 3*2^-11 goes up.
  EXPECT(__half2float(__float2half_rn(1.f + std::exp2(-11.f))) == 1.f, "fp16 tie to even");
  EXPECT(__half2float(__float2half_rn(1.f + 3.f * std::exp2(-11.f))) == 1.f + std::exp2(-9.f), "fp16 round up");
  EXPECT(__bfloat162float(__float2bfloat16_rn(1.f + std::exp2(-8.f))) == 1.f, "bf16 tie to even");
  EXPECT(__bfloat162float(__float2bfloat16_rn(1.f + 3.f * std::exp2(-8.f))) == 1.f + std::exp2(-6.f),
         "bf16 round up");
  const __half2 pair = __floats2half2_rn(1.5f, -2.f);
  EXPECT(__low2float(pair) == 1.5f && __high2float(pair) == -2.f, "__floats2half2_rn: lo in the low half");
  EXPECT(__fadd_rn(__fmul_rn(0.1f, 3.f), 1e-8f) == 0.1f * 3.f + 1e-8f, "__fadd_rn / __fmul_rn are IEEE");
}

}  // namespace

int main() {
  test_ldmatrix<1, false>();
  test_ldmatrix<1, true>();
  test_ldmatrix<2, false>();
  test_ldmatrix<2, true>();
  test_ldmatrix<4, false>();
  test_ldmatrix<4, true>();
  test_mma<false>();
  test_mma<true>();
  test_shfl();
  test_cp_async();
  test_syncthreads_and_launch_limits();
  test_math_and_conversions();
  if (failures) {
    std::fprintf(stderr, "%d emulated-primitive check(s) failed\n", failures);
    return 1;
  }
  std::printf("emulated primitives: ldmatrix x1/x2/x4 (+.trans), mma m16n8k16 f16/bf16, shfl, cp.async, "
              "__syncthreads, launch limits, ex2/lg2, conversions: all match the PTX ISA tables\n");
  return 0;
}
