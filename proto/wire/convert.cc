#include "proto/wire/convert.h"

namespace chunkd::wire {

void ToProto(const ByteRange& r, v1::GetRequest* out) {
  switch (r.kind) {
    case ByteRange::Kind::kAll:
      break;
    case ByteRange::Kind::kBounded:
      out->mutable_range()->mutable_bounded()->set_start(r.start);
      out->mutable_range()->mutable_bounded()->set_end(r.end);
      break;
    case ByteRange::Kind::kOffset:
      out->mutable_range()->set_offset(r.start);
      break;
    case ByteRange::Kind::kSuffix:
      out->mutable_range()->set_suffix(r.suffix);
      break;
  }
}

absl::StatusOr<ByteRange> RangeFromProto(const v1::GetRequest& request) {
  if (!request.has_range()) return ByteRange::All();
  const v1::ByteRange& r = request.range();
  ByteRange range;
  switch (r.kind_case()) {
    case v1::ByteRange::kBounded:
      range = ByteRange::Bounded(r.bounded().start(), r.bounded().end());
      break;
    case v1::ByteRange::kOffset:
      range = ByteRange::FromOffset(r.offset());
      break;
    case v1::ByteRange::kSuffix:
      range = ByteRange::Suffix(r.suffix());
      break;
    case v1::ByteRange::KIND_NOT_SET:
      range = ByteRange::All();
      break;
  }
  if (absl::Status s = range.Validate(); !s.ok()) return s;
  return range;
}

void ToProto(const Conditions& c, v1::Conditions* out) {
  if (c.if_generation_match) out->set_if_generation_match(*c.if_generation_match);
  if (c.if_generation_not_match) out->set_if_generation_not_match(*c.if_generation_not_match);
}

Conditions ConditionsFromProto(const v1::Conditions& proto) {
  Conditions conditions;
  if (proto.has_if_generation_match()) conditions.if_generation_match = proto.if_generation_match();
  if (proto.has_if_generation_not_match()) {
    conditions.if_generation_not_match = proto.if_generation_not_match();
  }
  return conditions;
}

void ToProto(const buffer::HostIdentity& id, v1::ClientIdentity* out) {
  out->set_boot_id(id.boot_id);
  out->set_ipc_namespace(id.ipc_namespace);
  out->set_mount_namespace(id.mount_namespace);
  out->set_shm_dir(id.shm_dir);
  out->set_shm_dir_dev(id.shm_dir_dev);
  out->set_shm_dir_ino(id.shm_dir_ino);
}

buffer::HostIdentity IdentityFromProto(const v1::ClientIdentity& proto) {
  buffer::HostIdentity id;
  id.boot_id = proto.boot_id();
  id.ipc_namespace = proto.ipc_namespace();
  id.mount_namespace = proto.mount_namespace();
  id.shm_dir = proto.shm_dir();
  id.shm_dir_dev = proto.shm_dir_dev();
  id.shm_dir_ino = proto.shm_dir_ino();
  return id;
}

}  // namespace chunkd::wire
