// Mutex, MutexLock and CondVar: the project's lock, with Abseil's thread-safety annotations
// (ABSL_GUARDED_BY, ABSL_EXCLUSIVE_LOCKS_REQUIRED apply to it as to absl::Mutex).
//
// Why not absl::Mutex directly: the Abseil we build against (Debian's libabsl) is compiled
// without NDEBUG, so every absl::Mutex::Lock runs Abseil's debug-only deadlock detector. Measured
// with callgrind, that was about 600 of the 1,800 instructions of a cached malloc+free pair (see
// docs/results.md); the only switch for it is process-wide, which a library must not flip. A
// std::mutex is a plain futex lock, and ThreadSanitizer understands it (and std::condition_variable)
// natively, with no annotations.
#pragma once

#include <condition_variable>
#include <mutex>

#include "absl/base/thread_annotations.h"

namespace stitchalloc {

class CondVar;

class ABSL_LOCKABLE Mutex {
 public:
  Mutex() = default;
  Mutex(const Mutex&) = delete;
  Mutex& operator=(const Mutex&) = delete;

  void Lock() ABSL_EXCLUSIVE_LOCK_FUNCTION() { mu_.lock(); }
  void Unlock() ABSL_UNLOCK_FUNCTION() { mu_.unlock(); }
  // Blocks on `cv` with the mutex released; returns with it held again. Spurious wake-ups
  // happen: callers loop on their condition.
  inline void Wait(CondVar* cv) ABSL_EXCLUSIVE_LOCKS_REQUIRED(this);
  void AssertHeld() const ABSL_ASSERT_EXCLUSIVE_LOCK() {}

 private:
  std::mutex mu_;
};

class CondVar {
 public:
  void Signal() { cv_.notify_one(); }
  void SignalAll() { cv_.notify_all(); }

 private:
  friend class Mutex;
  std::condition_variable cv_;
};

inline void Mutex::Wait(CondVar* cv) {
  std::unique_lock<std::mutex> lock(mu_, std::adopt_lock);
  cv->cv_.wait(lock);
  lock.release();  // still held: ownership goes back to the caller's MutexLock
}

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
