// The conformance suite every store backend passes unchanged (file, memory, s3, http).
//
// The tests live in backend_conformance_suite.cc. A backend joins the suite with one line in
// any .cc file of the unit test binary:
//
//   INSTANTIATE_TEST_SUITE_P(Http, BackendConformanceTest,
//                            ::testing::Values(chunkd::testing::BackendFactory{
//                                "http", [](chunkd::testing::TempDir& dir) { ... }}),
//                            chunkd::testing::BackendFactoryName);
//
// The factory gets a fresh temporary directory per test that it may use for its data (or
// ignore), and returns a fresh, empty backend. A factory may GTEST_SKIP() (with the reason) when
// something the backend needs is missing on this machine.
//
// Read-only backends (http) set `seed`: the suite then places its values behind the backend's
// back (e.g. files in the directory a web server serves) and runs the tests that only read and
// list; the tests that need the backend's own writes, deletes or conditions are skipped, with
// the reason, and the backend must refuse writes (ReadOnlyBackendRefusesWrites).
#ifndef CHUNKD_TESTS_UNIT_BACKEND_CONFORMANCE_H_
#define CHUNKD_TESTS_UNIT_BACKEND_CONFORMANCE_H_

#include <functional>
#include <memory>
#include <ostream>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "gtest/gtest.h"
#include "server/backend/backend.h"
#include "tests/support/test_support.h"
#include "tests/unit/forwarding_backend.h"

namespace chunkd::testing {

struct BackendFactory {
  std::string name;  // a test name suffix: letters, digits, '_'
  std::function<std::unique_ptr<server::Backend>(TempDir&)> make;
  // Set for read-only backends: stores `value` under `key` without the backend.
  std::function<absl::Status(TempDir&, const std::string& key, const std::string& value)> seed =
      nullptr;
  // False when listings leave out names that start with '.' (nginx's directory index).
  bool lists_dot_names = true;
};

// What the suite sees of a read-only backend: writes without conditions go through the
// factory's `seed` (then Stat tells the new size and generation); everything else is the
// backend's own.
class SeededBackend final : public ForwardingBackend {
 public:
  SeededBackend(std::unique_ptr<server::Backend> backend, const BackendFactory& factory,
                TempDir& dir)
      : ForwardingBackend(std::move(backend)), factory_(factory), dir_(dir) {}
  server::Backend& raw() { return inner(); }

  absl::StatusOr<server::ValueInfo> Write(absl::string_view key, buffer::cpu::Buffer value,
                                          const server::Conditions& conditions) override {
    if (!conditions.empty()) return inner_->Write(key, std::move(value), conditions);
    std::string k(key);
    if (absl::Status s = factory_.seed(dir_, k, std::string(value.view())); !s.ok()) return s;
    return inner_->Stat(key);
  }

 private:
  const BackendFactory& factory_;
  TempDir& dir_;
};

// How gtest prints a factory (in test names and messages): its name.
inline void PrintTo(const BackendFactory& factory, std::ostream* os) { *os << factory.name; }

// For INSTANTIATE_TEST_SUITE_P: names each instance after its factory.
inline std::string BackendFactoryName(const ::testing::TestParamInfo<BackendFactory>& info) {
  return info.param.name;
}

// The fixture: `backend()` is a fresh backend made by the factory for each test.
class BackendConformanceTest : public ::testing::TestWithParam<BackendFactory> {
 protected:
  void SetUp() override {
    backend_ = GetParam().make(dir_);
    if (IsSkipped()) return;
    ASSERT_NE(backend_, nullptr) << "factory " << GetParam().name << " made no backend";
    if (read_only()) {
      auto seeded = std::make_unique<SeededBackend>(std::move(backend_), GetParam(), dir_);
      raw_backend_ = &seeded->raw();
      backend_ = std::move(seeded);
    } else {
      raw_backend_ = backend_.get();
    }
  }
  server::Backend& backend() { return *backend_; }
  // The backend itself, without the suite's seeding of read-only backends.
  server::Backend& raw_backend() { return *raw_backend_; }
  bool read_only() const { return static_cast<bool>(GetParam().seed); }
  TempDir& dir() { return dir_; }

 private:
  TempDir dir_;
  std::unique_ptr<server::Backend> backend_;
  server::Backend* raw_backend_ = nullptr;
};

// Skips a test of writes, deletes or conditions on a read-only backend, saying why.
#define CHUNKD_SKIP_IF_READ_ONLY()                                                         \
  if (read_only()) {                                                                       \
    GTEST_SKIP() << GetParam().name                                                        \
                 << " is a read-only backend: this test needs its own writes, deletes or " \
                    "conditions";                                                          \
  }

}  // namespace chunkd::testing

#endif  // CHUNKD_TESTS_UNIT_BACKEND_CONFORMANCE_H_
