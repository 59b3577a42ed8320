// Derived entries (chunkd.v1's DerivedRead and DerivedPut) through the C++ client's Get, against
// the real chunkd: produce and publish, waiters, takeover after an abandon or a late producer,
// the waiter cap, conditions on the source, memory://, a read-only server, bad derivations.
// python/tests/test_derived.py covers GetMany, shared memory, a killed producer, a source
// rewritten behind chunkd's back, the budget and a server without derived entries.
#include <string>
#include <vector>

#include "absl/synchronization/notification.h"
#include "client/client.h"
#include "gtest/gtest.h"
#include "tests/support/test_support.h"

namespace chunkd {
namespace {

using testing::ServerProcess;
using testing::TempDir;

constexpr char kDerivation[] = "zstd|<f4|64,64";

buffer::cpu::Buffer Bytes(const std::string& s) { return buffer::cpu::Buffer::CopyOf(s); }
std::string Str(const buffer::cpu::Buffer& b) { return std::string(b.view()); }

uint64_t Counter(client::Client& c, const std::string& name) {
  auto info = c.ServerInfo();
  auto it = info->counters().find(name);
  return it == info->counters().end() ? 0 : it->second;
}

client::GetOptions Derived(bool produce, uint64_t wait_ms = 0,
                           const std::string& derivation = kDerivation) {
  client::GetOptions options;
  options.derived = client::DerivedRead{derivation, produce, wait_ms};
  return options;
}

client::DerivedPut Publish(const client::GetResult& told) {
  return client::DerivedPut{kDerivation, told.generation, told.production_id, false};
}

class DerivedTest : public ::testing::Test {
 protected:
  void StartServer(std::vector<std::string> flags, const std::string& store = "") {
    std::vector<std::string> args = {"--listen=127.0.0.1:0",
                                     "--store=" + (store.empty() ? dir_.path() : store),
                                     "--fsync=false"};
    args.insert(args.end(), flags.begin(), flags.end());
    auto server = ServerProcess::Start(args);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = *std::move(server);
    client_ = Connect();
  }
  std::unique_ptr<client::Client> Connect() {
    client::ClientOptions options;
    options.address = server_->address();
    options.timeout = absl::Seconds(60);
    return *client::Client::Connect(options);
  }
  // Waits until the server has `n` derived reads waiting.
  void AwaitWaiting(uint64_t n) {
    absl::Time deadline = absl::Now() + absl::Seconds(30);
    while (Counter(*client_, "derived_waiting") != n) {
      ASSERT_LT(absl::Now(), deadline) << "no derived read waiting";
      absl::SleepFor(absl::Milliseconds(10));
    }
  }

