// HTTP/2 settings both ends of a chunkd connection use.
//
// A chunk is 4 KiB to 256 MiB, sent in parts of up to 1 MiB. gRPC's defaults are sized for
// small RPCs: every new stream starts with a 64 KiB flow-control window (grown only later by
// BDP probing) and frames of 16 KiB, so a 1 MiB reply waits on several WINDOW_UPDATE round
// trips and is cut into 64 frames. A stream window of 8 MiB lets a whole part (and the next)
// be in flight at once, and 1 MiB frames carry a part with one frame header; measured on the
// 1 MiB/4-client bench row, throughput rose by about a third (see the issue notes; bench/run).
// The window is a credit, not an allocation: memory is used only by bytes actually in flight.
#ifndef CHUNKD_PROTO_WIRE_TRANSPORT_H_
#define CHUNKD_PROTO_WIRE_TRANSPORT_H_

namespace chunkd::wire {

inline constexpr char kStreamWindowArg[] = "grpc.http2.lookahead_bytes";
inline constexpr int kStreamWindowBytes = 8 << 20;
inline constexpr char kMaxFrameArg[] = "grpc.http2.max_frame_size";
inline constexpr int kMaxFrameBytes = 1 << 20;

}  // namespace chunkd::wire

#endif  // CHUNKD_PROTO_WIRE_TRANSPORT_H_
