// How a service puts its methods on the RPC engine (server/rpc/rpc_engine.h), for every
// service of the server: a call object per method, armed again by each arrival.
#ifndef CHUNKD_SERVER_SERVICES_METHOD_CALLS_H_
#define CHUNKD_SERVER_SERVICES_METHOD_CALLS_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <utility>

#include "grpcpp/support/byte_buffer.h"
#include "grpcpp/support/status.h"
#include "server/rpc/rpc_engine.h"

namespace chunkd::server {

// Ends a unary call: OK sends the response filled in, an error only the status. Called once,
// from any thread.
using UnaryDone = std::function<void(grpc::Status)>;

// Makes the call objects of one method: each arrival arms the next. CallT is constructed
// from (Service*, rpc::Engine*, grpc::ServerCompletionQueue*).
template <class CallT, class Service>
rpc::Engine::Spawner SpawnerOf(Service* service) {
  return [service](rpc::Engine* engine, grpc::ServerCompletionQueue* queue) {
    (new CallT(service, engine, queue))->Arm();
  };
}

// A unary method: the service's handler fills the response in and calls `done`, there or
// later from an I/O thread.
template <class Service, class Req, class Resp>
class UnaryMethodCall final : public rpc::UnaryCall<Req, Resp> {
 public:
  using RequestFn = void (Service::*)(grpc::ServerContext*, Req*,
                                      grpc::ServerAsyncResponseWriter<Resp>*,
                                      grpc::CompletionQueue*, grpc::ServerCompletionQueue*, void*);
  using HandlerFn = void (Service::*)(const Req&, Resp*, UnaryDone);

  UnaryMethodCall(Service* service, rpc::Engine* engine, grpc::ServerCompletionQueue* queue,
                  const char* name, RequestFn request, HandlerFn handler)
      : rpc::UnaryCall<Req, Resp>(
            engine, queue, name,
            [=](rpc::Engine* e, grpc::ServerCompletionQueue* q) {
              (new UnaryMethodCall(service, e, q, name, request, handler))->Arm();
            }),
        service_(service),
        request_fn_(request),
        handler_(handler) {}

 private:
  void Request(grpc::ServerCompletionQueue* queue, void* tag) override {
    (service_->*request_fn_)(&this->context_, &this->request_, &this->responder_, queue, queue,
                             tag);
  }
  void OnStart() override {
    (service_->*handler_)(this->request_, &this->response_,
                          [this](grpc::Status status) { this->Finish(std::move(status)); });
  }

  Service* const service_;
  const RequestFn request_fn_;
  const HandlerFn handler_;
};

// Registers a unary method of `service` with `engine` (one call waiting per queue). `name`
// is what authorization and logs call it (server/rpc/auth.h: RequiredRight).
template <class Service, class Req, class Resp>
void AddUnary(rpc::Engine* engine, Service* service, const char* name,
              typename UnaryMethodCall<Service, Req, Resp>::RequestFn request,
              void (Service::*handler)(const Req&, Resp*, UnaryDone)) {
  engine->AddMethod(
      [=](rpc::Engine* e, grpc::ServerCompletionQueue* q) {
        (new UnaryMethodCall<Service, Req, Resp>(service, e, q, name, request, handler))->Arm();
      },
      1);
}

// A read that streams its value in parts, one write in flight at a time (chunkd.v1's Get,
// TensorStore's Read): the subclass's WriteNext starts the next write once the last is done; a
// client that stops reading, or cancels, ends the call with CANCELLED. Calls that end in an
// error count in `errors`.
class StreamedReadCall : public rpc::ServerStreamCall<grpc::ByteBuffer, grpc::ByteBuffer> {
 protected:
  StreamedReadCall(rpc::Engine* engine, grpc::ServerCompletionQueue* queue, const char* name,
                   rpc::Engine::Spawner spawner, std::atomic<uint64_t>* errors)
      : ServerStreamCall(engine, queue, name, std::move(spawner)), errors_(errors) {}

  virtual void WriteNext() = 0;
  bool cancelled() const { return cancelled_.load(); }

  void FinishWith(grpc::Status status) {
    if (!status.ok()) errors_->fetch_add(1, std::memory_order_relaxed);
    Finish(std::move(status));
  }

  void OnWriteDone(bool ok) override {
    if (!ok) {
      FinishWith(grpc::Status(grpc::StatusCode::CANCELLED, "the client stopped reading"));
      return;
    }
    if (cancelled()) {
      FinishWith(grpc::Status(grpc::StatusCode::CANCELLED, "cancelled"));
      return;
    }
    WriteNext();
  }

  void OnCancel() override { cancelled_.store(true); }

 private:
  std::atomic<uint64_t>* const errors_;
  std::atomic<bool> cancelled_{false};
};

}  // namespace chunkd::server

#endif  // CHUNKD_SERVER_SERVICES_METHOD_CALLS_H_
