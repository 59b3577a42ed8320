// The streamed listing every service's List method runs: the store's listing, read page by
// page on an I/O thread after the previous page was sent, so that a slow reader holds one page,
// not the whole listing, and a listing of millions of keys is never held at once.
#ifndef CHUNKD_SERVER_SERVICES_LIST_CALL_H_
#define CHUNKD_SERVER_SERVICES_LIST_CALL_H_

#include <memory>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "server/rpc/grpc_status.h"
#include "server/rpc/rpc_engine.h"
#include "server/store/chunk_store.h"

namespace chunkd::server {

// A server-streaming call whose replies are pages of a listing. The method's OnStart checks
// its request and calls StartListing; AddPage turns each page into the reply message.
template <class RequestT, class ResponseT>
class PagedListCall : public rpc::ServerStreamCall<RequestT, ResponseT> {
 protected:
  // Entries and prefixes per store page (one reply message at most).
  static constexpr size_t kPageItems = 1000;

  using rpc::ServerStreamCall<RequestT, ResponseT>::ServerStreamCall;

  // Lists `prefix` (REQUIRES: ValidatePrefix(prefix).ok()) from `store`.
  void StartListing(ChunkStore* store, std::string prefix, bool directory) {
    store_ = store;
    prefix_ = std::move(prefix);
    directory_ = directory;
    ScheduleNextPage();
  }

  // Fills `response` (cleared) from `page`; returns false when the listing should end after
  // this page (the rest lies past what was asked for).
  virtual bool AddPage(ListPage& page, ResponseT* response) = 0;
  // True when `response` holds nothing to send.
  virtual bool Empty(const ResponseT& response) const = 0;

 private:
  void OnWriteDone(bool ok) override {
    if (!ok) {
      this->Finish(grpc::Status(grpc::StatusCode::CANCELLED, "the client stopped reading"));
      return;
    }
    ScheduleNextPage();
  }

  void ScheduleNextPage() {
    absl::Status queued = store_->Submit([this] { NextPage(); });
    if (!queued.ok()) this->Finish(ToGrpcStatus(queued));
  }

  void NextPage() {
    if (!cursor_) {
      auto cursor = store_->List(prefix_, directory_);
      if (!cursor.ok()) {
        this->Finish(ToGrpcStatus(cursor.status()));
        return;
      }
      cursor_ = *std::move(cursor);
    }
    ListPage page;
    absl::StatusOr<bool> more = cursor_->Next(kPageItems, &page);
    if (!more.ok()) {
      this->Finish(ToGrpcStatus(more.status()));
      return;
    }
    response_.Clear();
    if (!AddPage(page, &response_)) *more = false;
    bool empty = Empty(response_);
    if (*more) {
      if (empty) {
        ScheduleNextPage();
      } else {
        this->StartWrite(&response_);
      }
    } else if (empty) {
      this->Finish(grpc::Status::OK);
    } else {
      this->StartWriteAndFinish(&response_, grpc::WriteOptions(), grpc::Status::OK);
    }
  }

  ChunkStore* store_ = nullptr;
  std::string prefix_;
  bool directory_ = false;
  std::unique_ptr<ListCursor> cursor_;
  ResponseT response_;
};

}  // namespace chunkd::server

#endif  // CHUNKD_SERVER_SERVICES_LIST_CALL_H_
