// Greedy placement: order buffers, then drop each into the best gap among the placed buffers
// that overlap it in time. Placed buffers are indexed by time in a segment tree over the
// compressed time axis so the overlapping set is found without scanning every buffer.
#include "allocator/plan/heuristics.h"

#include <algorithm>
#include <functional>
#include <numeric>
#include <tuple>

#include "absl/container/btree_set.h"

namespace stitchalloc::plan {
namespace {

std::int64_t AlignUp(std::int64_t v, std::int64_t a) { return a <= 1 ? v : (v + a - 1) / a * a; }

// The cell of instant t on the compressed time axis `times` (sorted distinct instants).
std::size_t Cell(const std::vector<std::int64_t>& times, std::int64_t t) {
  return static_cast<std::size_t>(std::lower_bound(times.begin(), times.end(), t) - times.begin());
}

// For each buffer, the maximum live load over its lifetime (computed on the compressed axis).
std::vector<std::int64_t> LoadOverLifetime(const Problem& p, const std::vector<std::int64_t>& times) {
  const std::size_t m = times.size();
  std::vector<std::int64_t> delta(m + 1, 0);
  auto idx = [&](std::int64_t t) { return Cell(times, t); };
  for (const Buffer& b : p.buffers) {
    delta[idx(b.lower)] += b.size;
    delta[idx(b.upper)] -= b.size;
  }
  std::vector<std::int64_t> load(m, 0);
  std::int64_t run = 0;
  for (std::size_t i = 0; i < m; ++i) load[i] = run += delta[i];
  std::vector<std::int64_t> out(p.buffers.size());
  for (std::size_t i = 0; i < p.buffers.size(); ++i) {
    std::int64_t best = 0;
    for (auto t = idx(p.buffers[i].lower), e = idx(p.buffers[i].upper); t < e; ++t) best = std::max(best, load[t]);
    out[i] = best;
  }
  return out;
}

// Buffers placed so far, bucketed by the time cells of their lifetime in a segment tree: a
// placed buffer is stored as its [offset, end) at the O(log m) canonical nodes covering its
// lifetime, each node's list kept sorted by offset. A buffer stored at a node covers the node's
// whole range, so every node intersecting a query lifetime holds only buffers that overlap it:
// the query gathers those lists (no filtering) and merges them in offset order.
class TimeIndex {
 public:
  using Interval = std::pair<std::int64_t, std::int64_t>;  // [offset, end)
  explicit TimeIndex(std::size_t cells) : n_(1) {
    while (n_ < cells) n_ <<= 1;
    node_.resize(2 * n_);
    cover_.resize(2 * n_);
  }
  void Insert(std::size_t lo, std::size_t hi, Interval iv) {
    Insert(1, 0, n_, lo, hi, iv);
    all_.insert({iv.first, iv.second, lo, hi});
  }
  // Every interval of a buffer overlapping [lo, hi), in offset order, into *out.
  void Query(std::size_t lo, std::size_t hi, std::vector<Interval>* out) {
    if (hi - lo > kWide) {
      // A long lifetime meets most placed buffers and most tree nodes: one pass over all
      // placed buffers in offset order is cheaper than visiting and merging those nodes.
      out->clear();
      for (const Placed& q : all_) {
        if (q.lo < hi && lo < q.hi) out->emplace_back(q.offset, q.end);
      }
      return;
    }
    lists_.clear();
    Collect(1, 0, n_, lo, hi);
    out->clear();
    if (lists_.size() == 1) {
      out->assign(lists_[0].first, lists_[0].second);
      return;
    }
    // k-way merge through a min-heap of list cursors.
    auto later = [](const Cursor& a, const Cursor& b) { return *a.first > *b.first; };
    std::make_heap(lists_.begin(), lists_.end(), later);
    while (!lists_.empty()) {
      std::pop_heap(lists_.begin(), lists_.end(), later);
      Cursor& c = lists_.back();
      out->push_back(*c.first);
      if (++c.first == c.second) {
        lists_.pop_back();
      } else {
        std::push_heap(lists_.begin(), lists_.end(), later);
      }
    }
  }

