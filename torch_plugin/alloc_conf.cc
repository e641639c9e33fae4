#include "torch_plugin/alloc_conf.h"

#include <optional>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "allocator/config.h"

namespace stitchalloc {
namespace {

// PyTorch keys of the pinned host allocator: it stays PyTorch's, so they stay PyTorch's.
constexpr absl::string_view kPinnedKeys[] = {
    "pinned_use_cuda_host_register", "pinned_num_register_threads", "pinned_use_background_threads",
    "pinned_reserve_segment_size_mb", "pinned_free_catch_all", "pinned_use_hip_host_register"};

struct Ignored {
  absl::string_view key;
  absl::string_view why;
};
// PyTorch device-allocator keys that mean nothing to stitchalloc, with the reason.
constexpr Ignored kIgnoredKeys[] = {
    {"expandable_segments", "stitchalloc always maps memory with the VMM API (it never fragments into segments)"},
    {"expandable_segments_reserve", "stitchalloc reserves virtual space itself"},
    {"expandable_segments_reserve_by_class", "stitchalloc reserves virtual space itself"},
    {"garbage_collection_threshold", "stitchalloc reuses free chunks by stitching instead of collecting"},
    {"roundup_power2_divisions", "stitchalloc rounds requests to 512 bytes"},
    {"max_non_split_rounding_mb", "stitchalloc does not round large non-split blocks"},
    {"release_lock_on_cudamalloc", "stitchalloc maps without a device malloc"},
    {"release_lock_on_hipmalloc", "stitchalloc supports CUDA only"},
    {"graph_capture_record_stream_reuse", "stitchalloc keeps record_stream blocks of a capture until it ends"},
    {"large_segment_size_mb", "stitchalloc maps in chunks (chunk_size_mb)"},
    {"small_segment_size_mb", "stitchalloc maps in chunks (chunk_size_mb)"},
    {"throw_on_cudamalloc_oom", "stitchalloc always raises out-of-memory with its report"},
};

const Ignored* FindIgnored(absl::string_view key) {
  for (const Ignored& ig : kIgnoredKeys) {
    if (key == ig.key) return &ig;
  }
  return nullptr;
}

// Splits on commas outside brackets.
std::vector<absl::string_view> Tokens(absl::string_view text) {
  std::vector<absl::string_view> out;
  int depth = 0;
  std::size_t start = 0;
  for (std::size_t i = 0; i <= text.size(); ++i) {
    if (i == text.size() || (text[i] == ',' && depth == 0)) {
      absl::string_view t = absl::StripAsciiWhitespace(text.substr(start, i - start));
      if (!t.empty()) out.push_back(t);
      start = i + 1;
    } else if (text[i] == '[') {
      ++depth;
    } else if (text[i] == ']' && depth > 0) {
      --depth;
    }
  }
  return out;
}

struct KeyValue {
  absl::string_view token, key, value;
};

// `token` split at its first ':', both sides stripped of blanks; nullopt without a ':'.
std::optional<KeyValue> SplitKeyValue(absl::string_view token) {
  const std::size_t colon = token.find(':');
  if (colon == absl::string_view::npos) return std::nullopt;
  return KeyValue{token, absl::StripAsciiWhitespace(token.substr(0, colon)),
                  absl::StripAsciiWhitespace(token.substr(colon + 1))};
}

absl::Status Malformed(absl::string_view token, absl::string_view why) {
  return absl::InvalidArgumentError(
      absl::StrFormat("PYTORCH_CUDA_ALLOC_CONF: malformed entry '%s': %s", token, why));
}

}  // namespace

absl::StatusOr<AllocConfSplit> SplitTorchAllocConf(absl::string_view text) {
  AllocConfSplit out;
  std::vector<KeyValue> items;
  int stitchalloc_backends = 0;
  int other_backends = 0;
  for (absl::string_view token : Tokens(text)) {
    const std::optional<KeyValue> split = SplitKeyValue(token);
    if (!split) return Malformed(token, "expected key:value");
    const KeyValue& kv = *split;
    if (kv.key.empty() || kv.value.empty()) return Malformed(token, "key and value must both be non-empty");
    if (kv.key == "backend") {
      if (absl::AsciiStrToLower(kv.value) == "stitchalloc") {
        ++stitchalloc_backends;
      } else {
        ++other_backends;
      }
    }
    items.push_back(kv);
  }
  if (stitchalloc_backends == 0) {
    out.torch = std::string(text);
    return out;
  }
  if (stitchalloc_backends > 1 || other_backends > 0) {
    return absl::InvalidArgumentError(
        "PYTORCH_CUDA_ALLOC_CONF: 'backend' is given more than once; with backend:stitchalloc no other "
        "backend can be named");
  }
  out.enabled = true;
  std::vector<std::string> ours, theirs;
  for (const KeyValue& kv : items) {
    if (kv.key == "backend") continue;
    if (kv.key == "device") {
      return absl::InvalidArgumentError(
          "PYTORCH_CUDA_ALLOC_CONF: 'device' is not accepted here: under PyTorch every device gets its "
          "own stitchalloc allocator, chosen by the tensor's device");
    }
    if (IsConfigKey(kv.key)) {
      ours.push_back(absl::StrCat(kv.key, ":", kv.value));
      if (kv.key == "max_split_size_mb") {
        out.notes.push_back(absl::StrCat("max_split_size_mb:", kv.value, " honoured (same meaning in stitchalloc)"));
      }
      continue;
    }
    if (kv.key == "per_process_memory_fraction") {
      ours.push_back(absl::StrCat("memory_fraction:", kv.value));
      out.notes.push_back(
          absl::StrCat("per_process_memory_fraction:", kv.value, " honoured as stitchalloc's memory_fraction"));
      continue;
    }
    bool handled = false;
    for (absl::string_view k : kPinnedKeys) {
      if (kv.key == k) {
        theirs.emplace_back(kv.token);
        handled = true;
      }
    }
    if (const Ignored* ig = FindIgnored(kv.key); ig != nullptr) {
      out.notes.push_back(absl::StrCat(kv.token, " has no effect under stitchalloc: ", ig->why));
      handled = true;
    }
    if (!handled) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "PYTORCH_CUDA_ALLOC_CONF: unknown key '%s' in '%s': neither a stitchalloc key (docs/configuration.md) "
          "nor a PyTorch allocator key",
          kv.key, kv.token));
    }
  }
  out.stitchalloc = absl::StrJoin(ours, ",");
  out.torch = absl::StrJoin(theirs, ",");
  // Validate our part now, so that a bad value fails at startup, naming the key.
  auto parsed = ParseConfig(out.stitchalloc);
  if (!parsed.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("PYTORCH_CUDA_ALLOC_CONF: ", parsed.status().message()));
  }
  return out;
}