  TempDir dir_;
  std::unique_ptr<ServerProcess> server_;
  std::unique_ptr<client::Client> client_;
};

TEST_F(DerivedTest, MissProducePublishHitAndWaiterGetsTheEntry) {
  StartServer({});
  auto put = client_->Put("a/c/0", Bytes("encoded"));
  ASSERT_TRUE(put.ok()) << put.status();
  EXPECT_EQ(client_->Get("a/c/0", Derived(false)).status().code(), absl::StatusCode::kNotFound);
  auto told = client_->Get("a/c/0", Derived(true));
  ASSERT_TRUE(told.ok()) << told.status();
  ASSERT_NE(told->production_id, 0u);
  EXPECT_EQ(told->generation, put->generation);
  EXPECT_TRUE(told->data.empty());

  // A second reader waits for the production, on a server thread of nobody's.
  auto other = Connect();
  absl::Notification answered;
  absl::StatusOr<client::GetResult> waited;
  other->GetAsync("a/c/0", Derived(true, 30000), [&](absl::StatusOr<client::GetResult> r) {
    waited = std::move(r);
    answered.Notify();
  });
  AwaitWaiting(1);
  EXPECT_FALSE(answered.HasBeenNotified());
  auto published = client_->PutDerived("a/c/0", Bytes("decoded"), Publish(*told));
  ASSERT_TRUE(published.ok()) << published.status();
  ASSERT_TRUE(answered.WaitForNotificationWithTimeout(absl::Seconds(30)));
  ASSERT_TRUE(waited.ok()) << waited.status();
  EXPECT_EQ(waited->production_id, 0u);
  EXPECT_EQ(Str(waited->data), "decoded");
  EXPECT_EQ(waited->generation, put->generation);

  auto hit = client_->Get("a/c/0", Derived(false));
  ASSERT_TRUE(hit.ok()) << hit.status();
  EXPECT_EQ(Str(hit->data), "decoded");
  // Conditions apply to the source.
  client::GetOptions conditional = Derived(false);
  conditional.conditions.if_generation_match = put->generation + 1;
  EXPECT_EQ(client_->Get("a/c/0", conditional).status().code(),
            absl::StatusCode::kFailedPrecondition);
  // The value itself is untouched.
  EXPECT_EQ(Str(client_->Get("a/c/0")->data), "encoded");
  EXPECT_EQ(Counter(*client_, "derived_productions"), 1u);
  EXPECT_EQ(Counter(*client_, "derived_published"), 1u);
  EXPECT_EQ(Counter(*client_, "derived_hits"), 2u);
  EXPECT_EQ(Counter(*client_, "derived_waiting"), 0u);
}

TEST_F(DerivedTest, AbandonAndALateProducerHandTheProductionToAWaiter) {
  StartServer({"--derived_produce_timeout=500ms"});
  ASSERT_TRUE(client_->Put("b/c/0", Bytes("source")).ok());
  auto told = client_->Get("b/c/0", Derived(true));
  ASSERT_TRUE(told.ok() && told->production_id != 0);

  auto other = Connect();
  absl::Notification answered;
  absl::StatusOr<client::GetResult> waited;
  other->GetAsync("b/c/0", Derived(true, 30000), [&](absl::StatusOr<client::GetResult> r) {
    waited = std::move(r);
    answered.Notify();
  });
  AwaitWaiting(1);
  client::DerivedPut abandon{kDerivation, 0, told->production_id, true};
  ASSERT_TRUE(client_->PutDerived("b/c/0", buffer::cpu::Buffer(), abandon).ok());
  ASSERT_TRUE(answered.WaitForNotificationWithTimeout(absl::Seconds(30)));
  ASSERT_TRUE(waited.ok()) << waited.status();
  EXPECT_NE(waited->production_id, 0u);
  EXPECT_NE(waited->production_id, told->production_id);
  EXPECT_EQ(Counter(*client_, "derived_abandons"), 1u);
  EXPECT_EQ(Counter(*client_, "derived_handoffs"), 1u);

  // The new producer never publishes: past --derived_produce_timeout, a waiter takes over.
  absl::Notification second;
  absl::StatusOr<client::GetResult> took;
  client_->GetAsync("b/c/0", Derived(true, 30000), [&](absl::StatusOr<client::GetResult> r) {
    took = std::move(r);
    second.Notify();
  });
  ASSERT_TRUE(second.WaitForNotificationWithTimeout(absl::Seconds(30)));
  ASSERT_TRUE(took.ok()) << took.status();
  EXPECT_NE(took->production_id, 0u);
  EXPECT_NE(took->production_id, waited->production_id);
  EXPECT_EQ(Counter(*client_, "derived_handoffs"), 2u);
  // The late producer may still publish what it derived: the source has not changed.
  EXPECT_TRUE(other->PutDerived("b/c/0", Bytes("late"), Publish(*waited)).ok());
  EXPECT_EQ(Str(client_->Get("b/c/0", Derived(false))->data), "late");
}

TEST_F(DerivedTest, AWaiterThatWentAwayPassesTheProductionOn) {
  StartServer({"--derived_produce_timeout=60s"});
  ASSERT_TRUE(client_->Put("g/c/0", Bytes("source")).ok());
  auto told = client_->Get("g/c/0", Derived(true));
  ASSERT_TRUE(told.ok() && told->production_id != 0);
  // The first waiter gives up (its call's deadline) before the production is handed on.
  auto gone = Connect();
  client::GetOptions short_call = Derived(true, 30000);
  short_call.timeout = absl::Milliseconds(500);
  absl::Notification gone_answered;
  gone->GetAsync("g/c/0", short_call, [&](absl::StatusOr<client::GetResult> r) {
    EXPECT_EQ(r.status().code(), absl::StatusCode::kDeadlineExceeded) << r.status();
    gone_answered.Notify();
  });
  AwaitWaiting(1);
  auto other = Connect();
  absl::Notification answered;
  absl::StatusOr<client::GetResult> waited;
  other->GetAsync("g/c/0", Derived(true, 30000), [&](absl::StatusOr<client::GetResult> r) {
    waited = std::move(r);
    answered.Notify();
  });
  AwaitWaiting(2);
  ASSERT_TRUE(gone_answered.WaitForNotificationWithTimeout(absl::Seconds(30)));
  client::DerivedPut abandon{kDerivation, 0, told->production_id, true};
  ASSERT_TRUE(client_->PutDerived("g/c/0", buffer::cpu::Buffer(), abandon).ok());
  // The production went to the first waiter, whose call was over: it was passed on at once,
  // not after --derived_produce_timeout.
  ASSERT_TRUE(answered.WaitForNotificationWithTimeout(absl::Seconds(20)));
  ASSERT_TRUE(waited.ok()) << waited.status();
  EXPECT_NE(waited->production_id, 0u);
  EXPECT_EQ(Counter(*client_, "derived_handoffs"), 2u);
  EXPECT_EQ(Counter(*client_, "derived_abandons"), 2u);
}

TEST_F(DerivedTest, WaitersPastTheCapAreAnsweredAtOnce) {
  StartServer({"--derived_max_waiters=1"});
  ASSERT_TRUE(client_->Put("c/c/0", Bytes("source")).ok());
  auto told = client_->Get("c/c/0", Derived(true));
  ASSERT_TRUE(told.ok() && told->production_id != 0);
  auto other = Connect();
  absl::Notification answered;
  absl::StatusOr<client::GetResult> waited;
  other->GetAsync("c/c/0", Derived(false, 30000), [&](absl::StatusOr<client::GetResult> r) {
    waited = std::move(r);
    answered.Notify();
  });
  AwaitWaiting(1);
  EXPECT_EQ(client_->Get("c/c/0", Derived(false, 30000)).status().code(),
            absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(Counter(*client_, "derived_waiters_refused"), 1u);
  // A publication from the old generation after a rewrite is refused, and the waiter reads
  // again: it finds the new generation, which nobody produces (it asked without produce).
  ASSERT_TRUE(client_->Put("c/c/0", Bytes("rewritten")).ok());
  auto stale = client_->PutDerived("c/c/0", Bytes("old"), Publish(*told));
  EXPECT_EQ(stale.status().code(), absl::StatusCode::kFailedPrecondition) << stale.status();
  ASSERT_TRUE(answered.WaitForNotificationWithTimeout(absl::Seconds(30)));
  EXPECT_EQ(waited.status().code(), absl::StatusCode::kNotFound) << waited.status();
  EXPECT_EQ(Counter(*client_, "derived_stale_publishes"), 1u);
}

TEST_F(DerivedTest, MemoryStoreWritesDropTheEntries) {
  StartServer({}, "memory://");
  ASSERT_TRUE(client_->Put("m/c/0", Bytes("one")).ok());
  auto told = client_->Get("m/c/0", Derived(true));
  ASSERT_TRUE(told.ok() && told->production_id != 0);
  ASSERT_TRUE(client_->PutDerived("m/c/0", Bytes("ONE"), Publish(*told)).ok());
  EXPECT_EQ(Counter(*client_, "derived_entries"), 1u);
  ASSERT_TRUE(client_->Put("m/c/0", Bytes("two")).ok());
  EXPECT_EQ(Counter(*client_, "derived_entries"), 0u);
  EXPECT_EQ(client_->Get("m/c/0", Derived(false)).status().code(), absl::StatusCode::kNotFound);
  ASSERT_TRUE(client_->Delete("m/c/0").ok());
  EXPECT_EQ(client_->Get("m/c/0", Derived(true)).status().code(), absl::StatusCode::kNotFound);
}

TEST_F(DerivedTest, ReadOnlyServerTakesDerivedEntriesAndBadDerivationsAreRefused) {
  testing::WriteFile(dir_.Join("k"), "source");
  StartServer({"--read_only"});
  EXPECT_EQ(client_->Put("k", Bytes("x")).status().code(), absl::StatusCode::kPermissionDenied);
  auto told = client_->Get("k", Derived(true));
  ASSERT_TRUE(told.ok() && told->production_id != 0) << told.status();
  EXPECT_TRUE(client_->PutDerived("k", Bytes("derived"), Publish(*told)).ok());
  EXPECT_EQ(Str(client_->Get("k", Derived(false))->data), "derived");
  EXPECT_EQ(client_->Get("k", Derived(true, 0, "")).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(client_->Get("k", Derived(true, 0, std::string(4097, 'd'))).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(client_->Get("missing", Derived(true)).status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace chunkd
