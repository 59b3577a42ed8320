// The backend conformance suite (see backend_conformance.h), instantiated here for the file and
// memory backends and for Backend's default methods (http and s3 instantiate it in their own
// test files). Every test states behaviour of the Backend interface, never of one backend.
#include <algorithm>
#include <atomic>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "buffer/cpu/buffer.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/backend/backend.h"
#include "server/backend/file/file_backend.h"
#include "server/backend/memory/memory_backend.h"
#include "tests/support/test_support.h"
#include "tests/unit/backend_conformance.h"

namespace chunkd::testing {
namespace {

using buffer::cpu::Buffer;
using server::Backend;
using server::Conditions;
using server::Generation;
using server::ListPage;
using server::ValueInfo;
using ::testing::ElementsAre;
using ::testing::ElementsAreArray;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

Conditions Match(Generation g) {
  Conditions c;
  c.if_generation_match = g;
  return c;
}
Conditions NotMatch(Generation g) {
  Conditions c;
  c.if_generation_not_match = g;
  return c;
}

absl::StatusOr<ValueInfo> Put(Backend& b, const std::string& key, const std::string& value,
                              const Conditions& conditions = {}) {
  return b.Write(key, Buffer::CopyOf(value), conditions);
}

// The value under `key` as a string; fills `info`.
absl::StatusOr<std::string> Get(Backend& b, const std::string& key, ValueInfo* info = nullptr) {
  ValueInfo local;
  auto v = b.Read(key, &local);
  if (!v.ok()) return v.status();
  if (info) *info = local;
  EXPECT_EQ(local.size, v->size()) << key;
  return std::string(v->view());
}

struct Listing {
  std::vector<std::pair<std::string, uint64_t>> entries;
  std::vector<std::string> prefixes;
  int pages = 0;
  std::vector<std::string> Keys() const {
    std::vector<std::string> keys;
    for (const auto& e : entries) keys.push_back(e.first);
    return keys;
  }
};

// Walks a whole listing, `max_items` per page.
Listing ListAll(Backend& b, const std::string& prefix, bool directory, size_t max_items = 1000) {
  Listing out;
  auto cursor = b.List(prefix, directory);
  EXPECT_TRUE(cursor.ok()) << cursor.status();
  if (!cursor.ok()) return out;
  for (int guard = 0; guard < 10000; ++guard) {
    ListPage page;
    auto more = (*cursor)->Next(max_items, &page);
    EXPECT_TRUE(more.ok()) << more.status();
    if (!more.ok()) return out;
    ++out.pages;
    for (auto& e : page.entries) out.entries.emplace_back(std::move(e.key), e.size);
    for (auto& p : page.prefixes) out.prefixes.push_back(std::move(p));
    if (!*more) {
      // An exhausted cursor stays exhausted.
      ListPage after;
      auto again = (*cursor)->Next(max_items, &after);
      EXPECT_TRUE(again.ok() && !*again && after.entries.empty() && after.prefixes.empty())
          << "Next after the end returned more";
      return out;
    }
  }
  ADD_FAILURE() << "listing of '" << prefix << "' never ended";
  return out;
}

// What a listing must return for `keys` (key -> size): the reference model of the interface.
Listing Expected(const std::map<std::string, uint64_t>& keys, const std::string& prefix,
                 bool directory) {
  Listing out;
  std::set<std::string> prefixes;
  for (const auto& [key, size] : keys) {
    if (!absl::StartsWith(key, prefix)) continue;
    size_t slash = directory ? key.find('/', prefix.size()) : std::string::npos;
    if (slash == std::string::npos) {
      out.entries.emplace_back(key, size);
    } else {
      prefixes.insert(key.substr(0, slash + 1));
    }
  }
  out.prefixes.assign(prefixes.begin(), prefixes.end());
  return out;
}

void ExpectListing(Backend& b, const std::map<std::string, uint64_t>& keys,
                   const std::string& prefix, bool directory, size_t max_items) {
  SCOPED_TRACE(absl::StrCat("prefix '", prefix, "'", directory ? " (directory)" : "", ", ",
                            max_items, " per page"));
  Listing got = ListAll(b, prefix, directory, max_items);
  Listing want = Expected(keys, prefix, directory);
  EXPECT_EQ(got.entries, want.entries);
  EXPECT_EQ(got.prefixes, want.prefixes);
}

TEST_P(BackendConformanceTest, DescribesItself) {
  EXPECT_FALSE(backend().kind().empty());
  EXPECT_FALSE(backend().location().empty());
}

TEST_P(BackendConformanceTest, ReadMissingIsNotFoundNamingTheKey) {
  auto r = backend().Read("arr/c/0/0", nullptr);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound) << r.status();
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("arr/c/0/0"));
  auto s = backend().Stat("arr/c/0/0");
  EXPECT_EQ(s.status().code(), absl::StatusCode::kNotFound) << s.status();
  EXPECT_THAT(std::string(s.status().message()), HasSubstr("arr/c/0/0"));