 private:
  using Cursor = std::pair<const Interval*, const Interval*>;
  static constexpr std::size_t kWide = 256;  // cells
  struct Placed {
    std::int64_t offset, end;
    std::size_t lo, hi;
    bool operator<(const Placed& o) const {
      return std::tie(offset, end, lo, hi) < std::tie(o.offset, o.end, o.lo, o.hi);
    }
  };
  void Insert(std::size_t x, std::size_t l, std::size_t r, std::size_t lo, std::size_t hi, Interval iv) {
    if (hi <= l || r <= lo) return;
    cover_[x] = true;
    if (lo <= l && r <= hi) {
      std::vector<Interval>& v = node_[x];
      v.insert(std::upper_bound(v.begin(), v.end(), iv), iv);
      return;
    }
    const std::size_t mid = (l + r) / 2;
    Insert(2 * x, l, mid, lo, hi, iv);
    Insert(2 * x + 1, mid, r, lo, hi, iv);
  }
  void Collect(std::size_t x, std::size_t l, std::size_t r, std::size_t lo, std::size_t hi) {
    if (hi <= l || r <= lo || !cover_[x]) return;
    if (!node_[x].empty()) lists_.emplace_back(node_[x].data(), node_[x].data() + node_[x].size());
    if (r - l == 1) return;
    const std::size_t mid = (l + r) / 2;
    Collect(2 * x, l, mid, lo, hi);
    Collect(2 * x + 1, mid, r, lo, hi);
  }
  std::size_t n_;
  std::vector<std::vector<Interval>> node_;
  std::vector<bool> cover_;  // some buffer is stored at or below the node
  std::vector<Cursor> lists_;
  absl::btree_multiset<Placed> all_;
};

// Range "raise to at least x" and range maximum over time cells (lazy propagation).
class MaxTree {
 public:
  explicit MaxTree(std::size_t cells) : n_(1) {
    while (n_ < cells) n_ <<= 1;
    max_.assign(2 * n_, 0);
    tag_.assign(2 * n_, 0);
  }
  void Raise(std::size_t lo, std::size_t hi, std::int64_t x) { Raise(1, 0, n_, lo, hi, x); }
  std::int64_t Max(std::size_t lo, std::size_t hi) const { return Max(1, 0, n_, lo, hi); }

