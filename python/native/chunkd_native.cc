// chunkd._native: the Python package's client core. Every call goes to the C++ client library
// (client/client.h, client/sharded_client.h): the protocol, retries, deadlines, leases,
// shared-memory mapping, CUDA IPC import and sharding live there, once. This file only converts
// arguments and results.
//
// - Blocking calls release the GIL for the whole call (the calling thread drives gRPC's
//   synchronous API, as a C++ caller's would).
// - Values arrive without a copy: a memoryview over a `Value`, an object that owns the C++
//   buffer the bytes were received into (inline; writable) or the mapped view of the server's
//   shared memory (read-only; its lease goes back when the last view of it is gone). A value in
//   GPU memory (CUDA IPC) is a `DeviceValue` with __cuda_array_interface__.
// - Asynchronous calls (the *_async methods) complete on gRPC's threads, which never take the
//   GIL: each completion is queued on the `Completions` of the caller's event loop, whose
//   eventfd is written only when the queue goes from empty to non-empty; the loop (add_reader)
//   then drains the queue and sets the futures (chunkd/aio.py).
// - Fork: gRPC (Debian's 1.51) cannot be used in a child forked after it started: the child's
//   copy of its threads is gone, and a call there hangs. So a client refuses to be made, or
//   used, in a process forked from one where a client was made, and a parent's client is never
//   destroyed in the child. The Python clients never meet this: in such a child they relay
//   their calls through a helper process of their own (chunkd/_relay.py).
#include <Python.h>
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "buffer/cpu/buffer.h"
#include "buffer/memory.h"
#include "buffer/read_every_byte.h"
#include "client/client.h"
#include "client/cuda_import.h"
#include "client/sharded_client.h"

namespace nb = nanobind;

namespace chunkd::python {
namespace {

using client::ByteRange;
using client::Conditions;
using client::GetManyItem;
using client::GetManyResults;
using client::GetOptions;
using client::GetResult;

// ------------------------------------------------------------------------------------------------
// The Python classes results are made of (chunkd._common, chunkd.errors), set by configure().

struct PyTypes {
  PyObject* get_result = nullptr;  // GetResult(data, total_size, generation, range_start, delivery)
  PyObject* put_result = nullptr;  // PutResult(generation, size)
  PyObject* stat = nullptr;        // Stat(exists, size, generation)
  PyObject* list_entry = nullptr;  // ListEntry(key, size)
  PyObject* listing = nullptr;     // Listing(entries, prefixes)
  PyObject* error = nullptr;       // error_from_status(code, details, key) -> exception
  PyObject* get_item = nullptr;    // the GetItem class
};
PyTypes types;

// Raises the Python error already set.
[[noreturn]] void Throw() { throw nb::python_error(); }

// The chunkd exception for `status` (chunkd.errors.error_from_status), about `key` (or None).
nb::object ErrorObject(const absl::Status& status, PyObject* key) {
  nb::str details(status.message().data(), status.message().size());
  PyObject* e = PyObject_CallFunction(types.error, "iOO", static_cast<int>(status.code()),
                                      details.ptr(), key ? key : Py_None);
  if (e == nullptr) Throw();
  return nb::steal(e);
}

[[noreturn]] void Raise(const absl::Status& status, PyObject* key) {
  nb::object e = ErrorObject(status, key);
  PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(e.ptr())), e.ptr());
  Throw();
}

// ------------------------------------------------------------------------------------------------
// Value: owns a C++ buffer and exposes it through the buffer protocol.

struct ValueObject {
  PyObject_HEAD buffer::cpu::Buffer buffer;
  bool writable;
};

PyTypeObject* value_type = nullptr;
std::byte empty_byte[1];

int ValueGetBuffer(PyObject* self, Py_buffer* view, int flags) {
  auto* v = reinterpret_cast<ValueObject*>(self);
  if ((flags & PyBUF_WRITABLE) == PyBUF_WRITABLE && !v->writable) {
    PyErr_SetString(PyExc_BufferError,
                    "chunkd value is read-only: it views the server's shared memory");
    return -1;
  }
  void* data = v->buffer.empty() ? empty_byte : const_cast<std::byte*>(v->buffer.data());
  return PyBuffer_FillInfo(view, self, data, static_cast<Py_ssize_t>(v->buffer.size()),
                           v->writable ? 0 : 1, flags);
}

void ValueDealloc(PyObject* self) {
  auto* v = reinterpret_cast<ValueObject*>(self);
  PyTypeObject* type = Py_TYPE(self);
  // Dropping the buffer may return a lease: that queues an id in the lease keeper (a mutex, no
  // call, no Python), so it is safe here.
  v->buffer.~Buffer();
  type->tp_free(self);
  Py_DECREF(type);
}

PyType_Slot value_slots[] = {
    {Py_tp_dealloc, reinterpret_cast<void*>(ValueDealloc)},
    {Py_bf_getbuffer, reinterpret_cast<void*>(ValueGetBuffer)},
    {Py_tp_doc, const_cast<char*>("The memory of one chunkd value (use memoryview(value)).")},
    {0, nullptr},
};
PyType_Spec value_spec = {"chunkd._native.Value", sizeof(ValueObject), 0, Py_TPFLAGS_DEFAULT,
                          value_slots};

// A memoryview of `buffer`, writable for inline bytes (the caller's own), read-only for shared
// memory (the server's). No copy: the view keeps the Value, the Value keeps the buffer.
nb::object MakeView(buffer::cpu::Buffer buffer, bool writable) {
  PyObject* obj = PyType_GenericAlloc(value_type, 0);
  if (obj == nullptr) Throw();
  auto* v = reinterpret_cast<ValueObject*>(obj);
  new (&v->buffer) buffer::cpu::Buffer(std::move(buffer));
  v->writable = writable;
  PyObject* view = PyMemoryView_FromObject(obj);
  Py_DECREF(obj);
  if (view == nullptr) Throw();
  return nb::steal(view);
}

// DeviceValue: a chunk in GPU memory (CUDA IPC), for CuPy and zarr's gpu.Buffer through
// __cuda_array_interface__; holds the lease as long as it lives.
struct DeviceValue {
  buffer::gpu::Buffer buffer;
  nb::dict Interface() const {
    nb::dict d;
    d["shape"] = nb::make_tuple(buffer.size());
    d["typestr"] = "|u1";
    d["data"] = nb::make_tuple(reinterpret_cast<uintptr_t>(buffer.device_ptr()), true);
    d["version"] = 3;
    d["strides"] = nb::none();
    return d;
  }
};

// ------------------------------------------------------------------------------------------------
// Arguments

// A key (or prefix) as it travels: UTF-8, with surrogateescape for the odd name a listing of a
// file store decoded that way (chunkd.Client returns keys decoded so).
std::string KeyBytes(PyObject* key, const char* what = "key") {
  if (!PyUnicode_Check(key)) {
    PyErr_Format(PyExc_TypeError, "chunkd %s must be a str, got %s", what, Py_TYPE(key)->tp_name);
    Throw();
  }
  Py_ssize_t n;
  const char* utf8 = PyUnicode_AsUTF8AndSize(key, &n);
  if (utf8 != nullptr) return std::string(utf8, n);
  PyErr_Clear();
  PyObject* bytes = PyUnicode_AsEncodedString(key, "utf-8", "surrogateescape");
  if (bytes == nullptr) Throw();
  std::string out(PyBytes_AS_STRING(bytes), PyBytes_GET_SIZE(bytes));
  Py_DECREF(bytes);
  return out;
}

