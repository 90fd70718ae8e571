// Host-side page manager of the quantized paged KV cache (issue 5): free list, refcounted
// pages, per-sequence page tables, and the CSR metadata of each forward step.
//
// The page layout and the metadata's meaning are those of tir_kernels/kv_attention.py: pages of
// P tokens, a sequence's pages listed CSR-style (page_indptr / page_indices / last_page_len), a
// new token written to slot page * P + offset. Python reaches this file through tvm-ffi only
// (atom_tvm/runtime/kv_pages.py); the library links libtvm_ffi and nothing else, so it loads
// under runtime-only TVM.
//
// begin_forward runs every decode step for the whole batch, so it reads its inputs from, and
// writes its outputs into, tensors this object owns and Python holds numpy views of: no
// argument conversion or allocation per call (a buffer grows, rarely, when a step needs more
// room than any before it, and Python then re-imports its views).

#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/object.h>
#include <tvm/ffi/string.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <new>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace atom_tvm {
namespace {

namespace ffi = tvm::ffi;

// Error kinds that atom_tvm/runtime/kv_pages.py maps to UserError and its subclass KVCacheFull.
constexpr const char* kUserError = "atom_tvm.UserError";
constexpr const char* kCacheFull = "atom_tvm.KVCacheFull";

[[noreturn]] void Fail(const char* kind, const std::string& message) {
  throw ffi::Error(kind, message, "");
}

// Tensors whose memory belongs to this library (malloc/free), shared with numpy via DLPack.
struct HostAlloc {
  void AllocData(DLTensor* tensor) {
    tensor->data = std::malloc(ffi::GetDataSize(*tensor));
    if (tensor->data == nullptr) throw std::bad_alloc();
  }
  void FreeData(DLTensor* tensor) { std::free(tensor->data); }
};

template <typename T>
ffi::Tensor HostTensor(int64_t length) {
  DLDataType dtype{kDLInt, static_cast<uint8_t>(sizeof(T) * 8), 1};
  return ffi::Tensor::FromNDAlloc(HostAlloc(), ffi::Shape({length}), dtype, DLDevice{kDLCPU, 0});
}

template <typename T>
T* Data(const ffi::Tensor& tensor) {
  return static_cast<T*>(tensor.data_ptr());
}

struct Sequence {
  std::vector<int32_t> pages;
  int64_t length = 0;
  // The begin_forward call that last listed this sequence: catches a duplicate id in O(1).
  uint64_t listed_in_step = 0;
};

// Slots of the step_info tensor that begin_forward fills.
enum StepInfo : int { kNumTokens = 0, kNumPageEntries, kNumCopies, kGeneration, kStepInfoSize };

void CheckConfig(int64_t num_pages, int64_t page_size, int64_t max_batch) {
  if (num_pages < 1) Fail(kUserError, "num_pages must be at least 1, got " + std::to_string(num_pages));
  if (page_size < 1) Fail(kUserError, "page_size must be at least 1, got " + std::to_string(page_size));
  if (max_batch < 1) Fail(kUserError, "max_batch must be at least 1, got " + std::to_string(max_batch));
  // Page ids and slots (page * P + offset) travel as int32.
  if (num_pages > std::numeric_limits<int32_t>::max() / page_size) {
    Fail(kUserError, "num_pages * page_size must stay below 2**31 (int32 slots); use fewer pages");
  }
}

class PageManagerObj : public ffi::Object {
 public:
  static constexpr bool _type_mutable = true;
  TVM_FFI_DECLARE_OBJECT_INFO_FINAL("atom_tvm.PageManager", PageManagerObj, ffi::Object);

