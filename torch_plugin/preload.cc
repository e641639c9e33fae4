// libstitchalloc_preload.so: `LD_PRELOAD=.../libstitchalloc_preload.so python train.py` makes
// stitchalloc PyTorch's CUDA allocator in a job that cannot be changed.
//
// It depends on libc alone (no libstdc++, no torch), so a process that never loads torch (a shell, a compiler, every
// child a launcher starts) pays for one getenv at startup and one string search per dlopen:
//   - At load (constructor): if PYTORCH_CUDA_ALLOC_CONF names backend:stitchalloc, the variable
//     is split by libstitchalloc.so (loaded from this library's folder for that purpose only):
//     PyTorch's part stays in PYTORCH_CUDA_ALLOC_CONF, stitchalloc's goes to
//     STITCHALLOC_AUTO_INSTALL, notes are printed. A malformed value ends the process with the
//     error (PyTorch would reject it too, with a less precise message).
//   - dlopen is interposed: after a dlopen of a path containing "torch" succeeds, and once
//     libc10_cuda.so is in the process (its static constructors have run, CUDA has not been
//     initialised), libstitchalloc_torch.so from this library's folder is loaded and
//     stitchalloc_torch_install(STITCHALLOC_AUTO_INSTALL) is called, once.
// Failures are printed on stderr prefixed "stitchalloc preload:" and leave PyTorch's allocator
// in place; nothing is ever retried.
#include <dlfcn.h>

#include <limits.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace {

using DlopenFn = void* (*)(const char*, int);

constexpr char kInstallVar[] = "STITCHALLOC_AUTO_INSTALL";
std::atomic<int> g_state{0};  // 0: waiting for torch, 1: installing or done

DlopenFn RealDlopen() {
  static DlopenFn real = reinterpret_cast<DlopenFn>(dlsym(RTLD_NEXT, "dlopen"));
  return real;
}

// Writes the path of `name` in the folder this library was loaded from into `out`.
bool SiblingPath(const char* name, char (&out)[PATH_MAX]) {
  Dl_info info{};
  if (dladdr(reinterpret_cast<void*>(&SiblingPath), &info) == 0 || info.dli_fname == nullptr) return false;
  const char* slash = std::strrchr(info.dli_fname, '/');
  const int folder = slash == nullptr ? 0 : static_cast<int>(slash - info.dli_fname + 1);
  const int n = std::snprintf(out, sizeof(out), "%.*s%s", folder, info.dli_fname, name);
  return n > 0 && n < static_cast<int>(sizeof(out));
}

void Warn(const char* what, const char* detail) {
  std::fprintf(stderr, "stitchalloc preload: %s%s%s\n", what, detail != nullptr ? ": " : "",
               detail != nullptr ? detail : "");
}

void SplitEnvironment() {
  const char* conf = std::getenv("PYTORCH_CUDA_ALLOC_CONF");
  if (conf == nullptr || std::strstr(conf, "stitchalloc") == nullptr) return;
  char lib[PATH_MAX];
  void* h = SiblingPath("libstitchalloc.so", lib) ? RealDlopen()(lib, RTLD_NOW | RTLD_LOCAL) : nullptr;
  if (h == nullptr) {
    Warn("cannot load libstitchalloc.so to read PYTORCH_CUDA_ALLOC_CONF", dlerror());
    std::exit(1);
  }
  using SplitFn = int (*)(const char*, void**);
  using EnabledFn = int (*)(const void*);
  using PartFn = const char* (*)(const void*, const char*);
  using FreeFn = void (*)(void*);
  using ErrorFn = const char* (*)();
  auto split = reinterpret_cast<SplitFn>(dlsym(h, "stitchalloc_split_torch_conf"));
  auto enabled = reinterpret_cast<EnabledFn>(dlsym(h, "stitchalloc_conf_split_enabled"));
  auto part = reinterpret_cast<PartFn>(dlsym(h, "stitchalloc_conf_split_part"));
  auto release = reinterpret_cast<FreeFn>(dlsym(h, "stitchalloc_conf_split_free"));
  auto error = reinterpret_cast<ErrorFn>(dlsym(h, "stitchalloc_last_error"));
  if (!split || !enabled || !part || !release || !error) {
    Warn("libstitchalloc.so lacks the configuration splitter (version mismatch)", nullptr);
    std::exit(1);
  }
  void* s = nullptr;
  if (split(conf, &s) != 0) {
    Warn("invalid PYTORCH_CUDA_ALLOC_CONF", error());
    std::exit(1);
  }
  if (enabled(s)) {
    const char* notes = part(s, "notes");
    if (notes[0] != '\0') std::fprintf(stderr, "stitchalloc: %s\n", notes);
    const char* torch = part(s, "torch");
    if (torch[0] == '\0') {
      unsetenv("PYTORCH_CUDA_ALLOC_CONF");
    } else {
      setenv("PYTORCH_CUDA_ALLOC_CONF", torch, 1);
    }
    setenv(kInstallVar, part(s, "stitchalloc"), 1);
  }
  release(s);
}

void MaybeInstall() {
  if (g_state.load(std::memory_order_acquire) != 0) return;
  void* c10_cuda = RealDlopen()("libc10_cuda.so", RTLD_LAZY | RTLD_NOLOAD);
  if (c10_cuda == nullptr) return;
  dlclose(c10_cuda);  // drops the reference RTLD_NOLOAD took
  int expected = 0;
  if (!g_state.compare_exchange_strong(expected, 1)) return;
  char lib[PATH_MAX];
  void* h = SiblingPath("libstitchalloc_torch.so", lib) ? RealDlopen()(lib, RTLD_NOW | RTLD_LOCAL) : nullptr;
  if (h == nullptr) {
    Warn("cannot load libstitchalloc_torch.so; PyTorch keeps its own allocator", dlerror());
    return;
  }
  using InstallFn = int (*)(const char*);
  using ErrorFn = const char* (*)();
  auto install = reinterpret_cast<InstallFn>(dlsym(h, "stitchalloc_torch_install"));
  auto error = reinterpret_cast<ErrorFn>(dlsym(h, "stitchalloc_torch_last_error"));
  if (install == nullptr || error == nullptr) {
    Warn("libstitchalloc_torch.so lacks stitchalloc_torch_install; PyTorch keeps its own allocator", nullptr);
    return;
  }
  const char* conf = std::getenv(kInstallVar);
  if (install(conf != nullptr ? conf : "") != 0) Warn("not installed; PyTorch keeps its own allocator", error());
}

__attribute__((constructor)) void OnLoad() { SplitEnvironment(); }

}  // namespace

extern "C" __attribute__((visibility("default"))) void* dlopen(const char* file, int mode) {
  void* handle = RealDlopen()(file, mode);
  if (handle != nullptr && file != nullptr && g_state.load(std::memory_order_relaxed) == 0 &&
      std::strstr(file, "torch") != nullptr) {
    MaybeInstall();
  }
  return handle;
}
