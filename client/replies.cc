#include "client/replies.h"

#include <utility>

#include "absl/strings/cord.h"
#include "absl/strings/str_cat.h"

namespace chunkd::client {
namespace {

// Field number of GetResponse.header.
constexpr uint32_t kHeaderField = 1;

constexpr char kImportFailedPayload[] = "chunkd/import-failed";

// An item's error from the wire. Its code is any int32 the sender wrote: one that is not a
// failing gRPC code (OK, or past the codes there are) becomes UNKNOWN, since an item's error must
// be an error and casting an unknown number to StatusCode is undefined.
absl::Status ItemStatus(const v1::ItemError& error) {
  int code = error.code();
  if (code <= 0 || code > static_cast<int>(absl::StatusCode::kUnauthenticated)) {
    return absl::UnknownError(absl::StrCat("item failed with code ", code, ": ", error.message()));
  }
  return absl::Status(static_cast<absl::StatusCode>(code), error.message());
}

}  // namespace

absl::Status FromGrpc(const grpc::Status& s) {
  if (s.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
}

absl::Status ImportFailed(const absl::Status& cause, v1::Delivery delivery) {
  absl::Status s = absl::AbortedError(cause.message());
  s.SetPayload(kImportFailedPayload, absl::Cord(v1::Delivery_Name(delivery)));
  return s;
}

v1::Delivery ImportFailure(const absl::Status& s) {
  auto payload = s.GetPayload(kImportFailedPayload);
  v1::Delivery d = v1::DELIVERY_UNSPECIFIED;
  if (payload) (void)v1::Delivery_Parse(std::string(*payload), &d);
  return d;
}

UnclaimedLease::UnclaimedLease(UnclaimedLease&& other) noexcept
    : importer_(std::move(other.importer_)), id_(std::exchange(other.id_, 0)) {}

UnclaimedLease& UnclaimedLease::operator=(UnclaimedLease&& other) noexcept {
  Drop();
  importer_ = std::move(other.importer_);
  id_ = std::exchange(other.id_, 0);
  return *this;
}

void UnclaimedLease::Drop() {
  if (id_ != 0 && importer_) importer_->Drop(std::exchange(id_, 0));
}

absl::Status GetReply::Absorb(const grpc::ByteBuffer& message) {
  wire::FieldReader reader(message);
  while (!reader.done()) {
    uint32_t field, wire_type;
    if (!reader.NextField(&field, &wire_type)) return Malformed();
    uint64_t length;
    if (field == kHeaderField && wire_type == 2) {
      std::string bytes;
      if (!reader.ReadVarint(&length) || !reader.ReadString(length, &bytes)) return Malformed();
      if (absl::Status s = TakeHeader(bytes); !s.ok()) return s;
    } else if (field == wire::kDataField && wire_type == 2) {
      if (!reader.ReadVarint(&length)) return Malformed();
      if (absl::Status s = TakeData(reader, length); !s.ok()) return s;
    } else if (!reader.SkipField(wire_type)) {
      return Malformed();
    }
  }
  return absl::OkStatus();
}

bool InterruptedGet::active() const {
  absl::MutexLock lock(&mu_);
  return kept_.has_value();
}

std::optional<InterruptedGet::Kept> InterruptedGet::Take() {
  absl::MutexLock lock(&mu_);
  return std::exchange(kept_, std::nullopt);
}

void InterruptedGet::Keep(Kept kept) {
  absl::MutexLock lock(&mu_);
  kept_ = std::move(kept);
}

void GetReply::RewriteRequest(v1::GetRequest* request) const {
  const v1::GetHeader& whole = kept_->header;
  uint64_t from = whole.range_start() + kept_->received;
  request->mutable_range()->mutable_bounded()->set_start(static_cast<int64_t>(from));
  request->mutable_range()->mutable_bounded()->set_end(
      static_cast<int64_t>(whole.range_start() + whole.length()));
  // The caller's conditions held for this generation when the first attempt read it: the
  // rest must come from the same one.
  request->mutable_conditions()->Clear();
  request->mutable_conditions()->set_if_generation_match(whole.generation());
  // The kept bytes are in this process's memory: the rest comes inline after them.
  request->clear_accept();
  request->add_accept(v1::DELIVERY_INLINE);
}

absl::Status GetReply::TakeRest(const v1::GetHeader& rest) {
  InterruptedGet::Kept kept = *std::exchange(kept_, std::nullopt);
  const v1::GetHeader& whole = kept.header;
  if (rest.delivery() != v1::DELIVERY_INLINE || rest.generation() != whole.generation() ||
      rest.total_size() != whole.total_size() ||
      rest.range_start() != whole.range_start() + kept.received ||
      rest.length() != whole.length() - kept.received) {
    return absl::DataLossError(
        absl::StrCat("the reply to a resumed Get does not continue the value (bytes ",
                     rest.range_start(), "+", rest.length(), " of generation ", rest.generation(),
                     ", wanted ", whole.range_start() + kept.received, "+",
                     whole.length() - kept.received, " of generation ", whole.generation(), ")"));
  }
  header_ = std::move(kept.header);
  value_ = std::move(kept.value);
  received_ = kept.received;
  return absl::OkStatus();
}

absl::Status GetReply::Interrupted(const grpc::Status& status) {
  absl::Status error = FromGrpc(status);
  if (resume_ == nullptr) return error;
  // The connection closed mid-value (the server going away), or the server reset or cancelled
  // the stream: not an answer about the value. DEADLINE_EXCEEDED is the caller's limit, and a
  // cancellation of the caller's own ends the call (the retry loops check it before any next
  // attempt).
  bool cut_off = absl::IsUnavailable(error) || absl::IsInternal(error) || absl::IsCancelled(error);
  InterruptedGet::Kept kept;
  if (kept_) {
    // A continuing attempt that failed before the rest's header.
    if (absl::IsFailedPrecondition(error)) {
      // The generation condition it added failed: the value changed since the kept bytes were
      // read. The next attempt reads it whole, with the caller's own conditions.
      kept_.reset();
      return absl::UnavailableError(absl::StrCat(
          "the value changed while a Get that was cut off was resumed; reading it again (",
          error.message(), ")"));
    }
    kept = *std::exchange(kept_, std::nullopt);
  } else if (have_header_ && !is_handle() && received_ > 0 && received_ < header_.length()) {
    kept = {header_, std::move(value_), received_};
  } else {
    return error;  // nothing to continue
  }
  if (!cut_off) return error;
  uint64_t received = kept.received, length = kept.header.length();
  resume_->Keep(std::move(kept));
  return absl::UnavailableError(absl::StrCat("Get reply cut off after ", received, " of ", length,
                                             " bytes (", error.message(),
                                             "); the next attempt asks for the rest"));
}

absl::Status GetReply::TakeHeader(const std::string& bytes) {
  if (have_header_) return Malformed();
  if (kept_) {
    v1::GetHeader rest;
    if (!rest.ParseFromString(bytes)) return Malformed();
    have_header_ = true;
    return TakeRest(rest);
  }
  if (!header_.ParseFromString(bytes)) return Malformed();
  have_header_ = true;
  if (is_handle() && header_.lease().id() != 0) {
    // Kept alive from now on, not from the end of the reply (a GetMany's may be far off).
    if (importer_) importer_->Announce(header_.lease(), started_);
    unclaimed_ = UnclaimedLease(importer_, header_.lease().id());
  }
  // The bytes announced lie within the value.
  if (header_.range_start() > header_.total_size() ||
      header_.length() > header_.total_size() - header_.range_start()) {
    return Malformed();
  }
  if (is_handle()) return absl::OkStatus();  // no bytes follow
  if (header_.length() > max_bytes_) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "the Get reply announces ", header_.length(), " bytes, more than this client's maximum of ",
        max_bytes_, " (ClientOptions::max_value_bytes)"));
  }
  auto value = buffer::cpu::MutableBuffer::Allocate(header_.length());
  if (!value.ok()) return value.status();
  value_ = *std::move(value);
  return absl::OkStatus();
}

