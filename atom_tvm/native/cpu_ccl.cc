// "atom_cpu": a collective communication library for Disco sessions whose workers are threads of one
// process (ThreadedSession) on the CPU. TVM ships collectives for GPUs only (NCCL, RCCL); this one lets
// tensor-parallel programs (relax.op.ccl.*, lowered to runtime.disco.allreduce & co., which dispatch to
// runtime.disco.<the worker's ccl>.<op>) run in CPU tests.
//
// Workers meet at a barrier: each publishes pointers to its buffers, waits for all the others, reads
// what it needs straight from their memory, and waits again before returning, so no buffer is
// released or overwritten while another worker still reads it.

#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/optional.h>
#include <tvm/ffi/reflection/registry.h>
#include <tvm/runtime/disco/builtin.h>
#include <tvm/runtime/disco/disco_worker.h>
#include <tvm/runtime/disco/session.h>
#include <tvm/runtime/tensor.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

namespace atom_tvm {
namespace cpu_ccl {

using tvm::ffi::Optional;
using tvm::ffi::Shape;
using tvm::runtime::DiscoWorker;
using tvm::runtime::ReduceKind;
using tvm::runtime::Session;
using tvm::runtime::Tensor;

// The ccl name, a macro so that the registered function names below are string literals.
#define ATOM_CPU_CCL "atom_cpu"
constexpr const char* kName = ATOM_CPU_CCL;

// What one worker brings to a collective; the others read it between the two barriers.
struct Contribution {
  const char* send = nullptr;
  int64_t send_numel = 0;
  DLDataType dtype{};
  // Why this worker cannot take part (empty when it can). Published rather than thrown: a worker that
  // threw before the barrier would leave the others waiting for it forever.
  const std::string* problem = nullptr;
};

// The workers of one communicator (all of them, or one group), meeting once per collective.
class Rendezvous {
 public:
  explicit Rendezvous(int size) : size_(size), slots_(size) {}

  int size() const { return size_; }

  // Publishes `mine` as participant `rank`, runs `read(slots)` once every participant has published,
  // and returns once every participant has finished reading. An exception from `read` is rethrown
  // after the second barrier, so the others never wait for a worker that gave up. Participant 0 also
  // writes its message to stderr before that barrier: a ThreadedSession's worker threads do not
  // catch, so each participant's exception ends the process, and two threads terminating at once
  // can lose the message ("terminate called recursively").
  template <typename Read>
  void Meet(int rank, const Contribution& mine, Read read) {
    slots_[rank] = mine;
    Wait();
    try {
      read(slots_);
    } catch (const std::exception& error) {
      if (rank == 0) {
        std::fprintf(stderr, "%s\n", error.what());
        std::fflush(stderr);
      }
      Wait();
      throw;
    } catch (...) {
      Wait();
      throw;
    }
    Wait();
  }

 private:
  void Wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const int64_t generation = generation_;
    if (++arrived_ == size_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return generation_ != generation; });
    }
  }

  const int size_;
  std::vector<Contribution> slots_;
  std::mutex mutex_;
  std::condition_variable cv_;
  int arrived_ = 0;
  int64_t generation_ = 0;
};

// One session's communicator: every worker, and each group of num_workers / num_groups workers.
struct Communicator {
  Communicator(int num_workers, int num_groups) : world(num_workers) {
    for (int g = 0; g < num_groups; ++g) groups.push_back(std::make_unique<Rendezvous>(num_workers / num_groups));
  }
  Rendezvous world;
  std::vector<std::unique_ptr<Rendezvous>> groups;
};

// Communicators announced by init_ccl and not yet joined by all their workers, by id. The controller
// cannot hand a pointer to its workers (Disco passes integers, strings, shapes), so it hands an id.
class PendingCommunicators {
 public:
  int64_t Announce() { return next_id_++; }

  std::shared_ptr<Communicator> Join(int64_t id, const DiscoWorker& worker) {
    std::lock_guard<std::mutex> lock(mutex_);
    Entry& entry = pending_[id];
    if (!entry.communicator) {
      entry.communicator = std::make_shared<Communicator>(worker.num_workers, worker.num_groups);
    }
    std::shared_ptr<Communicator> communicator = entry.communicator;
    if (++entry.joined == worker.num_workers) pending_.erase(id);
    return communicator;
  }

  static PendingCommunicators* Global() {
    static PendingCommunicators instance;
    return &instance;
  }

 private:
  struct Entry {
    std::shared_ptr<Communicator> communicator;
    int joined = 0;
  };
  std::atomic<int64_t> next_id_{0};
  std::mutex mutex_;
  std::unordered_map<int64_t, Entry> pending_;
};

