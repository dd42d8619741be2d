// The driver shared by the host tests that replay cases exported from Python (one case per
// line of a text file named on the command line): open the file, hand each line to the
// test's checker, report mismatches and a summary, and give the exit status CTest reads.
#pragma once

#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>

namespace tidar_tests {

enum class CaseResult { kMatch, kMismatch, kMalformed };

// `check(fields)` parses one line (the stream over it) and says whether the C++ side agrees.
// Exit status: 0 when every case matched (and there was one), 1 on mismatches, 2 on a
// usage error, an unreadable file, a malformed line or an empty file.
template <typename Check>
int run_case_file(int argc, char** argv, const char* test_name, Check check) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s CASES.txt\n", argv[0]);
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
    const CaseResult result = check(fields);
    if (result == CaseResult::kMalformed) {
      std::fprintf(stderr, "malformed line: %s\n", line.c_str());
      return 2;
    }
    ++checked;
    if (result == CaseResult::kMismatch && ++failed <= 20) std::fprintf(stderr, "MISMATCH: %s\n", line.c_str());
  }
  if (checked == 0) {
    std::fprintf(stderr, "no cases read from %s\n", argv[1]);
    return 2;
  }
  std::printf("%s: %d cases, %d mismatches\n", test_name, checked, failed);
  return failed == 0 ? 0 : 1;
}

}  // namespace tidar_tests