 private:
  void Raise(std::size_t v, std::size_t l, std::size_t r, std::size_t lo, std::size_t hi, std::int64_t x) {
    if (hi <= l || r <= lo) return;
    if (lo <= l && r <= hi) {
      max_[v] = std::max(max_[v], x);
      tag_[v] = std::max(tag_[v], x);
      return;
    }
    const std::size_t mid = (l + r) / 2;
    Raise(2 * v, l, mid, lo, hi, x);
    Raise(2 * v + 1, mid, r, lo, hi, x);
    max_[v] = std::max({max_[v], max_[2 * v], max_[2 * v + 1]});
  }
  // A tag applies to the whole subtree, so it bounds every query that reaches the node.
  std::int64_t Max(std::size_t v, std::size_t l, std::size_t r, std::size_t lo, std::size_t hi) const {
    if (hi <= l || r <= lo) return 0;
    if (lo <= l && r <= hi) return max_[v];
    const std::size_t mid = (l + r) / 2;
    return std::max({tag_[v], Max(2 * v, l, mid, lo, hi), Max(2 * v + 1, mid, r, lo, hi)});
  }
  std::size_t n_;
  std::vector<std::int64_t> max_, tag_;
};

std::vector<std::int64_t> LowestFirst(const Problem& p, const std::vector<std::int64_t>& times, const char* order,
                                      absl::Time deadline) {
  const std::size_t n = p.buffers.size();
  auto cell = [&](std::int64_t t) { return Cell(times, t); };
  const std::vector<std::int64_t> load = LoadOverLifetime(p, times);
  std::vector<std::uint32_t> by(n);
  std::iota(by.begin(), by.end(), 0u);
  std::sort(by.begin(), by.end(), [&](std::uint32_t a, std::uint32_t b) {
    const Buffer &x = p.buffers[a], &y = p.buffers[b];
    for (const char* c = order; *c; ++c) {
      const std::int64_t wx = x.upper - x.lower, wy = y.upper - y.lower;
      if (*c == 'W' && wx != wy) return wx > wy;
      if (*c == 'A') {
        const double ax = static_cast<double>(x.size) * static_cast<double>(wx);
        const double ay = static_cast<double>(y.size) * static_cast<double>(wy);
        if (ax != ay) return ax > ay;
      }
      if (*c == 'T' && load[a] != load[b]) return load[a] > load[b];
      if (*c == 'Z' && x.size != y.size) return x.size > y.size;
    }
    return a < b;
  });
  std::vector<std::uint32_t> rank(n);
  for (std::uint32_t r = 0; r < n; ++r) rank[by[r]] = r;
  // Min-heap of (offset lower bound, rank, index); keys only rise, so a popped entry whose
  // recomputed offset is unchanged is the true minimum.
  struct Entry {
    std::int64_t off;
    std::uint32_t rank, index;
    bool operator>(const Entry& o) const { return off != o.off ? off > o.off : rank > o.rank; }
  };
  std::vector<Entry> heap;
  heap.reserve(n);
  for (std::uint32_t i = 0; i < n; ++i) heap.push_back({0, rank[i], i});
  std::make_heap(heap.begin(), heap.end(), std::greater<>());
  MaxTree tree(std::max<std::size_t>(times.size(), 1));
  std::vector<std::int64_t> offsets(n, -1);
  for (std::uint64_t steps = 1; !heap.empty(); ++steps) {
    if (steps % 4096 == 0 && absl::Now() >= deadline) return {};
    std::pop_heap(heap.begin(), heap.end(), std::greater<>());
    const Entry e = heap.back();
    heap.pop_back();
    const Buffer& b = p.buffers[e.index];
    const std::size_t lo = cell(b.lower), hi = cell(b.upper);
    const std::int64_t at = AlignUp(tree.Max(lo, hi), b.alignment);
    if (at > e.off) {
      heap.push_back({at, e.rank, e.index});
      std::push_heap(heap.begin(), heap.end(), std::greater<>());
      continue;
    }
    offsets[e.index] = at;
    tree.Raise(lo, hi, at + b.size);
  }
  return offsets;
}

}  // namespace

absl::string_view HeuristicName(Heuristic h) {
  switch (h) {
    case Heuristic::kGreedyBySize: return "greedy-by-size";
    case Heuristic::kGreedyByConflict: return "greedy-by-conflict";
    case Heuristic::kGreedyByArea: return "greedy-by-area";
    case Heuristic::kBestFitInTime: return "best-fit-in-time";
    case Heuristic::kLowestFirstWAT: return "lowest-first-WAT";
    case Heuristic::kLowestFirstTAW: return "lowest-first-TAW";
    case Heuristic::kLowestFirstZTW: return "lowest-first-ZTW";
  }
  return "?";
}

std::vector<std::int64_t> PlaceGreedy(const Problem& p, Heuristic heuristic, absl::Time deadline) {
  const std::size_t n = p.buffers.size();
  std::vector<std::int64_t> times;
  times.reserve(2 * n);
  for (const Buffer& b : p.buffers) {
    times.push_back(b.lower);
    times.push_back(b.upper);
  }
  std::sort(times.begin(), times.end());
  times.erase(std::unique(times.begin(), times.end()), times.end());
  auto cell = [&](std::int64_t t) { return Cell(times, t); };

  switch (heuristic) {
    case Heuristic::kLowestFirstWAT: return LowestFirst(p, times, "WAT", deadline);
    case Heuristic::kLowestFirstTAW: return LowestFirst(p, times, "TAW", deadline);
    case Heuristic::kLowestFirstZTW: return LowestFirst(p, times, "ZTW", deadline);
    default: break;
  }
  std::vector<std::uint32_t> order(n);
  std::iota(order.begin(), order.end(), 0u);
  auto size_then_length = [&](std::uint32_t a, std::uint32_t b) {
    const Buffer &x = p.buffers[a], &y = p.buffers[b];
    if (x.size != y.size) return x.size > y.size;
    if (x.upper - x.lower != y.upper - y.lower) return x.upper - x.lower > y.upper - y.lower;
    return a < b;
  };
  switch (heuristic) {
    case Heuristic::kGreedyBySize:
      std::sort(order.begin(), order.end(), size_then_length);
      break;
    case Heuristic::kGreedyByConflict: {
      const std::vector<std::int64_t> load = LoadOverLifetime(p, times);
      std::sort(order.begin(), order.end(), [&](std::uint32_t a, std::uint32_t b) {
        if (load[a] != load[b]) return load[a] > load[b];
        return size_then_length(a, b);
      });
      break;
    }
    case Heuristic::kGreedyByArea:
      std::sort(order.begin(), order.end(), [&](std::uint32_t a, std::uint32_t b) {
        const auto area = [&](std::uint32_t i) {
          return static_cast<double>(p.buffers[i].size) * static_cast<double>(p.buffers[i].upper - p.buffers[i].lower);
        };
        if (area(a) != area(b)) return area(a) > area(b);
        return size_then_length(a, b);
      });
      break;
    default:
      std::sort(order.begin(), order.end(), [&](std::uint32_t a, std::uint32_t b) {
        if (p.buffers[a].lower != p.buffers[b].lower) return p.buffers[a].lower < p.buffers[b].lower;
        return size_then_length(a, b);
      });
      break;
  }

  std::vector<std::int64_t> offsets(n, -1);
  TimeIndex index(std::max<std::size_t>(times.size(), 1));
  std::vector<TimeIndex::Interval> busy;  // [offset, end) of overlapping buffers, by offset
  for (std::size_t placed = 0; placed < n; ++placed) {
    if (placed % 1024 == 1023 && absl::Now() >= deadline) return {};
    const std::uint32_t i = order[placed];
    const Buffer& b = p.buffers[i];
    const std::size_t lo = cell(b.lower), hi = cell(b.upper);
    index.Query(lo, hi, &busy);
    // Best fit: the smallest gap that holds the buffer; otherwise on top of everything.
    std::int64_t best = -1, best_gap = 0, top = 0;
    for (const auto& [start, end] : busy) {
      const std::int64_t at = AlignUp(top, b.alignment);
      if (start > top && at + b.size <= start) {
        const std::int64_t gap = start - top;
        if (best < 0 || gap < best_gap) {
          best = at;
          best_gap = gap;
        }
      }
      top = std::max(top, end);
    }
    offsets[i] = best >= 0 ? best : AlignUp(top, b.alignment);
    index.Insert(lo, hi, {offsets[i], offsets[i] + b.size});
  }
  return offsets;
}

}  // namespace stitchalloc::plan