absl::Status GetReply::TakeData(wire::FieldReader& reader, uint64_t length) {
  if (!have_header_ || is_handle() || length > header_.length() - received_ ||
      !reader.ReadBytes(value_.data() + received_, length)) {
    return Malformed();
  }
  received_ += length;
  return absl::OkStatus();
}

bool GetReply::complete() const {
  if (!have_header_) return false;
  return is_handle() || received_ == header_.length();
}

absl::StatusOr<GetResult> GetReply::Finish(const grpc::Status& status) {
  if (!status.ok()) return Interrupted(status);
  if (!have_header_) return absl::InternalError("Get reply carried no header");
  if (is_handle()) {
    unclaimed_.Claim();  // the importer's now: the buffer returns it, or the failure does
    return importer_->Import(header_);
  }
  if (received_ != header_.length()) {
    return absl::DataLossError(
        absl::StrCat("Get reply ended after ", received_, " of ", header_.length(), " bytes"));
  }
  GetResult r;
  r.data = std::move(value_).Freeze();
  r.total_size = header_.total_size();
  r.generation = header_.generation();
  r.range_start = header_.range_start();
  r.delivery = header_.delivery();
  r.production_id = header_.production_id();
  return r;
}

GetManyReply::GetManyReply(std::shared_ptr<HandleImporter> importer, size_t items,
                           uint64_t max_bytes, ItemsCallback each, size_t base)
    : each_(std::move(each)), base_(base) {
  replies_.reserve(items);
  for (size_t i = 0; i < items; ++i) replies_.emplace_back(importer, max_bytes);
  errors_.resize(items);
}

absl::Status GetManyReply::Absorb(const grpc::ByteBuffer& message) {
  if (absl::Status s = AbsorbParts(message); !s.ok()) return s;
  return each_ ? HandOver(/*finished=*/false) : absl::OkStatus();
}

