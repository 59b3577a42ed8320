// Reads every byte of a value once, as the benchmarks count a reader that has a shared-memory
// value: such a value is a view of the server's memory, none of whose bytes has been read yet.
#ifndef CHUNKD_BUFFER_READ_EVERY_BYTE_H_
#define CHUNKD_BUFFER_READ_EVERY_BYTE_H_

#include <cstdint>
#include <string_view>

namespace chunkd::buffer {

// A sum (modulo 2^64) of the 64-bit words of the value's whole 32-byte blocks, in four lanes,
// then of the bytes left: what a reader
// that decodes or checks a value in place pays at the least. Compiled once, out of line, in
// chunkd_buffer at the project's optimisation, so the C++ benchmark driver (bench/chunkd_bench)
// and the Python one (python/benchmarks/compare.py, through chunkd._native._read_every_byte,
// whose module is otherwise compiled for size) run the same machine code.
uint64_t ReadEveryByte(std::string_view value);

}  // namespace chunkd::buffer

#endif  // CHUNKD_BUFFER_READ_EVERY_BYTE_H_