  PageManagerObj(int64_t num_pages, int64_t page_size, int64_t max_batch)
      : page_size_(page_size), max_batch_(max_batch) {
    refcount_.assign(num_pages, 0);
    free_pages_.reserve(num_pages);
    // A stack: page 0 is handed out first, and a page just freed is the next one reused.
    for (int64_t page = num_pages - 1; page >= 0; --page) free_pages_.push_back(static_cast<int32_t>(page));
    batch_.resize(max_batch);
    seq_ids_ = HostTensor<int64_t>(max_batch);
    append_lengths_ = HostTensor<int64_t>(max_batch);
    step_info_ = HostTensor<int64_t>(kStepInfoSize);
    qo_indptr_ = HostTensor<int32_t>(max_batch + 1);
    page_indptr_ = HostTensor<int32_t>(max_batch + 1);
    last_page_len_ = HostTensor<int32_t>(max_batch);
    copy_pairs_ = HostTensor<int32_t>(2 * max_batch);
    // Without forks the batch's page entries never exceed the pages that exist; a step of
    // decode tokens or a moderate prefill fits the token buffers from the start.
    page_indices_ = HostTensor<int32_t>(num_pages);
    append_slots_ = HostTensor<int32_t>(std::max<int64_t>(max_batch, 4096));
    positions_ = HostTensor<int32_t>(std::max<int64_t>(max_batch, 4096));
    std::fill_n(Data<int64_t>(step_info_), kStepInfoSize, 0);
  }

  void AddSequence(int64_t seq_id) {
    if (!sequences_.emplace(seq_id, Sequence()).second) {
      Fail(kUserError, "sequence " + std::to_string(seq_id) + " already exists; remove it first or pick a new id");
    }
  }

  void RemoveSequence(int64_t seq_id) {
    Sequence& seq = Find(seq_id);
    for (int32_t page : seq.pages) Release(page);
    sequences_.erase(seq_id);
  }

  // The child shares the parent's full pages; the parent's partial last page is copied into a
  // fresh page, so that both can append without touching each other's tokens. Returns the
  // (src, dst) page pair the caller copies on the device, or nothing.
  ffi::Shape ForkSequence(int64_t parent_id, int64_t child_id) {
    Sequence& parent = Find(parent_id);
    if (sequences_.count(child_id)) {
      Fail(kUserError, "fork target " + std::to_string(child_id) + " already exists; pick a new id");
    }
    const int64_t full_pages = parent.length / page_size_;
    const bool partial = parent.length % page_size_ != 0;
    if (partial && free_pages_.empty()) {
      Fail(kCacheFull, "fork_sequence needs 1 free page to copy the partial last page, 0 are free");
    }
    // References into an unordered_map survive the insertion.
    Sequence& child = sequences_[child_id];
    child.length = parent.length;
    child.pages.assign(parent.pages.begin(), parent.pages.begin() + full_pages);
    for (int32_t page : child.pages) ++refcount_[page];
    if (!partial) return ffi::Shape();
    const int32_t src = parent.pages.back();
    const int32_t dst = Allocate();
    child.pages.push_back(dst);
    return ffi::Shape({src, dst});
  }

  void Popn(int64_t seq_id, int64_t n) {
    Sequence& seq = Find(seq_id);
    if (n < 0 || n > seq.length) {
      Fail(kUserError, "popn(" + std::to_string(seq_id) + ", " + std::to_string(n) + "): n must be in [0, " +
                           std::to_string(seq.length) + "], the sequence's length");
    }
    seq.length -= n;
    const size_t keep = static_cast<size_t>(CeilPages(seq.length));
    for (size_t i = keep; i < seq.pages.size(); ++i) Release(seq.pages[i]);
    seq.pages.resize(keep);
  }

  int64_t SequenceLength(int64_t seq_id) { return Find(seq_id).length; }

  ffi::Shape SequencePages(int64_t seq_id) {
    const Sequence& seq = Find(seq_id);
    return ffi::Shape(seq.pages.begin(), seq.pages.end());
  }

  int64_t NumFreePages() const { return static_cast<int64_t>(free_pages_.size()); }

  ffi::Tensor Buffer(const ffi::String& name) const {
    const std::string key = name;
    if (key == "seq_ids") return seq_ids_;
    if (key == "append_lengths") return append_lengths_;
    if (key == "step_info") return step_info_;
    if (key == "qo_indptr") return qo_indptr_;
    if (key == "page_indptr") return page_indptr_;
    if (key == "page_indices") return page_indices_;
    if (key == "last_page_len") return last_page_len_;
    if (key == "append_slots") return append_slots_;
    if (key == "positions") return positions_;
    if (key == "copy_pairs") return copy_pairs_;
    Fail(kUserError, "page manager has no buffer named '" + key + "'");
  }

