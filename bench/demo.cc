// stitchalloc-demo: the main job for now. Runs the adversarial fragmentation pattern
// (bench/patterns.h) on the host driver with stitching on and off, without a memory limit and
// under one, and prints peak allocated and reserved memory side by side.
#include <cstdio>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_format.h"
#include "allocator/caching_allocator.h"
#include "bench/patterns.h"
#include "vmm/format.h"
#include "vmm/host_driver.h"

ABSL_FLAG(int, cycles, 24, "cycles of the adversarial pattern");
ABSL_FLAG(int, first_segment_mb, 64, "mapping size of the first cycle's large request, MiB");
ABSL_FLAG(int, growth_mb, 8, "growth of the large request per cycle, MiB");
ABSL_FLAG(int, limit_mb, 512, "memory limit of the second table, MiB");
ABSL_FLAG(std::string, config, "", "extra stitchalloc configuration (key:value,...)");

namespace stitchalloc {
namespace {

int Run() {
  AdversarialOptions o;
  o.cycles = static_cast<std::size_t>(absl::GetFlag(FLAGS_cycles));
  o.first_segment = static_cast<std::size_t>(absl::GetFlag(FLAGS_first_segment_mb)) * kMiB;
  o.growth = static_cast<std::size_t>(absl::GetFlag(FLAGS_growth_mb)) * kMiB;
  if (o.cycles == 0 || o.first_segment < 4 * kMiB || o.growth % (2 * kMiB) != 0 || o.first_segment % (2 * kMiB) != 0) {
    std::fprintf(stderr, "stitchalloc-demo: --cycles must be positive; sizes multiples of 2 MiB, first >= 4 MiB\n");
    return 2;
  }
  std::printf("stitchalloc demo: adversarial fragmentation pattern on the host driver\n");
  std::printf("%zu cycles: a large block growing from %s by %s per cycle is allocated, a %s block is\n"
              "kept in the segment it used, and the large block is freed.\n\n",
              o.cycles, FormatBytes(o.first_segment - o.small).c_str(), FormatBytes(o.growth).c_str(),
              FormatBytes(o.small).c_str());
  for (int limit_mb : {0, absl::GetFlag(FLAGS_limit_mb)}) {
    std::printf("%s\n", limit_mb == 0 ? "Without a memory limit (host capacity 16 GiB):"
                                      : absl::StrFormat("With reserved memory capped at %d MiB:", limit_mb).c_str());
    std::printf("  %-26s %10s %14s %14s %9s %5s %8s %9s %9s\n", "policy", "cycles", "peak alloc", "peak reserved",
                "reserved/", "OOMs", "retries", "stitches", "maps");
    std::printf("  %-26s %10s %14s %14s %9s\n", "", "", "", "", "allocated");
    for (bool stitching : {true, false}) {
      const std::string cfg = absl::StrFormat("host_capacity_mb:16384,stitching:%s%s%s", stitching ? "true" : "false",
                                              absl::GetFlag(FLAGS_config).empty() ? "" : ",", absl::GetFlag(FLAGS_config));
      auto parsed = ParseConfig(cfg);
      if (!parsed.ok()) {
        std::fprintf(stderr, "%s\n", std::string(parsed.status().message()).c_str());
        return 2;
      }
      auto driver = HostDriver::Create(parsed->driver.host);
      if (!driver.ok()) {
        std::fprintf(stderr, "%s\n", std::string(driver.status().message()).c_str());
        return 1;
      }
      auto alloc = CachingAllocator::Create(*parsed, *std::move(driver));
      if (!alloc.ok()) {
        std::fprintf(stderr, "%s\n", std::string(alloc.status().message()).c_str());
        return 1;
      }
      if (limit_mb > 0) (*alloc)->SetMemoryFraction(double(limit_mb) / 16384.0).IgnoreError();
      auto r = RunAdversarial(**alloc, o);
      if (!r.ok()) {
        std::fprintf(stderr, "%s\n", std::string(r.status().message()).c_str());
        return 1;
      }
      std::printf("  %-26s %10s %14s %14s %9.2f %5lld %8lld %9lld %9lld\n",
                  stitching ? "stitchalloc" : "stitchalloc, no stitching",
                  absl::StrFormat("%d/%d", r->cycles_done, o.cycles).c_str(),
                  FormatBytes(r->peak_allocated).c_str(), FormatBytes(r->peak_reserved).c_str(), r->ratio(),
                  static_cast<long long>(r->ooms), static_cast<long long>(r->retries),
                  static_cast<long long>(r->stitches), static_cast<long long>(r->map_calls));
    }
    std::printf("\n");
  }
  std::printf("reserved/allocated is the fragmentation ratio (1.00 is perfect). Without stitching, every\n"
              "cycle needs a new segment; under a limit, it survives only by releasing cached memory and\n"
              "retrying (synchronising all streams each time), or fails.\n");
  return 0;
}

}  // namespace
}  // namespace stitchalloc

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("Runs the adversarial fragmentation pattern with and without stitching.");
  absl::ParseCommandLine(argc, argv);
  return stitchalloc::Run();
}
