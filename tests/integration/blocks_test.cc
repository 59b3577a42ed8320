// Values read by the block, through the real chunkd and its clients: a value larger than the
// cache streamed whole and read by range at the cost of its blocks, every delivery on blocks,
// ranges in batches, a value replaced while it streams, and the read budget under 64 slow
// clients.
#include <sys/stat.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "chunkd/v1/chunkd.grpc.pb.h"
#include "client/client.h"
#include "grpcpp/create_channel.h"
#include "gtest/gtest.h"
#include "tests/support/tensorstore_client.h"
#include "tests/support/test_support.h"

namespace chunkd {
namespace {

using client::ByteRange;
using client::Client;
using client::ClientOptions;
using testing::RandomBytes;
using testing::ServerProcess;
using testing::TempDir;

constexpr uint64_t kBlock = 256 << 10;

class BlocksTest : public ::testing::Test {
 protected:
  // A server on a file store with an 8 MiB cache: values above 2 MiB are never one entry.
  void StartServer(std::vector<std::string> extra = {}) {
    std::filesystem::create_directories(dir_.Join("store/big"));
    std::vector<std::string> flags = {"--listen=127.0.0.1:0", "--store=" + dir_.Join("store"),
                                      "--fsync=false",        "--host_cache_bytes=8MiB",
                                      "--block_bytes=256KiB", "--shm_dir=" + shm_.path()};
    flags.insert(flags.end(), extra.begin(), extra.end());
    auto server = ServerProcess::Start(flags);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = *std::move(server);
  }
  // Writes a value straight into the store's directory, as another writer would.
  void WriteToStore(const std::string& key, const std::string& bytes) {
    std::string tmp = dir_.Join("store/.tmp-" + std::to_string(counter_++));
    {
      std::ofstream out(tmp, std::ios::binary);
      out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    }
    std::filesystem::rename(tmp, dir_.Join("store/" + key));
  }
  std::unique_ptr<Client> Connect(bool shm = false) {
    ClientOptions options;
    options.address = server_->address();
    options.shm_dir = shm_.path();
    options.timeout = absl::Seconds(60);
    if (shm) options.accept = {v1::DELIVERY_SHM, v1::DELIVERY_INLINE};
    auto c = Client::Connect(options);
    EXPECT_TRUE(c.ok()) << c.status();
    return *std::move(c);
  }
  uint64_t Counter(Client& c, const std::string& name) {
    auto info = c.ServerInfo();
    EXPECT_TRUE(info.ok()) << info.status();
    auto it = info->counters().find(name);
    EXPECT_NE(it, info->counters().end()) << name;
    return it == info->counters().end() ? 0 : it->second;
  }