  // One forward step over seq_ids_[:batch] appending append_lengths_[:batch] tokens each.
  // Checks everything and counts the pages first, so that an error or a full cache leaves
  // every sequence and the free list as they were.
  void BeginForward(int64_t batch) {
    if (batch < 1 || batch > max_batch_) {
      Fail(kUserError, "begin_forward got " + std::to_string(batch) + " sequences; the page manager takes 1 to " +
                           std::to_string(max_batch_) + " (max_batch)");
    }
    const int64_t* ids = Data<int64_t>(seq_ids_);
    const int64_t* lengths = Data<int64_t>(append_lengths_);
    const uint64_t step = ++step_counter_;
    int64_t pages_needed = 0, num_tokens = 0, num_page_entries = 0;
    for (int64_t b = 0; b < batch; ++b) {
      Sequence& seq = Find(ids[b]);
      if (seq.listed_in_step == step) {
        Fail(kUserError, "sequence " + std::to_string(ids[b]) + " is listed twice in one begin_forward");
      }
      seq.listed_in_step = step;
      if (lengths[b] < 1 || lengths[b] > std::numeric_limits<int32_t>::max() - seq.length) {
        Fail(kUserError, "append length " + std::to_string(lengths[b]) + " of sequence " + std::to_string(ids[b]) +
                             " must be at least 1 and keep the sequence below 2**31 tokens");
      }
      batch_[b] = &seq;
      const int64_t new_pages = CeilPages(seq.length + lengths[b]);
      pages_needed += new_pages - static_cast<int64_t>(seq.pages.size()) + (WritesSharedPage(seq) ? 1 : 0);
      num_tokens += lengths[b];
      num_page_entries += new_pages;
    }
    if (pages_needed > NumFreePages()) {
      Fail(kCacheFull, "begin_forward needs " + std::to_string(pages_needed) + " free pages, " +
                           std::to_string(NumFreePages()) + " are free (" + std::to_string(page_size_) +
                           " tokens per page)");
    }
    if (num_page_entries > std::numeric_limits<int32_t>::max() ||
        num_tokens > std::numeric_limits<int32_t>::max()) {
      Fail(kUserError, "begin_forward step is too large for int32 metadata; split it into smaller steps");
    }
    Reserve(&page_indices_, num_page_entries);
    Reserve(&append_slots_, num_tokens);
    Reserve(&positions_, num_tokens);

    int32_t* qo_indptr = Data<int32_t>(qo_indptr_);
    int32_t* page_indptr = Data<int32_t>(page_indptr_);
    int32_t* page_indices = Data<int32_t>(page_indices_);
    int32_t* last_page_len = Data<int32_t>(last_page_len_);
    int32_t* slots = Data<int32_t>(append_slots_);
    int32_t* positions = Data<int32_t>(positions_);
    int32_t* copy_pairs = Data<int32_t>(copy_pairs_);
    int32_t token = 0, entry = 0, copies = 0;
    qo_indptr[0] = page_indptr[0] = 0;
    for (int64_t b = 0; b < batch; ++b) {
      Sequence& seq = *batch_[b];
      if (WritesSharedPage(seq)) {
        // Copy-on-write: the other holders keep the old page, this sequence writes a copy.
        const int32_t src = seq.pages.back();
        --refcount_[src];
        seq.pages.back() = Allocate();
        copy_pairs[2 * copies] = src;
        copy_pairs[2 * copies + 1] = seq.pages.back();
        ++copies;
      }
      const int64_t end = seq.length + lengths[b];
      for (int64_t pos = seq.length; pos < end; ++pos, ++token) {
        const int64_t page_index = pos / page_size_;
        if (page_index == static_cast<int64_t>(seq.pages.size())) seq.pages.push_back(Allocate());
        slots[token] = static_cast<int32_t>(seq.pages[page_index] * page_size_ + pos % page_size_);
        positions[token] = static_cast<int32_t>(pos);
      }
      seq.length = end;
      std::copy(seq.pages.begin(), seq.pages.end(), page_indices + entry);
      entry += static_cast<int32_t>(seq.pages.size());
      qo_indptr[b + 1] = token;
      page_indptr[b + 1] = entry;
      last_page_len[b] = static_cast<int32_t>(seq.length - (seq.pages.size() - 1) * page_size_);
    }
    int64_t* info = Data<int64_t>(step_info_);
    info[kNumTokens] = token;
    info[kNumPageEntries] = entry;
    info[kNumCopies] = copies;
  }

