#include "allocator/config.h"

#include <cstdlib>
#include <string>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace stitchalloc {
namespace {

constexpr const char* kKeys[] = {"driver",          "device",          "host_capacity_mb",
                                 "host_granularity_kb", "chunk_size_mb", "stitching",
                                 "stitch_cache_mb", "mapping_headroom_mb", "max_split_size_mb", "memory_fraction",
                                 "swap_host_limit_mb", "swap_slab_mb", "swap_copy_chunk_mb",
                                 "swap_lookahead", "swap_keep_last_layers", "swap_min_kb", "ipc"};

std::string Lower(absl::string_view v) {
  std::string s(v);
  absl::AsciiStrToLower(&s);
  return s;
}

absl::Status Bad(absl::string_view key, absl::string_view value, absl::string_view accepted) {
  return absl::InvalidArgumentError(absl::StrFormat(
      "stitchalloc config: key '%s': invalid value '%s' (accepted: %s)", key, value, accepted));
}

absl::StatusOr<std::int64_t> ParseInt(absl::string_view key, absl::string_view value,
                                      std::int64_t lo, std::int64_t hi) {
  std::int64_t v = 0;
  if (!absl::SimpleAtoi(value, &v) || v < lo || v > hi) {
    return Bad(key, value, absl::StrFormat("an integer from %d to %d", lo, hi));
  }
  return v;
}

absl::StatusOr<bool> ParseBool(absl::string_view key, absl::string_view value) {
  const std::string v = Lower(value);
  if (v == "true" || v == "1" || v == "on" || v == "yes") return true;
  if (v == "false" || v == "0" || v == "off" || v == "no") return false;
  return Bad(key, value, "true or false");
}

absl::Status Apply(absl::string_view key, absl::string_view value, Config& c) {
  if (key == "driver") {
    const std::string v = Lower(value);
    if (v == "auto") c.driver.choice = DriverChoice::kAuto;
    else if (v == "cuda") c.driver.choice = DriverChoice::kCuda;
    else if (v == "host") c.driver.choice = DriverChoice::kHost;
    else return Bad(key, value, "auto, cuda or host");
  } else if (key == "device") {
    auto v = ParseInt(key, value, 0, 1023);
    if (!v.ok()) return v.status();
    c.driver.cuda.device = static_cast<int>(*v);
  } else if (key == "host_capacity_mb") {
    auto v = ParseInt(key, value, 1, std::int64_t{1} << 24);
    if (!v.ok()) return v.status();
    c.driver.host.capacity = static_cast<std::size_t>(*v) * kMiB;
  } else if (key == "host_granularity_kb") {
    auto v = ParseInt(key, value, 4, 1 << 20);
    if (!v.ok()) return v.status();
    if ((*v & (*v - 1)) != 0) return Bad(key, value, "a power of two from 4 to 1048576");
    c.driver.host.granularity = static_cast<std::size_t>(*v) * kKiB;
  } else if (key == "chunk_size_mb") {
    auto v = ParseInt(key, value, 0, 1024);
    if (!v.ok()) return v.status();
    c.chunk_size = static_cast<std::size_t>(*v) * kMiB;
  } else if (key == "stitching") {
    auto v = ParseBool(key, value);
    if (!v.ok()) return v.status();
    c.stitching = *v;
  } else if (key == "stitch_cache_mb") {
    if (Lower(value) == "auto") {
      c.stitch_cache_bytes.reset();
    } else {
      std::int64_t v = 0;
      if (!absl::SimpleAtoi(value, &v) || v < 0 || v > (std::int64_t{1} << 30)) {
        return Bad(key, value, "auto or an integer number of MiB from 0 to 1073741824");
      }
      c.stitch_cache_bytes = static_cast<std::size_t>(v) * kMiB;
    }
  } else if (key == "mapping_headroom_mb") {
    auto v = ParseInt(key, value, 0, std::int64_t{1} << 20);
    if (!v.ok()) return v.status();
    c.mapping_headroom = static_cast<std::size_t>(*v) * kMiB;
  } else if (key == "max_split_size_mb") {
    if (Lower(value) == "unlimited") {
      c.max_split_size = SIZE_MAX;
    } else {
      // PyTorch requires more than its 20 MiB large-segment size.
      auto v = ParseInt(key, value, 21, std::int64_t{1} << 30);
      if (!v.ok()) return Bad(key, value, "unlimited or an integer number of MiB above 20");
      c.max_split_size = static_cast<std::size_t>(*v) * kMiB;
    }
  } else if (key == "memory_fraction") {
    double v = 0;
    if (!absl::SimpleAtod(value, &v) || !(v > 0.0 && v <= 1.0)) {
      return Bad(key, value, "a number in (0, 1]");
    }
    c.memory_fraction = v;
  } else if (key == "swap_host_limit_mb") {
    auto v = ParseInt(key, value, 1, std::int64_t{1} << 24);
    if (!v.ok()) return v.status();
    c.swap.host_limit = static_cast<std::size_t>(*v) * kMiB;
  } else if (key == "swap_slab_mb") {
    auto v = ParseInt(key, value, 1, 1 << 16);
    if (!v.ok()) return v.status();
    c.swap.slab = static_cast<std::size_t>(*v) * kMiB;
  } else if (key == "swap_copy_chunk_mb") {
    auto v = ParseInt(key, value, 1, 1 << 12);
    if (!v.ok()) return v.status();
    c.swap.copy_chunk = static_cast<std::size_t>(*v) * kMiB;
  } else if (key == "swap_lookahead") {
    auto v = ParseInt(key, value, 1, 64);
    if (!v.ok()) return v.status();
    c.swap.lookahead = static_cast<int>(*v);
  } else if (key == "swap_keep_last_layers") {
    auto v = ParseInt(key, value, 0, 4096);
    if (!v.ok()) return v.status();
    c.swap.keep_last_layers = static_cast<int>(*v);
  } else if (key == "ipc") {
    auto v = ParseBool(key, value);
    if (!v.ok()) return v.status();
    c.driver.cuda.shareable = *v;
  } else if (key == "swap_min_kb") {
    auto v = ParseInt(key, value, 0, std::int64_t{1} << 30);
    if (!v.ok()) return v.status();
    c.swap.min_bytes = static_cast<std::size_t>(*v) * kKiB;
  } else {
    return absl::InvalidArgumentError(absl::StrFormat(
        "stitchalloc config: unknown key '%s' (accepted keys: %s)", key, absl::StrJoin(kKeys, ", ")));
  }
  return absl::OkStatus();
}

}  // namespace

