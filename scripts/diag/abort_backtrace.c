// abort_backtrace: an LD_PRELOAD diagnostic for crashes on a machine without gdb (the lent GPU
// machines). On SIGABRT, SIGSEGV or SIGBUS it prints the native stack to stderr, one frame per
// line as "object(+offset)" with the nearest exported symbol, then re-raises the signal with the
// default action, so the exit status is unchanged. scripts/gpu.sh (phase diag) builds it with
//   cc -shared -fPIC -O0 -o abort_backtrace.so scripts/diag/abort_backtrace.c
// and resolves the offsets with addr2line. Not part of the product; nothing links it.
#define _GNU_SOURCE
#include <dlfcn.h>
#include <execinfo.h>
#include <signal.h>
#include <string.h>
#include <unistd.h>

static void on_signal(int sig) {
  void* frames[128];
  int n = backtrace(frames, 128);
  static const char header[] = "\n=== abort_backtrace: native stack (object(+offset) [address]) ===\n";
  write(2, header, sizeof header - 1);
  backtrace_symbols_fd(frames, n, 2);
  static const char footer[] = "=== end of stack ===\n";
  write(2, footer, sizeof footer - 1);
  signal(sig, SIG_DFL);
  raise(sig);
}

__attribute__((constructor)) static void install(void) {
  void* warm[1];
  backtrace(warm, 1);  // loads libgcc_s now, not inside the handler
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_signal;
  sa.sa_flags = SA_RESETHAND;
  sigaction(SIGABRT, &sa, NULL);
  sigaction(SIGSEGV, &sa, NULL);
  sigaction(SIGBUS, &sa, NULL);
}
