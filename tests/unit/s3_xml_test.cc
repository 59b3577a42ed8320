// S3's XML answers as the s3:// backend reads them (server/backend/s3/s3_xml.h).
#include "server/backend/s3/s3_xml.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace chunkd::server {
namespace {

using ::testing::ElementsAre;

constexpr char kPage[] = R"(<?xml version="1.0" encoding="UTF-8"?>
<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
  <Name>bucket</Name><Prefix>era5.zarr/</Prefix><IsTruncated>true</IsTruncated>
  <NextContinuationToken>token+/=</NextContinuationToken>
  <Contents><Key>era5.zarr/zarr.json</Key><Size>412</Size></Contents>
  <Contents><Key>era5.zarr/t/c/0/0</Key><Size>1048576</Size></Contents>
  <Contents><Key>era5.zarr/marker/</Key><Size>0</Size></Contents>
  <Contents><Key>era5.zarr/a/../b</Key><Size>1</Size></Contents>
  <Contents><Key>other/x</Key><Size>1</Size></Contents>
  <Contents><Key>era5.zarr/nosize</Key></Contents>
  <CommonPrefixes><Prefix>era5.zarr/t/</Prefix></CommonPrefixes>
  <CommonPrefixes><Prefix>era5.zarr/../</Prefix></CommonPrefixes>
  <CommonPrefixes><Prefix>era5.zarr/no-slash</Prefix></CommonPrefixes>
</ListBucketResult>)";

TEST(S3XmlTest, AListingPageKeepsValidKeysAndPrefixesUnderTheRoot) {
  auto page = ParseS3ListPage(kPage, "era5.zarr/", "list");
  ASSERT_TRUE(page.ok()) << page.status();
  ASSERT_EQ(page->entries.size(), 2u);
  EXPECT_EQ(page->entries[0].key, "zarr.json");
  EXPECT_EQ(page->entries[0].size, 412u);
  EXPECT_EQ(page->entries[1].key, "t/c/0/0");
  // Found by tests/fuzz/s3_xml_fuzz.cc: a common prefix without the delimiter was listed as a
  // "directory" whose name then lost its last character where clients strip the '/'.
  EXPECT_THAT(page->prefixes, ElementsAre("t/"));
  EXPECT_TRUE(page->truncated);
  EXPECT_EQ(page->next_token, "token+/=");
}

TEST(S3XmlTest, OtherAnswersAreErrors) {
  EXPECT_EQ(ParseS3ListPage("<Error/>", "", "list s3://b/").status().code(),
            absl::StatusCode::kInternal);
  EXPECT_EQ(ParseS3ListPage("not xml", "", "list").status().code(), absl::StatusCode::kInternal);
  auto truncated = ParseS3ListPage(
      "<ListBucketResult><IsTruncated>true</IsTruncated></ListBucketResult>", "", "list");
  EXPECT_EQ(truncated.status().code(), absl::StatusCode::kInternal);
}

TEST(S3XmlTest, ErrorBodiesAndUploadIds) {
  EXPECT_EQ(S3ErrorDetail("<Error><Code>NoSuchKey</Code><Message>gone</Message></Error>"),
            "NoSuchKey: gone");
  EXPECT_EQ(S3ErrorDetail("<Error><Code>SlowDown</Code></Error>"), "SlowDown");
  EXPECT_EQ(S3ErrorDetail(""), "");
  EXPECT_EQ(S3ErrorDetail("<html>"), "");
  EXPECT_EQ(S3UploadId("<InitiateMultipartUploadResult><UploadId>abc</UploadId>"
                       "</InitiateMultipartUploadResult>"),
            "abc");
  EXPECT_EQ(S3UploadId("<Other/>"), "");
}

}  // namespace
}  // namespace chunkd::server
