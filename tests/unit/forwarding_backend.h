// A backend that forwards every call to another one: the base of the test wrappers that
// change one or two calls (seeding writes, counting and holding reads, owning a server).
#ifndef CHUNKD_TESTS_UNIT_FORWARDING_BACKEND_H_
#define CHUNKD_TESTS_UNIT_FORWARDING_BACKEND_H_

#include <memory>
#include <optional>
#include <string>
#include <utility>

#include "server/backend/backend.h"

namespace chunkd::testing {

class ForwardingBackend : public server::Backend {
 public:
  explicit ForwardingBackend(std::unique_ptr<server::Backend> inner) : inner_(std::move(inner)) {}

  server::Backend& inner() { return *inner_; }

  absl::string_view kind() const override { return inner_->kind(); }
  std::string location() const override { return inner_->location(); }
  absl::StatusOr<buffer::cpu::Buffer> Read(absl::string_view key,
                                           server::ValueInfo* info) override {
    return inner_->Read(key, info);
  }
  absl::StatusOr<buffer::cpu::Buffer> ReadRange(absl::string_view key, uint64_t offset,
                                                uint64_t length, server::ValueInfo* info) override {
    return inner_->ReadRange(key, offset, length, info);
  }
  absl::StatusOr<buffer::cpu::Buffer> ReadSuffix(absl::string_view key, uint64_t length,
                                                 server::ValueInfo* info) override {
    return inner_->ReadSuffix(key, length, info);
  }
  absl::StatusOr<buffer::cpu::Buffer> ReadRangeIfMatch(absl::string_view key, uint64_t offset,
                                                       uint64_t length,
                                                       const server::ValueInfo& expected,
                                                       server::ValueInfo* info) override {
    return inner_->ReadRangeIfMatch(key, offset, length, expected, info);
  }
  absl::StatusOr<server::ValueInfo> Stat(absl::string_view key) override {
    return inner_->Stat(key);
  }
  absl::StatusOr<bool> IsCurrent(absl::string_view key, const server::ValueInfo& cached) override {
    return inner_->IsCurrent(key, cached);
  }
  absl::StatusOr<std::optional<buffer::cpu::Buffer>> ReadIfChanged(
      absl::string_view key, const server::ValueInfo& cached, server::ValueInfo* info) override {
    return inner_->ReadIfChanged(key, cached, info);
  }
  absl::StatusOr<server::ValueInfo> Write(absl::string_view key, buffer::cpu::Buffer value,
                                          const server::Conditions& conditions) override {
    return inner_->Write(key, std::move(value), conditions);
  }
  absl::Status Delete(absl::string_view key, const server::Conditions& conditions) override {
    return inner_->Delete(key, conditions);
  }
  absl::StatusOr<std::unique_ptr<server::ListCursor>> List(absl::string_view prefix,
                                                           bool directory) override {
    return inner_->List(prefix, directory);
  }

 protected:
  std::unique_ptr<server::Backend> inner_;
};

}  // namespace chunkd::testing

#endif  // CHUNKD_TESTS_UNIT_FORWARDING_BACKEND_H_
