#include "buffer/gpu/host_standin.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <type_traits>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace chunkd::buffer::gpu {
namespace {

constexpr char kHandleMagic[] = "chunkd-host-stand-in-ipc";

// The process-wide table of exported allocations: what an IPC handle names.
struct Exported {
  uintptr_t base = 0;
  size_t size = 0;
  DeviceUuid uuid{};
  int opens = 0;  // instances that have the handle open now
};
struct HandleTable {
  absl::Mutex mu;
  uint64_t next_id ABSL_GUARDED_BY(mu) = 1;
  absl::flat_hash_map<uint64_t, Exported> entries ABSL_GUARDED_BY(mu);
};
HandleTable& Table() {
  static HandleTable* table = new HandleTable();
  return *table;
}

IpcHandle EncodeHandle(uint64_t id) {
  IpcHandle handle{};
  std::memcpy(handle.data(), kHandleMagic, sizeof(kHandleMagic));
  std::memcpy(handle.data() + 32, &id, sizeof(id));
  return handle;
}

std::optional<uint64_t> DecodeHandle(const IpcHandle& handle) {
  if (std::memcmp(handle.data(), kHandleMagic, sizeof(kHandleMagic)) != 0) return std::nullopt;
  uint64_t id;
  std::memcpy(&id, handle.data() + 32, sizeof(id));
  return id;
}

}  // namespace

HostStandInDeviceApi::HostStandInDeviceApi(std::vector<DeviceUuid> uuids,
                                           uint64_t memory_per_device)
    : uuids_(std::move(uuids)), memory_per_device_(memory_per_device), used_(uuids_.size(), 0) {}

HostStandInDeviceApi::~HostStandInDeviceApi() {
  absl::MutexLock lock(&mu_);
  for (const auto& [base, opened] : opened_) {
    absl::MutexLock table_lock(&Table().mu);
    auto entry = Table().entries.find(opened.second);
    if (entry != Table().entries.end()) --entry->second.opens;
  }
  for (auto& [base, allocation] : allocations_) {
    if (allocation.exported_id != 0) {
      absl::MutexLock table_lock(&Table().mu);
      Table().entries.erase(allocation.exported_id);
    }
    std::free(reinterpret_cast<void*>(base));
  }
  for (void* p : pinned_) std::free(p);
}

DeviceUuid HostStandInDeviceApi::StandInUuid(int ordinal) {
  DeviceUuid uuid{};
  const char tag[] = "STANDIN-GPU";
  std::memcpy(uuid.data(), tag, sizeof(tag) - 1);
  uuid[12] = static_cast<uint8_t>(ordinal >> 24);
  uuid[13] = static_cast<uint8_t>(ordinal >> 16);
  uuid[14] = static_cast<uint8_t>(ordinal >> 8);
  uuid[15] = static_cast<uint8_t>(ordinal);
  return uuid;
}

