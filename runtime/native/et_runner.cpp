// edgepeft's native ExecuTorch runner: the narrow C ABI that runtime/backends/executorch.py
// drives through ctypes, so a device process runs the bundle's .pte programs without torch.
//
// Built against the executorch wheel's own headers and libexecutorch*.so (see build.py next to
// this file). The training program takes the adapter tensors as inputs and returns
// (loss, *gradients), so plain Module/Method execution is all training needs; the optimizer
// stays in numpy. Error strings are copied into a caller buffer; nothing here throws across
// the ABI.
#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

using executorch::aten::ScalarType;
using executorch::extension::TensorPtr;
using executorch::extension::from_blob;
using executorch::extension::module::Module;
using executorch::runtime::Error;
using executorch::runtime::EValue;
using executorch::runtime::HierarchicalAllocator;
using executorch::runtime::Span;

namespace executorch::extension::threadpool {
// Declared here because the wheel ships libexecutorch_threadpool.so but not threadpool.h.
class ThreadPool {
 public:
  bool _unsafe_reset_threadpool(uint32_t num_threads);
};
ThreadPool* get_threadpool();
}  // namespace executorch::extension::threadpool

namespace {

// Members are destroyed in reverse order: the module before the memory its method was planned in.
struct Program {
  std::vector<void*> owned;                   // planned buffers the shared ones were too small for
  std::vector<Span<uint8_t>> spans;
  std::unique_ptr<HierarchicalAllocator> planned;
  std::unique_ptr<Module> module;
  std::string method;
  // The last run's outputs, copied out of the shared arena before another run may reuse it.
  std::vector<std::vector<uint8_t>> out_data;
  std::vector<int> out_dtype;
  std::vector<std::vector<int64_t>> out_shape;
};

// The planned (activation) memory every program of the process shares, per buffer index.
// Runs are serialized (g_run_mutex) and copy their outputs out before the next run may reuse
// the arena, so one arena serves a session's training and inference programs (and any other
// session's in the process): the inference program costs no arena of its own. malloc'd, not zero-filled: pages become resident only when a run touches them
// (ExecuTorch's Module zero-fills its own arena at load). Kept for the process's lifetime.
std::mutex g_arena_mutex;
std::vector<std::pair<uint8_t*, size_t>> g_arena;
std::mutex g_run_mutex;  // runs share the arena: one at a time, whichever thread asks

// Points ``p``'s planned memory at the shared arena, growing it for buffers it lacks; a buffer
// larger than the arena's already-shared one gets a private allocation instead (growing would
// move memory an earlier program was planned in).
bool plan_memory(Program* p, const executorch::runtime::MethodMeta& meta) {
  std::lock_guard<std::mutex> lock(g_arena_mutex);
  for (size_t i = 0; i < meta.num_memory_planned_buffers(); ++i) {
    auto size = meta.memory_planned_buffer_size(i);
    if (!size.ok()) {
      return false;
    }
    size_t n = static_cast<size_t>(size.get());
    uint8_t* buf = nullptr;
    if (i < g_arena.size() && g_arena[i].second >= n) {
      buf = g_arena[i].first;
    } else {
      buf = static_cast<uint8_t*>(std::malloc(n > 0 ? n : 1));
      if (buf == nullptr) {
        return false;
      }
      if (i == g_arena.size()) {
        g_arena.emplace_back(buf, n);
      } else {
        p->owned.push_back(buf);
      }
    }
    p->spans.emplace_back(buf, n);
  }
  p->planned = std::make_unique<HierarchicalAllocator>(Span<Span<uint8_t>>(p->spans.data(), p->spans.size()));
  return true;
}

void set_error(char* err, size_t len, const std::string& what) {
  if (err != nullptr && len > 0) {
    std::snprintf(err, len, "%s", what.c_str());
  }
}

std::string error_text(const char* phase, Error e) {
  return std::string(phase) + " failed with ExecuTorch error 0x" +
      [](int v) { char b[16]; std::snprintf(b, sizeof b, "%x", v); return std::string(b); }(static_cast<int>(e));
}

}  // namespace

