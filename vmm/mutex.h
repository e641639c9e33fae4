// Mutex and MutexLock: absl::Mutex, made visible to ThreadSanitizer.
//
// The Abseil we build against (Debian's) is compiled without ThreadSanitizer, so TSan cannot
// see the atomics inside absl::Mutex and would report every lock-protected access as a race.
// This wrapper reports lock and unlock to TSan through its __tsan_mutex_* hooks; in any other
// build it compiles down to absl::Mutex. Abseil's thread-safety annotations (ABSL_GUARDED_BY,
// ABSL_EXCLUSIVE_LOCKS_REQUIRED) apply to it as to absl::Mutex.
//
// Waiting goes through Mutex::Wait(absl::CondVar*), which tells TSan the mutex is released
// for the duration of the wait and reacquired after it.
#pragma once

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

#if defined(__SANITIZE_THREAD__)
#define STITCHALLOC_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define STITCHALLOC_TSAN 1
#endif
#endif

#if defined(STITCHALLOC_TSAN)
#include <sanitizer/tsan_interface.h>
#endif

namespace stitchalloc {

class ABSL_LOCKABLE Mutex {
 public:
  Mutex() {
#if defined(STITCHALLOC_TSAN)
    __tsan_mutex_create(this, 0);
#endif
  }
  ~Mutex() {
#if defined(STITCHALLOC_TSAN)
    __tsan_mutex_destroy(this, 0);
#endif
  }
  Mutex(const Mutex&) = delete;
  Mutex& operator=(const Mutex&) = delete;

  void Lock() ABSL_EXCLUSIVE_LOCK_FUNCTION() {
#if defined(STITCHALLOC_TSAN)
    __tsan_mutex_pre_lock(this, 0);
#endif
    mu_.Lock();
#if defined(STITCHALLOC_TSAN)
    __tsan_mutex_post_lock(this, 0, 0);
#endif
  }

  void Unlock() ABSL_UNLOCK_FUNCTION() {
#if defined(STITCHALLOC_TSAN)
    __tsan_mutex_pre_unlock(this, 0);
#endif
    mu_.Unlock();
#if defined(STITCHALLOC_TSAN)
    __tsan_mutex_post_unlock(this, 0);
#endif
  }

  // Blocks on `cv` with the mutex released; returns with it held again. Spurious wake-ups
  // happen: callers loop on their condition.
  void Wait(absl::CondVar* cv) ABSL_EXCLUSIVE_LOCKS_REQUIRED(this) {
#if defined(STITCHALLOC_TSAN)
    __tsan_mutex_pre_unlock(this, 0);
    __tsan_mutex_post_unlock(this, 0);
#endif
    cv->Wait(&mu_);
#if defined(STITCHALLOC_TSAN)
    __tsan_mutex_pre_lock(this, 0);
    __tsan_mutex_post_lock(this, 0, 0);
#endif
  }

  void AssertHeld() const ABSL_ASSERT_EXCLUSIVE_LOCK() { mu_.AssertHeld(); }

 private:
  absl::Mutex mu_;
};

class ABSL_SCOPED_LOCKABLE MutexLock {
 public:
  explicit MutexLock(Mutex* mu) ABSL_EXCLUSIVE_LOCK_FUNCTION(mu) : mu_(mu) { mu_->Lock(); }
  ~MutexLock() ABSL_UNLOCK_FUNCTION() { mu_->Unlock(); }
  MutexLock(const MutexLock&) = delete;
  MutexLock& operator=(const MutexLock&) = delete;

 private:
  Mutex* const mu_;
};

}  // namespace stitchalloc