nb::object DecodeKey(const std::string& raw) {
  PyObject* s =
      PyUnicode_DecodeUTF8(raw.data(), static_cast<Py_ssize_t>(raw.size()), "surrogateescape");
  if (s == nullptr) Throw();
  return nb::steal(s);
}

std::optional<uint64_t> OptUInt(PyObject* value, const char* what) {
  if (value == nullptr || value == Py_None) return std::nullopt;
  unsigned long long v = PyLong_AsUnsignedLongLong(value);
  if (v == static_cast<unsigned long long>(-1) && PyErr_Occurred()) {
    PyErr_Clear();
    PyErr_Format(PyExc_ValueError, "chunkd: %s must be an int from 0 to 2**64-1", what);
    Throw();
  }
  return v;
}

std::optional<int64_t> OptInt(PyObject* value, const char* what) {
  if (value == nullptr || value == Py_None) return std::nullopt;
  long long v = PyLong_AsLongLong(value);
  if (v == -1 && PyErr_Occurred()) {
    if (PyErr_ExceptionMatches(PyExc_TypeError)) {
      PyErr_Clear();
      PyErr_Format(PyExc_TypeError, "chunkd: %s must be an int, got %s", what,
                   Py_TYPE(value)->tp_name);
    }
    Throw();
  }
  return v;
}

// get(key, start, end, suffix=...): (start, end) bytes [start, end); start alone: to the end;
// end alone: [0, end); suffix: the last n bytes. Negative numbers go to the server, which
// refuses them with its reason.
ByteRange Range(PyObject* start, PyObject* end, PyObject* suffix) {
  std::optional<int64_t> s = OptInt(start, "start"), e = OptInt(end, "end"),
                         x = OptInt(suffix, "suffix");
  if (x) {
    if (s || e) {
      PyErr_SetString(PyExc_ValueError, "get: give either start/end or suffix, not both");
      Throw();
    }
    return ByteRange::Suffix(*x);
  }
  if (!s && !e) return ByteRange::All();
  if (!e) return ByteRange::FromOffset(*s);
  return ByteRange::Bounded(s.value_or(0), *e);
}

Conditions Conds(PyObject* match, PyObject* not_match) {
  Conditions c;
  if (auto m = OptUInt(match, "if_generation_match")) c.if_generation_match = *m;
  if (auto m = OptUInt(not_match, "if_generation_not_match")) c.if_generation_not_match = *m;
  return c;
}

PyObject* Attr(PyObject* obj, const char* name) {
  PyObject* v = PyObject_GetAttrString(obj, name);
  if (v == nullptr) Throw();
  Py_DECREF(v);  // borrowed from the frozen dataclass, which the caller keeps alive
  return v;
}

// A derivation (chunkd.GetItem.derivation, put_derived's): bytes.
std::string DerivationBytes(PyObject* derivation) {
  if (!PyBytes_Check(derivation)) {
    PyErr_Format(PyExc_TypeError, "a derivation is bytes, got %s", Py_TYPE(derivation)->tp_name);
    Throw();
  }
  return std::string(PyBytes_AS_STRING(derivation),
                     static_cast<size_t>(PyBytes_GET_SIZE(derivation)));
}

// One get_many item: a key, a (key, start[, end]) tuple or a chunkd.GetItem. `key` receives
// the item's key object (borrowed from `item`).
GetManyItem ParseItem(PyObject* item, PyObject** key) {
  GetManyItem out;
  if (PyUnicode_Check(item)) {
    *key = item;
    out.key = KeyBytes(item);
    return out;
  }
  if (PyTuple_Check(item) && PyTuple_GET_SIZE(item) >= 1 && PyTuple_GET_SIZE(item) <= 3) {
    Py_ssize_t n = PyTuple_GET_SIZE(item);
    *key = PyTuple_GET_ITEM(item, 0);
    out.key = KeyBytes(*key);
    out.range = Range(n > 1 ? PyTuple_GET_ITEM(item, 1) : nullptr,
                      n > 2 ? PyTuple_GET_ITEM(item, 2) : nullptr, nullptr);
    return out;
  }
  if (types.get_item != nullptr &&
      PyObject_TypeCheck(item, reinterpret_cast<PyTypeObject*>(types.get_item))) {
    *key = Attr(item, "key");
    out.key = KeyBytes(*key);
    out.range = Range(Attr(item, "start"), Attr(item, "end"), Attr(item, "suffix"));
    out.conditions =
        Conds(Attr(item, "if_generation_match"), Attr(item, "if_generation_not_match"));
    if (PyObject* derivation = Attr(item, "derivation"); derivation != Py_None) {
      // A derived entry's read (chunkd.GetItem's derivation, produce, wait_ms).
      client::DerivedRead derived;
      derived.derivation = DerivationBytes(derivation);
      int produce = PyObject_IsTrue(Attr(item, "produce"));
      if (produce < 0) Throw();
      derived.produce = produce != 0;
      unsigned long long wait = PyLong_AsUnsignedLongLong(Attr(item, "wait_ms"));
      if (wait == static_cast<unsigned long long>(-1) && PyErr_Occurred()) Throw();
      derived.wait_ms = wait;
      out.derived = std::move(derived);
    }
    return out;
  }
  PyObject* r = PyObject_Repr(item);
  PyErr_Format(PyExc_TypeError,
               "get_many items are keys (str), (key, start) or (key, start, end) tuples, or "
               "chunkd.GetItem; got %U",
               r);
  Py_XDECREF(r);
  Throw();
}

// A Python buffer held for the length of a call.
class HeldBuffer {
 public:
  HeldBuffer() = default;
  HeldBuffer(const HeldBuffer&) = delete;
  HeldBuffer& operator=(const HeldBuffer&) = delete;
  ~HeldBuffer() {
    if (held_) PyBuffer_Release(&view_);
  }
  // The value of a put: any C-contiguous buffer (bytes, bytearray, memoryview, numpy...).
  void HoldValue(PyObject* data) {
    if (PyUnicode_Check(data)) {
      PyErr_SetString(PyExc_TypeError, "chunkd values are bytes, not str: encode the string first");
      Throw();
    }
    if (PyObject_GetBuffer(data, &view_, PyBUF_C_CONTIGUOUS) != 0) {
      if (PyErr_ExceptionMatches(PyExc_BufferError)) {
        PyErr_Clear();
        PyErr_SetString(PyExc_ValueError, "chunkd: the value must be a C-contiguous buffer");
      }
      Throw();
    }
    held_ = true;
  }
  // get(out=...): a writable buffer the value is copied into.
  void HoldOut(PyObject* out) {
    if (PyObject_GetBuffer(out, &view_, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) != 0) {
      PyErr_Clear();
      PyErr_SetString(PyExc_TypeError, "get: out must be a writable buffer");
      Throw();
    }
    held_ = true;
  }
  bool held() const { return held_; }
  std::byte* data() const { return static_cast<std::byte*>(view_.buf); }
  size_t size() const { return static_cast<size_t>(view_.len); }
  PyObject* obj() const { return view_.obj; }

 private:
  Py_buffer view_{};
  bool held_ = false;
};

// A block over memory the caller keeps alive (a put's value, held for the call): never freed here.
class BorrowedBlock final : public buffer::Block {
 public:
  BorrowedBlock(std::byte* data, size_t size) : Block(data, size, buffer::MemoryKind::kHost) {}
};

