// Config: every setting of the allocator, parsed from a PYTORCH_CUDA_ALLOC_CONF-style string
// "key:value,key:value". docs/configuration.md documents each key; keep the two in step.
//
// Parsing is strict: an unknown key, a repeated key, a malformed or out-of-range value is an
// InvalidArgument error whose message names the key and what it accepts. Nothing is applied
// from a string that fails to parse.
#pragma once

#include <cstddef>
#include <optional>
#include <string>
#include "absl/strings/string_view.h"

#include "absl/status/statusor.h"
#include "vmm/driver_factory.h"

namespace stitchalloc {

// Offload to pinned host memory (swap/, docs/offload.md). Plain numbers here so that one
// string configures every layer; the swap layer turns them into its options.
struct SwapSettings {
  std::size_t host_limit = std::size_t{64} << 30;  // most host memory pinned per device
  std::size_t slab = std::size_t{256} << 20;       // pinned per growth step
  std::size_t copy_chunk = std::size_t{8} << 20;   // largest single copy call
  int lookahead = 1;                               // layers prefetched ahead of the backward
  int keep_last_layers = 1;                        // their tensors never leave the device
  std::size_t min_bytes = std::size_t{1} << 20;    // smaller saved tensors stay on the device
};

struct Config {
  DriverOptions driver;  // driver, device, host_capacity_mb, host_granularity_kb
  // Physical chunk size of the large pool: the unit of mapping and of stitching.
  // 0 means the driver's granularity (2 MiB on current GPUs).
  std::size_t chunk_size = 0;
  bool stitching = true;
  // Virtual bytes of idle stitched mappings kept for reuse; beyond it the least recently used
  // are unmapped and their chunks go back to their home mappings. nullopt: device capacity.
  std::optional<std::size_t> stitch_cache_bytes;
  // Virtual bytes reserved behind each large-pool mapping so that it can grow in place
  // (with stitching on). 0: mappings never grow.
  std::size_t mapping_headroom = std::size_t{1} << 30;
  // As PyTorch's max_split_size_mb: blocks at least this large are never split.
  std::size_t max_split_size = SIZE_MAX;
  // Upper bound of reserved memory as a fraction of the device's total memory.
  double memory_fraction = 1.0;
  SwapSettings swap;
};

// The environment variable read by ConfigFromEnvironment.
inline constexpr char kConfigEnvVar[] = "STITCHALLOC_CONF";

// Parses `text` on top of `base` (keys not named keep base's values). Empty text is valid.
absl::StatusOr<Config> ParseConfig(absl::string_view text, const Config& base = Config{});

// STITCHALLOC_CONF, then `overrides` (may be empty) on top of it.
absl::StatusOr<Config> ConfigFromEnvironment(absl::string_view overrides = {});

// Whether `key` is one of the settings ParseConfig accepts.
bool IsConfigKey(absl::string_view key);

// The canonical "key:value,..." form of every setting (round-trips through ParseConfig).
std::string ConfigToString(const Config& config);

}  // namespace stitchalloc