absl::Status GetManyReply::HandOver(bool finished) {
  if (!import_failed_.ok()) return finished ? import_failed_ : absl::OkStatus();
  if (!finished && ReadyBytes() < kHandOverBytes) return absl::OkStatus();
  size_t first = handed_over_;
  std::vector<absl::StatusOr<GetResult>> results;
  absl::Status status = CompleteItems(finished, &results);
  if (!results.empty()) each_(base_ + first, std::move(results));
  return status;
}

uint64_t GetManyReply::ReadyBytes() const {
  uint64_t bytes = 0;
  for (size_t i = handed_over_; i < replies_.size() && bytes < kHandOverBytes; ++i) {
    if (errors_[i]) continue;
    if (!replies_[i].complete()) break;
    bytes += replies_[i].length();
  }
  return bytes;
}

absl::Status GetManyReply::CompleteItems(bool finished,
                                         std::vector<absl::StatusOr<GetResult>>* results) {
  while (handed_over_ < replies_.size()) {
    size_t i = handed_over_;
    absl::StatusOr<GetResult> result;
    if (errors_[i]) {
      result = *errors_[i];
    } else if (replies_[i].complete()) {
      result = replies_[i].Finish(grpc::Status::OK);
      if (!result.ok() && ImportFailure(result.status()) != v1::DELIVERY_UNSPECIFIED) {
        import_failed_ = result.status();
        return finished ? import_failed_ : absl::OkStatus();
      }
    } else if (finished) {
      result = absl::DataLossError(absl::StrCat("GetMany: no whole reply for item ", i));
    } else {
      return absl::OkStatus();
    }
    ++handed_over_;
    results->push_back(std::move(result));
  }
  return absl::OkStatus();
}

absl::Status GetManyReply::AbsorbParts(const grpc::ByteBuffer& message) {
  wire::FieldReader reader(message);
  while (!reader.done()) {
    uint32_t field, wire_type;
    uint64_t length;
    if (!reader.NextField(&field, &wire_type)) return Malformed();
    if (field != 1 || wire_type != 2) {
      if (!reader.SkipField(wire_type)) return Malformed();
      continue;
    }
    if (!reader.ReadVarint(&length)) return Malformed();
    if (absl::Status s = AbsorbPart(reader, reader.consumed() + length); !s.ok()) return s;
  }
  return absl::OkStatus();
}

absl::StatusOr<GetManyResults> GetManyReply::Finish() {
  if (each_) {
    if (absl::Status s = HandOver(/*finished=*/true); !s.ok()) return s;
    return GetManyResults();
  }
  GetManyResults results;
  results.reserve(replies_.size());
  absl::Status import_failed;
  for (size_t i = 0; i < replies_.size(); ++i) {
    if (errors_[i]) {
      results.push_back(*errors_[i]);
    } else if (!replies_[i].has_header()) {
      results.push_back(absl::DataLossError(absl::StrCat("GetMany: no reply for item ", i)));
    } else {
      results.push_back(replies_[i].Finish(grpc::Status::OK));
      if (!results.back().ok() && import_failed.ok() &&
          ImportFailure(results.back().status()) != v1::DELIVERY_UNSPECIFIED) {
        import_failed = results.back().status();
      }
    }
  }
  // A handle this process cannot import fails the whole call, which is made again inline;
  // every item was imported (or its lease dropped) first, so the leases of the others go
  // back as `results` is dropped.
  if (!import_failed.ok()) return import_failed;
  return results;
}

absl::Status GetManyReply::AbsorbPart(wire::FieldReader& reader, uint64_t end) {
  std::optional<uint64_t> index;
  while (reader.consumed() < end) {
    uint32_t field, wire_type;
    uint64_t value;
    if (!reader.NextField(&field, &wire_type)) return Malformed();
    if (field == 1 && wire_type == 0) {
      // The index comes first, everything else belongs to it; once given, it stays.
      if (index || !reader.ReadVarint(&value) || value >= replies_.size()) return Malformed();
      index = value;
      continue;
    }
    // No index before the header, error or data: it is 0, which protobuf's encoders leave out
    // (chunkd's server writes it always).
    if (!index && (field == 2 || field == 3 || field == wire::kDataField)) {
      if (replies_.empty()) return Malformed();
      index = 0;
    }
    if ((field == 2 || field == 3) && wire_type == 2) {
      std::string bytes;
      if (!reader.ReadVarint(&value) || !reader.ReadString(value, &bytes)) return Malformed();
      if (field == 2) {
        if (absl::Status s = replies_[*index].TakeHeader(bytes); !s.ok()) return s;
      } else {
        v1::ItemError error;
        if (!error.ParseFromString(bytes)) return Malformed();
        errors_[*index] = ItemStatus(error);
      }
    } else if (field == wire::kDataField && wire_type == 2) {
      if (!reader.ReadVarint(&value)) return Malformed();
      if (absl::Status s = replies_[*index].TakeData(reader, value); !s.ok()) return s;
    } else if (!reader.SkipField(wire_type)) {
      return Malformed();
    }
  }
  return reader.consumed() == end ? absl::OkStatus() : Malformed();
}

}  // namespace chunkd::client