buffer::cpu::Buffer Borrow(const HeldBuffer& held) {
  if (held.size() == 0) return buffer::cpu::Buffer();
  return buffer::cpu::Buffer(std::make_shared<BorrowedBlock>(held.data(), held.size()));
}

// ------------------------------------------------------------------------------------------------
// Results

// With `out`: the value copied into it (and its lease, if any, gone with the result). Checked
// without the GIL; the error is reported by FinishOut.
struct OutCopy {
  size_t length = 0;
  bool too_small = false;
};

OutCopy CopyOut(const GetResult& r, const HeldBuffer& out) {
  OutCopy c;
  c.length = r.data.size();
  if (c.length > out.size()) {
    c.too_small = true;
  } else if (c.length > 0) {
    std::memcpy(out.data(), r.data.data(), c.length);
  }
  return c;
}

nb::object OutView(const OutCopy& copy, const HeldBuffer& out, PyObject* key) {
  if (copy.too_small) {
    PyObject* r = PyObject_Repr(key);
    PyErr_Format(PyExc_ValueError, "get %U: out holds %zu bytes, the reply has %zu", r, out.size(),
                 copy.length);
    Py_XDECREF(r);
    Throw();
  }
  PyObject* view = PyMemoryView_FromObject(out.obj());
  if (view == nullptr) Throw();
  nb::object full = nb::steal(view);
  // A flat unsigned-byte view of the first `length` bytes, like the value itself.
  nb::object flat = full.attr("cast")("B");
  nb::object slice =
      nb::steal(PySlice_New(nb::int_(0).ptr(), nb::int_(copy.length).ptr(), nullptr));
  PyObject* part = PyObject_GetItem(flat.ptr(), slice.ptr());
  if (part == nullptr) Throw();
  return nb::steal(part);
}

nb::object Data(GetResult& r) {
  if (r.delivery == v1::DELIVERY_CUDA_IPC && r.device_data) {
    return nb::cast(DeviceValue{*std::move(r.device_data)});
  }
  return MakeView(std::move(r.data), r.delivery != v1::DELIVERY_SHM);
}

nb::object FullResult(GetResult& r, nb::object data) {
  PyObject* o = PyObject_CallFunction(
      types.get_result, "OKKKiK", data.ptr(), static_cast<unsigned long long>(r.total_size),
      static_cast<unsigned long long>(r.generation), static_cast<unsigned long long>(r.range_start),
      static_cast<int>(r.delivery), static_cast<unsigned long long>(r.production_id));
  if (o == nullptr) Throw();
  return nb::steal(o);
}

// A Get's result for Python: the data alone (get) or a GetResult (read).
nb::object Result(absl::StatusOr<GetResult>& r, bool full, PyObject* key) {
  if (!r.ok()) Raise(r.status(), key);
  nb::object data = Data(*r);
  return full ? FullResult(*r, std::move(data)) : data;
}

// GetMany's results: each item's data or GetResult, or its exception, in the item's place.
nb::object ManyResults(GetManyResults& results, bool full, const std::vector<PyObject*>& keys) {
  nb::list out;
  for (size_t i = 0; i < results.size(); ++i) {
    absl::StatusOr<GetResult>& r = results[i];
    if (!r.ok()) {
      out.append(ErrorObject(r.status(), keys[i]));
      continue;
    }
    nb::object data = Data(*r);
    out.append(full ? FullResult(*r, std::move(data)) : data);
  }
  return out;
}

nb::object PutResultObject(const client::PutResult& r) {
  PyObject* o =
      PyObject_CallFunction(types.put_result, "KK", static_cast<unsigned long long>(r.generation),
                            static_cast<unsigned long long>(r.size));
  if (o == nullptr) Throw();
  return nb::steal(o);
}

nb::object StatObject(const client::StatResult& r) {
  PyObject* o = PyObject_CallFunction(types.stat, "OKK", r.exists ? Py_True : Py_False,
                                      static_cast<unsigned long long>(r.exists ? r.size : 0),
                                      static_cast<unsigned long long>(r.exists ? r.generation : 0));
  if (o == nullptr) Throw();
  return nb::steal(o);
}

nb::object ListingObject(const client::ListResult& page) {
  nb::list entries, prefixes;
  for (const client::ListEntry& e : page.entries) {
    PyObject* o = PyObject_CallFunction(types.list_entry, "OK", DecodeKey(e.key).ptr(),
                                        static_cast<unsigned long long>(e.size));
    if (o == nullptr) Throw();
    entries.append(nb::steal(o));
  }
  for (const std::string& p : page.prefixes) prefixes.append(DecodeKey(p));
  PyObject* o = PyObject_CallFunction(types.listing, "OO", entries.ptr(), prefixes.ptr());
  if (o == nullptr) Throw();
  return nb::steal(o);
}

nb::object Pages(const std::vector<client::ListResult>& pages) {
  nb::list out;
  for (const client::ListResult& page : pages) out.append(ListingObject(page));
  return out;
}

nb::object ServerInfoDict(const v1::ServerInfoResponse& r) {
  nb::dict d;
  d["version"] = r.version();
  d["backend"] = r.backend();
  d["store"] = r.store();
  d["read_only"] = r.read_only();
  d["max_value_bytes"] = r.max_value_bytes();
  nb::list tiers, features, deliveries;
  for (const auto& t : r.tiers()) {
    tiers.append(nb::make_tuple(t.tier(), t.capacity_bytes(), t.used_bytes(), t.entries(),
                                t.pinned_bytes(), t.max_pinned_bytes(), t.max_client_pinned_bytes(),
                                t.pinning_clients(), t.pin_refusals_total_cap(),
                                t.pin_refusals_client_cap()));
  }
  for (const std::string& f : r.features()) features.append(nb::str(f.data(), f.size()));
  for (int delivery : r.deliveries()) {
    deliveries.append(nb::str(v1::Delivery_Name(static_cast<v1::Delivery>(delivery)).c_str()));
  }
  nb::dict counters;
  for (const auto& [name, value] : r.counters())
    counters[nb::str(name.data(), name.size())] = value;
  d["tiers"] = tiers;
  d["features"] = features;
  d["deliveries"] = deliveries;
  d["counters"] = counters;
  d["leases_active"] = r.leases_active();
  d["leased_bytes"] = r.leased_bytes();
  return d;
}

// ------------------------------------------------------------------------------------------------
// Completions: how asynchronous calls reach an event loop.

// One call's way back: made with the GIL when the call starts (it holds the future and whatever
// Python objects the call needs), filled on a gRPC thread, delivered with the GIL by Drain.
//
// With `boxed`, a value reaches the future in a one-item list, which the caller empties: asyncio
// keeps a completed future referenced until the end of the loop iteration that resumes its
// waiter (the wake-up handle), and a future holding the value itself would keep a
// shared-memory value's lease alive after the caller dropped it. A Pending without a future
// only carries `keep` to the loop's thread.
class Pending {
 public:
  Pending(PyObject* future, bool boxed) : future_(future), boxed_(boxed) { Py_XINCREF(future_); }
  virtual ~Pending() { Py_XDECREF(future_); }  // with the GIL: only Drain destroys these
  // The call's result: the value to set on the future. Raises for an error.
  virtual nb::object Result() = 0;

  // The client, held by the call until it is over, and then let go by Drain, on the loop's
  // thread: never on one of gRPC's threads, where the last reference would destroy the client
  // (its channel, its lease keeper) inside a gRPC callback.
  std::shared_ptr<client::Client> keep;

