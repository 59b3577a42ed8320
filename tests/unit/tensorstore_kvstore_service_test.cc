// Tests of the TensorStore service's mapping of generations and conditions
// (server/services/tensorstore_kvstore_service.h); the service itself is tested against the
// real binary by tests/integration/tensorstore_kvstore_test.cc and, with TensorStore's own
// driver, by python/tests/test_tensorstore_*.py.
#include "server/services/tensorstore_kvstore_service.h"

#include <string>

#include "gtest/gtest.h"

namespace chunkd::server::tsgrpc {
namespace {

TEST(TensorStoreGenerationTest, EncodesAsStorageGenerationFromUint64) {
  // "\x00" (a base generation follows), then the 64 bits in little-endian order, as
  // TensorStore's StorageGeneration::FromUint64 writes them (0.1.74 and later).
  EXPECT_EQ(EncodeGeneration(0x0807060504030201ull),
            std::string("\x00\x01\x02\x03\x04\x05\x06\x07\x08", 9));
  for (Generation g : {Generation{1}, Generation{0x1234567890ABCDEFull}, ~Generation{0}}) {
    EXPECT_EQ(DecodeGeneration(EncodeGeneration(g)), g);
  }
}

TEST(TensorStoreGenerationTest, BytesChunkdNeverHandsOutDecodeToNothing) {
  EXPECT_EQ(DecodeGeneration(""), std::nullopt);                    // unknown
  EXPECT_EQ(DecodeGeneration(kNoValue), std::nullopt);              // no value
  EXPECT_EQ(DecodeGeneration(std::string(9, '\0')), std::nullopt);  // 0 is "no value" here
  EXPECT_EQ(DecodeGeneration(std::string("\x04\x01\0\0\0\0\0\0\0", 9)), std::nullopt);  // dirty
  EXPECT_EQ(DecodeGeneration(std::string("\x00\x01\x02", 3)), std::nullopt);
  EXPECT_EQ(DecodeGeneration("\"etag\""), std::nullopt);
}

TEST(TensorStoreGenerationTest, ConditionsFromGenerationFields) {
  TsConditions none = ConditionsFrom("", "");
  EXPECT_TRUE(none.conditions.empty());
  EXPECT_FALSE(none.never);

  TsConditions absent = ConditionsFrom(kNoValue);
  EXPECT_EQ(absent.conditions.if_generation_match, Generation{0});
  EXPECT_TRUE(absent.conditions.Check("k", std::nullopt).ok());
  EXPECT_FALSE(absent.conditions.Check("k", 7).ok());

  TsConditions equal = ConditionsFrom(EncodeGeneration(7), EncodeGeneration(9));
  EXPECT_EQ(equal.conditions.if_generation_match, Generation{7});
  EXPECT_EQ(equal.conditions.if_generation_not_match, Generation{9});

  // if_not_equal "no value": the key must hold a value.
  TsConditions exists = ConditionsFrom("", kNoValue);
  EXPECT_TRUE(exists.conditions.Check("k", 7).ok());
  EXPECT_FALSE(exists.conditions.Check("k", std::nullopt).ok());

  // A generation chunkd never hands out: if_equal can never hold, if_not_equal always does.
  TsConditions foreign = ConditionsFrom("\"etag\"", std::string(9, '\0'));
  EXPECT_TRUE(foreign.never);
  EXPECT_FALSE(foreign.conditions.if_generation_not_match.has_value());
}

}  // namespace
}  // namespace chunkd::server::tsgrpc