// The worker thread's place in its session's communicator.
struct WorkerContext {
  std::shared_ptr<Communicator> communicator;
  int worker_id = 0;
  int group_size = 1;

  static WorkerContext* Local() {
    thread_local WorkerContext context;
    return &context;
  }

  static const WorkerContext& Joined() {
    const WorkerContext* context = Local();
    if (context->communicator == nullptr) {
      TVM_FFI_THROW(RuntimeError) << "this Disco worker has no " << kName << " communicator; call runtime.disco."
                                  << kName << ".init_ccl on its session first";
    }
    return *context;
  }

  // The participants of a collective and this worker's rank among them.
  std::pair<Rendezvous*, int> Participants(bool in_group) const {
    if (!in_group) return {&communicator->world, worker_id};
    return {communicator->groups[worker_id / group_size].get(), worker_id % group_size};
  }
};

const char* Data(const Tensor& tensor) {
  return static_cast<const char*>(tensor->data) + tensor->byte_offset;
}

char* MutableData(const Tensor& tensor) { return static_cast<char*>(tensor->data) + tensor->byte_offset; }

int64_t ElementBytes(DLDataType dtype) { return (static_cast<int64_t>(dtype.bits) * dtype.lanes + 7) / 8; }

// Empty when `tensor` is one this library can read and write, else what is wrong with it.
std::string HostTensorProblem(const Tensor& tensor, const char* what) {
  std::ostringstream problem;
  if (tensor->device.device_type != kDLCPU) {
    problem << "`" << what << "` is not on the CPU (device type " << tensor->device.device_type << ")";
  } else if (!tensor.IsContiguous()) {
    problem << "`" << what << "` is not contiguous";
  }
  return problem.str();
}

// Meets the other participants of a collective (every worker, or this worker's group) and runs
// `read(slots)`. Every participant checks every slot's problem, so all of them stop together.
template <typename Read>
void Collective(const char* op, bool in_group, const Contribution& mine, Read read) {
  auto [rendezvous, rank] = WorkerContext::Joined().Participants(in_group);
  rendezvous->Meet(rank, mine, [&](const std::vector<Contribution>& slots) {
    for (size_t r = 0; r < slots.size(); ++r) {
      if (!slots[r].problem->empty()) {
        TVM_FFI_THROW(ValueError) << kName << "." << op << ", participant " << r << ": " << *slots[r].problem;
      }
    }
    for (const Contribution& slot : slots) {
      if (slot.send_numel != slots[0].send_numel || !(slot.dtype == slots[0].dtype)) {
        TVM_FFI_THROW(ValueError) << kName << "." << op << ": the participants' buffers differ (" << slot.send_numel
                                  << " x " << slot.dtype << " against " << slots[0].send_numel << " x "
                                  << slots[0].dtype << ")";
      }
    }
    read(slots);
  });
}

// IEEE half and bfloat16 to and from float, rounding to nearest even.
float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in float
    const float magnitude = std::ldexp(static_cast<float>(mantissa), -24);
    return sign ? -magnitude : magnitude;
  }
  // Inf and NaN keep an all-ones exponent; normal numbers move from bias 15 to bias 127.
  const uint32_t bits = sign | (exponent == 0x1f ? 0x7f800000u : (exponent + 112) << 23) | (mantissa << 13);
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

uint16_t FloatToHalf(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t magnitude = bits & 0x7fffffffu;
  if (magnitude > 0x7f800000u) return sign | 0x7e00u;        // NaN
  if (magnitude >= 0x477ff000u) return sign | 0x7c00u;       // at or past 65520, which rounds to inf
  if (magnitude < 0x38800000u) {                             // below 2^-14: a subnormal half (or zero)
    // |value| * 2^24 is exact; rounding it to an integer (ties to even) gives the subnormal's
    // mantissa, and 1024 comes out as the smallest normal half, which has the same bits.
    return sign | static_cast<uint16_t>(std::nearbyint(std::fabs(value) * 16777216.0f));
  }
  // Round the 23-bit mantissa to 10 bits (a carry moves into the exponent, as it should), then
  // rebias the exponent from 127 to 15.
  const uint32_t rounded = magnitude + 0xfffu + ((magnitude >> 13) & 1u);
  return sign | static_cast<uint16_t>((rounded >> 13) - (112u << 10));
}

float BFloat16ToFloat(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

uint16_t FloatToBFloat16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);  // NaN
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