  void Deliver() {
    if (future_ == nullptr) return;
    nb::handle future(future_);
    if (nb::cast<bool>(future.attr("done")())) return;  // cancelled meanwhile
    try {
      nb::object value = Result();
      if (boxed_) {
        nb::list box;
        box.append(value);
        value = std::move(box);
      }
      future.attr("set_result")(value);
    } catch (nb::python_error& e) {
      future.attr("set_exception")(e.value());
    }
  }

 private:
  PyObject* future_;
  bool boxed_;
};

// Carries the last references of a call to the loop's thread (see Pending::keep): the client,
// and Python objects (`held`) the call needed until its end.
class KeepOnly final : public Pending {
 public:
  explicit KeepOnly(nb::object held) : Pending(nullptr, false), held_(std::move(held)) {}
  nb::object Result() override { return nb::none(); }

 private:
  nb::object held_;
};

class Queue {
 public:
  explicit Queue(int fd) : fd_(fd) {}
  // Pending calls hold the queue, so what is left here was never drained (the loop went away);
  // those Python references are left as they are: this may run on a gRPC thread, without the
  // GIL.
  ~Queue() { close(fd_); }
  int fd() const { return fd_; }

  // Any thread, without the GIL.
  void Push(Pending* p) { Push(std::vector<Pending*>{p}); }
  void Push(std::vector<Pending*> ps) {
    bool wake;
    {
      absl::MutexLock lock(&mu_);
      wake = queue_.empty();
      queue_.insert(queue_.end(), ps.begin(), ps.end());
    }
    if (wake) {
      uint64_t one = 1;
      while (write(fd_, &one, sizeof(one)) < 0 && errno == EINTR) {
      }
    }
  }

  // The loop's reader callback, with the GIL: the eventfd is reset before the queue is taken,
  // so a push that comes after the swap writes it again.
  void Drain() {
    uint64_t count;
    while (read(fd_, &count, sizeof(count)) < 0 && errno == EINTR) {
    }
    std::vector<Pending*> batch;
    {
      absl::MutexLock lock(&mu_);
      batch.swap(queue_);
    }
    std::vector<std::shared_ptr<client::Client>> clients;
    clients.reserve(batch.size());
    for (Pending* p : batch) {
      p->Deliver();
      clients.push_back(std::move(p->keep));
      delete p;
    }
    // A client closed meanwhile may go here, and its last lease releases with it: not with
    // the GIL held.
    nb::gil_scoped_release release;
    clients.clear();
  }

 private:
  const int fd_;
  absl::Mutex mu_;
  std::vector<Pending*> queue_ ABSL_GUARDED_BY(mu_);
};

// What Python holds of a Queue: one per event loop (chunkd/aio.py).
struct Completions {
  Completions() {
    int fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (fd < 0) {
      PyErr_SetFromErrno(PyExc_OSError);
      Throw();
    }
    queue = std::make_shared<Queue>(fd);
  }
  std::shared_ptr<Queue> queue;
};

// A Pending that holds a C++ result of type T until delivery.
template <typename T>
class PendingResult : public Pending {
 public:
  explicit PendingResult(PyObject* future, bool boxed = false) : Pending(future, boxed) {}
  void Set(absl::StatusOr<T> r) { result_ = std::move(r); }

 protected:
  absl::StatusOr<T> result_ = absl::UnknownError("no result");
};

// The completion callback of an asynchronous call: stores the result and queues the delivery.
// Keeps the client (and the queue) alive until the call is over.
template <typename T, typename P>
client::Callback<T> Complete(std::shared_ptr<Queue> queue, P* pending,
                             std::shared_ptr<client::Client> keep) {
  return [queue = std::move(queue), pending, keep = std::move(keep)](absl::StatusOr<T> r) mutable {
    pending->Set(std::move(r));
    pending->keep = std::move(keep);
    queue->Push(pending);
  };
}

class PendingGet final : public PendingResult<GetResult> {
 public:
  PendingGet(PyObject* future, PyObject* key, bool full)
      : PendingResult(future, /*boxed=*/true), key_(nb::borrow(key)), full_(full) {}
  HeldBuffer out;
  OutCopy copy;
  void Set(absl::StatusOr<GetResult> r) {
    // Copied into `out` here, on the gRPC thread, without the GIL; the lease goes at once.
    if (r.ok() && out.held() && r->delivery != v1::DELIVERY_CUDA_IPC) {
      copy = CopyOut(*r, out);
      r->data = buffer::cpu::Buffer();
    }
    result_ = std::move(r);
  }
  nb::object Result() override {
    if (out.held() && result_.ok() && result_->delivery != v1::DELIVERY_CUDA_IPC) {
      nb::object view = OutView(copy, out, key_.ptr());
      return full_ ? FullResult(*result_, std::move(view)) : view;
    }
    return chunkd::python::Result(result_, full_, key_.ptr());
  }

 private:
  nb::object key_;
  bool full_;
};

class PendingMany final : public PendingResult<GetManyResults> {
 public:
  PendingMany(PyObject* future, nb::object items, std::vector<PyObject*> keys, bool full)
      : PendingResult(future, /*boxed=*/true),
        items_(std::move(items)),
        keys_(std::move(keys)),
        full_(full) {}
  nb::object Result() override {
    if (!result_.ok()) Raise(result_.status(), nullptr);
    return ManyResults(*result_, full_, keys_);
  }

 private:
  nb::object items_;  // keeps the keys alive
  std::vector<PyObject*> keys_;
  bool full_;
};

// One item of a GetManyEachAsync call: its own future, set as soon as the item has arrived.
class PendingItem final : public PendingResult<GetResult> {
 public:
  PendingItem(PyObject* future, PyObject* key) : PendingResult(future, /*boxed=*/true), key_(key) {}
  nb::object Result() override { return chunkd::python::Result(result_, /*full=*/true, key_); }

 private:
  PyObject* key_;  // borrowed: the call's item list holds it
};

// The items of a GetManyEachAsync call not handed over yet, and what goes last. No Python object
// here: the callbacks that hold this may be destroyed on gRPC's threads.
struct PendingItems {
  std::vector<PendingItem*> pending;
  KeepOnly* last;  // holds the item list (the keys the items borrow)
};

template <typename T, typename Convert>
class PendingSimple final : public PendingResult<T> {
 public:
  PendingSimple(PyObject* future, PyObject* key, Convert convert)
      : PendingResult<T>(future), key_(nb::borrow(key ? key : Py_None)), convert_(convert) {}
  HeldBuffer value;  // a put's value, held until the call is over
  nb::object Result() override {
    if (!this->result_.ok()) Raise(this->result_.status(), key_.is_none() ? nullptr : key_.ptr());
    return convert_(*this->result_);
  }

 private:
  nb::object key_;
  Convert convert_;
};

template <typename T, typename Convert>
PendingSimple<T, Convert>* NewSimple(PyObject* future, PyObject* key, Convert convert) {
  return new PendingSimple<T, Convert>(future, key, convert);
}

struct Empty {};

// ------------------------------------------------------------------------------------------------
// The client

struct Cancel {
  std::shared_ptr<client::Cancellation> cancellation;
  void Run() { cancellation->Cancel(); }
};

// The process where the first client was made (gRPC started there), 0 before.
pid_t grpc_pid = 0;

