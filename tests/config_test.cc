#include "allocator/config.h"

#include <cstdlib>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "gtest/gtest.h"

namespace stitchalloc {
namespace {

TEST(Config, DefaultsAndEveryKey) {
  auto c = ParseConfig("");
  ASSERT_TRUE(c.ok());
  EXPECT_TRUE(c->stitching);
  EXPECT_TRUE(c->driver.cuda.shareable);
  EXPECT_EQ(c->driver.choice, DriverChoice::kAuto);
  auto all = ParseConfig(
      " driver:host, device:1,host_capacity_mb:512,host_granularity_kb:64,chunk_size_mb:4,stitching:off,"
      "stitch_cache_mb:128,mapping_headroom_mb:256,max_split_size_mb:64,memory_fraction:0.5,swap_host_limit_mb:4096,swap_slab_mb:64,"
      "swap_copy_chunk_mb:4,swap_lookahead:2,swap_keep_last_layers:0,swap_min_kb:256,ipc:no ");
  ASSERT_TRUE(all.ok()) << all.status();
  EXPECT_EQ(all->driver.choice, DriverChoice::kHost);
  EXPECT_EQ(all->driver.cuda.device, 1);
  EXPECT_EQ(all->driver.host.capacity, 512 * kMiB);
  EXPECT_EQ(all->driver.host.granularity, 64 * kKiB);
  EXPECT_EQ(all->chunk_size, 4 * kMiB);
  EXPECT_FALSE(all->stitching);
  EXPECT_EQ(all->stitch_cache_bytes, 128 * kMiB);
  EXPECT_EQ(all->mapping_headroom, 256 * kMiB);
  EXPECT_EQ(all->max_split_size, 64 * kMiB);
  EXPECT_DOUBLE_EQ(all->memory_fraction, 0.5);
  EXPECT_EQ(all->swap.host_limit, 4096 * kMiB);
  EXPECT_EQ(all->swap.slab, 64 * kMiB);
  EXPECT_EQ(all->swap.copy_chunk, 4 * kMiB);
  EXPECT_EQ(all->swap.lookahead, 2);
  EXPECT_FALSE(all->driver.cuda.shareable);
  EXPECT_EQ(all->swap.keep_last_layers, 0);
  EXPECT_EQ(all->swap.min_bytes, 256 * kKiB);
  // The canonical form round-trips.
  auto again = ParseConfig(ConfigToString(*all));
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(ConfigToString(*again), ConfigToString(*all));
}

struct BadCase {
  const char* text;
  const char* must_mention;
};

TEST(Config, RejectionsNameTheKeyAndWhatIsAccepted) {
  const BadCase cases[] = {
      {"colour:blue", "unknown key 'colour'"},
      {"colour:blue", "accepted keys: driver"},
      {"driver:gpu", "key 'driver'"},
      {"driver:gpu", "auto, cuda or host"},
      {"device:-1", "key 'device'"},
      {"host_capacity_mb:0", "key 'host_capacity_mb'"},
      {"host_granularity_kb:48", "power of two"},
      {"chunk_size_mb:two", "key 'chunk_size_mb'"},
      {"stitching:maybe", "true or false"},
      {"stitch_cache_mb:-5", "key 'stitch_cache_mb'"},
      {"mapping_headroom_mb:-1", "key 'mapping_headroom_mb'"},
      {"mapping_headroom_mb:2000000", "from 0 to 1048576"},
      {"max_split_size_mb:20", "above 20"},
      {"memory_fraction:1.5", "(0, 1]"},
      {"swap_lookahead:0", "key 'swap_lookahead'"},
      {"swap_lookahead:0", "from 1 to 64"},
      {"swap_keep_last_layers:-1", "from 0 to 4096"},
      {"swap_slab_mb:0", "key 'swap_slab_mb'"},
      {"memory_fraction:0", "(0, 1]"},
      {"stitching", "expected key:value"},
      {"stitching:", "must both be non-empty"},
      {"stitching:true,stitching:false", "more than once"},
  };
  for (const BadCase& c : cases) {
    auto r = ParseConfig(c.text);
    ASSERT_FALSE(r.ok()) << c.text;
    EXPECT_TRUE(absl::IsInvalidArgument(r.status()));
    EXPECT_NE(r.status().message().find(c.must_mention), std::string::npos)
        << "'" << c.text << "' gave: " << r.status().message();
  }
}

TEST(Config, EnvironmentThenOverrides) {
  setenv(kConfigEnvVar, "stitching:false,chunk_size_mb:4", 1);
  auto c = ConfigFromEnvironment("chunk_size_mb:8");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_FALSE(c->stitching);
  EXPECT_EQ(c->chunk_size, 8 * kMiB);
  setenv(kConfigEnvVar, "bogus:1", 1);
  auto bad = ConfigFromEnvironment("");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("STITCHALLOC_CONF"), std::string::npos);
  unsetenv(kConfigEnvVar);
}

// docs/configuration.md is the one configuration reference: its table has a row for every
// setting (the keys of the canonical form) and no other, and each row's default is the default.
TEST(Config, TheReferenceTableMatchesTheCode) {
  std::ifstream in(STITCHALLOC_DOCS "/configuration.md");
  ASSERT_TRUE(in) << "cannot read " STITCHALLOC_DOCS "/configuration.md";
  std::map<std::string, std::string> documented;  // key -> default, as written
  for (std::string line; std::getline(in, line);) {
    // | `key` | values | `default` | meaning |
    const std::vector<std::string> cells = absl::StrSplit(line, '|');
    if (cells.size() < 5 || !absl::StartsWith(absl::StripAsciiWhitespace(cells[1]), "`")) continue;
    const auto unquote = [](absl::string_view c) {
      c = absl::StripAsciiWhitespace(c);
      return std::string(absl::StripSuffix(absl::StripPrefix(c, "`"), "`"));
    };
    EXPECT_TRUE(documented.emplace(unquote(cells[1]), unquote(cells[3])).second) << "two rows for " << cells[1];
  }
  const std::string defaults = ConfigToString(Config{});
  std::vector<std::string> keys;
  for (absl::string_view item : absl::StrSplit(defaults, ',')) {
    keys.emplace_back(item.substr(0, item.find(':')));
  }
  ASSERT_GE(keys.size(), 16u) << defaults;
  for (const std::string& k : keys) {
    auto it = documented.find(k);
    if (it == documented.end()) {
      ADD_FAILURE() << "docs/configuration.md has no row for '" << k << "'";
      continue;
    }
    auto parsed = ParseConfig(k + ":" + it->second);
    ASSERT_TRUE(parsed.ok()) << "documented default of " << k << ": " << parsed.status();
    EXPECT_EQ(ConfigToString(*parsed), defaults) << "documented default of " << k << " is '" << it->second << "'";
    documented.erase(it);
  }
  for (const auto& [k, d] : documented) {
    ADD_FAILURE() << "docs/configuration.md documents '" << k << "', which is no setting (IsConfigKey: "
                  << IsConfigKey(k) << ")";
  }
}

}  // namespace
}  // namespace stitchalloc
