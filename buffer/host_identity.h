// Who a process is, as far as shared memory is concerned: handles (shared-memory segment
// names) are only usable by a process that sees the same shared-memory directory on the same
// booted kernel.
#ifndef CHUNKD_BUFFER_HOST_IDENTITY_H_
#define CHUNKD_BUFFER_HOST_IDENTITY_H_

#include <cstdint>
#include <string>

namespace chunkd::buffer {

struct HostIdentity {
  std::string boot_id;           // /proc/sys/kernel/random/boot_id
  uint64_t ipc_namespace = 0;    // inode of /proc/self/ns/ipc
  uint64_t mount_namespace = 0;  // inode of /proc/self/ns/mnt
  std::string shm_dir;           // the shared-memory directory as this process names it
  uint64_t shm_dir_dev = 0;      // and the directory it is: device and inode
  uint64_t shm_dir_ino = 0;
};

// This process's identity, with `shm_dir` as its shared-memory directory.
HostIdentity CurrentHostIdentity(const std::string& shm_dir = "/dev/shm");

// Whether a process with identity `client` can map segments that a process with identity
// `server` created in its shared-memory directory: same boot, and the same directory object
// (a pod's containers see one memory-backed volume under different mount namespaces, so the
// namespaces themselves need not match).
bool CanShareMemory(const HostIdentity& server, const HostIdentity& client);

}  // namespace chunkd::buffer

#endif  // CHUNKD_BUFFER_HOST_IDENTITY_H_
