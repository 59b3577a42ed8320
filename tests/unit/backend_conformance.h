// The conformance suite every store backend passes unchanged (file, memory, and later ones).
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
// ignore), and returns a fresh, empty backend.
#ifndef CHUNKD_TESTS_UNIT_BACKEND_CONFORMANCE_H_
#define CHUNKD_TESTS_UNIT_BACKEND_CONFORMANCE_H_

#include <functional>
#include <memory>
#include <string>

#include "gtest/gtest.h"
#include "server/backend/backend.h"
#include "tests/support/test_support.h"

namespace chunkd::testing {

struct BackendFactory {
  std::string name;  // a test name suffix: letters, digits, '_'
  std::function<std::unique_ptr<server::Backend>(TempDir&)> make;
};

// For INSTANTIATE_TEST_SUITE_P: names each instance after its factory.
inline std::string BackendFactoryName(const ::testing::TestParamInfo<BackendFactory>& info) {
  return info.param.name;
}

// The fixture: `backend()` is a fresh backend made by the factory for each test.
class BackendConformanceTest : public ::testing::TestWithParam<BackendFactory> {
 protected:
  void SetUp() override {
    backend_ = GetParam().make(dir_);
    ASSERT_NE(backend_, nullptr) << "factory " << GetParam().name << " made no backend";
  }
  server::Backend& backend() { return *backend_; }
  TempDir& dir() { return dir_; }

 private:
  TempDir dir_;
  std::unique_ptr<server::Backend> backend_;
};

}  // namespace chunkd::testing

#endif  // CHUNKD_TESTS_UNIT_BACKEND_CONFORMANCE_H_