// gRPC cannot be used in a process forked from one where it started (its threads are gone):
// chunkd's Python clients relay such a child's calls through a helper process
// (chunkd/_relay.py) and never get here; a native client made there directly is refused.
void CheckNotForked() {
  if (grpc_pid == 0) {
    grpc_pid = getpid();
  } else if (grpc_pid != getpid()) {
    PyErr_SetString(PyExc_RuntimeError,
                    "chunkd: this process was forked from one that had started gRPC, which "
                    "cannot be used here: chunkd.Client, AsyncClient, ShardedClient, "
                    "chunkd.zarr.ChunkdStore and chunkd:// URLs work in such a process (they "
                    "relay their calls through a helper process); chunkd._native.Client does "
                    "not");
    Throw();
  }
}

[[noreturn]] void RaiseForked() {
  PyErr_SetString(PyExc_RuntimeError,
                  "chunkd: this native client was made before this process was forked: its "
                  "connections and threads are the parent's. chunkd.Client, AsyncClient, "
                  "ShardedClient, chunkd.zarr.ChunkdStore and the chunkd:// filesystem make a "
                  "client of their own in the child on its first call; use them rather than "
                  "chunkd._native.Client directly");
  Throw();
}

class PyClient {
 public:
  explicit PyClient(std::shared_ptr<client::Client> c) : client_(std::move(c)), pid_(getpid()) {}
  ~PyClient() {
    // A forked child's copy of a parent's client: its threads and gRPC state are the parent's.
    if (getpid() != pid_ && client_) new std::shared_ptr<client::Client>(std::move(client_));
  }

  client::Client& c() {
    if (getpid() != pid_) RaiseForked();
    if (!client_) {
      PyErr_SetString(PyExc_RuntimeError, "chunkd client is closed");
      Throw();
    }
    return *client_;
  }
  std::shared_ptr<client::Client> shared() {
    c();
    return client_;
  }
  client::ShardedClient& sharded() {
    auto* s = dynamic_cast<client::ShardedClient*>(&c());
    if (s == nullptr) {
      PyErr_SetString(PyExc_TypeError, "not a sharded client");
      Throw();
    }
    return *s;
  }

  void Close() {
    std::shared_ptr<client::Client> c = std::move(client_);
    if (c && getpid() != pid_) new std::shared_ptr<client::Client>(std::move(c));
    nb::gil_scoped_release release;
    c.reset();  // calls in flight keep their own reference, and end first
  }

  // -- reads --------------------------------------------------------------------------------

  GetOptions Options(PyObject* start, PyObject* end, PyObject* suffix, PyObject* match,
                     PyObject* not_match, PyObject* device) {
    GetOptions o;
    o.range = Range(start, end, suffix);
    o.conditions = Conds(match, not_match);
    if (auto d = OptInt(device, "device")) {
      o.accept = {v1::DELIVERY_CUDA_IPC, v1::DELIVERY_INLINE};
      o.cuda_device = static_cast<int>(*d);
    }
    return o;
  }

  nb::object Get(nb::handle key, nb::handle start, nb::handle end, nb::handle suffix,
                 nb::handle out, nb::handle match, nb::handle not_match, bool full) {
    std::string k = KeyBytes(key.ptr());
    GetOptions o =
        Options(start.ptr(), end.ptr(), suffix.ptr(), match.ptr(), not_match.ptr(), nullptr);
    HeldBuffer held;
    if (!out.is_none()) held.HoldOut(out.ptr());
    client::Client& cl = c();
    absl::StatusOr<GetResult> r;
    OutCopy copy;
    {
      nb::gil_scoped_release release;
      r = cl.Get(k, o);
      if (r.ok() && held.held()) {
        copy = CopyOut(*r, held);
        r->data = buffer::cpu::Buffer();  // a shared-memory lease goes now
      }
    }
    if (r.ok() && held.held()) {
      nb::object view = OutView(copy, held, key.ptr());
      return full ? FullResult(*r, std::move(view)) : view;
    }
    return Result(r, full, key.ptr());
  }

  std::vector<GetManyItem> Items(nb::handle items, nb::list* objects,
                                 std::vector<PyObject*>* keys) {
    nb::object iter = nb::steal(PyObject_GetIter(items.ptr()));
    if (!iter.is_valid()) Throw();
    std::vector<GetManyItem> out;
    while (PyObject* item = PyIter_Next(iter.ptr())) {
      nb::object held = nb::steal(item);
      objects->append(held);
      PyObject* key;
      out.push_back(ParseItem(item, &key));
      keys->push_back(key);
    }
    if (PyErr_Occurred()) Throw();
    return out;
  }

  nb::object GetMany(nb::handle items, bool full) {
    nb::list objects;
    std::vector<PyObject*> keys;
    std::vector<GetManyItem> parsed = Items(items, &objects, &keys);
    client::Client& cl = c();
    absl::StatusOr<GetManyResults> r;
    {
      nb::gil_scoped_release release;
      r = cl.GetMany(parsed, GetOptions());
    }
    if (!r.ok()) Raise(r.status(), nullptr);
    return ManyResults(*r, full, keys);
  }

  // -- writes and the rest ------------------------------------------------------------------

  nb::object Put(nb::handle key, nb::handle data, nb::handle match, nb::handle not_match) {
    std::string k = KeyBytes(key.ptr());
    Conditions conds = Conds(match.ptr(), not_match.ptr());
    HeldBuffer held;
    held.HoldValue(data.ptr());
    client::Client& cl = c();
    absl::StatusOr<client::PutResult> r;
    {
      nb::gil_scoped_release release;
      r = cl.Put(k, Borrow(held), conds);
    }
    if (!r.ok()) Raise(r.status(), key.ptr());
    return PutResultObject(*r);
  }

  void Delete(nb::handle key, nb::handle match, nb::handle not_match) {
    std::string k = KeyBytes(key.ptr());
    Conditions conds = Conds(match.ptr(), not_match.ptr());
    client::Client& cl = c();
    absl::Status s;
    {
      nb::gil_scoped_release release;
      s = cl.Delete(k, conds);
    }
    if (!s.ok()) Raise(s, key.ptr());
  }

  nb::object Stat(nb::handle key) {
    std::string k = KeyBytes(key.ptr());
    client::Client& cl = c();
    absl::StatusOr<client::StatResult> r;
    {
      nb::gil_scoped_release release;
      r = cl.Stat(k);
    }
    if (!r.ok()) Raise(r.status(), key.ptr());
    return StatObject(*r);
  }

  nb::object ListPages(nb::handle prefix, bool directory) {
    std::string p = KeyBytes(prefix.ptr(), "prefix");
    client::Client& cl = c();
    absl::StatusOr<std::vector<client::ListResult>> r;
    {
      nb::gil_scoped_release release;
      r = cl.ListPages(p, directory);
    }
    if (!r.ok()) Raise(r.status(), prefix.ptr());
    return Pages(*r);
  }

  nb::object ServerInfo() {
    client::Client& cl = c();
    absl::StatusOr<v1::ServerInfoResponse> r;
    {
      nb::gil_scoped_release release;
      r = cl.ServerInfo();
    }
    if (!r.ok()) Raise(r.status(), nullptr);
    return ServerInfoDict(*r);
  }

  bool FlushReleases() {
    client::Client& cl = c();
    nb::gil_scoped_release release;
    return cl.FlushReleases();
  }
  size_t leases_held() { return client_ ? client_->leases_held() : 0; }
  std::string shm_disabled() { return client_ ? client_->shm_disabled() : ""; }

