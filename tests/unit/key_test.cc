// Tests of server/common/key.h: which keys and prefixes are accepted, and the messages of refusals.
#include "server/common/key.h"

#include <string>

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace chunkd::server {
namespace {

using ::testing::HasSubstr;

absl::Status Validate(const std::string& key) { return ValidateKey(key); }

TEST(ValidateKeyTest, AcceptsZarrKeys) {
  for (const std::string key :
       {"a", "arr/c/0/1", "arr/zarr.json", ".zarray", "a/.zattrs", "a/b/c/d/e/f/g", "a.b", "..a",
        "a..", "a/...", "x y", "température/c/0", "温度/c/0", "emoji\xF0\x9F\x98\x80/0"}) {
    EXPECT_TRUE(Validate(key).ok()) << key << ": " << Validate(key);
  }
}

TEST(ValidateKeyTest, AcceptsExactlyMaxBytes) {
  std::string key(kMaxKeyBytes, 'k');
  ASSERT_EQ(key.size(), 1024u);
  EXPECT_TRUE(Validate(key).ok()) << Validate(key);
  // Also with segments.
  std::string segmented;
  while (segmented.size() + 2 <= kMaxKeyBytes) segmented += segmented.empty() ? "ab" : "/a";
  segmented.resize(kMaxKeyBytes, 'z');
  ASSERT_EQ(segmented.size(), kMaxKeyBytes);
  EXPECT_TRUE(Validate(segmented).ok()) << Validate(segmented);
}

// Expects INVALID_ARGUMENT with a message holding `what`.
void ExpectRefused(const std::string& key, const std::string& what) {
  absl::Status s = ValidateKey(key);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << QuoteKey(key) << ": " << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr(what)) << QuoteKey(key);
}

TEST(ValidateKeyTest, RefusesEmpty) { ExpectRefused("", "empty"); }

TEST(ValidateKeyTest, RefusesLeadingSlash) {
  ExpectRefused("/a", "starts with '/'");
  ExpectRefused("/", "starts with '/'");
  ExpectRefused("/etc/passwd", "starts with '/'");
}

TEST(ValidateKeyTest, RefusesEmptySegments) {
  ExpectRefused("a//b", "empty segment");
  ExpectRefused("a/", "empty segment");
  ExpectRefused("a/b/", "empty segment");
}

TEST(ValidateKeyTest, RefusesDotSegments) {
  ExpectRefused("../../etc/passwd", "'..' segment");
  ExpectRefused("a/../../b", "'..' segment");
  ExpectRefused("a/./b", "'.' segment");
  ExpectRefused("..", "'..' segment");
  ExpectRefused(".", "'.' segment");
  ExpectRefused("a/..", "'..' segment");
  ExpectRefused("a/.", "'.' segment");
}

TEST(ValidateKeyTest, RefusesNul) {
  ExpectRefused(std::string("a\0b", 3), "NUL");
  ExpectRefused(std::string("\0", 1), "NUL");
}

TEST(ValidateKeyTest, RefusesControlCharacters) {
  ExpectRefused(
      "a\x01"
      "b",
      "control character");
  ExpectRefused("a\x7f", "control character");
  ExpectRefused("a\nb", "control character");
  ExpectRefused("a\tb", "control character");
  ExpectRefused("a/\x1b[31m", "control character");
  // C1 controls: U+0085 (NEL) and U+009F, encoded in UTF-8.
  ExpectRefused(
      "a\xC2\x85"
      "b",
      "control character");
  ExpectRefused("a\xC2\x9F", "control character");
  // U+00A0 is just past the C1 range: allowed.
  EXPECT_TRUE(ValidateKey("a\xC2\xA0"
                          "b")
                  .ok());
}

TEST(ValidateKeyTest, RefusesInvalidUtf8) {
  ExpectRefused(
      "a\xff"
      "b",
      "UTF-8");
  ExpectRefused("\xC0\xAF", "UTF-8");           // overlong '/'
  ExpectRefused("a/\xE0\x80\xAF", "UTF-8");     // overlong, 3 bytes
  ExpectRefused("a\xED\xA0\x80", "UTF-8");      // surrogate U+D800
  ExpectRefused("a\xC3", "UTF-8");              // truncated 2-byte sequence
  ExpectRefused("a\xE2\x82", "UTF-8");          // truncated 3-byte sequence
  ExpectRefused("a\xE2\x82/b", "UTF-8");        // truncated in the middle
  ExpectRefused("a\x80", "UTF-8");              // lone continuation byte
  ExpectRefused("a\xF4\x90\x80\x80", "UTF-8");  // past U+10FFFF
}

TEST(ValidateKeyTest, RefusesTooLong) {
  std::string key(kMaxKeyBytes + 1, 'k');
  ExpectRefused(key, "longer than 1024");
}

TEST(ValidateKeyTest, MessagesQuoteTheKey) {
  absl::Status s = ValidateKey("arr/../x");
  EXPECT_THAT(std::string(s.message()), HasSubstr("\"arr/../x\""));
  s = ValidateKey("arr/\x01");
  EXPECT_THAT(std::string(s.message()), HasSubstr("\"arr/\\x01\""));
}

TEST(ValidatePrefixTest, AcceptsAndRefuses) {
  EXPECT_TRUE(ValidatePrefix("").ok());
  EXPECT_TRUE(ValidatePrefix("a/").ok());
  EXPECT_TRUE(ValidatePrefix("arr/c/1").ok());
  EXPECT_TRUE(ValidatePrefix("a").ok());
  absl::Status s = ValidatePrefix("/a");
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("starts with '/'"));
  s = ValidatePrefix("a\xff");
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  s = ValidatePrefix(std::string("a\0", 2));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  s = ValidatePrefix(std::string(kMaxKeyBytes + 1, 'p'));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
}

