// Formatting for messages: byte counts ("1.50 GiB", "512.00 KiB", "12 B") and addresses.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/strings/str_format.h"

namespace stitchalloc {

inline std::string FormatBytes(std::size_t bytes) {
  static constexpr const char* kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  if (bytes < 1024) return absl::StrFormat("%d B", bytes);
  double v = static_cast<double>(bytes);
  int unit = 0;
  while (v >= 1024.0 && unit < 6) {
    v /= 1024.0;
    ++unit;
  }
  return absl::StrFormat("%.2f %s", v, kUnits[unit]);
}

// An address for messages: "0x7f3a00000000".
inline std::string FormatAddress(std::uintptr_t p) { return absl::StrFormat("0x%x", p); }

}  // namespace stitchalloc
