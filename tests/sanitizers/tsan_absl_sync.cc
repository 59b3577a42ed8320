// ThreadSanitizer builds only: tells TSan about Abseil's synchronization.
//
// Debian's Abseil is built without TSan, and absl::Mutex locks with atomics and futexes inside
// libabsl_synchronization.so, which TSan does not see: every variable an absl::Mutex guards
// would show as a data race between the threads that take turns holding it. An instrumented
// Abseil reports its locks to TSan itself (ABSL_TSAN_MUTEX_* in mutex.cc); this file does the
// same from outside. It defines absl::Mutex's, CondVar's and Notification's out-of-line members
// in the executable, which takes precedence over the shared library (for gRPC's calls through
// the PLT as well, the executable being linked with -rdynamic); each tells TSan what happens
// (__tsan_mutex_pre_lock/post_lock, ...) around a call of the library's own function, found with
// dlsym(RTLD_NEXT).
//
// Conditions (Await, LockWhen) are evaluated by Abseil on whichever thread happens to hold the
// mutex, sometimes while TSan believes nobody does; each evaluation therefore acquires what the
// mutex's holders released before it, and releases to the next holders after it.
//
// Linked into every executable of a build with -DCHUNKD_SANITIZE=thread (CMakeLists.txt).
#include <dlfcn.h>
#include <sanitizer/tsan_interface.h>

#include <cstdio>
#include <cstdlib>
#include <string>

#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"

#define CHUNKD_STRINGIFY2(x) #x
#define CHUNKD_STRINGIFY(x) CHUNKD_STRINGIFY2(x)

namespace {

// The library's own definition of the member whose Itanium mangled name is
// "_ZN4absl" <inline namespace> `suffix` ("5Mutex4LockEv" for absl::Mutex::Lock()), or of a
// const member ("_ZNK4absl...") with `is_const`.
template <class Fn>
Fn Real(const char* suffix, bool is_const = false) {
  const std::string ns = CHUNKD_STRINGIFY(ABSL_OPTION_INLINE_NAMESPACE_NAME);
  const std::string name =
      std::string(is_const ? "_ZNK4absl" : "_ZN4absl") + std::to_string(ns.size()) + ns + suffix;
  void* fn = dlsym(RTLD_NEXT, name.c_str());
  if (fn == nullptr) {
    std::fprintf(stderr, "tsan_absl_sync: %s not found in Abseil: %s\n", name.c_str(), dlerror());
    std::abort();
  }
  return reinterpret_cast<Fn>(fn);
}

// Abseil's members call each other through the PLT (AwaitWithTimeout calls AwaitWithDeadline),
// which lands in these wrappers again: only the outermost call tells TSan.
thread_local int depth = 0;
struct Outer {
  const bool outermost = depth++ == 0;
  ~Outer() { --depth; }
};

// A condition evaluated as if under the mutex: it acquires what the mutex's holders released,
// evaluates `cond`, and releases what it read to the mutex's next holders.
struct Acquiring {
  absl::Mutex* mu;
  const absl::Condition* cond;
  static bool Eval(Acquiring* self) {
    // The condition is the program's code again: its own locks are told.
    int saved = depth;
    depth = 0;
    __tsan_acquire(self->mu);
    bool met = self->cond->Eval();
    __tsan_release(self->mu);
    depth = saved;
    return met;
  }
};

// Lock and unlock as TSan sees them; `flags` adds __tsan_mutex_read_lock for reader locks.
void Locked(void* mu, unsigned flags = 0) {
  __tsan_mutex_pre_lock(mu, flags);
  __tsan_mutex_post_lock(mu, flags, 0);
}
void Unlocking(void* mu, unsigned flags = 0) {
  __tsan_mutex_pre_unlock(mu, flags);
  __tsan_mutex_post_unlock(mu, flags);
}

}  // namespace

