#include "allocator/policy.h"

#include <algorithm>
#include <tuple>

namespace stitchalloc {

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