absl::Status HostStandInDeviceApi::CheckDevice(int device) const {
  if (device < 0 || static_cast<size_t>(device) >= uuids_.size()) {
    return absl::InvalidArgumentError(absl::StrCat("invalid device ordinal ", device));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<DeviceInfo>> HostStandInDeviceApi::Devices() {
  std::vector<DeviceInfo> devices;
  for (size_t i = 0; i < uuids_.size(); ++i) {
    devices.push_back(DeviceInfo{static_cast<int>(i), uuids_[i], absl::StrCat("host stand-in ", i),
                                 memory_per_device_});
  }
  return devices;
}

absl::StatusOr<void*> HostStandInDeviceApi::Malloc(int device, size_t bytes) {
  if (absl::Status s = CheckDevice(device); !s.ok()) return s;
  absl::MutexLock lock(&mu_);
  if (bytes > memory_per_device_ - used_[device]) {
    return absl::ResourceExhaustedError(
        absl::StrCat("stand-in device ", device, " is out of memory (", bytes, " bytes asked)"));
  }
  void* p = std::aligned_alloc(256, (std::max<size_t>(bytes, 1) + 255) / 256 * 256);
  if (p == nullptr) return absl::ResourceExhaustedError("host memory exhausted");
  allocations_[reinterpret_cast<uintptr_t>(p)] = Allocation{bytes, device, 0};
  used_[device] += bytes;
  ++counters_.mallocs;
  counters_.device_bytes += bytes;
  counters_.peak_device_bytes = std::max(counters_.peak_device_bytes, counters_.device_bytes);
  return p;
}

absl::Status HostStandInDeviceApi::Free(int device, void* ptr) {
  absl::MutexLock lock(&mu_);
  auto it = allocations_.find(reinterpret_cast<uintptr_t>(ptr));
  if (it == allocations_.end() || it->second.device != device) {
    return absl::InvalidArgumentError("Free of a pointer that is not a device allocation");
  }
  if (it->second.exported_id != 0) {
    absl::MutexLock table_lock(&Table().mu);
    auto entry = Table().entries.find(it->second.exported_id);
    if (entry != Table().entries.end() && entry->second.opens > 0) {
      // CUDA: freeing memory another process has mapped through IPC is undefined behaviour.
      ++counters_.frees_with_open_imports;
      return absl::FailedPreconditionError(
          "Free of device memory whose IPC handle another process still has open");
    }
    Table().entries.erase(it->second.exported_id);
  }
  used_[device] -= it->second.size;
  counters_.device_bytes -= it->second.size;
  ++counters_.frees;
  allocations_.erase(it);
  std::free(ptr);
  return absl::OkStatus();
}

absl::StatusOr<IpcHandle> HostStandInDeviceApi::IpcGetMemHandle(int device, void* ptr) {
  absl::MutexLock lock(&mu_);
  auto it = allocations_.find(reinterpret_cast<uintptr_t>(ptr));
  if (it == allocations_.end() || it->second.device != device) {
    return absl::InvalidArgumentError(
        "IpcGetMemHandle of a pointer that does not start a device allocation");
  }
  ++counters_.ipc_exports;
  absl::MutexLock table_lock(&Table().mu);
  if (it->second.exported_id == 0) {
    it->second.exported_id = Table().next_id++;
    Table().entries[it->second.exported_id] = Exported{it->first, it->second.size, uuids_[device]};
  }
  return EncodeHandle(it->second.exported_id);
}

absl::StatusOr<void*> HostStandInDeviceApi::IpcOpenMemHandle(int device, const IpcHandle& handle) {
  if (absl::Status s = CheckDevice(device); !s.ok()) return s;
  std::optional<uint64_t> id = DecodeHandle(handle);
  if (!id) return absl::InvalidArgumentError("not an IPC handle of the host stand-in");
  Exported entry;
  {
    absl::MutexLock table_lock(&Table().mu);
    auto it = Table().entries.find(*id);
    if (it == Table().entries.end()) {
      return absl::InvalidArgumentError("IPC handle names no live allocation");
    }
    entry = it->second;
  }
  if (entry.uuid != uuids_[device]) {
    return absl::InvalidArgumentError(
        absl::StrCat("IPC handle names memory of ", UuidToString(entry.uuid), ", not of device ",
                     device, " (", UuidToString(uuids_[device]), ")"));
  }
  absl::MutexLock lock(&mu_);
  for (const auto& [base, opened] : opened_) {
    if (opened.second == *id) {
      return absl::AlreadyExistsError(
          "IPC handle already open in this process (CUDA allows one open per process)");
    }
  }
  {
    absl::MutexLock table_lock(&Table().mu);
    auto it = Table().entries.find(*id);
    if (it == Table().entries.end()) {
      return absl::InvalidArgumentError("IPC handle names no live allocation");
    }
    ++it->second.opens;
  }
  opened_[entry.base] = std::make_pair(entry.size, *id);
  ++counters_.ipc_opens;
  return reinterpret_cast<void*>(entry.base);
}

absl::Status HostStandInDeviceApi::IpcCloseMemHandle(int device, void* ptr) {
  absl::MutexLock lock(&mu_);
  auto it = opened_.find(reinterpret_cast<uintptr_t>(ptr));
  if (it == opened_.end()) {
    return absl::InvalidArgumentError("IpcCloseMemHandle of a pointer that is not open");
  }
  {
    absl::MutexLock table_lock(&Table().mu);
    auto entry = Table().entries.find(it->second.second);
    if (entry != Table().entries.end()) --entry->second.opens;
  }
  opened_.erase(it);
  ++counters_.ipc_closes;
  return absl::OkStatus();
}

absl::Status HostStandInDeviceApi::Synchronize(int device) {
  if (absl::Status s = CheckDevice(device); !s.ok()) return s;
  absl::MutexLock lock(&mu_);
  ++counters_.synchronizes;
  return absl::OkStatus();
}

absl::Status HostStandInDeviceApi::CheckDeviceRange(int device, const void* ptr,
                                                    size_t bytes) const {
  uintptr_t p = reinterpret_cast<uintptr_t>(ptr);
  auto within = [&](const auto& map) {
    auto it = map.upper_bound(p);
    if (it == map.begin()) return false;
    --it;
    size_t size;
    if constexpr (std::is_same_v<std::decay_t<decltype(it->second)>, Allocation>) {
      size = it->second.size;
    } else {
      size = it->second.first;
    }
    return p >= it->first && bytes <= size && p - it->first <= size - bytes;
  };
  if (within(allocations_) || within(opened_)) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrFormat("[%p, +%d) is not device memory of the stand-in", ptr, bytes));
}

namespace {

// Copies in and out of "device memory" take one lock for the whole process: a device orders
// its copies, so what one wrote is there for the next, whoever makes it. (Two stand-ins in one
// test process are two processes talking through a socket, an order ThreadSanitizer does not
// see; this lock shows it.)
absl::Mutex& CopyEngine() {
  static absl::Mutex* mu = new absl::Mutex();
  return *mu;
}

}  // namespace

absl::Status HostStandInDeviceApi::CopyToDevice(int device, void* dst, const void* src,
                                                size_t bytes) {
  if (absl::Status s = CheckDevice(device); !s.ok()) return s;
  {
    absl::MutexLock lock(&mu_);
    if (absl::Status s = CheckDeviceRange(device, dst, bytes); !s.ok()) return s;
    ++counters_.copies_to_device;
    counters_.bytes_to_device += bytes;
  }
  absl::MutexLock copy(&CopyEngine());
  if (bytes > 0) std::memcpy(dst, src, bytes);
  return absl::OkStatus();
}

absl::Status HostStandInDeviceApi::CopyToHost(int device, void* dst, const void* src,
                                              size_t bytes) {
  if (absl::Status s = CheckDevice(device); !s.ok()) return s;
  {
    absl::MutexLock lock(&mu_);
    if (absl::Status s = CheckDeviceRange(device, src, bytes); !s.ok()) return s;
    ++counters_.copies_to_host;
  }
  absl::MutexLock copy(&CopyEngine());
  if (bytes > 0) std::memcpy(dst, src, bytes);
  return absl::OkStatus();
}

absl::StatusOr<void*> HostStandInDeviceApi::HostAllocPinned(size_t bytes) {
  void* p = std::aligned_alloc(4096, (std::max<size_t>(bytes, 1) + 4095) / 4096 * 4096);
  if (p == nullptr) return absl::ResourceExhaustedError("host memory exhausted");
  absl::MutexLock lock(&mu_);
  pinned_.insert(p);
  ++counters_.pinned_allocs;
  return p;
}

absl::Status HostStandInDeviceApi::HostFreePinned(void* ptr) {
  absl::MutexLock lock(&mu_);
  if (pinned_.erase(ptr) == 0) return absl::InvalidArgumentError("not pinned memory");
  std::free(ptr);
  return absl::OkStatus();
}

absl::Status HostStandInDeviceApi::HostRegister(void*, size_t) { return absl::OkStatus(); }
absl::Status HostStandInDeviceApi::HostUnregister(void*) { return absl::OkStatus(); }

HostStandInCounters HostStandInDeviceApi::counters() const {
  absl::MutexLock lock(&mu_);
  return counters_;
}

uint64_t HostStandInDeviceApi::device_bytes(int device) const {
  absl::MutexLock lock(&mu_);
  return device >= 0 && static_cast<size_t>(device) < used_.size() ? used_[device] : 0;
}

size_t HostStandInDeviceApi::open_handles() const {
  absl::MutexLock lock(&mu_);
  return opened_.size();
}

std::unique_ptr<HostStandInDeviceApi> NewHostStandInDeviceApi(int n_devices,
                                                              uint64_t memory_per_device) {
  std::vector<DeviceUuid> uuids;
  for (int i = 0; i < n_devices; ++i) uuids.push_back(HostStandInDeviceApi::StandInUuid(i));
  return std::make_unique<HostStandInDeviceApi>(std::move(uuids), memory_per_device);
}

}  // namespace chunkd::buffer::gpu