  ASSERT_TRUE(Put(backend(), "arr/c/0/1", "x").ok());
  // Siblings, the "directory" of a key and paths below a value are not values either.
  EXPECT_EQ(backend().Read("arr/c/0/0", nullptr).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(backend().Read("arr/c/0", nullptr).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(backend().Read("arr", nullptr).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(backend().Read("arr/c/0/1/x", nullptr).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(backend().Stat("arr/c").status().code(), absl::StatusCode::kNotFound);
}

TEST_P(BackendConformanceTest, RoundTripOfManySizes) {
  for (size_t size : {size_t{0}, size_t{1}, size_t{4096}, size_t{(1 << 20) + 1}}) {
    std::string key = absl::StrCat("arr/c/", size);
    std::string value = RandomBytes(size, size + 1);
    auto info = Put(backend(), key, value);
    ASSERT_TRUE(info.ok()) << size << ": " << info.status();
    EXPECT_EQ(info->size, size);
    EXPECT_NE(info->generation, 0u);
    ValueInfo read_info;
    auto read = Get(backend(), key, &read_info);
    ASSERT_TRUE(read.ok()) << size << ": " << read.status();
    EXPECT_EQ(read->size(), size);
    EXPECT_TRUE(*read == value) << "value of " << size << " bytes differs";
    EXPECT_EQ(read_info.size, size);
    EXPECT_EQ(read_info.generation, info->generation);
    auto stat = backend().Stat(key);
    ASSERT_TRUE(stat.ok()) << stat.status();
    EXPECT_EQ(stat->size, size);
    EXPECT_EQ(stat->generation, info->generation);
  }
}

TEST_P(BackendConformanceTest, UnusualButValidKeys) {
  for (const std::string key :
       {"température/c/0", ".zarray", "a/.zattrs", "x y/z", "arr/zarr.json", "..a", "a..b/c"}) {
    auto info = Put(backend(), key, key + "!");
    ASSERT_TRUE(info.ok()) << key << ": " << info.status();
    auto read = Get(backend(), key);
    ASSERT_TRUE(read.ok()) << key << ": " << read.status();
    EXPECT_EQ(*read, key + "!");
  }
  Listing all = ListAll(backend(), "", false);
  if (GetParam().lists_dot_names) {
    EXPECT_THAT(all.Keys(), ElementsAre("..a", ".zarray", "a..b/c", "a/.zattrs", "arr/zarr.json",
                                        "température/c/0", "x y/z"));
  } else {
    EXPECT_THAT(all.Keys(), ElementsAre("a..b/c", "arr/zarr.json", "température/c/0", "x y/z"));
  }
}

TEST_P(BackendConformanceTest, RangedReads) {
  std::string value = RandomBytes(100000, 7);
  auto written = Put(backend(), "arr/c/0", value);
  ASSERT_TRUE(written.ok()) << written.status();
  struct Case {
    uint64_t offset, length;
    size_t want_start, want_size;
  };
  const uint64_t kToEnd = Backend::kToEnd;
  for (const Case& c :
       {Case{0, kToEnd, 0, 100000}, Case{0, 10, 0, 10}, Case{5, 1000, 5, 1000},
        Case{99990, 100, 99990, 10}, Case{50000, kToEnd, 50000, 50000}, Case{100000, 10, 0, 0},
        Case{200000, kToEnd, 0, 0}, Case{7, 0, 0, 0}, Case{1, kToEnd - 1, 1, 99999}}) {
    SCOPED_TRACE(absl::StrCat("offset ", c.offset, " length ", c.length));
    ValueInfo info;
    auto got = backend().ReadRange("arr/c/0", c.offset, c.length, &info);
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(got->size(), c.want_size);
    EXPECT_TRUE(got->view() == std::string_view(value).substr(c.want_start, c.want_size));
    EXPECT_EQ(info.size, 100000u);
    EXPECT_EQ(info.generation, written->generation);
  }
  auto missing = backend().ReadRange("arr/c/1", 0, 10, nullptr);
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound) << missing.status();
  auto empty = Put(backend(), "arr/empty", "");
  ASSERT_TRUE(empty.ok()) << empty.status();
  ValueInfo info;
  auto none = backend().ReadRange("arr/empty", 0, 10, &info);
  ASSERT_TRUE(none.ok()) << none.status();
  EXPECT_EQ(none->size(), 0u);
  EXPECT_EQ(info.size, 0u);
}

// The last N bytes, with the whole value's size, generation and etag (what a reader of a
// shard's index asks for before it knows the size).
TEST_P(BackendConformanceTest, SuffixReads) {
  std::string value = RandomBytes(100000, 11);
  auto written = Put(backend(), "arr/shard", value);
  ASSERT_TRUE(written.ok()) << written.status();
  auto stat = backend().Stat("arr/shard");
  ASSERT_TRUE(stat.ok()) << stat.status();
  for (uint64_t length : {uint64_t{10}, uint64_t{99999}, uint64_t{100000}, uint64_t{100001},
                          uint64_t{1} << 40, Backend::kToEnd, uint64_t{0}}) {
    SCOPED_TRACE(absl::StrCat("length ", length));
    ValueInfo info;
    auto got = backend().ReadSuffix("arr/shard", length, &info);
    ASSERT_TRUE(got.ok()) << got.status();
    size_t want = static_cast<size_t>(std::min<uint64_t>(length, value.size()));
    EXPECT_EQ(got->size(), want);
    EXPECT_TRUE(got->view() == std::string_view(value).substr(value.size() - want));
    EXPECT_EQ(info.size, 100000u);
    EXPECT_EQ(info.generation, written->generation);
    EXPECT_EQ(info.etag, stat->etag);
  }
  // `info` may be left out.
  auto no_info = backend().ReadSuffix("arr/shard", 3, nullptr);
  ASSERT_TRUE(no_info.ok()) << no_info.status();
  EXPECT_TRUE(no_info->view() == std::string_view(value).substr(value.size() - 3));

  auto empty = Put(backend(), "arr/empty", "");
  ASSERT_TRUE(empty.ok()) << empty.status();
  for (uint64_t length : {uint64_t{0}, uint64_t{10}, Backend::kToEnd}) {
    SCOPED_TRACE(absl::StrCat("empty value, length ", length));
    ValueInfo info;
    auto none = backend().ReadSuffix("arr/empty", length, &info);
    ASSERT_TRUE(none.ok()) << none.status();
    EXPECT_EQ(none->size(), 0u);
    EXPECT_EQ(info.size, 0u);
    EXPECT_EQ(info.generation, empty->generation);
  }

  auto missing = backend().ReadSuffix("arr/none", 10, nullptr);
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound) << missing.status();
  EXPECT_THAT(std::string(missing.status().message()), HasSubstr("arr/none"));
}

// Ranges of one stored version: the pieces of a value read by several calls are never of two
// versions. Each replacement changes the size, so that stores whose validator is coarse in
// time (nginx's ETag: mtime in seconds and size) see it too.
TEST_P(BackendConformanceTest, RangeReadsOfOneVersion) {
  std::string v1 = RandomBytes(3000, 21);
  auto written = Put(backend(), "arr/shard", v1);
  ASSERT_TRUE(written.ok()) << written.status();
  // The first piece's info is what the later pieces ask for.
  ValueInfo first;
  auto head = backend().ReadRange("arr/shard", 0, 100, &first);
  ASSERT_TRUE(head.ok()) << head.status();
  EXPECT_EQ(first.generation, written->generation);
  auto stat = backend().Stat("arr/shard");
  ASSERT_TRUE(stat.ok()) << stat.status();
  EXPECT_EQ(first.etag, stat->etag);

  struct Case {
    uint64_t offset, length;
    size_t want_start, want_size;
  };
  for (const Case& c :
       {Case{100, 900, 100, 900}, Case{2990, 100, 2990, 10}, Case{0, Backend::kToEnd, 0, 3000},
        Case{3000, 10, 0, 0}, Case{5, 0, 0, 0}}) {
    SCOPED_TRACE(absl::StrCat("offset ", c.offset, " length ", c.length));
    ValueInfo info;
    auto got = backend().ReadRangeIfMatch("arr/shard", c.offset, c.length, first, &info);
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(got->size(), c.want_size);
    EXPECT_TRUE(got->view() == std::string_view(v1).substr(c.want_start, c.want_size));
    EXPECT_EQ(info.size, 3000u);
    EXPECT_EQ(info.generation, first.generation);
  }
  // A suffix read's info serves as well.
  ValueInfo from_suffix;
  ASSERT_TRUE(backend().ReadSuffix("arr/shard", 16, &from_suffix).ok());
  EXPECT_TRUE(backend().ReadRangeIfMatch("arr/shard", 0, 16, from_suffix, nullptr).ok());

  // Replaced: the old version's pieces are refused, whatever the range; the new ones read.
  std::string v2 = RandomBytes(4500, 22);
  auto rewritten = Put(backend(), "arr/shard", v2);
  ASSERT_TRUE(rewritten.ok()) << rewritten.status();
  for (const Case& c :
       {Case{100, 900, 0, 0}, Case{4000, 100, 0, 0}, Case{9000, 10, 0, 0}, Case{5, 0, 0, 0}}) {
    SCOPED_TRACE(absl::StrCat("old version, offset ", c.offset, " length ", c.length));
    auto stale = backend().ReadRangeIfMatch("arr/shard", c.offset, c.length, first, nullptr);
    EXPECT_EQ(stale.status().code(), absl::StatusCode::kAborted) << stale.status();
    EXPECT_THAT(std::string(stale.status().message()), HasSubstr("arr/shard"));
    EXPECT_THAT(std::string(stale.status().message()), HasSubstr("changed"));
  }
  ValueInfo second;
  ASSERT_TRUE(backend().ReadRange("arr/shard", 0, 1, &second).ok());
  EXPECT_NE(second.generation, first.generation);
  ValueInfo info;
  auto fresh = backend().ReadRangeIfMatch("arr/shard", 4000, 1000, second, &info);
  ASSERT_TRUE(fresh.ok()) << fresh.status();
  EXPECT_TRUE(fresh->view() == std::string_view(v2).substr(4000, 500));
  EXPECT_EQ(info.size, 4500u);
  EXPECT_EQ(info.generation, second.generation);

  auto missing = backend().ReadRangeIfMatch("arr/none", 0, 10, second, nullptr);
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound) << missing.status();
  EXPECT_THAT(std::string(missing.status().message()), HasSubstr("arr/none"));
  if (read_only()) return;  // the suite cannot remove values behind a read-only backend
  ASSERT_TRUE(backend().Delete("arr/shard", {}).ok());
  auto deleted = backend().ReadRangeIfMatch("arr/shard", 0, 10, second, nullptr);
  EXPECT_EQ(deleted.status().code(), absl::StatusCode::kNotFound) << deleted.status();
}

TEST_P(BackendConformanceTest, ReadOnlyBackendRefusesWrites) {
  if (!read_only()) {
    GTEST_SKIP() << GetParam().name << " is not read-only";
  }
  ASSERT_TRUE(Put(backend(), "k", "seeded").ok());
  auto w = raw_backend().Write("k", Buffer::CopyOf("new"), {});
  EXPECT_EQ(w.status().code(), absl::StatusCode::kPermissionDenied) << w.status();
  EXPECT_THAT(std::string(w.status().message()), HasSubstr("\"k\""));
  w = raw_backend().Write("fresh", Buffer::CopyOf("new"), Match(0));
  EXPECT_EQ(w.status().code(), absl::StatusCode::kPermissionDenied) << w.status();
  absl::Status d = raw_backend().Delete("k", {});
  EXPECT_EQ(d.code(), absl::StatusCode::kPermissionDenied) << d;
  EXPECT_EQ(*Get(backend(), "k"), "seeded");
  EXPECT_EQ(backend().Stat("fresh").status().code(), absl::StatusCode::kNotFound);
}

TEST_P(BackendConformanceTest, OverwriteChangesGeneration) {
  CHUNKD_SKIP_IF_READ_ONLY();
  std::set<Generation> seen;
  Generation previous = 0;
  for (int i = 0; i < 20; ++i) {
    // Same size every time: the generation must still change.
    std::string value = absl::StrCat("value-", i % 10, "-", i / 10);
    auto info = Put(backend(), "k", value);
    ASSERT_TRUE(info.ok()) << info.status();
    EXPECT_NE(info->generation, 0u);
    EXPECT_NE(info->generation, previous);
    EXPECT_TRUE(seen.insert(info->generation).second) << "generation reused at write " << i;
    previous = info->generation;
    ValueInfo read_info;
    auto read = Get(backend(), "k", &read_info);
    ASSERT_TRUE(read.ok());
    EXPECT_EQ(*read, value);
    EXPECT_EQ(read_info.generation, info->generation);
  }
  // Rewriting identical bytes is a new version too.
  auto a = Put(backend(), "same", "bytes");
  auto b = Put(backend(), "same", "bytes");
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_NE(a->generation, b->generation);
}

// Freshness: a cached copy (a Read's value and info, validator included) can be checked against
// the store. Unchanged: IsCurrent true, ReadIfChanged nothing; replaced: false, the new value and
// its info; removed: false, NOT_FOUND. Each replacement changes the size, so that stores whose
// validator is coarse in time (nginx's ETag: mtime in seconds and size) see it too.
TEST_P(BackendConformanceTest, ValidatesACachedCopy) {
  ASSERT_TRUE(Put(backend(), "a/k", "first").ok());
  ValueInfo cached;
  ASSERT_TRUE(Get(backend(), "a/k", &cached).ok());
  auto current = backend().IsCurrent("a/k", cached);
  ASSERT_TRUE(current.ok()) << current.status();
  EXPECT_TRUE(*current);
  ValueInfo info;
  auto same = backend().ReadIfChanged("a/k", cached, &info);
  ASSERT_TRUE(same.ok()) << same.status();
  EXPECT_FALSE(same->has_value());

  ASSERT_TRUE(Put(backend(), "a/k", "second, longer").ok());
  current = backend().IsCurrent("a/k", cached);
  ASSERT_TRUE(current.ok()) << current.status();
  EXPECT_FALSE(*current);
  auto changed = backend().ReadIfChanged("a/k", cached, &info);
  ASSERT_TRUE(changed.ok()) << changed.status();
  ASSERT_TRUE(changed->has_value());
  EXPECT_EQ((*changed)->view(), "second, longer");
  EXPECT_EQ(info.size, 14u);
  auto stat = backend().Stat("a/k");
  ASSERT_TRUE(stat.ok()) << stat.status();
  EXPECT_EQ(info.generation, stat->generation);
  EXPECT_NE(info.generation, cached.generation);
  // The new copy is current in turn.
  EXPECT_TRUE(*backend().IsCurrent("a/k", info));

  // A key never stored is no copy's current version.
  current = backend().IsCurrent("never/stored", cached);
  ASSERT_TRUE(current.ok()) << current.status();
  EXPECT_FALSE(*current);
  if (read_only()) return;  // the suite cannot remove values behind a read-only backend
  ASSERT_TRUE(backend().Delete("a/k", {}).ok());
  EXPECT_FALSE(*backend().IsCurrent("a/k", info));
  EXPECT_EQ(backend().ReadIfChanged("a/k", info, nullptr).status().code(),
            absl::StatusCode::kNotFound);
}

TEST_P(BackendConformanceTest, StatAgreesWithRead) {
  ASSERT_TRUE(Put(backend(), "a/b/c", std::string(12345, 'q')).ok());
  ValueInfo read_info;
  ASSERT_TRUE(Get(backend(), "a/b/c", &read_info).ok());
  auto stat = backend().Stat("a/b/c");
  ASSERT_TRUE(stat.ok()) << stat.status();
  EXPECT_EQ(stat->size, 12345u);
  EXPECT_EQ(stat->size, read_info.size);
  EXPECT_EQ(stat->generation, read_info.generation);
  // Stable while nothing changes.
  auto again = backend().Stat("a/b/c");
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->generation, stat->generation);
}