// How an element type is read into and written from the type the reduction runs in. Floating
// types reduce in double, so a sum of a few workers' values is rounded once, at the store.
struct Float16 {
  using Storage = uint16_t;
  using Acc = double;
  static Acc Load(Storage x) { return HalfToFloat(x); }
  static Storage Store(Acc x) { return FloatToHalf(static_cast<float>(x)); }
};
struct BFloat16 {
  using Storage = uint16_t;
  using Acc = double;
  static Acc Load(Storage x) { return BFloat16ToFloat(x); }
  static Storage Store(Acc x) { return FloatToBFloat16(static_cast<float>(x)); }
};
template <typename T, typename A>
struct Plain {
  using Storage = T;
  using Acc = A;
  static Acc Load(Storage x) { return static_cast<Acc>(x); }
  static Storage Store(Acc x) { return static_cast<Storage>(x); }
};

// result[i] = op over the participants (in rank order, so every worker gets the same bits) of send[i].
template <typename Codec>
std::vector<char> Reduce(const std::vector<Contribution>& slots, ReduceKind kind) {
  using Storage = typename Codec::Storage;
  using Acc = typename Codec::Acc;
  const int64_t numel = slots[0].send_numel;
  std::vector<Acc> acc(numel);
  const Storage* first = reinterpret_cast<const Storage*>(slots[0].send);
  for (int64_t i = 0; i < numel; ++i) acc[i] = Codec::Load(first[i]);
  auto fold = [&](auto op) {
    for (size_t rank = 1; rank < slots.size(); ++rank) {
      const Storage* send = reinterpret_cast<const Storage*>(slots[rank].send);
      for (int64_t i = 0; i < numel; ++i) acc[i] = op(acc[i], Codec::Load(send[i]));
    }
  };
  switch (kind) {
    case ReduceKind::kSum:
    case ReduceKind::kAvg:
      fold([](Acc a, Acc b) { return a + b; });
      break;
    case ReduceKind::kProd:
      fold([](Acc a, Acc b) { return a * b; });
      break;
    case ReduceKind::kMin:
      fold([](Acc a, Acc b) { return std::min(a, b); });
      break;
    case ReduceKind::kMax:
      fold([](Acc a, Acc b) { return std::max(a, b); });
      break;
  }
  if (kind == ReduceKind::kAvg) {
    for (Acc& a : acc) a /= static_cast<Acc>(slots.size());
  }
  std::vector<char> result(numel * sizeof(Storage));
  Storage* out = reinterpret_cast<Storage*>(result.data());
  for (int64_t i = 0; i < numel; ++i) out[i] = Codec::Store(acc[i]);
  return result;
}

std::vector<char> ReduceAny(const std::vector<Contribution>& slots, ReduceKind kind) {
  const DLDataType dtype = slots[0].dtype;
  if (dtype == DLDataType{kDLFloat, 16, 1}) return Reduce<Float16>(slots, kind);
  if (dtype == DLDataType{kDLBfloat, 16, 1}) return Reduce<BFloat16>(slots, kind);
  if (dtype == DLDataType{kDLFloat, 32, 1}) return Reduce<Plain<float, double>>(slots, kind);
  if (dtype == DLDataType{kDLFloat, 64, 1}) return Reduce<Plain<double, double>>(slots, kind);
  if (dtype == DLDataType{kDLInt, 32, 1}) return Reduce<Plain<int32_t, int64_t>>(slots, kind);
  TVM_FFI_THROW(ValueError) << kName << ".allreduce supports float16, bfloat16, float32, float64 and int32, not "
                            << dtype;
  return {};  // not reached: the line above throws
}

// Controller side: announce a communicator and have every worker join it.
void InitCCL(Session session, Shape device_ids) {
  const std::string session_kind = session->GetTypeKey();
  if (session_kind != "runtime.disco.ThreadedSession") {
    TVM_FFI_THROW(ValueError) << kName << " connects workers that are threads of one process (a ThreadedSession); "
                              << "this is a " << session_kind << ": use nccl between GPU worker processes";
  }
  if (static_cast<int64_t>(device_ids.size()) != session->GetNumWorkers()) {
    TVM_FFI_THROW(ValueError) << kName << ".init_ccl wants one device id per worker: " << device_ids.size()
                              << " ids for " << session->GetNumWorkers() << " workers";
  }
  const int64_t id = PendingCommunicators::Global()->Announce();
  session->CallPacked(session->GetGlobalFunc(std::string("runtime.disco.") + kName + ".init_ccl_per_worker"), id);
}

// Worker side: join communicator `id` and make atom_cpu this worker's collective library.
void InitCCLPerWorker(int64_t id) {
  DiscoWorker* worker = DiscoWorker::ThreadLocal();
  TVM_FFI_ICHECK(worker != nullptr) << kName << ".init_ccl_per_worker runs on Disco workers only";
  WorkerContext* context = WorkerContext::Local();
  context->communicator = PendingCommunicators::Global()->Join(id, *worker);
  context->worker_id = worker->worker_id;
  context->group_size = worker->num_workers / worker->num_groups;
  worker->ccl = kName;
  worker->default_device = DLDevice{kDLCPU, 0};
}

