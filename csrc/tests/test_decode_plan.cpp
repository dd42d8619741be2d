// Host test of the CUDA decode planner (csrc/decode_attention_plan.cpp with the roofline
// model of csrc/roofline.h): every case exported from tidar_kernels/kernels/roofline.py
// (python_tests/helpers/decode_plan_cases.py -> csrc/tests/decode_plan_cases.txt) must give the
// same split count, so the C++ mirror of the model is checked without a GPU.
#include <cstdio>
#include <sstream>
#include <string>

#include "case_file.h"
#include "decode_attention_plan.h"

int main(int argc, char** argv) {
  using tidar_tests::CaseResult;
  return tidar_tests::run_case_file(argc, argv, "test_decode_plan", [](std::istringstream& fields) {
    std::string kind, name;
    int sms, smem, batch, steps, draft_len, q_heads, kv_heads, head_dim, max_len, expected;
    fields >> kind >> name >> sms >> smem >> batch >> steps >> draft_len >> q_heads >> kv_heads >> head_dim >>
        max_len >> expected;
    if (kind != "plan" || fields.fail()) return CaseResult::kMalformed;
    for (char& c : name) c = c == '_' ? ' ' : c;  // device names are written with '_' for ' '
    const tidar::roofline::Device device = tidar::roofline::device_for(name.c_str(), sms, smem);
    const int got = tidar::decode_num_splits(batch, steps, draft_len, q_heads, kv_heads, head_dim, max_len, device);
    if (got == expected) return CaseResult::kMatch;
    std::fprintf(stderr, "C++ planner gives %d splits, Python's model %d\n", got, expected);
    return CaseResult::kMismatch;
  });
}
