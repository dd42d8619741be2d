// Host test of the CUDA decode planner (csrc/decode_attention_plan.cpp with the roofline
// model of csrc/roofline.h): every case exported from tidar_kernels/roofline.py
// (python_tests/decode_plan_cases.py -> csrc/tests/decode_plan_cases.txt) must give the
// same split count, so the C++ mirror of the model is checked without a GPU.
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>

#include "decode_attention_plan.h"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s decode_plan_cases.txt\n", argv[0]);
    return 2;
  }
  std::ifstream in(argv[1]);
  if (!in) {
    std::fprintf(stderr, "cannot open %s\n", argv[1]);
    return 2;
  }
  int checked = 0, failed = 0;
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream fields(line);
    std::string kind, name;
    int sms, smem, batch, steps, draft_len, q_heads, kv_heads, head_dim, max_len, expected;
    fields >> kind >> name >> sms >> smem >> batch >> steps >> draft_len >> q_heads >> kv_heads >> head_dim >>
        max_len >> expected;
    if (kind != "plan" || fields.fail()) {
      std::fprintf(stderr, "malformed line: %s\n", line.c_str());
      return 2;
    }
    for (char& c : name) c = c == '_' ? ' ' : c;
    const tidar::roofline::Device device = tidar::roofline::device_for(name.c_str(), sms, smem);
    const int got = tidar::decode_num_splits(batch, steps, draft_len, q_heads, kv_heads, head_dim, max_len, device);
    ++checked;
    if (got != expected) {
      ++failed;
      std::fprintf(stderr, "%s: C++ planner gives %d splits, Python's model %d\n", line.c_str(), got, expected);
    }
  }
  std::printf("%d planner cases checked, %d failed\n", checked, failed);
  return failed == 0 && checked > 0 ? 0 : 1;
}