  // -- asynchronous calls: the result goes to `future` through `queue` -----------------------

  Cancel GetAsync(Completions& q, nb::handle future, nb::handle key, nb::handle start,
                  nb::handle end, nb::handle suffix, nb::handle out, nb::handle match,
                  nb::handle not_match, nb::handle device, bool full) {
    std::string k = KeyBytes(key.ptr());
    GetOptions o = Options(start.ptr(), end.ptr(), suffix.ptr(), match.ptr(), not_match.ptr(),
                           out.is_none() ? device.ptr() : nullptr);
    o.cancellation = std::make_shared<client::Cancellation>();
    auto keep = shared();
    auto* pending = new PendingGet(future.ptr(), key.ptr(), full);
    if (!out.is_none()) {
      try {
        pending->out.HoldOut(out.ptr());
      } catch (...) {
        delete pending;
        throw;
      }
    }
    Cancel cancel{o.cancellation};
    {
      nb::gil_scoped_release release;
      keep->GetAsync(k, o, Complete<GetResult>(q.queue, pending, keep));
    }
    return cancel;
  }

  Cancel GetManyAsync(Completions& q, nb::handle future, nb::handle items, bool full) {
    nb::list objects;
    std::vector<PyObject*> keys;
    std::vector<GetManyItem> parsed = Items(items, &objects, &keys);
    GetOptions o;
    o.cancellation = std::make_shared<client::Cancellation>();
    auto keep = shared();
    auto* pending = new PendingMany(future.ptr(), objects, std::move(keys), full);
    Cancel cancel{o.cancellation};
    {
      nb::gil_scoped_release release;
      keep->GetManyAsync(std::move(parsed), o, Complete<GetManyResults>(q.queue, pending, keep));
    }
    return cancel;
  }

  // One GetMany whose items each complete their own future (`futures`, one per item) as soon as
  // they arrive; a failure of the whole call fails the items not handed over yet, each with its
  // own key.
  Cancel GetManyEachAsync(Completions& q, nb::handle futures, nb::handle items) {
    nb::list objects;
    std::vector<PyObject*> keys;
    std::vector<GetManyItem> parsed = Items(items, &objects, &keys);
    if (!PyList_Check(futures.ptr()) ||
        static_cast<size_t>(PyList_GET_SIZE(futures.ptr())) != parsed.size()) {
      PyErr_SetString(PyExc_ValueError, "get_many_each_async: one future per item");
      Throw();
    }
    std::vector<PendingItem*> pending;
    pending.reserve(parsed.size());
    for (size_t i = 0; i < parsed.size(); ++i) {
      pending.push_back(new PendingItem(PyList_GET_ITEM(futures.ptr(), i), keys[i]));
    }
    auto state = std::make_shared<PendingItems>(
        PendingItems{std::move(pending), new KeepOnly(std::move(objects))});
    GetOptions o;
    o.cancellation = std::make_shared<client::Cancellation>();
    auto keep = shared();
    Cancel cancel{o.cancellation};
    std::shared_ptr<Queue> queue = q.queue;
    nb::gil_scoped_release release;
    keep->GetManyEachAsync(
        std::move(parsed), o,
        [queue, state](size_t first, std::vector<absl::StatusOr<GetResult>> results) {
          // The items one reply message completed reach the loop together (one wake-up, one
          // drain), so their gets resume in the same iteration and their next reads batch.
          std::vector<Pending*> ready;
          ready.reserve(results.size());
          for (size_t j = 0; j < results.size(); ++j) {
            PendingItem* p = std::exchange(state->pending[first + j], nullptr);
            p->Set(std::move(results[j]));
            ready.push_back(p);
          }
          queue->Push(std::move(ready));
        },
        [queue, state, keep](absl::Status status) mutable {
          std::vector<Pending*> rest;
          for (PendingItem*& p : state->pending) {
            if (p == nullptr) continue;
            p->Set(status.ok() ? absl::DataLossError("GetMany: no reply for the item") : status);
            rest.push_back(std::exchange(p, nullptr));
          }
          // The item list and the client go last, on the loop's thread.
          KeepOnly* last = std::exchange(state->last, nullptr);
          last->keep = std::move(keep);
          rest.push_back(last);
          queue->Push(std::move(rest));
        });
    return cancel;
  }

  void PutAsync(Completions& q, nb::handle future, nb::handle key, nb::handle data,
                nb::handle match, nb::handle not_match) {
    std::string k = KeyBytes(key.ptr());
    Conditions conds = Conds(match.ptr(), not_match.ptr());
    auto keep = shared();
    auto* pending = NewSimple<client::PutResult>(future.ptr(), key.ptr(), PutResultObject);
    try {
      pending->value.HoldValue(data.ptr());
    } catch (...) {
      delete pending;
      throw;
    }
    buffer::cpu::Buffer value = Borrow(pending->value);
    nb::gil_scoped_release release;
    keep->PutAsync(k, std::move(value), conds, Complete<client::PutResult>(q.queue, pending, keep));
  }

  // A derived entry's publication (or, with `abandon`, the production given up).
  static client::DerivedPut DerivedPutOf(nb::handle derivation, uint64_t source_generation,
                                         uint64_t production_id, bool abandon) {
    client::DerivedPut derived;
    derived.derivation = DerivationBytes(derivation.ptr());
    derived.source_generation = source_generation;
    derived.production_id = production_id;
    derived.abandon = abandon;
    return derived;
  }

  nb::object PutDerived(nb::handle key, nb::handle derivation, nb::handle data,
                        uint64_t source_generation, uint64_t production_id, bool abandon) {
    std::string k = KeyBytes(key.ptr());
    client::DerivedPut derived =
        DerivedPutOf(derivation, source_generation, production_id, abandon);
    HeldBuffer held;
    if (!data.is_none()) held.HoldValue(data.ptr());
    client::Client& cl = c();
    absl::StatusOr<client::PutResult> r;
    {
      nb::gil_scoped_release release;
      r = cl.PutDerived(k, held.held() ? Borrow(held) : buffer::cpu::Buffer(), derived);
    }
    if (!r.ok()) Raise(r.status(), key.ptr());
    return PutResultObject(*r);
  }

  void PutDerivedAsync(Completions& q, nb::handle future, nb::handle key, nb::handle derivation,
                       nb::handle data, uint64_t source_generation, uint64_t production_id,
                       bool abandon) {
    std::string k = KeyBytes(key.ptr());
    client::DerivedPut derived =
        DerivedPutOf(derivation, source_generation, production_id, abandon);
    auto keep = shared();
    auto* pending = NewSimple<client::PutResult>(future.ptr(), key.ptr(), PutResultObject);
    if (!data.is_none()) {
      try {
        pending->value.HoldValue(data.ptr());
      } catch (...) {
        delete pending;
        throw;
      }
    }
    buffer::cpu::Buffer value = data.is_none() ? buffer::cpu::Buffer() : Borrow(pending->value);
    nb::gil_scoped_release release;
    keep->PutDerivedAsync(k, std::move(value), derived,
                          Complete<client::PutResult>(q.queue, pending, keep));
  }

