// Hand-offs through gRPC, told to ThreadSanitizer.
//
// What a thread does before it starts a gRPC operation (a read, a write, a call, an alarm)
// happens before that operation's completion is handled, on whichever thread gRPC delivers
// it. gRPC guarantees it with its own synchronization (completion queues, combiners), which
// TSan cannot see in Debian's uninstrumented gRPC, so both ends of the RPC engine and the
// client's reactors say it themselves: Started(token) when they start an operation, Completed
// (token) when they handle its completion, the token being the operation's tag or another
// address that stands for it. Nothing outside ThreadSanitizer builds.
#ifndef CHUNKD_PROTO_WIRE_HANDOFF_H_
#define CHUNKD_PROTO_WIRE_HANDOFF_H_

#if defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define CHUNKD_TSAN 1
#endif
#endif
#if defined(__SANITIZE_THREAD__)
#define CHUNKD_TSAN 1
#endif

#ifdef CHUNKD_TSAN
#include <sanitizer/tsan_interface.h>
#endif

namespace chunkd::wire {

inline void Started(const void* token) {
#ifdef CHUNKD_TSAN
  __tsan_release(const_cast<void*>(token));
#else
  (void)token;
#endif
}

inline void Completed(const void* token) {
#ifdef CHUNKD_TSAN
  __tsan_acquire(const_cast<void*>(token));
#else
  (void)token;
#endif
}

}  // namespace chunkd::wire

#endif  // CHUNKD_PROTO_WIRE_HANDOFF_H_
