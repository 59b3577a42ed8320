#include "buffer/host_identity.h"

#include <sys/stat.h>

#include <fstream>

namespace chunkd::buffer {
namespace {

uint64_t InodeOf(const char* path) {
  struct stat st;
  return ::stat(path, &st) == 0 ? static_cast<uint64_t>(st.st_ino) : 0;
}

}  // namespace

HostIdentity CurrentHostIdentity(const std::string& shm_dir) {
  HostIdentity id;
  std::ifstream boot("/proc/sys/kernel/random/boot_id");
  std::getline(boot, id.boot_id);
  id.ipc_namespace = InodeOf("/proc/self/ns/ipc");
  id.mount_namespace = InodeOf("/proc/self/ns/mnt");
  id.shm_dir = shm_dir;
  struct stat st;
  if (::stat(shm_dir.c_str(), &st) == 0) {
    id.shm_dir_dev = static_cast<uint64_t>(st.st_dev);
    id.shm_dir_ino = static_cast<uint64_t>(st.st_ino);
  }
  return id;
}

bool CanShareMemory(const HostIdentity& server, const HostIdentity& client) {
  return !server.boot_id.empty() && server.boot_id == client.boot_id && server.shm_dir_ino != 0 &&
         server.shm_dir_dev == client.shm_dir_dev && server.shm_dir_ino == client.shm_dir_ino;
}

}  // namespace chunkd::buffer