  void DeleteAsync(Completions& q, nb::handle future, nb::handle key, nb::handle match,
                   nb::handle not_match) {
    std::string k = KeyBytes(key.ptr());
    Conditions conds = Conds(match.ptr(), not_match.ptr());
    auto keep = shared();
    auto* pending =
        NewSimple<Empty>(future.ptr(), key.ptr(), [](const Empty&) { return nb::none(); });
    nb::gil_scoped_release release;
    keep->DeleteAsync(k, conds,
                      [done = Complete<Empty>(q.queue, pending, keep)](absl::Status s) mutable {
                        done(s.ok() ? absl::StatusOr<Empty>(Empty{}) : absl::StatusOr<Empty>(s));
                      });
  }

  void StatAsync(Completions& q, nb::handle future, nb::handle key) {
    std::string k = KeyBytes(key.ptr());
    auto keep = shared();
    auto* pending = NewSimple<client::StatResult>(future.ptr(), key.ptr(), StatObject);
    nb::gil_scoped_release release;
    keep->StatAsync(k, Complete<client::StatResult>(q.queue, pending, keep));
  }

  void ListPagesAsync(Completions& q, nb::handle future, nb::handle prefix, bool directory) {
    std::string p = KeyBytes(prefix.ptr(), "prefix");
    auto keep = shared();
    auto* pending = NewSimple<std::vector<client::ListResult>>(future.ptr(), prefix.ptr(), Pages);
    nb::gil_scoped_release release;
    keep->ListPagesAsync(p, directory,
                         Complete<std::vector<client::ListResult>>(q.queue, pending, keep));
  }

  void ServerInfoAsync(Completions& q, nb::handle future) {
    auto keep = shared();
    auto* pending = NewSimple<v1::ServerInfoResponse>(future.ptr(), nullptr, ServerInfoDict);
    nb::gil_scoped_release release;
    keep->ServerInfoAsync(Complete<v1::ServerInfoResponse>(q.queue, pending, keep));
  }

 private:
  std::shared_ptr<client::Client> client_;
  const pid_t pid_;
};

// The options both kinds of client are made with (see chunkd.Client's arguments).
client::ClientOptions MakeOptions(const std::string& address, nb::handle timeout, int retries,
                                  const std::string& delivery, const std::string& shm_dir,
                                  const std::string& tls_ca, bool tls, const std::string& tls_cert,
                                  const std::string& tls_key, const std::string& tls_server_name,
                                  const std::string& token) {
  client::ClientOptions o;
  o.address = address;
  o.timeout =
      timeout.is_none() ? absl::InfiniteDuration() : absl::Seconds(nb::cast<double>(timeout));
  o.max_attempts = retries + 1;
  if (delivery == "shm") o.accept = {v1::DELIVERY_SHM, v1::DELIVERY_INLINE};
  o.shm_dir = shm_dir;
  o.tls_ca = tls_ca;
  o.tls = tls;
  o.tls_cert = tls_cert;
  o.tls_key = tls_key;
  o.tls_server_name = tls_server_name;
  o.token = token;
  return o;
}

std::shared_ptr<client::Client> ConnectOrRaise(const client::ClientOptions& o) {
  CheckNotForked();
  absl::StatusOr<std::unique_ptr<client::Client>> c;
  {
    nb::gil_scoped_release release;
    c = client::Client::Connect(o);
  }
  if (!c.ok()) Raise(c.status(), nullptr);
  return std::shared_ptr<client::Client>(*std::move(c));
}

void ConnectClient(PyClient* self, const std::string& address, nb::handle timeout, int retries,
                   const std::string& delivery, const std::string& shm_dir,
                   const std::string& tls_ca, bool tls, const std::string& tls_cert,
                   const std::string& tls_key, const std::string& tls_server_name,
                   const std::string& token, nb::handle max_staleness) {
  client::ClientOptions o = MakeOptions(address, timeout, retries, delivery, shm_dir, tls_ca, tls,
                                        tls_cert, tls_key, tls_server_name, token);
  // Seconds; None: the server's freshness policy.
  if (!max_staleness.is_none()) o.max_staleness = absl::Seconds(nb::cast<double>(max_staleness));
  std::shared_ptr<client::Client> c = ConnectOrRaise(o);
  new (self) PyClient(std::move(c));
}

PyClient* ConnectSharded(const std::vector<std::string>& servers, int marks_down,
                         double down_backoff, double resolve_interval, const std::string& address,
                         nb::handle timeout, int retries, const std::string& delivery,
                         const std::string& shm_dir, const std::string& tls_ca, bool tls,
                         const std::string& tls_cert, const std::string& tls_key,
                         const std::string& tls_server_name, const std::string& token) {
  CheckNotForked();
  client::ShardedClientOptions o;
  o.servers = servers;
  o.failures_to_mark_down = marks_down;
  o.down_backoff = absl::Seconds(down_backoff);
  o.resolve_interval = absl::Seconds(resolve_interval);
  o.client = MakeOptions(address, timeout, retries, delivery, shm_dir, tls_ca, tls, tls_cert,
                         tls_key, tls_server_name, token);
  absl::StatusOr<std::unique_ptr<client::ShardedClient>> c;
  {
    nb::gil_scoped_release release;
    c = client::ShardedClient::Connect(o);
  }
  if (!c.ok()) Raise(c.status(), nullptr);
  return new PyClient(std::shared_ptr<client::Client>(*std::move(c)));
}

}  // namespace
}  // namespace chunkd::python