  TempDir dir_;
  TempDir shm_{"/dev/shm"};
  std::unique_ptr<ServerProcess> server_;
  int counter_ = 0;
};

TEST_F(BlocksTest, AValueLargerThanTheCacheStreamsWholeAndReadsByRange) {
  StartServer();
  const std::string value = RandomBytes(48 << 20, 3);
  WriteToStore("big/value", value);
  auto c = Connect();
  // Its last 4 KiB cost one block from the store.
  uint64_t before = Counter(*c, "backend_read_bytes");
  client::GetOptions tail;
  tail.range = ByteRange::Suffix(4096);
  auto last = c->Get("big/value", tail);
  ASSERT_TRUE(last.ok()) << last.status();
  EXPECT_TRUE(last->data.view() == std::string_view(value).substr(value.size() - 4096));
  EXPECT_EQ(last->total_size, value.size());
  EXPECT_LE(Counter(*c, "backend_read_bytes") - before, 2 * kBlock);
  // A range inside the value: its blocks only.
  before = Counter(*c, "backend_read_bytes");
  client::GetOptions middle;
  middle.range = ByteRange::Bounded(30 << 20, (30 << 20) + 300000);
  auto part = c->Get("big/value", middle);
  ASSERT_TRUE(part.ok()) << part.status();
  EXPECT_TRUE(part->data.view() == std::string_view(value).substr(30 << 20, 300000));
  EXPECT_LE(Counter(*c, "backend_read_bytes") - before, 2 * kBlock);
  // Whole: streamed piece by piece, never held whole in the server.
  auto whole = c->Get("big/value");
  ASSERT_TRUE(whole.ok()) << whole.status();
  EXPECT_TRUE(whole->data.view() == value);
  EXPECT_GT(Counter(*c, "read_ahead_blocks"), 0u);
  // Streamed block by block, each a view of the cache: nothing joined, nothing held.
  EXPECT_EQ(Counter(*c, "read_held_peak_bytes"), 0u);
}

TEST_F(BlocksTest, AnObjectPast4GiBReadsByRange) {
  StartServer();
  // A sparse 5 GiB file: marks around the 4 GiB boundary and at the end, zeros elsewhere.
  const uint64_t size = 5ull << 30, boundary = 4ull << 30;
  const std::string path = dir_.Join("store/big/huge");
  {
    std::ofstream out(path, std::ios::binary);
    out.seekp(static_cast<std::streamoff>(boundary - 100));
    out << std::string(200, 'b');
    out.seekp(static_cast<std::streamoff>(size - 4096));
    out << std::string(4096, 'e');
  }
  std::filesystem::resize_file(path, size);
  auto c = Connect();
  uint64_t before = Counter(*c, "backend_read_bytes");
  client::GetOptions across;
  across.range = ByteRange::Bounded(boundary - 150, boundary + 150);
  auto got = c->Get("big/huge", across);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->total_size, size);
  EXPECT_TRUE(got->data.view() ==
              std::string(50, '\0') + std::string(200, 'b') + std::string(50, '\0'));
  client::GetOptions tail;
  tail.range = ByteRange::Suffix(4096);
  auto last = c->Get("big/huge", tail);
  ASSERT_TRUE(last.ok()) << last.status();
  EXPECT_TRUE(last->data.view() == std::string(4096, 'e'));
  testing::TsClient ts(server_->address());
  testing::TsRead ts_tail = ts.Read("big/huge", testing::TsReadOptions::Range(size - 10));
  ASSERT_TRUE(ts_tail.status.ok()) << ts_tail.status.error_message();
  EXPECT_EQ(ts_tail.value, std::string(10, 'e'));
  // Two blocks around the boundary and the last one: not the 5 GiB.
  EXPECT_LE(Counter(*c, "backend_read_bytes") - before, 4 * kBlock);
}

TEST_F(BlocksTest, EveryDeliveryOnBlocks) {
  // Leases may pin the whole cache budget (8 MiB), so that the joined whole value fits.
  StartServer({"--max_pinned_fraction=1", "--max_client_pinned_fraction=1"});
  const std::string value = RandomBytes(6 << 20, 5);
  WriteToStore("big/value", value);
  auto c = Connect(/*shm=*/true);
  // Within one block: a handle on the cached block.
  client::GetOptions inside;
  inside.range = ByteRange::Bounded(kBlock + 10, 2 * kBlock - 10);
  auto one = c->Get("big/value", inside);
  ASSERT_TRUE(one.ok()) << one.status();
  EXPECT_EQ(one->delivery, v1::DELIVERY_SHM);
  EXPECT_TRUE(one->data.view() == std::string_view(value).substr(kBlock + 10, kBlock - 20));
  // Across blocks: one handle on the range joined under the read budget.
  client::GetOptions across;
  across.range = ByteRange::Bounded(kBlock - 100, 3 * kBlock + 100);
  auto joined = c->Get("big/value", across);
  ASSERT_TRUE(joined.ok()) << joined.status();
  EXPECT_EQ(joined->delivery, v1::DELIVERY_SHM);
  EXPECT_TRUE(joined->data.view() ==
              std::string_view(value).substr(kBlock - 100, 2 * kBlock + 200));
  EXPECT_GT(Counter(*c, "read_held_bytes"), 0u);  // leased: held until released
  // The whole value: one handle too, within the budget.
  auto whole = c->Get("big/value");
  ASSERT_TRUE(whole.ok()) << whole.status();
  EXPECT_EQ(whole->delivery, v1::DELIVERY_SHM);
  EXPECT_TRUE(whole->data.view() == value);
  one->data = {};
  joined->data = {};
  whole->data = {};
  c->FlushReleases();
  absl::Time deadline = absl::Now() + absl::Seconds(20);
  while (Counter(*c, "read_held_bytes") != 0 && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(20));
  }
  EXPECT_EQ(Counter(*c, "read_held_bytes"), 0u);
  // Inline clients get the same bytes.
  auto plain = Connect();
  auto again = plain->Get("big/value", across);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->delivery, v1::DELIVERY_INLINE);
  EXPECT_TRUE(again->data.view() == std::string_view(value).substr(kBlock - 100, 2 * kBlock + 200));
}