TEST(PrefixOfKeyRangeTest, CommonPrefixOfTheBounds) {
  EXPECT_EQ(*PrefixOfKeyRange("a/c/", "a/c0"), "a/c");
  EXPECT_EQ(*PrefixOfKeyRange("arr/c/1", "arr/c/3"), "arr/c/");
  EXPECT_EQ(*PrefixOfKeyRange("a/b", "b/aa"), "");
  EXPECT_EQ(*PrefixOfKeyRange("", "a/c/aa"), "");
  // No upper bound: nothing is common.
  EXPECT_EQ(*PrefixOfKeyRange("a/b", ""), "");
  EXPECT_EQ(*PrefixOfKeyRange("", ""), "");
  // Equal bounds (an empty range) share themselves.
  EXPECT_EQ(*PrefixOfKeyRange("k/1", "k/1"), "k/1");
}

TEST(PrefixOfKeyRangeTest, EndsOnAWholeUtf8Character) {
  // "é" is C3 A9, "ê" C3 AA: they share their first byte only.
  EXPECT_EQ(*PrefixOfKeyRange("a/\xc3\xa9", "a/\xc3\xaa"), "a/");
  // "€" is E2 82 AC, "₭" E2 82 AD.
  EXPECT_EQ(*PrefixOfKeyRange("x\xe2\x82\xac", "x\xe2\x82\xad"), "x");
  EXPECT_EQ(*PrefixOfKeyRange("\xc3\xa9/a", "\xc3\xa9/b"), "\xc3\xa9/");
}

TEST(PrefixOfKeyRangeTest, RefusesPrefixesNoKeyCanStartWith) {
  absl::StatusOr<std::string> p = PrefixOfKeyRange("/a/b", "/a/c");
  EXPECT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(p.status().message()), HasSubstr("starts with '/'"));
  p = PrefixOfKeyRange("a\x01x", "a\x01y");
  EXPECT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(PrefixOfKeyRangeTest, InKeyRange) {
  EXPECT_TRUE(InKeyRange("a/b", "a/b", "b"));
  EXPECT_FALSE(InKeyRange("b", "a/b", "b"));
  EXPECT_FALSE(InKeyRange("a/a", "a/b", "b"));
  EXPECT_TRUE(InKeyRange("zzz", "a", ""));
}

TEST(QuoteKeyTest, EscapesAndCuts) {
  EXPECT_EQ(QuoteKey("arr/c/0"), "\"arr/c/0\"");
  EXPECT_EQ(QuoteKey(""), "\"\"");
  EXPECT_EQ(QuoteKey("a\"b"), "\"a\\\"b\"");
  EXPECT_EQ(QuoteKey("a\\b"), "\"a\\\\b\"");
  EXPECT_EQ(QuoteKey("a\nb"), "\"a\\x0ab\"");
  EXPECT_EQ(QuoteKey(std::string("\0", 1)), "\"\\x00\"");
  EXPECT_EQ(QuoteKey("\xff\x7f"), "\"\\xff\\x7f\"");
  EXPECT_EQ(QuoteKey("é"), "\"\\xc3\\xa9\"");
  std::string long_key(200, 'x');
  std::string quoted = QuoteKey(long_key);
  EXPECT_EQ(quoted, "\"" + std::string(80, 'x') + "\"... (200 bytes)");
}

}  // namespace
}  // namespace chunkd::server
