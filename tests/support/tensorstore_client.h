// A small blocking client of TensorStore's key-value service (tensorstore_grpc.kvstore), for
// the C++ tests of chunkd's implementation of it: the calls TensorStore's tsgrpc_kvstore driver
// makes, with the answers as they come off the wire.
#ifndef CHUNKD_TESTS_SUPPORT_TENSORSTORE_CLIENT_H_
#define CHUNKD_TESTS_SUPPORT_TENSORSTORE_CLIENT_H_

#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "grpcpp/channel.h"
#include "grpcpp/client_context.h"
#include "grpcpp/create_channel.h"
#include "tensorstore_grpc/kvstore/kvstore.grpc.pb.h"

namespace chunkd::testing {

namespace tskv = ::tensorstore_grpc::kvstore;

inline constexpr char kTsNoValue[] = "\x02";

struct TsRead {
  grpc::Status status;
  tskv::ReadResponse::State state = tskv::ReadResponse::UNSPECIFIED;
  std::string generation;
  std::string value;
  int messages = 0;
};

struct TsReadOptions {
  std::string if_equal, if_not_equal;
  // TensorStore's byte range: a negative min is a suffix; max nullopt: to the end.
  std::optional<int64_t> min;
  std::optional<int64_t> max;

  static TsReadOptions Range(int64_t min, std::optional<int64_t> max = std::nullopt) {
    TsReadOptions o;
    o.min = min;
    o.max = max;
    return o;
  }
  static TsReadOptions IfEqual(std::string g) {
    TsReadOptions o;
    o.if_equal = std::move(g);
    return o;
  }
  static TsReadOptions IfNotEqual(std::string g) {
    TsReadOptions o;
    o.if_not_equal = std::move(g);
    return o;
  }
};

class TsClient {
 public:
  explicit TsClient(std::shared_ptr<grpc::Channel> channel, std::string token = "")
      : stub_(tskv::KvStoreService::NewStub(std::move(channel))), token_(std::move(token)) {}
  explicit TsClient(const std::string& address, std::string token = "")
      : TsClient(grpc::CreateChannel(address, grpc::InsecureChannelCredentials()),
                 std::move(token)) {}

  TsRead Read(const std::string& key, const TsReadOptions& options = {}) {
    grpc::ClientContext context;
    Prepare(&context);
    tskv::ReadRequest request;
    request.set_key(key);
    request.set_generation_if_equal(options.if_equal);
    request.set_generation_if_not_equal(options.if_not_equal);
    if (options.min || options.max) {
      request.mutable_byte_range()->set_inclusive_min(options.min.value_or(0));
      if (options.max) request.mutable_byte_range()->set_exclusive_max(*options.max);
    }
    TsRead out;
    auto reader = stub_->Read(&context, request);
    tskv::ReadResponse response;
    while (reader->Read(&response)) {
      if (out.messages++ == 0) {
        out.state = response.state();
        out.generation = response.generation_and_timestamp().generation();
      }
      out.value += response.value_part();
    }
    out.status = reader->Finish();
    return out;
  }

  // OK with the new generation ("" when the condition did not hold), or the error.
  grpc::Status Write(const std::string& key, const std::string& value, std::string* generation,
                     const std::string& if_equal = "") {
    grpc::ClientContext context;
    Prepare(&context);
    tskv::WriteResponse response;
    auto writer = stub_->Write(&context, &response);
    size_t offset = 0;
    do {
      tskv::WriteRequest request;
      if (offset == 0) {
        request.set_key(key);
        request.set_generation_if_equal(if_equal);
      }
      request.set_value_part(value.substr(offset, 1 << 20));
      offset += request.value_part().size();
      if (!writer->Write(request)) break;
    } while (offset < value.size());
    writer->WritesDone();
    grpc::Status status = writer->Finish();
    if (generation) *generation = response.generation_and_timestamp().generation();
    return status;
  }

  grpc::Status Delete(const std::string& key, std::string* generation = nullptr,
                      const std::string& if_equal = "") {
    tskv::DeleteRequest request;
    request.set_key(key);
    request.set_generation_if_equal(if_equal);
    return Delete(request, generation);
  }
  grpc::Status DeleteRange(const std::string& min, const std::string& max) {
    tskv::DeleteRequest request;
    request.mutable_range()->set_inclusive_min(min);
    request.mutable_range()->set_exclusive_max(max);
    return Delete(request, nullptr);
  }
  grpc::Status Delete(const tskv::DeleteRequest& request, std::string* generation) {
    grpc::ClientContext context;
    Prepare(&context);
    tskv::DeleteResponse response;
    grpc::Status status = stub_->Delete(&context, request, &response);
    if (generation) *generation = response.generation_and_timestamp().generation();
    return status;
  }

  grpc::Status List(const std::string& min, const std::string& max, std::vector<std::string>* keys,
                    uint64_t strip_prefix_length = 0) {
    grpc::ClientContext context;
    Prepare(&context);
    tskv::ListRequest request;
    request.mutable_range()->set_inclusive_min(min);
    request.mutable_range()->set_exclusive_max(max);
    request.set_strip_prefix_length(strip_prefix_length);
    auto reader = stub_->List(&context, request);
    tskv::ListResponse response;
    while (reader->Read(&response)) {
      for (const auto& entry : response.entry()) keys->push_back(entry.key());
    }
    return reader->Finish();
  }

  tskv::KvStoreService::Stub& stub() { return *stub_; }

 private:
  void Prepare(grpc::ClientContext* context) {
    context->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    if (!token_.empty()) context->AddMetadata("authorization", "Bearer " + token_);
  }

  std::unique_ptr<tskv::KvStoreService::Stub> stub_;
  std::string token_;
};

}  // namespace chunkd::testing

#endif  // CHUNKD_TESTS_SUPPORT_TENSORSTORE_CLIENT_H_
