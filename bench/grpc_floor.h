// The gRPC floor: one gRPC call with no chunkd code in it, to tell what chunkd adds to a call
// from what a call costs.
//
// The server answers any method of a server-streaming call with one message of a fixed size,
// from a static slice (no copy), on gRPC's asynchronous API with one completion-queue thread:
// chunkd's own server engine, less everything chunkd does. The client makes the call on gRPC's
// synchronous API and copies the reply once into contiguous memory, as chunkd's client does.
// Both ends use chunkd's HTTP/2 settings (proto/wire/transport.h) and the client the same
// polling engine as chunkd's client.
#ifndef CHUNKD_BENCH_GRPC_FLOOR_H_
#define CHUNKD_BENCH_GRPC_FLOOR_H_

#include <cstddef>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "grpcpp/channel.h"

namespace chunkd::bench {

// Serves replies of `size` bytes on `address` (port 0: any) until SIGTERM or SIGINT; writes the
// bound address to `ready_file`. Returns the process's exit status.
int RunGrpcFloorServer(size_t size, const std::string& address, const std::string& ready_file);

class GrpcFloorClient {
 public:
  // A connection of its own (client threads do not share one, as chunkd's clients do not).
  static absl::StatusOr<std::unique_ptr<GrpcFloorClient>> Connect(const std::string& address,
                                                                  int connection);
  // One call; the view stays valid until the next.
  absl::StatusOr<std::string_view> Fetch();

 private:
  explicit GrpcFloorClient(std::shared_ptr<grpc::Channel> channel);
  std::shared_ptr<grpc::Channel> channel_;
  std::vector<char> buffer_;
};

}  // namespace chunkd::bench

#endif  // CHUNKD_BENCH_GRPC_FLOOR_H_