namespace absl {
ABSL_NAMESPACE_BEGIN

void Mutex::Lock() {
  static auto real = Real<void (*)(Mutex*)>("5Mutex4LockEv");
  Outer outer;
  if (!outer.outermost) return real(this);
  __tsan_mutex_pre_lock(this, 0);
  real(this);
  __tsan_mutex_post_lock(this, 0, 0);
}

void Mutex::ReaderLock() {
  static auto real = Real<void (*)(Mutex*)>("5Mutex10ReaderLockEv");
  Outer outer;
  if (!outer.outermost) return real(this);
  __tsan_mutex_pre_lock(this, __tsan_mutex_read_lock);
  real(this);
  __tsan_mutex_post_lock(this, __tsan_mutex_read_lock, 0);
}

bool Mutex::TryLock() {
  static auto real = Real<bool (*)(Mutex*)>("5Mutex7TryLockEv");
  Outer outer;
  if (!outer.outermost) return real(this);
  __tsan_mutex_pre_lock(this, __tsan_mutex_try_lock);
  bool locked = real(this);
  __tsan_mutex_post_lock(this, __tsan_mutex_try_lock | (locked ? 0 : __tsan_mutex_try_lock_failed),
                         0);
  return locked;
}

bool Mutex::ReaderTryLock() {
  static auto real = Real<bool (*)(Mutex*)>("5Mutex13ReaderTryLockEv");
  Outer outer;
  if (!outer.outermost) return real(this);
  unsigned flags = __tsan_mutex_read_lock | __tsan_mutex_try_lock;
  __tsan_mutex_pre_lock(this, flags);
  bool locked = real(this);
  __tsan_mutex_post_lock(this, flags | (locked ? 0 : __tsan_mutex_try_lock_failed), 0);
  return locked;
}

void Mutex::Unlock() {
  static auto real = Real<void (*)(Mutex*)>("5Mutex6UnlockEv");
  Outer outer;
  if (!outer.outermost) return real(this);
  // Told before the real unlock: conditions the unlock evaluates then see this thread's writes.
  __tsan_mutex_pre_unlock(this, 0);
  real(this);
  __tsan_mutex_post_unlock(this, 0);
}

void Mutex::ReaderUnlock() {
  static auto real = Real<void (*)(Mutex*)>("5Mutex12ReaderUnlockEv");
  Outer outer;
  if (!outer.outermost) return real(this);
  __tsan_mutex_pre_unlock(this, __tsan_mutex_read_lock);
  real(this);
  __tsan_mutex_post_unlock(this, __tsan_mutex_read_lock);
}

// Waiting releases the mutex and takes it again.
void Mutex::Await(const Condition& cond) {
  static auto real = Real<void (*)(Mutex*, const Condition&)>("5Mutex5AwaitERKNS0_9ConditionE");
  Outer outer;
  if (!outer.outermost) return real(this, cond);
  Acquiring a{this, &cond};
  Unlocking(this);
  real(this, Condition(&Acquiring::Eval, &a));
  Locked(this);
}

bool Mutex::AwaitWithTimeout(const Condition& cond, absl::Duration timeout) {
  static auto real = Real<bool (*)(Mutex*, const Condition&, absl::Duration)>(
      "5Mutex16AwaitWithTimeoutERKNS0_9ConditionENS0_8DurationE");
  Outer outer;
  if (!outer.outermost) return real(this, cond, timeout);
  Acquiring a{this, &cond};
  Unlocking(this);
  bool met = real(this, Condition(&Acquiring::Eval, &a), timeout);
  Locked(this);
  return met;
}

bool Mutex::AwaitWithDeadline(const Condition& cond, absl::Time deadline) {
  static auto real = Real<bool (*)(Mutex*, const Condition&, absl::Time)>(
      "5Mutex17AwaitWithDeadlineERKNS0_9ConditionENS0_4TimeE");
  Outer outer;
  if (!outer.outermost) return real(this, cond, deadline);
  Acquiring a{this, &cond};
  Unlocking(this);
  bool met = real(this, Condition(&Acquiring::Eval, &a), deadline);
  Locked(this);
  return met;
}

void Mutex::LockWhen(const Condition& cond) {
  static auto real = Real<void (*)(Mutex*, const Condition&)>("5Mutex8LockWhenERKNS0_9ConditionE");
  Outer outer;
  if (!outer.outermost) return real(this, cond);
  Acquiring a{this, &cond};
  __tsan_mutex_pre_lock(this, 0);
  real(this, Condition(&Acquiring::Eval, &a));
  __tsan_mutex_post_lock(this, 0, 0);
}

void Mutex::ReaderLockWhen(const Condition& cond) {
  static auto real =
      Real<void (*)(Mutex*, const Condition&)>("5Mutex14ReaderLockWhenERKNS0_9ConditionE");
  Outer outer;
  if (!outer.outermost) return real(this, cond);
  Acquiring a{this, &cond};
  __tsan_mutex_pre_lock(this, __tsan_mutex_read_lock);
  real(this, Condition(&Acquiring::Eval, &a));
  __tsan_mutex_post_lock(this, __tsan_mutex_read_lock, 0);
}

bool Mutex::LockWhenWithTimeout(const Condition& cond, absl::Duration timeout) {
  static auto real = Real<bool (*)(Mutex*, const Condition&, absl::Duration)>(
      "5Mutex19LockWhenWithTimeoutERKNS0_9ConditionENS0_8DurationE");
  Outer outer;
  if (!outer.outermost) return real(this, cond, timeout);
  Acquiring a{this, &cond};
  __tsan_mutex_pre_lock(this, 0);
  bool met = real(this, Condition(&Acquiring::Eval, &a), timeout);
  __tsan_mutex_post_lock(this, 0, 0);
  return met;
}

bool Mutex::LockWhenWithDeadline(const Condition& cond, absl::Time deadline) {
  static auto real = Real<bool (*)(Mutex*, const Condition&, absl::Time)>(
      "5Mutex20LockWhenWithDeadlineERKNS0_9ConditionENS0_4TimeE");
  Outer outer;
  if (!outer.outermost) return real(this, cond, deadline);
  Acquiring a{this, &cond};
  __tsan_mutex_pre_lock(this, 0);
  bool met = real(this, Condition(&Acquiring::Eval, &a), deadline);
  __tsan_mutex_post_lock(this, 0, 0);
  return met;
}

bool Mutex::ReaderLockWhenWithTimeout(const Condition& cond, absl::Duration timeout) {
  static auto real = Real<bool (*)(Mutex*, const Condition&, absl::Duration)>(
      "5Mutex25ReaderLockWhenWithTimeoutERKNS0_9ConditionENS0_8DurationE");
  Outer outer;
  if (!outer.outermost) return real(this, cond, timeout);
  Acquiring a{this, &cond};
  __tsan_mutex_pre_lock(this, __tsan_mutex_read_lock);
  bool met = real(this, Condition(&Acquiring::Eval, &a), timeout);
  __tsan_mutex_post_lock(this, __tsan_mutex_read_lock, 0);
  return met;
}

bool Mutex::ReaderLockWhenWithDeadline(const Condition& cond, absl::Time deadline) {
  static auto real = Real<bool (*)(Mutex*, const Condition&, absl::Time)>(
      "5Mutex26ReaderLockWhenWithDeadlineERKNS0_9ConditionENS0_4TimeE");
  Outer outer;
  if (!outer.outermost) return real(this, cond, deadline);
  Acquiring a{this, &cond};
  __tsan_mutex_pre_lock(this, __tsan_mutex_read_lock);
  bool met = real(this, Condition(&Acquiring::Eval, &a), deadline);
  __tsan_mutex_post_lock(this, __tsan_mutex_read_lock, 0);
  return met;
}

// gRPC's gpr_cv is an absl::CondVar: a wait releases the mutex and takes it again.
void CondVar::Wait(Mutex* mu) {
  static auto real = Real<void (*)(CondVar*, Mutex*)>("7CondVar4WaitEPNS0_5MutexE");
  Outer outer;
  if (!outer.outermost) return real(this, mu);
  Unlocking(mu);
  real(this, mu);
  Locked(mu);
}

bool CondVar::WaitWithTimeout(Mutex* mu, absl::Duration timeout) {
  static auto real = Real<bool (*)(CondVar*, Mutex*, absl::Duration)>(
      "7CondVar15WaitWithTimeoutEPNS0_5MutexENS0_8DurationE");
  Outer outer;
  if (!outer.outermost) return real(this, mu, timeout);
  Unlocking(mu);
  bool timed_out = real(this, mu, timeout);
  Locked(mu);
  return timed_out;
}

bool CondVar::WaitWithDeadline(Mutex* mu, absl::Time deadline) {
  static auto real = Real<bool (*)(CondVar*, Mutex*, absl::Time)>(
      "7CondVar16WaitWithDeadlineEPNS0_5MutexENS0_4TimeE");
  Outer outer;
  if (!outer.outermost) return real(this, mu, deadline);
  Unlocking(mu);
  bool timed_out = real(this, mu, deadline);
  Locked(mu);
  return timed_out;
}

// A notification publishes what the notifier did before it to every thread that sees it.
void Notification::Notify() {
  static auto real = Real<void (*)(Notification*)>("12Notification6NotifyEv");
  Outer outer;
  if (!outer.outermost) return real(this);
  __tsan_release(this);
  real(this);
}

void Notification::WaitForNotification() const {
  static auto real =
      Real<void (*)(const Notification*)>("12Notification19WaitForNotificationEv", true);
  Outer outer;
  if (!outer.outermost) return real(this);
  real(this);
  __tsan_acquire(const_cast<Notification*>(this));
}

bool Notification::WaitForNotificationWithTimeout(absl::Duration timeout) const {
  static auto real = Real<bool (*)(const Notification*, absl::Duration)>(
      "12Notification30WaitForNotificationWithTimeoutENS0_8DurationE", true);
  Outer outer;
  if (!outer.outermost) return real(this, timeout);
  bool notified = real(this, timeout);
  if (notified) __tsan_acquire(const_cast<Notification*>(this));
  return notified;
}

bool Notification::WaitForNotificationWithDeadline(absl::Time deadline) const {
  static auto real = Real<bool (*)(const Notification*, absl::Time)>(
      "12Notification31WaitForNotificationWithDeadlineENS0_4TimeE", true);
  Outer outer;
  if (!outer.outermost) return real(this, deadline);
  bool notified = real(this, deadline);
  if (notified) __tsan_acquire(const_cast<Notification*>(this));
  return notified;
}

ABSL_NAMESPACE_END
}  // namespace absl