TEST_P(BackendConformanceTest, CreateOnlyWithGenerationMatchZero) {
  CHUNKD_SKIP_IF_READ_ONLY();
  auto first = Put(backend(), "k", "first", Match(0));
  ASSERT_TRUE(first.ok()) << first.status();
  auto second = Put(backend(), "k", "second", Match(0));
  EXPECT_EQ(second.status().code(), absl::StatusCode::kFailedPrecondition) << second.status();
  EXPECT_THAT(std::string(second.status().message()), HasSubstr("\"k\""));
  ValueInfo info;
  auto read = Get(backend(), "k", &info);
  ASSERT_TRUE(read.ok());
  EXPECT_EQ(*read, "first");
  EXPECT_EQ(info.generation, first->generation);
}

TEST_P(BackendConformanceTest, GenerationMatchAndNotMatch) {
  CHUNKD_SKIP_IF_READ_ONLY();
  auto v1 = Put(backend(), "k", "v1");
  ASSERT_TRUE(v1.ok());
  // Wrong generation: refused, nothing changes.
  auto wrong = Put(backend(), "k", "nope", Match(v1->generation + 1));
  EXPECT_EQ(wrong.status().code(), absl::StatusCode::kFailedPrecondition) << wrong.status();
  EXPECT_EQ(*Get(backend(), "k"), "v1");
  // Right generation: replaced.
  auto v2 = Put(backend(), "k", "v2", Match(v1->generation));
  ASSERT_TRUE(v2.ok()) << v2.status();
  EXPECT_NE(v2->generation, v1->generation);
  EXPECT_EQ(*Get(backend(), "k"), "v2");
  // The old generation no longer matches.
  auto stale = Put(backend(), "k", "stale", Match(v1->generation));
  EXPECT_EQ(stale.status().code(), absl::StatusCode::kFailedPrecondition) << stale.status();
  EXPECT_EQ(*Get(backend(), "k"), "v2");
  // not_match the current generation: refused.
  auto same = Put(backend(), "k", "same", NotMatch(v2->generation));
  EXPECT_EQ(same.status().code(), absl::StatusCode::kFailedPrecondition) << same.status();
  EXPECT_EQ(*Get(backend(), "k"), "v2");
  // not_match another generation: written.
  auto v3 = Put(backend(), "k", "v3", NotMatch(v1->generation));
  ASSERT_TRUE(v3.ok()) << v3.status();
  EXPECT_EQ(*Get(backend(), "k"), "v3");
  // not_match 0 means "must exist": fine here.
  auto v4 = Put(backend(), "k", "v4", NotMatch(0));
  ASSERT_TRUE(v4.ok()) << v4.status();
  EXPECT_EQ(*Get(backend(), "k"), "v4");
  // Both conditions at once.
  Conditions both = Match(v4->generation);
  both.if_generation_not_match = v4->generation;
  EXPECT_EQ(Put(backend(), "k", "v5", both).status().code(), absl::StatusCode::kFailedPrecondition);
  both.if_generation_not_match = v1->generation;
  EXPECT_TRUE(Put(backend(), "k", "v5", both).ok());
  EXPECT_EQ(*Get(backend(), "k"), "v5");
}