extern "C" {

// Loads ``path`` (memory-mapped: constants stay file pages) and plans ``method``'s memory.
void* edgepeft_et_open(const char* path, const char* method, char* err, size_t errlen) {
  auto p = std::make_unique<Program>();
  p->module = std::make_unique<Module>(path, Module::LoadMode::Mmap);
  p->method = method;
  auto meta = p->module->method_meta(p->method);  // loads the program
  if (!meta.ok()) {
    set_error(err, errlen, error_text("loading the program", meta.error()));
    return nullptr;
  }
  if (!plan_memory(p.get(), meta.get())) {
    set_error(err, errlen, "allocating the method's planned memory failed");
    return nullptr;
  }
  Error e = p->module->load_method(p->method, p->planned.get());
  if (e != Error::Ok) {
    set_error(err, errlen, error_text("loading the method", e));
    return nullptr;
  }
  return p.release();
}

// The sizes of ``method``'s planned buffers in ``path`` (without loading the method), up to
// ``max`` of them: their count, or -1 with ``err`` filled. A process that loads several
// programs loads the largest first, so the shared arena is sized once (plan_memory can only
// grow it by new buffers, not enlarge one a loaded program already uses).
int edgepeft_et_planned_sizes(const char* path, const char* method, int64_t* sizes, int max, char* err,
                              size_t errlen) {
  Module module(path, Module::LoadMode::Mmap);
  auto meta = module.method_meta(method);
  if (!meta.ok()) {
    set_error(err, errlen, error_text("loading the program", meta.error()));
    return -1;
  }
  int n = static_cast<int>(meta->num_memory_planned_buffers());
  for (int i = 0; i < n && i < max; ++i) {
    auto size = meta->memory_planned_buffer_size(i);
    sizes[i] = size.ok() ? size.get() : -1;
  }
  return n;
}

// Inputs the method takes (its MethodMeta), or -1.
int edgepeft_et_num_inputs(void* handle) {
  auto* p = static_cast<Program*>(handle);
  auto meta = p->module->method_meta(p->method);
  return meta.ok() ? static_cast<int>(meta->num_inputs()) : -1;
}

// Runs the method on ``n`` inputs (dtype: ExecuTorch ScalarType codes; shapes packed, ``ranks``
// entries each). Returns the number of outputs, or -1 with ``err`` filled.
int edgepeft_et_run(void* handle, int n, void** data, const int* dtypes, const int* ranks, const int64_t* shapes,
                    char* err, size_t errlen) {
  auto* p = static_cast<Program*>(handle);
  std::vector<TensorPtr> tensors;  // kept alive until execute returns (inputs are copied in)
  std::vector<EValue> inputs;
  for (int i = 0; i < n; ++i) {
    std::vector<executorch::aten::SizesType> sizes(shapes, shapes + ranks[i]);
    shapes += ranks[i];
    tensors.push_back(from_blob(data[i], std::move(sizes), static_cast<ScalarType>(dtypes[i])));
    inputs.emplace_back(tensors.back());
  }
  std::lock_guard<std::mutex> lock(g_run_mutex);
  auto result = p->module->execute(p->method, inputs);
  if (!result.ok()) {
    set_error(err, errlen, error_text("running the method", result.error()));
    return -1;
  }
  p->out_data.clear();
  p->out_dtype.clear();
  p->out_shape.clear();
  for (const auto& v : result.get()) {
    if (!v.isTensor()) {
      set_error(err, errlen, "an output is not a tensor");
      return -1;
    }
    const auto& t = v.toTensor();
    const auto* bytes = static_cast<const uint8_t*>(t.const_data_ptr());
    p->out_data.emplace_back(bytes, bytes + t.nbytes());
    p->out_dtype.push_back(static_cast<int>(t.scalar_type()));
    p->out_shape.emplace_back(t.sizes().begin(), t.sizes().end());
  }
  return static_cast<int>(p->out_data.size());
}

// Output ``i`` of the last run: a pointer to its copy (valid until the next run of this
// program), dtype and shape (up to 8 dimensions). Returns the rank, or -1.
int edgepeft_et_output(void* handle, int i, void** data, int* dtype, int64_t* shape) {
  auto* p = static_cast<Program*>(handle);
  if (i < 0 || i >= static_cast<int>(p->out_data.size()) || p->out_shape[i].size() > 8) {
    return -1;
  }
  *data = p->out_data[i].data();
  *dtype = p->out_dtype[i];
  std::copy(p->out_shape[i].begin(), p->out_shape[i].end(), shape);
  return static_cast<int>(p->out_shape[i].size());
}

void edgepeft_et_close(void* handle) {
  auto* p = static_cast<Program*>(handle);
  p->module.reset();
  for (void* buf : p->owned) {
    std::free(buf);
  }
  delete p;
}

// ExecuTorch's kernels and XNNPACK share one process-wide pool.
int edgepeft_et_set_threads(int n) {
  auto* pool = executorch::extension::threadpool::get_threadpool();
  return pool != nullptr && pool->_unsafe_reset_threadpool(static_cast<uint32_t>(n)) ? 0 : -1;
}

}  // extern "C"