 private:
  Sequence& Find(int64_t seq_id) {
    auto it = sequences_.find(seq_id);
    if (it == sequences_.end()) {
      Fail(kUserError, "unknown sequence id " + std::to_string(seq_id) + "; add_sequence it first");
    }
    return it->second;
  }

  int64_t CeilPages(int64_t tokens) const { return (tokens + page_size_ - 1) / page_size_; }

  // The next token goes into the sequence's last page, and another sequence holds that page.
  bool WritesSharedPage(const Sequence& seq) const {
    return seq.length % page_size_ != 0 && refcount_[seq.pages.back()] > 1;
  }

  int32_t Allocate() {
    const int32_t page = free_pages_.back();
    free_pages_.pop_back();
    refcount_[page] = 1;
    return page;
  }

  void Release(int32_t page) {
    if (--refcount_[page] == 0) free_pages_.push_back(page);
  }

  // Grows an output buffer (doubling) and bumps the generation Python watches for new views.
  void Reserve(ffi::Tensor* buffer, int64_t length) {
    int64_t capacity = buffer->shape()[0];
    if (length <= capacity) return;
    while (capacity < length) capacity *= 2;
    *buffer = HostTensor<int32_t>(capacity);
    ++Data<int64_t>(step_info_)[kGeneration];
  }

  const int64_t page_size_, max_batch_;
  std::vector<int32_t> refcount_;
  std::vector<int32_t> free_pages_;
  std::unordered_map<int64_t, Sequence> sequences_;
  std::vector<Sequence*> batch_;
  uint64_t step_counter_ = 0;
  ffi::Tensor seq_ids_, append_lengths_, step_info_;
  ffi::Tensor qo_indptr_, page_indptr_, page_indices_, last_page_len_, append_slots_, positions_, copy_pairs_;
};

class PageManager : public ffi::ObjectRef {
 public:
  explicit PageManager(ffi::ObjectPtr<PageManagerObj> obj) : ObjectRef(std::move(obj)) {}
  TVM_FFI_DEFINE_OBJECT_REF_METHODS_NOTNULLABLE(PageManager, ffi::ObjectRef, PageManagerObj);
};

}  // namespace
}  // namespace atom_tvm

// The exported functions (tvm-ffi C ABI, found by name by tvm_ffi.load_module).
namespace atom_tvm {
namespace {

PageManager Create(int64_t num_pages, int64_t page_size, int64_t max_batch) {
  CheckConfig(num_pages, page_size, max_batch);  // before the object exists, so nothing half-built leaks
  return PageManager(ffi::make_object<PageManagerObj>(num_pages, page_size, max_batch));
}
ffi::Tensor Buffer(PageManager pm, ffi::String name) { return pm->Buffer(name); }
void AddSequence(PageManager pm, int64_t seq_id) { pm->AddSequence(seq_id); }
void RemoveSequence(PageManager pm, int64_t seq_id) { pm->RemoveSequence(seq_id); }
ffi::Shape ForkSequence(PageManager pm, int64_t parent_id, int64_t child_id) {
  return pm->ForkSequence(parent_id, child_id);
}
void Popn(PageManager pm, int64_t seq_id, int64_t n) { pm->Popn(seq_id, n); }
int64_t SequenceLength(PageManager pm, int64_t seq_id) { return pm->SequenceLength(seq_id); }
ffi::Shape SequencePages(PageManager pm, int64_t seq_id) { return pm->SequencePages(seq_id); }
int64_t NumFreePages(PageManager pm) { return pm->NumFreePages(); }
void BeginForward(PageManager pm, int64_t batch) { pm->BeginForward(batch); }

}  // namespace
}  // namespace atom_tvm

TVM_FFI_DLL_EXPORT_TYPED_FUNC(page_manager_create, atom_tvm::Create);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(page_manager_buffer, atom_tvm::Buffer);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(page_manager_add_sequence, atom_tvm::AddSequence);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(page_manager_remove_sequence, atom_tvm::RemoveSequence);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(page_manager_fork_sequence, atom_tvm::ForkSequence);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(page_manager_popn, atom_tvm::Popn);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(page_manager_sequence_length, atom_tvm::SequenceLength);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(page_manager_sequence_pages, atom_tvm::SequencePages);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(page_manager_num_free_pages, atom_tvm::NumFreePages);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(page_manager_begin_forward, atom_tvm::BeginForward);
