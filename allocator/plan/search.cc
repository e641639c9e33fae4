// Exact canonical search (see search.h for the method). State changes made by a placement are
// logged and undone on return, so one set of arrays serves the whole depth-first search.
#include "allocator/plan/search.h"

#include <pthread.h>

#include <algorithm>
#include <limits>
#include <numeric>

namespace stitchalloc::plan {
namespace {

std::int64_t AlignUp(std::int64_t v, std::int64_t a) { return a <= 1 ? v : (v + a - 1) / a * a; }

enum class Res { kOk, kFail, kAbort };
// Static orders tried round-robin (letters as in RankPart).
constexpr const char* kOrders[] = {"WAT", "TAW", "TWA"};
constexpr int kNumOrders = 3;
constexpr std::int64_t kNone = std::numeric_limits<std::int64_t>::max();

class Searcher {
 public:
  Searcher(const Problem& p, const SearchOptions& o) : p_(p), n_(static_cast<int>(p.buffers.size())), opt_(o) {}

  SearchResult Run() {
    SearchResult result;
    if (!Sweep()) {
      result.outcome = timed_out_ ? SearchOutcome::kTimeout : SearchOutcome::kTooLarge;
      return result;
    }
    std::int64_t limit = std::max<std::int64_t>(2 * n_, 64);
    while (true) {
      for (order_ = 0; order_ < kNumOrders; ++order_) {
        Reset();
        node_limit_ = nodes_ + limit;
        const Res r = SolveAll();
        if (r == Res::kOk) {
          result.outcome = SearchOutcome::kFound;
          result.offsets = sol_;
        } else if (r == Res::kFail) {
          result.outcome = SearchOutcome::kInfeasible;
        }
        if (r != Res::kAbort || timed_out_) {
          result.nodes = nodes_;
          result.backtracks = backtracks_;
          return result;
        }
      }
      limit *= 2;
    }
  }

 private:
  struct Cand {
    std::int64_t off;
    int rank;
    int index;
    bool operator<(const Cand& o) const { return off != o.off ? off < o.off : rank < o.rank; }
  };
  struct Change {
    int index;
    std::int64_t value;
  };
  struct LowChange {
    int index;
    std::int64_t low;
    int count;
  };

  // Sections (maximal cliques in time order), each buffer's section range, pairwise overlaps
  // and the cut counts between consecutive sections. False when the problem is too large.
  bool Sweep() {
    struct Point {
      std::int64_t t;
      bool start;
      int i;
    };
    std::vector<Point> pts;
    pts.reserve(2 * n_);
    for (int i = 0; i < n_; ++i) {
      pts.push_back({p_.buffers[i].lower, true, i});
      pts.push_back({p_.buffers[i].upper, false, i});
    }
    std::sort(pts.begin(), pts.end(), [](const Point& a, const Point& b) {
      if (a.t != b.t) return a.t < b.t;
      if (a.start != b.start) return !a.start;
      return a.i < b.i;
    });
    first_.assign(n_, 0);
    last_.assign(n_, 0);
    overlaps_.assign(n_, {});
    std::vector<int> live;
    std::vector<int> where(n_, -1);
    int sections = 0;
    bool rising = false;
    std::int64_t pairs = 0;
    std::size_t seen = 0;
    for (const Point& pt : pts) {
      if ((++seen & 1023) == 0 && absl::Now() > opt_.deadline) {
        timed_out_ = true;
        return false;
      }
      if (pt.start) {
        first_[pt.i] = sections;
        pairs += static_cast<std::int64_t>(live.size());
        if (pairs > opt_.max_overlaps) return false;
        for (int j : live) {
          overlaps_[pt.i].push_back(j);
          overlaps_[j].push_back(pt.i);
        }
        where[pt.i] = static_cast<int>(live.size());
        live.push_back(pt.i);
        rising = true;
      } else {
        if (rising) {
          ++sections;
          rising = false;
        }
        last_[pt.i] = sections;
        const int w = where[pt.i];
        where[live.back()] = w;
        live[w] = live.back();
        live.pop_back();
      }
    }
    sections_ = sections;
    members_.assign(sections_, {});
    std::int64_t membership = 0;
    for (int i = 0; i < n_; ++i) {
      membership += last_[i] - first_[i];
      if (membership > opt_.max_overlaps) return false;
      for (int s = first_[i]; s < last_[i]; ++s) members_[s].push_back(i);
    }
    section_sum_.assign(sections_, 0);
    for (int s = 0; s < sections_; ++s) {
      for (int i : members_[s]) section_sum_[s] += p_.buffers[i].size;
    }
    base_cuts_.assign(std::max(sections_ - 1, 0), 0);
    for (int i = 0; i < n_; ++i) {
      for (int s = first_[i]; s + 1 < last_[i]; ++s) ++base_cuts_[s];
    }
    rank_.assign(n_, 0);
    return true;
  }