TEST_F(BlocksTest, RangesInABatchReadOnlyTheirBlocks) {
  StartServer();
  const std::string value = RandomBytes(16 << 20, 7);
  WriteToStore("big/shard", value);
  auto c = Connect();
  uint64_t before = Counter(*c, "backend_read_bytes");
  std::vector<client::GetManyItem> items;
  items.push_back({"big/shard", ByteRange::Suffix(1028), {}});
  for (int i = 0; i < 8; ++i) {
    int64_t at = static_cast<int64_t>(i) * (2 << 20);
    items.push_back({"big/shard", ByteRange::Bounded(at, at + 100000), {}});
  }
  auto results = c->GetMany(items);
  ASSERT_TRUE(results.ok()) << results.status();
  ASSERT_EQ(results->size(), items.size());
  ASSERT_TRUE((*results)[0].ok()) << (*results)[0].status();
  EXPECT_TRUE((*results)[0]->data.view() == std::string_view(value).substr(value.size() - 1028));
  for (int i = 0; i < 8; ++i) {
    const auto& r = (*results)[i + 1];
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_TRUE(r->data.view() == std::string_view(value).substr(i * (2 << 20), 100000));
  }
  // 9 ranges of at most 100 KB: at most 2 blocks each, not the 16 MiB value.
  EXPECT_LE(Counter(*c, "backend_read_bytes") - before, 9 * 2 * kBlock);
}

TEST_F(BlocksTest, TensorStoreByteRangesReadOnlyTheirBlocks) {
  StartServer();
  const std::string value = RandomBytes(16 << 20, 8);
  WriteToStore("big/shard", value);
  testing::TsClient ts(server_->address());
  auto c = Connect();
  uint64_t before = Counter(*c, "backend_read_bytes");
  // The shard index (a suffix), then one inner chunk, as TensorStore's zarr3 sharding reads.
  testing::TsRead index = ts.Read("big/shard", testing::TsReadOptions::Range(-1028));
  ASSERT_TRUE(index.status.ok()) << index.status.error_message();
  EXPECT_TRUE(index.value == value.substr(value.size() - 1028));
  testing::TsRead chunk =
      ts.Read("big/shard", testing::TsReadOptions::Range(5 << 20, (5 << 20) + 262144));
  ASSERT_TRUE(chunk.status.ok()) << chunk.status.error_message();
  EXPECT_TRUE(chunk.value == value.substr(5 << 20, 262144));
  EXPECT_LE(Counter(*c, "backend_read_bytes") - before, 4 * kBlock);
  // Past the end is OUT_OF_RANGE, as TensorStore's kvstores answer.
  testing::TsRead past = ts.Read("big/shard", testing::TsReadOptions::Range(value.size() + 10));
  EXPECT_EQ(past.status.error_code(), grpc::StatusCode::OUT_OF_RANGE);
  // The whole value, which is larger than one cache entry, comes whole.
  testing::TsRead whole = ts.Read("big/shard");
  ASSERT_TRUE(whole.status.ok()) << whole.status.error_message();
  EXPECT_TRUE(whole.value == value);
}