void AllReduce(Tensor send, int kind, bool in_group, Tensor recv) {
  std::string problem = HostTensorProblem(send, "send");
  if (problem.empty()) problem = HostTensorProblem(recv, "recv");
  if (problem.empty() && (kind < 0 || kind > static_cast<int>(ReduceKind::kAvg))) {
    problem = "unknown ReduceKind " + std::to_string(kind);
  }
  if (problem.empty() && (recv.numel() != send.numel() || !(recv.dtype() == send.dtype()))) {
    problem = "`recv` must have the shape and dtype of `send`";
  }
  std::vector<char> result;
  Collective("allreduce", in_group, {Data(send), send.numel(), send.dtype(), &problem},
             [&](const std::vector<Contribution>& slots) {
               result = ReduceAny(slots, static_cast<ReduceKind>(kind));
             });
  // Written only now that every participant has read its inputs: `recv` may be `send`.
  std::memcpy(MutableData(recv), result.data(), result.size());
}

// recv = the participants' send buffers one after another, in rank order.
void AllGather(Tensor send, bool in_group, Tensor recv) {
  std::string problem = HostTensorProblem(send, "send");
  if (problem.empty()) problem = HostTensorProblem(recv, "recv");
  const int participants = WorkerContext::Joined().Participants(in_group).first->size();
  if (problem.empty() && (recv.numel() != send.numel() * participants || !(recv.dtype() == send.dtype()))) {
    problem = "`recv` must hold " + std::to_string(participants) + " times the elements of `send`, of its dtype";
  }
  Collective("allgather", in_group, {Data(send), send.numel(), send.dtype(), &problem},
             [&](const std::vector<Contribution>& slots) {
               const int64_t bytes = slots[0].send_numel * ElementBytes(slots[0].dtype);
               for (size_t r = 0; r < slots.size(); ++r) {
                 char* dst = MutableData(recv) + r * bytes;
                 // In place (send is this worker's own slice of recv) there is nothing to copy, and
                 // nobody else writes that slice.
                 if (dst != slots[r].send) std::memcpy(dst, slots[r].send, bytes);
               }
             });
}

// recv = the send buffer of the first participant (worker 0, or the group's first worker); the
// others pass no send buffer.
void BroadcastFromWorker0(Optional<Tensor> send, bool in_group, Tensor recv) {
  const bool is_root = WorkerContext::Joined().Participants(in_group).second == 0;
  std::string problem = HostTensorProblem(recv, "recv");
  if (is_root && problem.empty()) {
    if (!send.has_value()) {
      problem = "the first worker must pass a `send` buffer";
    } else {
      problem = HostTensorProblem(send.value(), "send");
    }
  }
  if (is_root && problem.empty() &&
      (send.value().numel() != recv.numel() || !(send.value().dtype() == recv.dtype()))) {
    problem = "`recv` must have the shape and dtype of `send`";
  }
  // Every participant publishes its recv size, so a receiver of the wrong size is caught by all.
  Contribution mine{nullptr, recv.numel(), recv.dtype(), &problem};
  if (is_root && problem.empty()) mine.send = Data(send.value());
  Collective("broadcast_from_worker0", in_group, mine, [&](const std::vector<Contribution>& slots) {
    if (MutableData(recv) != slots[0].send) {
      std::memcpy(MutableData(recv), slots[0].send, slots[0].send_numel * ElementBytes(slots[0].dtype));
    }
  });
}

TVM_FFI_STATIC_INIT_BLOCK() {
  namespace refl = tvm::ffi::reflection;
  refl::GlobalDef()
      .def("runtime.disco." ATOM_CPU_CCL ".init_ccl", InitCCL)
      .def("runtime.disco." ATOM_CPU_CCL ".init_ccl_per_worker", InitCCLPerWorker)
      .def("runtime.disco." ATOM_CPU_CCL ".allreduce", AllReduce)
      .def("runtime.disco." ATOM_CPU_CCL ".allgather", AllGather)
      .def("runtime.disco." ATOM_CPU_CCL ".broadcast_from_worker0", BroadcastFromWorker0)
      // Disco asks the worker's ccl to finish its pending work before replying to a sync; each
      // collective here is done when it returns.
      .def("runtime.disco." ATOM_CPU_CCL ".sync_worker", []() {});
}

}  // namespace cpu_ccl
}  // namespace atom_tvm
