#include "allocator/stats.h"

namespace stitchalloc {
namespace {

// Visits every named value of `s` in the fixed order. F: void(std::string name, T& value).
template <typename S, typename F>
void Visit(S& s, F&& f) {
  static constexpr const char* kPools[] = {"all", "small_pool", "large_pool"};
  auto arr = [&](const char* name, auto& a) {
    for (int p = 0; p < 3; ++p) {
      const std::string base = std::string(name) + "." + kPools[p] + ".";
      f(base + "current", a.pools[p].current);
      f(base + "peak", a.pools[p].peak);
      f(base + "allocated", a.pools[p].allocated);
      f(base + "freed", a.pools[p].freed);
    }
  };
  auto one = [&](const char* name, auto& st) {
    const std::string base = std::string(name) + ".";
    f(base + "current", st.current);
    f(base + "peak", st.peak);
    f(base + "allocated", st.allocated);
    f(base + "freed", st.freed);
  };
  arr("allocation", s.allocation);
  arr("segment", s.segment);
  arr("active", s.active);
  arr("inactive_split", s.inactive_split);
  arr("allocated_bytes", s.allocated_bytes);
  arr("reserved_bytes", s.reserved_bytes);
  arr("active_bytes", s.active_bytes);
  arr("inactive_split_bytes", s.inactive_split_bytes);
  arr("requested_bytes", s.requested_bytes);
  one("oversize_allocations", s.oversize_allocations);
  one("oversize_segments", s.oversize_segments);
  one("stitched_segment", s.stitched_segment);
  f(std::string("num_alloc_retries"), s.num_alloc_retries);
  f(std::string("num_ooms"), s.num_ooms);
  f(std::string("num_sync_all_streams"), s.num_sync_all_streams);
  f(std::string("num_device_alloc"), s.num_device_alloc);
  f(std::string("num_device_free"), s.num_device_free);
  f(std::string("max_split_size"), s.max_split_size);
  f(std::string("num_stitches"), s.num_stitches);
  f(std::string("stitched_bytes"), s.stitched_bytes);
  f(std::string("num_map_calls"), s.num_map_calls);
  f(std::string("num_unmap_calls"), s.num_unmap_calls);
  f(std::string("num_dissolves"), s.num_dissolves);
  f(std::string("num_cross_stream_reuses"), s.num_cross_stream_reuses);
  f(std::string("num_grows_in_place"), s.num_grows_in_place);
  f(std::string("num_refills"), s.num_refills);
}

}  // namespace

namespace {

// Applies `f` to every Stat of `s` (arrays and single ones), in a fixed order; `S` is Stats or
// const Stats.
template <typename S, typename F>
void ForEachStat(S& s, F&& f) {
  for (auto* a : {&s.allocation, &s.segment, &s.active, &s.inactive_split, &s.allocated_bytes,
                  &s.reserved_bytes, &s.active_bytes, &s.inactive_split_bytes, &s.requested_bytes}) {
    for (auto& st : a->pools) f(st);
  }
  for (auto* st : {&s.oversize_allocations, &s.oversize_segments, &s.stitched_segment}) f(*st);
}

}  // namespace

void Stats::ResetPeak() {
  ForEachStat(*this, [](Stat& st) { st.ResetPeak(); });
}

void Stats::Accumulate(const Stats& other) {
  std::vector<Stat*> mine;
  ForEachStat(*this, [&](Stat& st) { mine.push_back(&st); });
  std::size_t i = 0;
  ForEachStat(other, [&](const Stat& st) {
    Stat& m = *mine[i++];
    m.current += st.current;
    m.peak += st.peak;
    m.allocated += st.allocated;
    m.freed += st.freed;
  });
  for (auto [a, b] : {std::pair{&num_alloc_retries, other.num_alloc_retries}, {&num_ooms, other.num_ooms},
                      {&num_sync_all_streams, other.num_sync_all_streams}, {&num_device_alloc, other.num_device_alloc},
                      {&num_device_free, other.num_device_free}, {&num_stitches, other.num_stitches},
                      {&stitched_bytes, other.stitched_bytes}, {&num_map_calls, other.num_map_calls},
                      {&num_unmap_calls, other.num_unmap_calls}, {&num_dissolves, other.num_dissolves},
                      {&num_cross_stream_reuses, other.num_cross_stream_reuses},
                      {&num_grows_in_place, other.num_grows_in_place}, {&num_refills, other.num_refills}}) {
    *a += b;
  }
}

void Stats::ReleaseAll() {
  ForEachStat(*this, [](Stat& st) {
    st.freed += st.current;
    st.current = 0;
  });
}

void Stats::ResetAccumulated() {
  ForEachStat(*this, [](Stat& st) { st.ResetAccumulated(); });
  num_alloc_retries = num_ooms = num_sync_all_streams = num_device_alloc = num_device_free = 0;
  num_stitches = stitched_bytes = num_map_calls = num_unmap_calls = num_dissolves = 0;
  num_cross_stream_reuses = num_grows_in_place = num_refills = 0;
}

const std::vector<std::string>& StatNames() {
  static const std::vector<std::string>* names = [] {
    auto* v = new std::vector<std::string>();
    Stats s;
    Visit(s, [&](const std::string& n, std::int64_t&) { v->push_back(n); });
    return v;
  }();
  return *names;
}

std::vector<std::int64_t> StatValues(const Stats& stats) {
  std::vector<std::int64_t> out;
  out.reserve(StatNames().size());
  Visit(stats, [&](const std::string&, const std::int64_t& v) { out.push_back(v); });
  return out;
}

}  // namespace stitchalloc