NB_MODULE(_native, m) {
  using namespace chunkd::python;
  namespace client = chunkd::client;
  // At import, before any client exists: the process-wide settings of client.h's InitProcess.
  client::InitProcess();

  // Clients (and their classes) still referenced when the interpreter exits are not collected
  // by Python's shutdown: nanobind would call that a leak. Their leases went back at exit
  // (release_leases_at_exit), and the process's end takes the rest.
  nb::set_leak_warnings(false);

  value_type = reinterpret_cast<PyTypeObject*>(PyType_FromSpec(&value_spec));
  if (value_type == nullptr) throw nb::python_error();
  m.attr("Value") = nb::borrow(reinterpret_cast<PyObject*>(value_type));

  m.def(
      "configure",
      [](nb::handle get_result, nb::handle put_result, nb::handle stat, nb::handle list_entry,
         nb::handle listing, nb::handle error, nb::handle get_item) {
        PyObject* all[] = {get_result.ptr(), put_result.ptr(), stat.ptr(),    list_entry.ptr(),
                           listing.ptr(),    error.ptr(),      get_item.ptr()};
        for (PyObject* o : all) Py_INCREF(o);  // for the life of the process
        types = {get_result.ptr(), put_result.ptr(), stat.ptr(),    list_entry.ptr(),
                 listing.ptr(),    error.ptr(),      get_item.ptr()};
      },
      "Sets the Python classes results are made of (chunkd._common does this at import).");

  m.attr("DELIVERY_UNSPECIFIED") = static_cast<int>(chunkd::v1::DELIVERY_UNSPECIFIED);
  m.attr("DELIVERY_INLINE") = static_cast<int>(chunkd::v1::DELIVERY_INLINE);
  m.attr("DELIVERY_SHM") = static_cast<int>(chunkd::v1::DELIVERY_SHM);
  m.attr("DELIVERY_CUDA_IPC") = static_cast<int>(chunkd::v1::DELIVERY_CUDA_IPC);
  m.attr("MAX_GET_MANY_ITEMS") = 4096;

  nb::class_<DeviceValue>(m, "DeviceValue",
                          "A chunk in GPU memory (CUDA IPC): __cuda_array_interface__ of uint8; "
                          "holds the chunk's lease while it lives.")
      .def_prop_ro("__cuda_array_interface__", &DeviceValue::Interface)
      .def("__len__", [](const DeviceValue& v) { return v.buffer.size(); })
      .def_prop_ro("device", [](const DeviceValue& v) { return v.buffer.device(); });

  nb::class_<Cancel>(m, "Cancel", "Cancels an asynchronous call (ends it with CANCELLED).")
      .def("cancel", &Cancel::Run);

  nb::class_<Completions>(m, "Completions",
                          "The queue through which asynchronous calls reach one event loop: "
                          "register drain() as the reader of fd.")
      .def(nb::init<>())
      .def_prop_ro("fd", [](Completions& c) { return c.queue->fd(); })
      .def("drain", [](Completions& c) { c.queue->Drain(); });

  nb::class_<PyClient>(m, "Client")
      .def("__init__", &ConnectClient, nb::arg("address"), nb::arg("timeout").none(),
           nb::arg("retries"), nb::arg("delivery"), nb::arg("shm_dir"), nb::arg("tls_ca"),
           nb::arg("tls"), nb::arg("tls_cert"), nb::arg("tls_key"), nb::arg("tls_server_name"),
           nb::arg("token"), nb::arg("max_staleness").none() = nb::none())
      .def_static(
          "sharded",
          [](const std::vector<std::string>& servers, int marks_down, double down_backoff,
             double resolve_interval, nb::handle timeout, int retries, const std::string& delivery,
             const std::string& shm_dir, const std::string& tls_ca, bool tls,
             const std::string& tls_cert, const std::string& tls_key,
             const std::string& tls_server_name, const std::string& token) {
            return nb::cast(ConnectSharded(servers, marks_down, down_backoff, resolve_interval, "",
                                           timeout, retries, delivery, shm_dir, tls_ca, tls,
                                           tls_cert, tls_key, tls_server_name, token),
                            nb::rv_policy::take_ownership);
          },
          nb::arg("servers"), nb::arg("failures_to_mark_down"), nb::arg("down_backoff"),
          nb::arg("resolve_interval"), nb::arg("timeout").none(), nb::arg("retries"),
          nb::arg("delivery"), nb::arg("shm_dir"), nb::arg("tls_ca"), nb::arg("tls"),
          nb::arg("tls_cert"), nb::arg("tls_key"), nb::arg("tls_server_name"), nb::arg("token"))
      .def("close", &PyClient::Close)
      .def("get", &PyClient::Get, nb::arg("key"), nb::arg("start").none(), nb::arg("end").none(),
           nb::arg("suffix").none(), nb::arg("out").none(), nb::arg("match").none(),
           nb::arg("not_match").none(), nb::arg("full"))
      .def("get_many", &PyClient::GetMany, nb::arg("items"), nb::arg("full"))
      .def("put", &PyClient::Put, nb::arg("key"), nb::arg("data"), nb::arg("match").none(),
           nb::arg("not_match").none())
      .def("put_derived", &PyClient::PutDerived, nb::arg("key"), nb::arg("derivation"),
           nb::arg("data").none(), nb::arg("source_generation"), nb::arg("production_id"),
           nb::arg("abandon"))
      .def("put_derived_async", &PyClient::PutDerivedAsync, nb::arg("queue"), nb::arg("future"),
           nb::arg("key"), nb::arg("derivation"), nb::arg("data").none(),
           nb::arg("source_generation"), nb::arg("production_id"), nb::arg("abandon"))
      .def("delete", &PyClient::Delete, nb::arg("key"), nb::arg("match").none(),
           nb::arg("not_match").none())
      .def("stat", &PyClient::Stat)
      .def("list_pages", &PyClient::ListPages)
      .def("server_info", &PyClient::ServerInfo)
      .def("flush_releases", &PyClient::FlushReleases)
      .def_prop_ro("leases_held", &PyClient::leases_held)
      .def_prop_ro("shm_disabled", &PyClient::shm_disabled)
      .def("get_many_each_async", &PyClient::GetManyEachAsync)
      .def("get_async", &PyClient::GetAsync, nb::arg("queue"), nb::arg("future"), nb::arg("key"),
           nb::arg("start").none(), nb::arg("end").none(), nb::arg("suffix").none(),
           nb::arg("out").none(), nb::arg("match").none(), nb::arg("not_match").none(),
           nb::arg("device").none(), nb::arg("full"))
      .def("get_many_async", &PyClient::GetManyAsync)
      .def("put_async", &PyClient::PutAsync, nb::arg("queue"), nb::arg("future"), nb::arg("key"),
           nb::arg("data"), nb::arg("match").none(), nb::arg("not_match").none())
      .def("delete_async", &PyClient::DeleteAsync, nb::arg("queue"), nb::arg("future"),
           nb::arg("key"), nb::arg("match").none(), nb::arg("not_match").none())
      .def("stat_async", &PyClient::StatAsync)
      .def("list_pages_async", &PyClient::ListPagesAsync)
      .def("server_info_async", &PyClient::ServerInfoAsync)
      // The pool (chunkd.ShardedClient).
      .def("servers", [](PyClient& self) { return self.sharded().servers(); })
      .def("ranked_servers",
           [](PyClient& self, nb::handle key) {
             return self.sharded().RankedServers(KeyBytes(key.ptr()));
           })
      .def("is_down",
           [](PyClient& self, const std::string& server) { return self.sharded().IsDown(server); });

  m.def("shard_hash64", [](nb::bytes data) {
    return client::ShardHash64(absl::string_view(data.c_str(), data.size()));
  });
  m.def("rendezvous_score", [](nb::bytes server, nb::bytes key) {
    return client::RendezvousScore(absl::string_view(server.c_str(), server.size()),
                                   absl::string_view(key.c_str(), key.size()));
  });
  m.def("rendezvous_order", [](std::vector<std::string> servers, nb::bytes key) {
    return client::RendezvousOrder(std::move(servers), absl::string_view(key.c_str(), key.size()));
  });
  m.def("split_server_list", [](const std::string& list) { return client::SplitServerList(list); });
  m.def(
      "cuda_delivery_possible", [](int device) { return client::CheckCudaDelivery(device).ok(); },
      "Whether CUDA IPC delivery can be asked for on this process's device `device`.");
  m.def(
      "cuda_open_handles",
      []() -> size_t {
        auto importer = client::CudaImporter::ForProcess();
        return importer.ok() ? (*importer)->open_handles() : 0;
      },
      "CUDA IPC handles this process has open now (one per device segment in use).");
  m.def(
      "release_leases_at_exit",
      []() {
        nb::gil_scoped_release release;
        client::ReleaseLeasesAtExit();
      },
      "Returns every lease the process holds to its servers (registered with atexit).");
  m.def(
      "_read_every_byte",
      [](nb::handle value) -> uint64_t {
        Py_buffer view;
        if (PyObject_GetBuffer(value.ptr(), &view, PyBUF_SIMPLE) != 0) throw nb::python_error();
        uint64_t sum = chunkd::buffer::ReadEveryByte(
            std::string_view(static_cast<const char*>(view.buf), static_cast<size_t>(view.len)));
        PyBuffer_Release(&view);
        return sum;
      },
      "Benchmarks only: reads every byte of a contiguous buffer once (a checksum, returned),"
      " the routine bench/chunkd_bench runs on a shared-memory value (buffer/read_every_byte.h).");
  m.def("fail_next_shm_imports", &client::FailNextShmImportsForTesting,
        "Tests only: the next n shared-memory imports fail as an unmappable segment does.");
}
