#include "allocator/policy.h"

#include <algorithm>
#include <tuple>

#include "absl/strings/str_format.h"
#include "vmm/format.h"

namespace stitchalloc {

absl::Status Policy::RequestError(std::size_t size) {
  if (size == 0) return absl::InvalidArgumentError("stitchalloc: malloc(0): the size must be at least 1 byte");
  return absl::InvalidArgumentError(absl::StrFormat(
      "stitchalloc: malloc(%d): impossible size (%s; the limit is 1 PiB)", size, FormatBytes(size)));
}

absl::Status Policy::CheckPlacement(DevicePtr ptr, std::size_t size, std::size_t requested) {
  if (size == 0 || size % kMinBlockSize != 0 || requested > size) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "stitchalloc: allocate_at(%#x, %d bytes, %d requested): the size must be a positive multiple of %d "
        "bytes, at least the requested bytes", ptr, size, requested, kMinBlockSize));
  }
  return absl::OkStatus();
}

absl::Status Policy::CheckFraction(double fraction) {
  if (!(fraction > 0.0 && fraction <= 1.0)) {
    return absl::InvalidArgumentError(absl::StrFormat("stitchalloc: memory fraction %g is outside (0, 1]", fraction));
  }
  return absl::OkStatus();
}

std::vector<SlotRun> Policy::ChooseStitch(std::vector<Candidate> candidates, std::size_t needed) const {
  std::sort(candidates.begin(), candidates.end(), [](const Candidate& a, const Candidate& b) {
    return std::make_tuple(!a.same_stream, a.run.count, a.run.block->ptr) <
           std::make_tuple(!b.same_stream, b.run.count, b.run.block->ptr);
  });
  std::vector<SlotRun> chosen;
  std::size_t have = 0;
  for (const Candidate& c : candidates) {
    if (have >= needed) break;
    SlotRun r = c.run;
    r.count = static_cast<std::uint32_t>(std::min<std::size_t>(r.count, needed - have));
    have += r.count;
    chosen.push_back(r);
  }
  return chosen;
}

}  // namespace stitchalloc