TEST_P(BackendConformanceTest, ConditionsOnAbsentKey) {
  CHUNKD_SKIP_IF_READ_ONLY();
  // A nonzero match on an absent key fails and creates nothing.
  auto r = Put(backend(), "dir/k", "x", Match(12345));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition) << r.status();
  EXPECT_EQ(backend().Stat("dir/k").status().code(), absl::StatusCode::kNotFound);
  // not_match 0 ("must exist") on an absent key fails.
  r = Put(backend(), "dir/k", "x", NotMatch(0));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition) << r.status();
  EXPECT_EQ(backend().Stat("dir/k").status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(ListAll(backend(), "", false).entries, IsEmpty());
  EXPECT_THAT(ListAll(backend(), "", true).prefixes, IsEmpty());
  // not_match some generation on an absent key succeeds.
  r = Put(backend(), "dir/k", "x", NotMatch(12345));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(*Get(backend(), "dir/k"), "x");
}

TEST_P(BackendConformanceTest, DeleteMissingIsNotFound) {
  CHUNKD_SKIP_IF_READ_ONLY();
  absl::Status s = backend().Delete("no/such/key", {});
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("no/such/key"));
  ASSERT_TRUE(Put(backend(), "no/other", "x").ok());
  EXPECT_EQ(backend().Delete("no/such/key", {}).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(backend().Delete("no", {}).code(), absl::StatusCode::kNotFound);  // a "directory"
  EXPECT_EQ(*Get(backend(), "no/other"), "x");
}

