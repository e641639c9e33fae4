// The other process of ipc_test's cross-process tests: opens a handle exported by its parent
// (on its own host driver, as a second process would) and checks and writes the shared bytes.
//
//   ipc_child HANDLE_HEX OFFSET BYTES SEED_IN SEED_OUT
//
// reads BYTES at OFFSET into the opened range, which must equal Pattern(BYTES, SEED_IN), then
// writes Pattern(BYTES, SEED_OUT) there. Exit status: 0 done, 2 bad arguments, 3 the open
// failed (the error on stderr, its status code name on stdout), 4 the bytes differed.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "absl/strings/escaping.h"
#include "absl/strings/numbers.h"
#include "allocator/ipc.h"
#include "tests/test_util.h"
#include "vmm/host_driver.h"

int main(int argc, char** argv) {
  using namespace stitchalloc;
  std::string handle;
  std::size_t offset = 0, bytes = 0;
  std::uint64_t seed_in = 0, seed_out = 0;
  if (argc == 6) handle = absl::HexStringToBytes(argv[1]);
  if (argc != 6 || handle.empty() || !absl::SimpleAtoi(argv[2], &offset) ||
      !absl::SimpleAtoi(argv[3], &bytes) || !absl::SimpleAtoi(argv[4], &seed_in) ||
      !absl::SimpleAtoi(argv[5], &seed_out)) {
    std::fprintf(stderr, "usage: ipc_child HANDLE_HEX OFFSET BYTES SEED_IN SEED_OUT\n");
    return 2;
  }
  auto driver = HostDriver::Create({1 * kGiB, 2 * kMiB});
  if (!driver.ok()) return 2;
  auto decoded = DecodeIpcHandle(handle);
  auto range = decoded.ok() ? ImportedRange::Open(**driver, *decoded) : decoded.status();
  if (!range.ok()) {
    std::fprintf(stderr, "%s\n", std::string(range.status().message()).c_str());
    std::printf("%s\n", absl::StatusCodeToString(range.status().code()).c_str());
    return 3;
  }
  if (offset + bytes > (*range)->size()) return 2;
  auto* p = reinterpret_cast<std::uint8_t*>((*range)->ptr()) + offset;
  const auto want = stitchalloc::testing::Pattern(bytes, seed_in);
  if (std::memcmp(p, want.data(), bytes) != 0) return 4;
  const auto reply = stitchalloc::testing::Pattern(bytes, seed_out);
  std::memcpy(p, reply.data(), bytes);
  return 0;
}