  // Ranks the buffers of a part by the current order: keys compared in turn, each descending
  // (W lifetime width, A area, T the largest current unplaced total of its sections in the
  // part), ties by index. Ranks only ever compare buffers of one part.
  void RankPart(const std::vector<int>& part, int lo, int hi) {
    struct Key {
      std::int64_t width, total;
      double area;
      int index;
    };
    std::vector<Key> keys;
    keys.reserve(part.size());
    for (int i : part) {
      const Buffer& b = p_.buffers[i];
      std::int64_t total = 0;
      for (int s = std::max(first_[i], lo), e = std::min(last_[i], hi); s < e; ++s) total = std::max(total, total_[s]);
      keys.push_back({b.upper - b.lower, total, static_cast<double>(b.size) * static_cast<double>(b.upper - b.lower), i});
    }
    const char* order = kOrders[order_];
    std::sort(keys.begin(), keys.end(), [order](const Key& x, const Key& y) {
      for (const char* c = order; *c; ++c) {
        if (*c == 'W' && x.width != y.width) return x.width > y.width;
        if (*c == 'A' && x.area != y.area) return x.area > y.area;
        if (*c == 'T' && x.total != y.total) return x.total > y.total;
      }
      return x.index < y.index;
    });
    for (std::size_t r = 0; r < keys.size(); ++r) rank_[keys[r].index] = static_cast<int>(r);
  }

  void Reset() {
    off_.assign(n_, -1);
    sol_.assign(n_, -1);
    minoff_.assign(n_, 0);
    floor_.assign(sections_, 0);
    total_ = section_sum_;
    cuts_ = base_cuts_;
    key_.assign(n_, 0);
    low_.assign(sections_, 0);
    low_count_.resize(sections_);
    for (int s = 0; s < sections_; ++s) low_count_[s] = static_cast<int>(members_[s].size());
  }

  Res SolveAll() {
    std::vector<int> all(n_);
    std::iota(all.begin(), all.end(), 0);
    std::vector<int> cutpoints = {0};
    for (int s = 0; s + 1 < sections_; ++s) {
      if (cuts_[s] == 0) cutpoints.push_back(s + 1);
    }
    cutpoints.push_back(sections_);
    return SolveParts(all, cutpoints);
  }

  // Solves each range between consecutive cut points independently.
  Res SolveParts(const std::vector<int>& pool, const std::vector<int>& cutpoints) {
    for (std::size_t c = 1; c < cutpoints.size(); ++c) {
      const int lo = cutpoints[c - 1], hi = cutpoints[c];
      std::vector<int> part;
      for (int i : pool) {
        if (off_[i] < 0 && first_[i] < hi && lo < last_[i]) part.push_back(i);
      }
      if (part.empty()) continue;
      std::vector<int> saved(part.size());
      for (std::size_t k = 0; k < part.size(); ++k) saved[k] = rank_[part[k]];
      RankPart(part, lo, hi);
      const Res r = Search(part, lo, hi, 0, -1);
      for (std::size_t k = 0; k < part.size(); ++k) rank_[part[k]] = saved[k];
      if (r != Res::kOk) return r;
    }
    return Res::kOk;
  }