TEST_F(BlocksTest, AValueReplacedWhileItStreamsIsNeverMixed) {
  StartServer();
  const std::string old_value = RandomBytes(40 << 20, 9), new_value = RandomBytes(40 << 20, 10);
  WriteToStore("big/value", old_value);
  auto channel = grpc::CreateChannel(server_->address(), grpc::InsecureChannelCredentials());
  auto stub = v1::Chunkd::NewStub(channel);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  v1::GetRequest request;
  request.set_key("big/value");
  auto reader = stub->Get(&context, request);
  std::string got;
  v1::GetResponse message;
  ASSERT_TRUE(reader->Read(&message));
  got += message.data();
  // The store's value is replaced after the first part went out.
  WriteToStore("big/value", new_value);
  while (reader->Read(&message)) got += message.data();
  grpc::Status status = reader->Finish();
  if (status.ok()) {
    EXPECT_TRUE(got == old_value) << "a reply that completes is all of one version";
  } else {
    EXPECT_EQ(status.error_code(), grpc::StatusCode::ABORTED) << status.error_message();
    EXPECT_TRUE(absl::StrContains(status.error_message(), "changed")) << status.error_message();
    EXPECT_TRUE(std::string_view(old_value).substr(0, got.size()) == got);
  }
  // A read after it gets the new version.
  auto c = Connect();
  auto now = c->Get("big/value");
  ASSERT_TRUE(now.ok()) << now.status();
  EXPECT_TRUE(now->data.view() == new_value);
}

TEST_F(BlocksTest, TheReadBudgetHoldsUnder64SlowClients) {
  StartServer({"--host_cache_bytes=64MiB", "--read_budget_bytes=64MiB"});
  const std::string value = RandomBytes(32 << 20, 11);
  WriteToStore("big/value", value);
  auto channel = grpc::CreateChannel(server_->address(), grpc::InsecureChannelCredentials());
  auto stub = v1::Chunkd::NewStub(channel);
  struct Reader {
    grpc::ClientContext context;
    std::unique_ptr<grpc::ClientReader<v1::GetResponse>> get;
    std::unique_ptr<grpc::ClientReader<v1::GetManyResponse>> get_many;
  };
  // 32 readers of the whole value by Get, and 32 of four 8 MiB ranges by GetMany, all taking
  // their first message and then no more.
  std::vector<std::unique_ptr<Reader>> readers;
  for (int i = 0; i < 64; ++i) {
    auto r = std::make_unique<Reader>();
    r->context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    if (i % 2 == 0) {
      v1::GetRequest request;
      request.set_key("big/value");
      r->get = stub->Get(&r->context, request);
      v1::GetResponse first;
      EXPECT_TRUE(r->get->Read(&first));  // streamed block by block: never refused
    } else {
      v1::GetManyRequest request;
      for (int part = 0; part < 4; ++part) {
        v1::GetRequest* item = request.add_items();
        item->set_key("big/value");
        item->mutable_range()->mutable_bounded()->set_start(part * (8 << 20) + 1);
        item->mutable_range()->mutable_bounded()->set_end((part + 1) * (8 << 20) - 1);
      }
      r->get_many = stub->GetMany(&r->context, request);
      v1::GetManyResponse first;
      EXPECT_TRUE(r->get_many->Read(&first));
    }
    readers.push_back(std::move(r));
  }
  auto c = Connect();
  // Memory held for reads never went past the budget, however many clients stalled: ranges
  // joined from blocks found no room past it (their items failed with RESOURCE_EXHAUSTED).
  EXPECT_LE(Counter(*c, "read_held_peak_bytes"), 64u << 20);
  EXPECT_GT(Counter(*c, "read_budget_refusals"), 0u);
  // The stalled readers go; the memory comes back and reads are served again.
  for (auto& r : readers) r->context.TryCancel();
  readers.clear();
  absl::Time deadline = absl::Now() + absl::Seconds(20);
  while (Counter(*c, "read_held_bytes") != 0 && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(20));
  }
  EXPECT_EQ(Counter(*c, "read_held_bytes"), 0u);
  auto whole = c->Get("big/value");
  ASSERT_TRUE(whole.ok()) << whole.status();
  EXPECT_TRUE(whole->data.view() == value);
  std::vector<client::GetManyItem> items = {{"big/value", ByteRange::Bounded(1, 20 << 20), {}}};
  auto batch = c->GetMany(items);
  ASSERT_TRUE(batch.ok()) << batch.status();
  ASSERT_TRUE((*batch)[0].ok()) << (*batch)[0].status();
  EXPECT_TRUE((*batch)[0]->data.view() == std::string_view(value).substr(1, (20 << 20) - 1));
}

}  // namespace
}  // namespace chunkd