std::vector<std::string> RunTimeSettingNotes(absl::string_view text, const Config& installed) {
  std::vector<std::string> notes;
  for (absl::string_view token : Tokens(text)) {
    const std::optional<KeyValue> kv = SplitKeyValue(token);
    if (!kv) continue;
    const absl::string_view key = kv->key, value = kv->value;
    if (key == "max_split_size_mb") {
      std::size_t mb = 0;
      if (absl::SimpleAtoi(value, &mb) && installed.max_split_size != SIZE_MAX && mb <= SIZE_MAX / kMiB &&
          mb * kMiB == installed.max_split_size) {
        continue;  // what stitchalloc uses already
      }
      notes.push_back(absl::StrCat(
          token, " set at run time does not reach stitchalloc: its max_split_size_mb is fixed when it is installed (",
          installed.max_split_size == SIZE_MAX ? std::string("unlimited")
                                               : absl::StrCat(installed.max_split_size / kMiB, " MiB"),
          "); give it in PYTORCH_CUDA_ALLOC_CONF or stitchalloc.install()"));
    } else if (key == "per_process_memory_fraction") {
      notes.push_back(absl::StrCat(token,
                                   " set at run time does not reach stitchalloc; "
                                   "torch.cuda.set_per_process_memory_fraction(",
                                   value, ") does"));
    } else if (const Ignored* ig = FindIgnored(key); ig != nullptr) {
      notes.push_back(absl::StrCat(token, " set at run time has no effect under stitchalloc: ", ig->why));
    }
  }
  return notes;
}

}  // namespace stitchalloc
