// The client's side of shared-memory delivery: ShmImporter maps each segment once, and maps a
// segment recreated under the same name afresh.
#include "buffer/shm_import.h"

#include <fcntl.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include "gtest/gtest.h"

namespace chunkd::buffer {
namespace {

class ShmImportTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char pattern[] = "/dev/shm/chunkd-import-test-XXXXXX";
    ASSERT_NE(::mkdtemp(pattern), nullptr);
    dir_ = pattern;
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  void Write(const std::string& name, char fill, size_t size) {
    std::ofstream(dir_ + "/" + name, std::ios::binary) << std::string(size, fill);
  }

  std::string dir_;
};

TEST_F(ShmImportTest, MapsOnceAndRemapsARecreatedSegment) {
  Write("chunkd-1-0", 'a', 8192);
  ShmImporter importer(dir_);
  int released = 0;
  auto first = importer.Import("chunkd-1-0", 8192, 100, 10, [&] { ++released; });
  ASSERT_TRUE(first.ok()) << first.status();
  auto again = importer.Import("chunkd-1-0", 8192, 0, 8192, [&] { ++released; });
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(importer.mapped_segments(), 1u);
  EXPECT_EQ(first->view(), std::string(10, 'a'));

  // A restarted server (same pid) makes a new file of the same name: the old mapping is stale.
  std::filesystem::remove(dir_ + "/chunkd-1-0");
  Write("chunkd-1-0", 'b', 8192);
  auto fresh = importer.Import("chunkd-1-0", 8192, 0, 4, [&] { ++released; });
  ASSERT_TRUE(fresh.ok());
  EXPECT_EQ(fresh->view(), "bbbb");
  EXPECT_EQ(first->view(), std::string(10, 'a'));  // old buffers keep the old mapping
  *first = cpu::Buffer();
  *again = cpu::Buffer();
  *fresh = cpu::Buffer();
  EXPECT_EQ(released, 3);
}

TEST_F(ShmImportTest, RefusesBadNamesAndShortFiles) {
  Write("chunkd-1-0", 'a', 8192);
  ShmImporter importer(dir_);
  for (const char* bad : {"", "../etc", ".hidden", "a/b"}) {
    EXPECT_FALSE(importer.Import(bad, 8192, 0, 1, nullptr).ok()) << bad;
  }
  EXPECT_FALSE(importer.Import("chunkd-1-0", 1 << 20, 0, 1, nullptr).ok());  // larger than the file
  EXPECT_FALSE(importer.Import("chunkd-1-0", 8192, 8000, 500, nullptr).ok());  // outside it
  EXPECT_FALSE(importer.Import("missing", 8192, 0, 1, nullptr).ok());
}

}  // namespace
}  // namespace chunkd::buffer
