#include "bench/grpc_floor.h"

#include <signal.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/generic/async_generic_service.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server_builder.h"
#include "grpcpp/support/sync_stream.h"
#include "proto/wire/transport.h"

namespace chunkd::bench {
namespace {

constexpr char kMethod[] = "/chunkd.bench.Floor/Get";

std::atomic<bool> g_stop{false};
void OnSignal(int) { g_stop.store(true); }

// One call: request, read the request message, reply with the static message and the status.
class FloorCall {
 public:
  FloorCall(grpc::AsyncGenericService* service, grpc::ServerCompletionQueue* queue,
            const grpc::ByteBuffer* reply)
      : service_(service), queue_(queue), reply_(reply) {
    service_->RequestCall(&context_, &stream_, queue_, queue_, this);
  }

  void Proceed(bool ok) {
    switch (state_) {
      case State::kRequested:
        if (!ok) {
          delete this;
          return;
        }
        new FloorCall(service_, queue_, reply_);
        state_ = State::kReading;
        stream_.Read(&request_, this);
        return;
      case State::kReading:
        state_ = State::kFinishing;
        if (!ok) {
          stream_.Finish(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "no request"), this);
          return;
        }
        stream_.WriteAndFinish(*reply_, grpc::WriteOptions(), grpc::Status::OK, this);
        return;
      case State::kFinishing:
        delete this;
        return;
    }
  }

 private:
  enum class State { kRequested, kReading, kFinishing };
  grpc::AsyncGenericService* const service_;
  grpc::ServerCompletionQueue* const queue_;
  const grpc::ByteBuffer* const reply_;
  grpc::GenericServerContext context_;
  grpc::GenericServerAsyncReaderWriter stream_{&context_};
  grpc::ByteBuffer request_;
  State state_ = State::kRequested;
};

}  // namespace

int RunGrpcFloorServer(size_t size, const std::string& address, const std::string& ready_file) {
  static std::string bytes;
  bytes.assign(size, 'f');
  grpc::Slice slice(bytes.data(), bytes.size(), grpc::Slice::STATIC_SLICE);
  const grpc::ByteBuffer reply(&slice, 1);

  grpc::AsyncGenericService service;
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(address, grpc::InsecureServerCredentials(), &port);
  builder.AddChannelArgument(wire::kStreamWindowArg, wire::kStreamWindowBytes);
  builder.AddChannelArgument(wire::kMaxFrameArg, wire::kMaxFrameBytes);
  builder.RegisterAsyncGenericService(&service);
  std::unique_ptr<grpc::ServerCompletionQueue> queue = builder.AddCompletionQueue();
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (!server || port == 0) {
    std::fprintf(stderr, "grpc floor: cannot listen on %s\n", address.c_str());
    return 1;
  }
  for (int i = 0; i < 16; ++i) new FloorCall(&service, queue.get(), &reply);
  std::thread poller([&] {
    void* tag;
    bool ok;
    while (queue->Next(&tag, &ok)) static_cast<FloorCall*>(tag)->Proceed(ok);
  });
  std::string bound = absl::StrCat(address.substr(0, address.rfind(':')), ":", port);
  { std::ofstream(ready_file + ".tmp") << bound << "\n"; }
  std::rename((ready_file + ".tmp").c_str(), ready_file.c_str());
  signal(SIGTERM, OnSignal);
  signal(SIGINT, OnSignal);
  while (!g_stop.load()) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  server->Shutdown(std::chrono::system_clock::now());
  queue->Shutdown();
  poller.join();
  return 0;
}

absl::StatusOr<std::unique_ptr<GrpcFloorClient>> GrpcFloorClient::Connect(
    const std::string& address, int connection) {
  // The polling engine chunkd's client library chooses (client/client.cc).
  if (std::getenv("GRPC_POLL_STRATEGY") == nullptr) ::setenv("GRPC_POLL_STRATEGY", "poll", 0);
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(64 << 20);
  args.SetInt(wire::kStreamWindowArg, wire::kStreamWindowBytes);
  args.SetInt(wire::kMaxFrameArg, wire::kMaxFrameBytes);
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  args.SetInt("chunkd.bench.connection", connection);
  auto channel = grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args);
  if (!channel)
    return absl::InvalidArgumentError(absl::StrCat("grpc floor: bad address ", address));
  return std::unique_ptr<GrpcFloorClient>(new GrpcFloorClient(std::move(channel)));
}

GrpcFloorClient::GrpcFloorClient(std::shared_ptr<grpc::Channel> channel)
    : channel_(std::move(channel)) {}

absl::StatusOr<std::string_view> GrpcFloorClient::Fetch() {
  static const grpc::internal::RpcMethod method(kMethod,
                                                grpc::internal::RpcMethod::SERVER_STREAMING);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  grpc::Slice request_slice("k");
  const grpc::ByteBuffer request(&request_slice, 1);
  std::unique_ptr<grpc::ClientReader<grpc::ByteBuffer>> reader(
      grpc::internal::ClientReaderFactory<grpc::ByteBuffer>::Create(channel_.get(), method,
                                                                    &context, request));
  grpc::ByteBuffer message;
  size_t size = 0;
  while (reader->Read(&message)) {
    std::vector<grpc::Slice> slices;
    (void)message.Dump(&slices);
    size = message.Length();
    if (buffer_.size() < size) buffer_.resize(size);
    char* out = buffer_.data();
    for (const grpc::Slice& s : slices) {
      std::memcpy(out, s.begin(), s.size());
      out += s.size();
    }
  }
  grpc::Status status = reader->Finish();
  if (!status.ok()) {
    return absl::UnavailableError(absl::StrCat("grpc floor: ", status.error_message()));
  }
  return std::string_view(buffer_.data(), size);
}

}  // namespace chunkd::bench