  // Section inference: in every section with unplaced buffers, those buffers all go above
  // max(floor, offset, lowest minimum offset among them) and must fit under the capacity.
  bool Check(int lo, int hi, std::int64_t offset) const {
    const std::int64_t cap = opt_.capacity;
    for (int s = lo; s < hi; ++s) {
      if (total_[s] != 0 && std::max({floor_[s], low_[s], offset}) + total_[s] > cap) return false;
    }
    return true;
  }

  // A buffer holding section s's lowest minimum offset was placed or moved up; when it was the
  // last one at that offset, the section's low is recomputed from its members.
  void LoseMinimiser(int s) {
    low_log_.push_back({s, low_[s], low_count_[s]});
    if (--low_count_[s] > 0) return;
    std::int64_t low = kNone;
    int count = 0;
    for (int i : members_[s]) {
      const std::int64_t k = key_[i];
      if (k < low) {
        low = k;
        count = 1;
      } else if (k == low) {
        ++count;
      }
    }
    low_[s] = low;
    low_count_[s] = count;
  }

  Res Search(const std::vector<int>& part, int lo, int hi, std::int64_t last_off, int last_rank) {
    if (++nodes_ > node_limit_) return Res::kAbort;
    if ((nodes_ & 255) == 0 && absl::Now() > opt_.deadline) {
      timed_out_ = true;
      return Res::kAbort;
    }
    // Only candidates below the lowest top of any unplaced buffer can be placed (dominance):
    // find that top first, then sort just those.
    std::int64_t min_height = kNone;
    bool any = false;
    for (int i : part) {
      if (off_[i] >= 0) continue;
      any = true;
      min_height = std::min(min_height, minoff_[i] + p_.buffers[i].size);
    }
    if (!any) return Res::kOk;
    std::vector<Cand> cands;
    for (int i : part) {
      if (off_[i] < 0 && minoff_[i] < min_height && minoff_[i] >= last_off) cands.push_back({minoff_[i], rank_[i], i});
    }
    std::sort(cands.begin(), cands.end());
    for (const Cand& c : cands) {
      if (c.off < last_off || (c.off == last_off && c.rank < last_rank)) continue;  // canonical order
      const Buffer& b = p_.buffers[c.index];
      if (c.off + b.size > opt_.capacity) continue;
      const std::size_t mark_min = min_log_.size(), mark_floor = floor_log_.size(), mark_low = low_log_.size();
      Place(c.index, c.off);
      Res r = Res::kFail;
      if (Check(lo, hi, c.off)) r = Descend(part, lo, hi, c);
      const bool moved_nothing = min_log_.size() == mark_min;
      Unplace(c.index, mark_min, mark_floor, mark_low);
      if (r != Res::kFail) return r;
      // The buffer raised no other buffer's minimum offset: it sits at c.off in some solution
      // if there is any, so the failure below it is final for this node.
      if (moved_nothing) break;
    }
    ++backtracks_;
    return Res::kFail;
  }

  // After placing c: continue in this part, or split it where no unplaced buffer crosses.
  Res Descend(const std::vector<int>& part, int lo, int hi, const Cand& c) {
    const int i = c.index;
    std::vector<int> cutpoints;
    for (int s = first_[i]; s + 1 < last_[i]; ++s) {
      if (--cuts_[s] == 0 && s + 1 > lo && s + 1 < hi) cutpoints.push_back(s + 1);
    }
    Res r;
    if (cutpoints.empty()) {
      r = Search(part, lo, hi, c.off, c.rank);
    } else {
      cutpoints.insert(cutpoints.begin(), lo);
      cutpoints.push_back(hi);
      r = SolveParts(part, cutpoints);
    }
    for (int s = first_[i]; s + 1 < last_[i]; ++s) ++cuts_[s];
    return r;
  }

