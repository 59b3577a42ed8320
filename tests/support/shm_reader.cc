// A second process for the shared-memory tests: reads keys through shared-memory delivery.
//
//   chunkd_shm_reader ADDRESS SHM_DIR hold KEY...       get each key (shm), print
//                                     "holding N", then sleep holding the leases until killed
//   chunkd_shm_reader ADDRESS SHM_DIR greedy KEY...     get each key (shm or inline, whichever
//                                     the server gives), check each value's bytes are whole,
//                                     print "holding N shm S inline I", then sleep holding every
//                                     result until killed
//   chunkd_shm_reader ADDRESS SHM_DIR watch KEY...      get each key (shm), print "holding N shm
//   S",
//                                     then check every 20 ms, until killed, that each value
//                                     still holds the bytes it had (one repeated byte); print
//                                     "changed KEY" and exit 1 when one does not
//   chunkd_shm_reader ADDRESS SHM_DIR read ITER KEY...  get the keys ITER times each, check that
//   every
//                                               value is whole (all bytes equal its first byte),
//                                               print "reads R torn T shm S"; exit 1 if T > 0
//   chunkd_shm_reader ADDRESS SHM_DIR drop-in-callback  five times: connect the process's only
//                                               client, and delete it in the callback of its
//                                               ServerInfoAsync (on gRPC's callback thread);
//                                               print "dropped 5" (a crash or hang otherwise)
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "client/client.h"

namespace {

// The drop-in-callback mode: before this process makes any other client.
int DropInCallback(const chunkd::client::ClientOptions& options) {
  for (int i = 0; i < 5; ++i) {
    auto connected = chunkd::client::Client::Connect(options);
    if (!connected.ok()) return 2;
    chunkd::client::Client* client = connected->release();
    absl::Notification done;
    bool ok = false;
    client->ServerInfoAsync(
        [client, &done, &ok](absl::StatusOr<chunkd::v1::ServerInfoResponse> info) {
          ok = info.ok();
          delete client;  // the process's last channel, on gRPC's callback thread
          done.Notify();
        });
    done.WaitForNotification();
    if (!ok) return 1;
    absl::SleepFor(absl::Milliseconds(100));  // the callback queue's threads poll again
  }
  std::printf("dropped 5\n");
  return 0;
}

// Gets each of `keys` (shm or inline, whichever the server gives) into `held`, counting the
// shm deliveries in `shm`; false (after saying why) when a get fails or a value is not whole
// (every byte equal to its first).
bool GetWholeValues(chunkd::client::Client& client, char** keys, int count,
                    std::vector<chunkd::client::GetResult>* held, long* shm) {
  for (int i = 0; i < count; ++i) {
    auto got = client.Get(keys[i]);
    std::string_view v = got.ok() ? got->data.view() : std::string_view();
    if (!got.ok() || v.empty() || v.find_first_not_of(v[0]) != std::string_view::npos) {
      std::fprintf(stderr, "get %s: %s\n", keys[i],
                   got.ok() ? "torn value" : got.status().ToString().c_str());
      return false;
    }
    *shm += got->delivery == chunkd::v1::DELIVERY_SHM;
    held->push_back(*std::move(got));
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 4 && std::string(argv[3]) == "drop-in-callback") {
    chunkd::client::ClientOptions options;
    options.address = argv[1];
    options.shm_dir = argv[2];
    return DropInCallback(options);
  }
  if (argc < 5) {
    std::fprintf(stderr,
                 "usage: %s ADDRESS SHM_DIR hold KEY... | greedy KEY... | read ITER KEY...\n",
                 argv[0]);
    return 2;
  }
  chunkd::client::ClientOptions options;
  options.address = argv[1];
  options.shm_dir = argv[2];
  argv += 1;
  argc -= 1;
  options.accept = {chunkd::v1::DELIVERY_SHM, chunkd::v1::DELIVERY_INLINE};
  auto client = chunkd::client::Client::Connect(options);
  if (!client.ok()) return 2;
  std::string mode = argv[2];
  if (mode == "hold") {
    std::vector<chunkd::buffer::cpu::Buffer> held;
    for (int i = 3; i < argc; ++i) {
      auto got = (*client)->Get(argv[i]);
      if (!got.ok() || got->delivery != chunkd::v1::DELIVERY_SHM) {
        std::fprintf(stderr, "get %s: %s\n", argv[i], got.status().ToString().c_str());
        return 1;
      }
      held.push_back(got->data);
    }
    std::printf("holding %zu\n", held.size());
    std::fflush(stdout);
    for (;;) ::pause();
  }
  if (mode == "watch") {
    std::vector<chunkd::client::GetResult> held;
    long shm = 0;
    if (!GetWholeValues(**client, argv + 3, argc - 3, &held, &shm)) return 1;
    std::vector<char> first;
    for (const auto& got : held) first.push_back(got.data.view()[0]);
    std::printf("holding %zu shm %ld\n", held.size(), shm);
    std::fflush(stdout);
    for (;;) {
      for (size_t i = 0; i < held.size(); ++i) {
        std::string_view v = held[i].data.view();
        if (v.find_first_not_of(first[i]) != std::string_view::npos) {
          std::printf("changed %s\n", argv[3 + i]);
          std::fflush(stdout);
          return 1;
        }
      }
      ::usleep(20000);
    }
  }
  if (mode == "greedy") {
    std::vector<chunkd::client::GetResult> held;
    long shm = 0;
    if (!GetWholeValues(**client, argv + 3, argc - 3, &held, &shm)) return 1;
    std::printf("holding %zu shm %ld inline %ld\n", held.size(), shm,
                static_cast<long>(held.size()) - shm);
    std::fflush(stdout);
    for (;;) ::pause();
  }
  int iterations = std::atoi(argv[3]);
  long reads = 0, torn = 0, shm = 0;
  for (int it = 0; it < iterations; ++it) {
    for (int i = 4; i < argc; ++i) {
      auto got = (*client)->Get(argv[i]);
      if (!got.ok()) {
        std::fprintf(stderr, "get %s: %s\n", argv[i], got.status().ToString().c_str());
        return 1;
      }
      ++reads;
      shm += got->delivery == chunkd::v1::DELIVERY_SHM;
      std::string_view v = got->data.view();
      if (v.empty() || v.find_first_not_of(v[0]) != std::string_view::npos) ++torn;
    }
  }
  std::printf("reads %ld torn %ld shm %ld\n", reads, torn, shm);
  return torn > 0 ? 1 : 0;
}
