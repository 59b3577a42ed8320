#include "client/health.h"

#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "client/credentials.h"
#include "grpcpp/generic/generic_stub.h"
#include "grpcpp/support/byte_buffer.h"

namespace chunkd::client {

absl::StatusOr<std::string> CheckHealth(const ClientOptions& options, absl::Duration timeout,
                                        const std::string& service) {
  ClientOptions plain = options;
  plain.token.clear();  // the health service is open; a token would only travel for nothing
  auto channel = CreateChannel(plain, grpc::ChannelArguments());
  if (!channel.ok()) return channel.status();
  // HealthCheckRequest { string service = 1; }, encoded by hand: Debian ships no health stub.
  std::string request_bytes;
  if (!service.empty()) {
    if (service.size() > 127) return absl::InvalidArgumentError("service name too long");
    request_bytes =
        absl::StrCat("\x0a", std::string(1, static_cast<char>(service.size())), service);
  }
  grpc::Slice slice(request_bytes);
  grpc::ByteBuffer request(&slice, 1), response;
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
  grpc::GenericStub stub(*channel);
  grpc::Status status;
  absl::Notification done;
  stub.UnaryCall(&context, "/grpc.health.v1.Health/Check", grpc::StubOptions(), &request, &response,
                 [&](grpc::Status s) {
                   status = std::move(s);
                   done.Notify();
                 });
  done.WaitForNotification();
  if (!status.ok()) {
    return absl::Status(
        static_cast<absl::StatusCode>(status.error_code()),
        absl::StrCat("health check of ", options.address, ": ", status.error_message()));
  }
  // HealthCheckResponse { ServingStatus status = 1; } (absent: UNKNOWN).
  std::vector<grpc::Slice> slices;
  std::string bytes;
  if (response.Dump(&slices).ok()) {
    for (const grpc::Slice& s : slices) {
      bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
    }
  }
  int value = 0;
  if (bytes.size() >= 2 && bytes[0] == '\x08') value = static_cast<unsigned char>(bytes[1]);
  switch (value) {
    case 1:
      return std::string("SERVING");
    case 2:
      return std::string("NOT_SERVING");
    case 3:
      return std::string("SERVICE_UNKNOWN");
    default:
      return std::string("UNKNOWN");
  }
}

}  // namespace chunkd::client