  void Place(int i, std::int64_t off) {
    const Buffer& b = p_.buffers[i];
    off_[i] = sol_[i] = off;
    key_[i] = kNone;
    const std::int64_t top = off + b.size;
    for (int s = first_[i]; s < last_[i]; ++s) {
      floor_log_.push_back({s, floor_[s]});
      floor_[s] = std::max(floor_[s], top);
      total_[s] -= b.size;
      if (low_[s] == minoff_[i]) LoseMinimiser(s);
    }
    for (int j : overlaps_[i]) {
      if (off_[j] >= 0 || minoff_[j] >= top) continue;
      const std::int64_t old = minoff_[j];
      min_log_.push_back({j, old});
      minoff_[j] = key_[j] = AlignUp(top, p_.buffers[j].alignment);
      for (int s = first_[j]; s < last_[j]; ++s) {
        if (low_[s] == old) LoseMinimiser(s);
      }
    }
  }

  void Unplace(int i, std::size_t mark_min, std::size_t mark_floor, std::size_t mark_low) {
    const Buffer& b = p_.buffers[i];
    while (min_log_.size() > mark_min) {
      const Change& c = min_log_.back();
      minoff_[c.index] = key_[c.index] = c.value;
      min_log_.pop_back();
    }
    while (floor_log_.size() > mark_floor) {
      floor_[floor_log_.back().index] = floor_log_.back().value;
      floor_log_.pop_back();
    }
    while (low_log_.size() > mark_low) {
      const LowChange& c = low_log_.back();
      low_[c.index] = c.low;
      low_count_[c.index] = c.count;
      low_log_.pop_back();
    }
    for (int s = first_[i]; s < last_[i]; ++s) total_[s] += b.size;
    off_[i] = -1;
    key_[i] = minoff_[i];
  }

  const Problem& p_;
  const int n_;
  const SearchOptions& opt_;
  int sections_ = 0;
  std::vector<int> first_, last_, rank_;
  std::vector<std::vector<int>> overlaps_, members_;
  std::vector<std::int64_t> section_sum_, floor_, total_, minoff_, off_, sol_;
  std::vector<std::int64_t> key_;  // minoff_ of unplaced buffers, kNone for placed ones
  std::vector<std::int64_t> low_;  // per section: min key_ over its members
  std::vector<int> base_cuts_, cuts_;
  std::vector<Change> min_log_, floor_log_;
  std::vector<LowChange> low_log_;
  std::vector<int> low_count_;  // members of the section whose key_ equals low_
  std::int64_t nodes_ = 0, node_limit_ = 0, backtracks_ = 0;
  bool timed_out_ = false;
  int order_ = 0;
};

struct ThreadArgs {
  const Problem* problem;
  const SearchOptions* options;
  SearchResult result;
};

void* RunSearch(void* arg) {
  auto* a = static_cast<ThreadArgs*>(arg);
  a->result = Searcher(*a->problem, *a->options).Run();
  return nullptr;
}

}  // namespace

SearchResult ExactSearch(const Problem& problem, const SearchOptions& options) {
  ThreadArgs args{&problem, &options, {}};
  // The depth of the search is the number of buffers of a part; give it room.
  const std::size_t stack = std::max<std::size_t>(8u << 20, problem.buffers.size() * 1024 + (8u << 20));
  if (problem.buffers.size() < 2000) {
    RunSearch(&args);
    return args.result;
  }
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setstacksize(&attr, stack);
  pthread_t thread;
  if (pthread_create(&thread, &attr, RunSearch, &args) != 0) {
    pthread_attr_destroy(&attr);
    return SearchResult{};  // no thread: reported as not solved in time
  }
  pthread_attr_destroy(&attr);
  pthread_join(thread, nullptr);
  return args.result;
}

}  // namespace stitchalloc::plan