TEST_P(BackendConformanceTest, DeleteWithConditions) {
  CHUNKD_SKIP_IF_READ_ONLY();
  auto v = Put(backend(), "k", "keep me");
  ASSERT_TRUE(v.ok());
  absl::Status s = backend().Delete("k", Match(v->generation + 1));
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_EQ(*Get(backend(), "k"), "keep me");
  s = backend().Delete("k", NotMatch(v->generation));
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_EQ(*Get(backend(), "k"), "keep me");
  s = backend().Delete("k", Match(0));
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_EQ(*Get(backend(), "k"), "keep me");

  ASSERT_TRUE(backend().Delete("k", Match(v->generation)).ok());
  EXPECT_EQ(backend().Read("k", nullptr).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(backend().Stat("k").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(backend().Delete("k", {}).code(), absl::StatusCode::kNotFound);
  // Unconditional delete, and the key can be written again afterwards.
  ASSERT_TRUE(Put(backend(), "k", "again").ok());
  ASSERT_TRUE(backend().Delete("k", {}).ok());
  ASSERT_TRUE(Put(backend(), "k", "once more", Match(0)).ok());
  EXPECT_EQ(*Get(backend(), "k"), "once more");
}

// Keys whose order tests the place of '/' among its neighbours ('-' < '.' < '/' < '0').
const std::vector<std::string>& TrickyKeys() {
  static const auto* keys = new std::vector<std::string>{
      "A",         "a-",        "a.b",       "a/b",        "a/c/d",   "a0",
      "arr/c/0/0", "arr/c/1/0", "arr/c/1/1", "arr/c/10/0", "arr/c/2", "arr/zarr.json",
      "b",         "b/x",       "b-",        "z/y/x/w"};
  return *keys;
}

std::map<std::string, uint64_t> WriteKeys(Backend& b, const std::vector<std::string>& keys) {
  std::map<std::string, uint64_t> written;
  // Written in reverse order, so that a backend returning insertion order fails.
  for (auto it = keys.rbegin(); it != keys.rend(); ++it) {
    std::string value = RandomBytes(it->size() * 3, it->size());
    auto info = Put(b, *it, value);
    EXPECT_TRUE(info.ok()) << *it << ": " << info.status();
    written[*it] = value.size();
  }
  return written;
}

TEST_P(BackendConformanceTest, ListRecursiveIsLexicographic) {
  // "b" and "b/x" cannot both exist in a directory tree; drop "b".
  std::vector<std::string> keys;
  for (const std::string& k : TrickyKeys()) {
    if (k != "b") keys.push_back(k);
  }
  auto written = WriteKeys(backend(), keys);
  Listing all = ListAll(backend(), "", false);
  EXPECT_THAT(all.Keys(), ElementsAre("A", "a-", "a.b", "a/b", "a/c/d", "a0", "arr/c/0/0",
                                      "arr/c/1/0", "arr/c/1/1", "arr/c/10/0", "arr/c/2",
                                      "arr/zarr.json", "b-", "b/x", "z/y/x/w"));
  EXPECT_THAT(all.prefixes, IsEmpty());
  for (const auto& [key, size] : all.entries) EXPECT_EQ(size, written[key]) << key;
  ExpectListing(backend(), written, "", false, 1000);
}

TEST_P(BackendConformanceTest, ListPrefixFiltering) {
  std::vector<std::string> keys;
  for (const std::string& k : TrickyKeys()) {
    if (k != "b") keys.push_back(k);
  }
  auto written = WriteKeys(backend(), keys);
  EXPECT_THAT(ListAll(backend(), "arr/c/1", false).Keys(),
              ElementsAre("arr/c/1/0", "arr/c/1/1", "arr/c/10/0"));
  EXPECT_THAT(ListAll(backend(), "arr/c/1/", false).Keys(), ElementsAre("arr/c/1/0", "arr/c/1/1"));
  EXPECT_THAT(ListAll(backend(), "a/", false).Keys(), ElementsAre("a/b", "a/c/d"));
  EXPECT_THAT(ListAll(backend(), "a", false).Keys(),
              ElementsAre("a-", "a.b", "a/b", "a/c/d", "a0", "arr/c/0/0", "arr/c/1/0", "arr/c/1/1",
                          "arr/c/10/0", "arr/c/2", "arr/zarr.json"));
  EXPECT_THAT(ListAll(backend(), "arr/zarr.json", false).Keys(), ElementsAre("arr/zarr.json"));
  EXPECT_THAT(ListAll(backend(), "arr/zarr.json/", false).Keys(), IsEmpty());
  EXPECT_THAT(ListAll(backend(), "nothing/", false).Keys(), IsEmpty());
  EXPECT_THAT(ListAll(backend(), "nothing", false).Keys(), IsEmpty());
  EXPECT_THAT(ListAll(backend(), "z/y/", false).Keys(), ElementsAre("z/y/x/w"));
  for (const std::string prefix : {"", "a", "a/", "a.", "a/c", "arr/", "arr/c/", "arr/c/1",
                                   "arr/c/10", "b", "b-", "z/", "zz", "A"}) {
    ExpectListing(backend(), written, prefix, false, 1000);
    ExpectListing(backend(), written, prefix, true, 1000);
  }
}

TEST_P(BackendConformanceTest, ListPaging) {
  const std::vector<std::string> keys = {"p/1", "p/2/a", "p/3", "p/4/b/c", "p/5", "p/6", "p/7"};
  auto written = WriteKeys(backend(), keys);
  ASSERT_TRUE(Put(backend(), "q", "outside the prefix").ok());
  ASSERT_TRUE(Put(backend(), "o", "outside the prefix").ok());
  Listing two = ListAll(backend(), "p/", false, 2);
  EXPECT_THAT(two.Keys(), ElementsAreArray(keys));
  EXPECT_GE(two.pages, 4);  // 7 keys, 2 per page
  for (size_t per_page : {1, 3, 7, 8}) {
    Listing l = ListAll(backend(), "p/", false, per_page);
    EXPECT_THAT(l.Keys(), ElementsAreArray(keys)) << per_page << " per page";
  }
  // Directory listings page too: entries p/1 p/3 p/5 p/6 p/7, prefixes p/2/ p/4/.
  for (size_t per_page : {1, 2, 3, 100}) {
    ExpectListing(backend(), written, "p/", true, per_page);
  }
  // The whole store, one item per page.
  written["q"] = 18;
  written["o"] = 18;
  ExpectListing(backend(), written, "", false, 1);
  ExpectListing(backend(), written, "", true, 1);
}

TEST_P(BackendConformanceTest, ListEmpty) {
  Listing l = ListAll(backend(), "", false);
  EXPECT_THAT(l.entries, IsEmpty());
  l = ListAll(backend(), "", true);
  EXPECT_THAT(l.entries, IsEmpty());
  EXPECT_THAT(l.prefixes, IsEmpty());
  EXPECT_THAT(ListAll(backend(), "x/", true).prefixes, IsEmpty());
}

TEST_P(BackendConformanceTest, ListDirectory) {
  auto written = WriteKeys(backend(), {"a/x", "a/y/z", "b/q", "top", "arr/zarr.json", "arr/c/0/0",
                                       "arr/c/1/0", "arr/c/1/1", "zeta.json"});
  Listing root = ListAll(backend(), "", true);
  EXPECT_THAT(root.Keys(), ElementsAre("top", "zeta.json"));
  EXPECT_THAT(root.prefixes, ElementsAre("a/", "arr/", "b/"));
  for (const auto& [key, size] : root.entries) EXPECT_EQ(size, written[key]) << key;

  Listing arr = ListAll(backend(), "arr/", true);
  EXPECT_THAT(arr.Keys(), ElementsAre("arr/zarr.json"));
  EXPECT_THAT(arr.prefixes, ElementsAre("arr/c/"));
  Listing chunks = ListAll(backend(), "arr/c/", true);
  EXPECT_THAT(chunks.Keys(), IsEmpty());
  EXPECT_THAT(chunks.prefixes, ElementsAre("arr/c/0/", "arr/c/1/"));
  Listing one = ListAll(backend(), "arr/c/1/", true);
  EXPECT_THAT(one.Keys(), ElementsAre("arr/c/1/0", "arr/c/1/1"));
  EXPECT_THAT(one.prefixes, IsEmpty());
  Listing a = ListAll(backend(), "a/", true);
  EXPECT_THAT(a.Keys(), ElementsAre("a/x"));
  EXPECT_THAT(a.prefixes, ElementsAre("a/y/"));
  // A partial name: children of the prefix's directory whose names start with it.
  Listing partial = ListAll(backend(), "a", true);
  EXPECT_THAT(partial.Keys(), IsEmpty());
  EXPECT_THAT(partial.prefixes, ElementsAre("a/", "arr/"));
}

TEST_P(BackendConformanceTest, EmptiedDirectoryDisappearsFromListings) {
  CHUNKD_SKIP_IF_READ_ONLY();
  auto written = WriteKeys(backend(), {"a/x", "a/y/z", "b/q", "top"});
  ASSERT_THAT(ListAll(backend(), "", true).prefixes, ElementsAre("a/", "b/"));
  ASSERT_TRUE(backend().Delete("b/q", {}).ok());
  EXPECT_THAT(ListAll(backend(), "", true).prefixes, ElementsAre("a/"));
  ASSERT_TRUE(backend().Delete("a/y/z", {}).ok());
  Listing a = ListAll(backend(), "a/", true);
  EXPECT_THAT(a.Keys(), ElementsAre("a/x"));
  EXPECT_THAT(a.prefixes, IsEmpty());
  EXPECT_THAT(ListAll(backend(), "", true).prefixes, ElementsAre("a/"));
  ASSERT_TRUE(backend().Delete("a/x", {}).ok());
  Listing root = ListAll(backend(), "", true);
  EXPECT_THAT(root.prefixes, IsEmpty());
  EXPECT_THAT(root.Keys(), ElementsAre("top"));
  EXPECT_THAT(ListAll(backend(), "", false).Keys(), ElementsAre("top"));
  // The emptied "directories" can hold keys again.
  ASSERT_TRUE(Put(backend(), "a/y/z", "back").ok());
  EXPECT_EQ(*Get(backend(), "a/y/z"), "back");
}

TEST_P(BackendConformanceTest, ConcurrentWritersToDifferentKeys) {
  CHUNKD_SKIP_IF_READ_ONLY();
  constexpr int kThreads = 8, kKeysPerThread = 16;
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kKeysPerThread; ++i) {
        // Threads share directories, so that directory creation races too.
        std::string key = absl::StrCat("arr/c/", i % 4, "/", t, "/", i);
        if (!Put(backend(), key, absl::StrCat(key, "=", RandomBytes(100 * i, t * 100 + i))).ok()) {
          failures.fetch_add(1);
        }
      }
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(failures.load(), 0);
  std::map<std::string, uint64_t> expected;
  for (int t = 0; t < kThreads; ++t) {
    for (int i = 0; i < kKeysPerThread; ++i) {
      std::string key = absl::StrCat("arr/c/", i % 4, "/", t, "/", i);
      std::string value = absl::StrCat(key, "=", RandomBytes(100 * i, t * 100 + i));
      auto read = Get(backend(), key);
      ASSERT_TRUE(read.ok()) << key << ": " << read.status();
      EXPECT_TRUE(*read == value) << key;
      expected[key] = value.size();
    }
  }
  ExpectListing(backend(), expected, "", false, 10);
}

TEST_P(BackendConformanceTest, ConcurrentWritersToOneKeyNeverMix) {
  CHUNKD_SKIP_IF_READ_ONLY();
  constexpr int kWriters = 4, kWritesEach = 8;
  // Writer w writes values of its own size, every byte 'A' + w.
  auto size_of = [](int w) { return size_t{64 << 10} + static_cast<size_t>(w) * 4099; };
  ASSERT_TRUE(Put(backend(), "hot", std::string(size_of(0), 'A')).ok());
  std::atomic<bool> stop{false};
  std::atomic<int> torn{0}, failures{0}, reads{0};
  auto check = [&](const std::string& v) {
    if (v.empty()) return false;
    int w = v[0] - 'A';
    if (w < 0 || w >= kWriters || v.size() != size_of(w)) return false;
    return v.find_first_not_of(v[0]) == std::string::npos;
  };
  std::vector<std::thread> threads;
  for (int r = 0; r < 2; ++r) {
    threads.emplace_back([&] {
      while (!stop.load()) {
        auto v = Get(backend(), "hot");
        // A reader may lose a race with a file being replaced, but never sees a mix.
        if (v.ok()) {
          reads.fetch_add(1);
          if (!check(*v)) torn.fetch_add(1);
        } else if (!absl::IsAborted(v.status())) {
          failures.fetch_add(1);
        }
      }
    });
  }
  std::vector<std::thread> writers;
  for (int w = 0; w < kWriters; ++w) {
    writers.emplace_back([&, w] {
      for (int i = 0; i < kWritesEach; ++i) {
        if (!Put(backend(), "hot", std::string(size_of(w), static_cast<char>('A' + w))).ok()) {
          failures.fetch_add(1);
        }
      }
    });
  }
  for (std::thread& t : writers) t.join();
  stop = true;
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(torn.load(), 0);
  EXPECT_EQ(failures.load(), 0);
  EXPECT_GT(reads.load(), 0);
  ValueInfo info;
  auto last = Get(backend(), "hot", &info);
  ASSERT_TRUE(last.ok());
  EXPECT_TRUE(check(*last));
  auto stat = backend().Stat("hot");
  ASSERT_TRUE(stat.ok());
  EXPECT_EQ(stat->generation, info.generation);
  EXPECT_THAT(ListAll(backend(), "", false).Keys(), ElementsAre("hot"));
}

TEST_P(BackendConformanceTest, ConcurrentCreateOnlyHasOneWinner) {
  CHUNKD_SKIP_IF_READ_ONLY();
  constexpr int kThreads = 8;
  std::atomic<int> won{0}, lost{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      auto r = Put(backend(), "lock", absl::StrCat("owner ", t), Match(0));
      if (r.ok()) {
        won.fetch_add(1);
      } else if (absl::IsFailedPrecondition(r.status())) {
        lost.fetch_add(1);
      }
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(won.load(), 1);
  EXPECT_EQ(lost.load(), kThreads - 1);
}

TEST_P(BackendConformanceTest, ConcurrentWriteAndDeleteInOneDirectory) {
  CHUNKD_SKIP_IF_READ_ONLY();
  // One thread keeps writing a key while another creates and deletes a sibling (which may
  // empty and remove their shared "directory"): every write must succeed.
  std::atomic<bool> stop{false};
  std::atomic<int> failures{0};
  std::thread churn([&] {
    while (!stop.load()) {
      if (!Put(backend(), "grp/sub/churn", "x").ok()) failures.fetch_add(1);
      if (!backend().Delete("grp/sub/churn", {}).ok()) failures.fetch_add(1);
    }
  });
  for (int i = 0; i < 50; ++i) {
    auto r = Put(backend(), absl::StrCat("grp/sub/k", i % 3), absl::StrCat("v", i));
    EXPECT_TRUE(r.ok()) << i << ": " << r.status();
    if (i % 3 == 2) {
      for (int k = 0; k < 3; ++k) {
        absl::Status d = backend().Delete(absl::StrCat("grp/sub/k", k), {});
        EXPECT_TRUE(d.ok()) << d;
      }
    }
  }
  stop = true;
  churn.join();
  EXPECT_EQ(failures.load(), 0);
}

// The backends of this repository.
std::unique_ptr<Backend> MakeFileBackend(TempDir& dir) {
  auto backend = server::OpenFileBackend(dir.path(), server::BackendOptions{});
  EXPECT_TRUE(backend.ok()) << backend.status();
  return backend.ok() ? *std::move(backend) : nullptr;
}

std::unique_ptr<Backend> MakeMemoryBackend(TempDir&) {
  return server::NewMemoryBackend(server::BackendOptions{});
}

// Only what every backend must implement, over a memory backend: the rest (ReadRange,
// ReadSuffix, ReadRangeIfMatch, IsCurrent, ReadIfChanged) is Backend's defaults, which the
// suite then tests. `after_stat` (when set) runs after each Stat: a writer racing the reads.
class DefaultsBackend final : public Backend {
 public:
  DefaultsBackend() : inner_(server::NewMemoryBackend(server::BackendOptions{})) {}
  absl::string_view kind() const override { return "defaults"; }
  std::string location() const override { return "defaults over memory://"; }
  absl::StatusOr<Buffer> Read(absl::string_view key, ValueInfo* info) override {
    return inner_->Read(key, info);
  }
  absl::StatusOr<ValueInfo> Stat(absl::string_view key) override {
    auto info = inner_->Stat(key);
    ++stats;
    if (after_stat) after_stat();
    return info;
  }
  absl::StatusOr<ValueInfo> Write(absl::string_view key, Buffer value,
                                  const Conditions& conditions) override {
    return inner_->Write(key, std::move(value), conditions);
  }
  absl::Status Delete(absl::string_view key, const Conditions& conditions) override {
    return inner_->Delete(key, conditions);
  }
  absl::StatusOr<std::unique_ptr<server::ListCursor>> List(absl::string_view prefix,
                                                           bool directory) override {
    return inner_->List(prefix, directory);
  }

  std::function<void()> after_stat;
  int stats = 0;

 private:
  std::unique_ptr<Backend> inner_;
};

// The default ReadSuffix is a Stat and then a ReadRange: a value replaced between the two is
// read again once, at its new version, and a value replaced every time fails with ABORTED;
// never the old size's offset into the new bytes.
TEST(BackendDefaultsTest, SuffixReadOfAValueReplacedMeanwhile) {
  DefaultsBackend backend;
  ASSERT_TRUE(Put(backend, "k", "first version").ok());
  backend.after_stat = [&] {
    backend.after_stat = nullptr;  // one racing write
    ASSERT_TRUE(Put(backend, "k", "the second, longer version").ok());
  };
  ValueInfo info;
  auto got = backend.ReadSuffix("k", 7, &info);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->view(), "version");
  EXPECT_EQ(info.size, 26u);
  EXPECT_EQ(backend.stats, 2);

  int writes = 0;
  backend.after_stat = [&] { ASSERT_TRUE(Put(backend, "k", std::string(++writes, 'x')).ok()); };
  auto stale = backend.ReadSuffix("k", 7, &info);
  EXPECT_EQ(stale.status().code(), absl::StatusCode::kAborted) << stale.status();
  EXPECT_THAT(std::string(stale.status().message()), HasSubstr("\"k\""));
  EXPECT_EQ(writes, 2);
}

std::unique_ptr<Backend> MakeDefaultsBackend(TempDir&) {
  return std::make_unique<DefaultsBackend>();
}

INSTANTIATE_TEST_SUITE_P(Defaults, BackendConformanceTest,
                         ::testing::Values(BackendFactory{"defaults", MakeDefaultsBackend}),
                         BackendFactoryName);
INSTANTIATE_TEST_SUITE_P(File, BackendConformanceTest,
                         ::testing::Values(BackendFactory{"file", MakeFileBackend}),
                         BackendFactoryName);
INSTANTIATE_TEST_SUITE_P(Memory, BackendConformanceTest,
                         ::testing::Values(BackendFactory{"memory", MakeMemoryBackend}),
                         BackendFactoryName);

}  // namespace
}  // namespace chunkd::testing