bool IsConfigKey(absl::string_view key) {
  for (const char* k : kKeys) {
    if (key == k) return true;
  }
  return false;
}

absl::StatusOr<Config> ParseConfig(absl::string_view text, const Config& base) {
  Config c = base;
  absl::flat_hash_set<std::string> seen;
  for (absl::string_view item : absl::StrSplit(text, ',', absl::SkipWhitespace())) {
    item = absl::StripAsciiWhitespace(item);
    const std::vector<absl::string_view> kv = absl::StrSplit(item, absl::MaxSplits(':', 1));
    if (kv.size() != 2) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "stitchalloc config: malformed entry '%s': expected key:value", item));
    }
    const absl::string_view key = absl::StripAsciiWhitespace(kv[0]);
    const absl::string_view value = absl::StripAsciiWhitespace(kv[1]);
    if (key.empty() || value.empty()) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "stitchalloc config: malformed entry '%s': key and value must both be non-empty", item));
    }
    if (!seen.insert(std::string(key)).second) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "stitchalloc config: key '%s' given more than once", key));
    }
    if (auto s = Apply(key, value, c); !s.ok()) return s;
  }
  return c;
}

absl::StatusOr<Config> ConfigFromEnvironment(absl::string_view overrides) {
  Config c;
  if (const char* env = std::getenv(kConfigEnvVar); env != nullptr) {
    auto parsed = ParseConfig(env, c);
    if (!parsed.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("in ", kConfigEnvVar, ": ", parsed.status().message()));
    }
    c = *parsed;
  }
  return ParseConfig(overrides, c);
}

std::string ConfigToString(const Config& c) {
  const char* driver = c.driver.choice == DriverChoice::kAuto   ? "auto"
                       : c.driver.choice == DriverChoice::kCuda ? "cuda"
                                                                : "host";
  return absl::StrFormat(
      "driver:%s,device:%d,host_capacity_mb:%d,host_granularity_kb:%d,chunk_size_mb:%d,stitching:%s,"
      "stitch_cache_mb:%s,mapping_headroom_mb:%d,max_split_size_mb:%s,memory_fraction:%g,swap_host_limit_mb:%d,swap_slab_mb:%d,"
      "swap_copy_chunk_mb:%d,swap_lookahead:%d,swap_keep_last_layers:%d,swap_min_kb:%d,ipc:%s",
      driver, c.driver.cuda.device, c.driver.host.capacity / kMiB, c.driver.host.granularity / kKiB,
      c.chunk_size / kMiB, c.stitching ? "true" : "false",
      c.stitch_cache_bytes ? absl::StrCat(*c.stitch_cache_bytes / kMiB) : "auto", c.mapping_headroom / kMiB,
      c.max_split_size == SIZE_MAX ? "unlimited" : absl::StrCat(c.max_split_size / kMiB), c.memory_fraction,
      c.swap.host_limit / kMiB, c.swap.slab / kMiB, c.swap.copy_chunk / kMiB, c.swap.lookahead,
      c.swap.keep_last_layers, c.swap.min_bytes / kKiB, c.driver.cuda.shareable ? "true" : "false");
}

}  // namespace stitchalloc
