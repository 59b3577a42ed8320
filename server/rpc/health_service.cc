#include "server/rpc/health_service.h"

#include <optional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "proto/wire/raw_message.h"

namespace chunkd::server {
namespace {

constexpr char kCheck[] = "/grpc.health.v1.Health/Check";
constexpr char kWatch[] = "/grpc.health.v1.Health/Watch";
// HealthCheckResponse.ServingStatus
constexpr int kServing = 1, kNotServing = 2, kServiceUnknown = 3;

// HealthCheckRequest { string service = 1; }; nullopt when malformed.
std::optional<std::string> ServiceName(const grpc::ByteBuffer& message) {
  wire::FieldReader reader(message);
  std::string service;
  while (!reader.done()) {
    uint32_t field, wire_type;
    uint64_t length;
    if (!reader.NextField(&field, &wire_type)) return std::nullopt;
    if (field == 1 && wire_type == 2) {
      if (!reader.ReadVarint(&length) || !reader.ReadString(length, &service)) return std::nullopt;
    } else if (!reader.SkipField(wire_type)) {
      return std::nullopt;
    }
  }
  return service;
}

// HealthCheckResponse { ServingStatus status = 1; }
grpc::ByteBuffer Response(int status) {
  const char bytes[2] = {0x08, static_cast<char>(status)};
  grpc::Slice slice(bytes, sizeof(bytes));
  return grpc::ByteBuffer(&slice, 1);
}

}  // namespace

// One call of any method no registered service has; Check and Watch of the health service are
// answered, the rest end with UNIMPLEMENTED.
class HealthService::Call final : public rpc::Call {
 public:
  Call(HealthService* health, rpc::Engine* engine, grpc::ServerCompletionQueue* queue)
      : rpc::Call(engine, queue, /*method=*/nullptr, Spawner(health)), health_(health) {}

  static rpc::Engine::Spawner Spawner(HealthService* health) {
    return [health](rpc::Engine* engine, grpc::ServerCompletionQueue* queue) {
      (new Call(health, engine, queue))->Arm();
    };
  }

  // The server's status changed (or it shuts down: `end`).
  void Notify(bool serving, bool end) {
    absl::MutexLock lock(&mu_);
    if (finished_) return;
    // A watched name the server does not have stays SERVICE_UNKNOWN.
    status_ = !known_ ? kServiceUnknown : serving ? kServing : kNotServing;
    ending_ |= end;
    if (writing_) {
      dirty_ = true;
      return;
    }
    WriteLocked();
  }

 private:
  void Request(grpc::ServerCompletionQueue* queue, void* tag) override {
    health_->generic_.RequestCall(&context_, &stream_, queue, queue, tag);
  }

  void OnStart() override {
    const std::string& method = context_.method();
    if (method != kCheck && method != kWatch) {
      Finish(
          grpc::Status(grpc::StatusCode::UNIMPLEMENTED, absl::StrCat("unknown method ", method)));
      return;
    }
    watch_ = method == kWatch;
    BeginOp();
    stream_.Read(&request_, read_tag());
  }

  void OnReadDone(bool ok) override {
    std::optional<std::string> service = ok ? ServiceName(request_) : std::nullopt;
    if (!service) {
      Finish(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "malformed HealthCheckRequest"));
      return;
    }
    service_ = *std::move(service);
    int status = health_->StatusOf(service_);
    if (!watch_) {
      if (status == kServiceUnknown) {
        Finish(grpc::Status(grpc::StatusCode::NOT_FOUND,
                            absl::StrCat("unknown service \"", service_, "\"")));
        return;
      }
      response_ = Response(status);
      BeginOp();
      stream_.WriteAndFinish(response_, grpc::WriteOptions(), grpc::Status::OK, finish_tag());
      return;
    }
    known_ = status != kServiceUnknown;
    bool end;
    {
      absl::MutexLock lock(&health_->mu_);
      end = health_->shut_down_;
      if (!end) health_->watchers_.insert(this);
      watching_ = !end;
    }
    Notify(status == kServing, end);
  }

  void OnWriteDone(bool ok) override {
    absl::MutexLock lock(&mu_);
    writing_ = false;
    if (!ok || ending_) {
      FinishLocked(grpc::Status::OK);
    } else if (dirty_) {
      WriteLocked();
    }
  }

  void OnCancel() override {
    Unwatch();
    absl::MutexLock lock(&mu_);
    ending_ = true;
    if (!writing_) FinishLocked(grpc::Status(grpc::StatusCode::CANCELLED, "cancelled"));
  }

  void OnDone() override { Unwatch(); }

  void Unwatch() {
    if (!watching_) return;
    absl::MutexLock lock(&health_->mu_);
    health_->watchers_.erase(this);
    watching_ = false;
  }

  void WriteLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    dirty_ = false;
    writing_ = true;
    response_ = Response(status_);
    BeginOp();
    stream_.Write(response_, write_tag());
  }

  void FinishLocked(grpc::Status status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (finished_) return;
    finished_ = true;
    Finish(std::move(status));
  }

  void Finish(grpc::Status status) override {
    BeginOp();
    stream_.Finish(status, finish_tag());
  }

  HealthService* const health_;
  grpc::GenericServerAsyncReaderWriter stream_{&context_};
  grpc::ByteBuffer request_;
  grpc::ByteBuffer response_;
  std::string service_;
  bool watch_ = false;
  bool known_ = false;
  // Set and cleared on the queue threads, one event at a time.
  bool watching_ = false;
  absl::Mutex mu_;
  int status_ ABSL_GUARDED_BY(mu_) = 0;
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool dirty_ ABSL_GUARDED_BY(mu_) = false;
  bool ending_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
};

HealthService::HealthService(std::vector<std::string> services) : services_(std::move(services)) {}

void HealthService::Serve(rpc::Engine* engine) { engine->AddMethod(Call::Spawner(this), 1); }

int HealthService::StatusOf(const std::string& service) const {
  bool known = service.empty();
  for (const std::string& s : services_) known |= s == service;
  if (!known) return kServiceUnknown;
  absl::MutexLock lock(&mu_);
  return serving_ ? kServing : kNotServing;
}

void HealthService::SetServing(bool serving) {
  absl::MutexLock lock(&mu_);
  if (shut_down_) return;
  serving_ = serving;
  for (Call* watcher : watchers_) watcher->Notify(serving, /*end=*/false);
}

void HealthService::Shutdown() {
  absl::MutexLock lock(&mu_);
  if (shut_down_) return;
  shut_down_ = true;
  serving_ = false;
  for (Call* watcher : watchers_) watcher->Notify(false, /*end=*/true);
}

}  // namespace chunkd::server
