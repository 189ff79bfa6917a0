// The CPU kernels of the bitfx_kernels ops in C++: the per-call hot path without Python.
//
// bitfx/ops/native.py builds this file once per machine (one g++/clang++ call, -O2) into the bitfx cache
// and loads it; its TORCH_LIBRARY_IMPL registers CPU kernels for bitfx_kernels::bit_linear (and its pair
// bit_linear_to_bits / bit_linear_on_bits), fused_attention, sign_scores and binary_pv, which then take
// precedence over the Python implementations (registered for CompositeExplicitAutograd in
// bitfx/ops/kernel_ops.py and bitfx/codegen/fused_attention.py, the fallback when this file cannot be built).
// The helper ops it asks on a cache miss are Python CPU kernels, reached by redispatching to CPU.
//
// A call does what runtime.LinearPlan.__call__ does, in C++: look up the layer's plan (packed weight,
// vectors, TVM function handles), allocate the outputs with at::empty, and call the two TVM kernels through
// the TVM-FFI C ABI with DLTensor pointers (no DLPack capsules, no Python objects). The plan cache is keyed
// like kernel_ops.linear_plan: the parameter (weakly: an entry whose parameter died never matches), the view
// geometry, and (data pointer, version) of the weight and its vectors, so an in-place update (optimizer.step)
// rebuilds it. A miss (and every call with cache=False) asks Python once, through the dispatcher, via the
// op bitfx_kernels::_linear_plan_parts, which returns the plan's tensors and kernel handles.
#include <ATen/core/Tensor.h>
#include <ATen/core/stack.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/add.h>
#include <ATen/ops/empty.h>
#include <c10/util/intrusive_ptr.h>
#include <torch/library.h>

#include <ATen/Parallel.h>
#include <tvm/ffi/c_api.h>
#include <tvm/ffi/extra/c_env_api.h>

#include <dlfcn.h>
#include <sched.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace {

using Stack = std::vector<c10::IValue>;
using Args = c10::ArrayRef<c10::IValue>;  // an op's arguments, still on its stack
using Ints = c10::SmallVector<int64_t, 16>;  // a plan's geometry and key: no allocation per call

std::string_view view(const c10::IValue& v) {
  const auto& s = v.toStringRef();  // (a reference: the string lives in the IValue)
  return {s.data(), s.size()};
}

// ------------------------------------------------------------------------------------ TVM-FFI calls
struct Fn {  // a retained TVM-FFI function handle
  TVMFFIObjectHandle h = nullptr;
  Fn() = default;
  explicit Fn(int64_t handle) : h(reinterpret_cast<TVMFFIObjectHandle>(handle)) {
    TORCH_CHECK(h != nullptr, "bitfx native: null kernel handle");
    TVMFFIObjectIncRef(h);
  }
  Fn(const Fn&) = delete;
  Fn& operator=(const Fn&) = delete;
  ~Fn() {
    if (h) TVMFFIObjectDecRef(h);
  }
};

DLDataType dl_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return {kDLFloat, 32, 1};
    case at::kUInt64: return {kDLUInt, 64, 1};
    case at::kInt: return {kDLInt, 32, 1};
    case at::kByte: return {kDLUInt, 8, 1};
    case at::kChar: return {kDLInt, 8, 1};
    default: TORCH_CHECK(false, "bitfx native: no DLPack dtype for ", t.scalar_type());
  }
}

// A DLTensor over a tensor's data, its shape and strides borrowed (the tensor outlives the call).
DLTensor dl(const at::Tensor& t) {
  DLTensor d;
  d.data = t.data_ptr();
  d.device = {kDLCPU, 0};
  d.ndim = static_cast<int32_t>(t.dim());
  d.dtype = dl_dtype(t);
  d.shape = const_cast<int64_t*>(t.sizes().data());
  d.strides = const_cast<int64_t*>(t.strides().data());
  d.byte_offset = 0;
  return d;
}

// A compact DLTensor over raw memory with the given shape (strides NULL: row-major compact).
DLTensor dl(void* data, DLDataType dtype, int64_t* shape, int32_t ndim) {
  DLTensor d;
  d.data = data;
  d.device = {kDLCPU, 0};
  d.ndim = ndim;
  d.dtype = dtype;
  d.shape = shape;
  d.strides = nullptr;
  d.byte_offset = 0;
  return d;
}

[[noreturn]] void raise_ffi_error() {
  TVMFFIObjectHandle err = nullptr;
  TVMFFIErrorMoveFromRaised(&err);
  std::string msg = "bitfx kernel failed";
  if (err) {
    TVMFFIErrorCell* cell = TVMFFIErrorGetCellPtr(err);
    msg = std::string(cell->kind.data, cell->kind.size) + ": " + std::string(cell->message.data, cell->message.size);
    TVMFFIObjectDecRef(err);
  }
  TORCH_CHECK(false, msg);
}

// Calls fn(tensors...) through the TVM-FFI C ABI, each argument a DLTensor pointer (no DLPack capsule).
void call(const Fn& fn, std::initializer_list<DLTensor*> tensors) {
  constexpr int kMax = 10;
  TVMFFIAny args[kMax];
  int n = 0;
  for (DLTensor* t : tensors) {
    TORCH_CHECK(n < kMax, "bitfx native: too many kernel arguments");
    std::memset(&args[n], 0, sizeof(TVMFFIAny));
    args[n].type_index = kTVMFFIDLTensorPtr;
    args[n].v_ptr = t;
    ++n;
  }
  TVMFFIAny result;
  std::memset(&result, 0, sizeof(TVMFFIAny));
  result.type_index = kTVMFFINone;
  if (TVMFFIFunctionCall(fn.h, args, n, &result) != 0) raise_ffi_error();
  if (result.type_index >= kTVMFFIStaticObjectBegin && result.v_obj) TVMFFIObjectDecRef(result.v_obj);
}

void call(const Fn& fn, std::initializer_list<const at::Tensor*> tensors) {
  constexpr int kMax = 10;
  DLTensor d[kMax];
  int n = 0;
  for (const at::Tensor* t : tensors) {
    TORCH_CHECK(n < kMax, "bitfx native: too many kernel arguments");
    d[n++] = dl(*t);
  }
  switch (n) {  // (an initializer_list of pointers into d)
    case 2: return call(fn, {&d[0], &d[1]});
    case 3: return call(fn, {&d[0], &d[1], &d[2]});
    case 4: return call(fn, {&d[0], &d[1], &d[2], &d[3]});
    default: TORCH_CHECK(false, "bitfx native: unexpected kernel arity ", n);
  }
}

// Per-thread scratch for the packed activation and its row scales: consumed within the call.
template <typename T>
T* scratch(std::vector<T>& buf, size_t n) {
  if (buf.size() < n || buf.empty()) buf.resize(std::max<size_t>({n, buf.size() * 2, 64}));
  return buf.data();
}
thread_local std::vector<uint64_t> t_packed;
thread_local std::vector<float> t_rows;

// The work (bit-MACs) of the op this thread is running, while it runs (-1: unknown). The pool launch runs a
// kernel's parallel loop as one task on the calling thread below a threshold (bitfx_pool_set_min_work):
// handing a few microseconds of work to another thread costs more than it saves, and on a busy machine a
// handoff can wait for a whole time slice.
thread_local int64_t t_work = -1;
struct WorkHint {
  int64_t prev;
  explicit WorkHint(int64_t work) : prev(t_work) { t_work = work; }
  ~WorkHint() { t_work = prev; }
  WorkHint(const WorkHint&) = delete;
  WorkHint& operator=(const WorkHint&) = delete;
};

int64_t words(int64_t k) { return (k + 63) / 64; }

// x[..., K] -> contiguous float32 [M, K], as runtime._rows (same errors: TypeError / ValueError).
at::Tensor rows(const at::Tensor& x, int64_t K, const char* name) {
  auto dt = x.scalar_type();
  if (dt == at::kFloat && x.is_contiguous() && x.dim() >= 1 && x.size(-1) == K && x.device().is_cpu()) return x;
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, name,
                   " must be float32, float16 or bfloat16; got torch.", c10::getDtypeNames(dt).first);
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == K, name, " has ", x.dim() ? x.size(-1) : 0,
                    " features in its last dim; the kernel expects K=", K);
  TORCH_CHECK_VALUE(x.device().is_cpu(), name, " is on ", x.device(), "; the host kernels run on CPU tensors");
  return x.to(at::kFloat).contiguous();  // callers read it as [numel / K, K]
}

// The TVM backend ABI of a parallel loop and the GNU OpenMP entry points (see "one thread pool" below).
extern "C" {
typedef struct {
  void* sync_handle;
  int32_t num_task;
} TVMParallelGroupEnv;  // as tvm/runtime/c_backend_api.h (TVM 0.27) declares it
typedef int (*FTVMParallelLambda)(int task_id, TVMParallelGroupEnv* penv, void* cdata);

void GOMP_parallel(void (*fn)(void*), void* data, unsigned num_threads, unsigned flags) __attribute__((weak));
void GOMP_barrier() __attribute__((weak));
int omp_get_thread_num() __attribute__((weak));
int omp_get_num_threads() __attribute__((weak));
int omp_in_parallel() __attribute__((weak));
}

// ------------------------------------------------------------------------------------- bit_linear
// kPython: a quantizer this file does not know (a newer activation method): the Python path runs each call.
// kUnsigned: {0, α} codes (x + move) > α/2, packed by pack_rows("pos") with the threshold -α/2 as its move.
enum Quant : int64_t { kPython = -1, kSignMean = 0, kSignAlpha = 1, kAbsmax = 2, kUnsigned = 3 };

struct Plan {  // runtime.LinearPlan's resolved parts
  std::unique_ptr<Fn> quant, gemm;
  int64_t kind = 0, bits = 1, K = 0, N = 0;
  bool sign_bits = false;  // the GEMM writes the next layer's packed sign codes (output="sign_bits")
  std::vector<at::Tensor> weights;  // packed planes [, nnz]
  at::Tensor col, bias, move, alpha, threshold, out_move;  // undefined when absent
};

constexpr size_t kPlanArgs = 14;  // bit_linear's arguments: x, weight, ..., activation (the plan's key)

// The plan's parts from Python (kernel_ops._linear_plan_parts): tensors [w, (nnz), col, (bias), (move),
// (alpha), (threshold), (out_move)] and ints [quant handle, gemm handle, kind, bits, K, N, n_weights, has_bias,
// has_move, has_alpha, output (1: packed sign codes), has_out_move]. `args`: bit_linear's 14 arguments.
std::shared_ptr<Plan> plan_from_python(Args args, const c10::IValue& out_move, const char* output) {
  static const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow("bitfx_kernels::_linear_plan_parts", "");
  Stack stack(args.begin() + 1, args.begin() + kPlanArgs);  // all but x
  stack.push_back(out_move);
  stack.emplace_back(std::string(output));
  op.redispatchBoxed(c10::DispatchKeySet(c10::DispatchKey::CPU), &stack);
  TORCH_CHECK(stack.size() == 2, "bitfx native: _linear_plan_parts returned ", stack.size(), " values");
  std::vector<at::Tensor> ts = stack[0].toTensorVector();
  std::vector<int64_t> is = stack[1].toIntVector();
  TORCH_CHECK(is.size() == 12, "bitfx native: _linear_plan_parts returned ", is.size(), " ints");
  auto plan = std::make_shared<Plan>();
  plan->kind = is[2];
  if (plan->kind == kPython) return plan;
  plan->quant = std::make_unique<Fn>(is[0]);
  plan->gemm = std::make_unique<Fn>(is[1]);
  plan->bits = is[3];
  plan->K = is[4];
  plan->N = is[5];
  size_t i = 0;
  for (int64_t w = 0; w < is[6]; ++w) plan->weights.push_back(ts.at(i++));
  plan->col = ts.at(i++);
  if (is[7]) plan->bias = ts.at(i++);
  if (is[8]) plan->move = ts.at(i++);
  if (is[9]) plan->alpha = ts.at(i++);
  if (plan->kind == kUnsigned) plan->threshold = ts.at(i++);
  plan->sign_bits = is[10] != 0;
  if (is[11]) plan->out_move = ts.at(i++);
  return plan;
}

// The GEMM of a plan, from the packed activation `da` and row scales `dr`, into `out`: float32 [M, N], or
// (sign_bits) the next layer's packed codes, int64 [M, N/64], which the kernel writes as bytes [M, N/8].
void run_gemm(const Plan& p, DLTensor* da, DLTensor* dr, void* out, int64_t M) {
  int64_t y_shape[2] = {M, p.sign_bits ? p.N / 8 : p.N};
  DLTensor dy = dl(out, p.sign_bits ? DLDataType{kDLUInt, 8, 1} : DLDataType{kDLFloat, 32, 1}, y_shape, 2);
  DLTensor dw = dl(p.weights[0]), dc = dl(p.col);
  DLTensor dn = p.weights.size() == 2 ? dl(p.weights[1]) : DLTensor{};
  DLTensor db = p.bias.defined() ? dl(p.bias) : DLTensor{};
  DLTensor dm = p.out_move.defined() ? dl(p.out_move) : DLTensor{};
  // a, w, (nnz), row_scale, col_scale, (bias), (out_move), out
  DLTensor* args[8];
  int n = 0;
  args[n++] = da;
  args[n++] = &dw;
  if (p.weights.size() == 2) args[n++] = &dn;
  args[n++] = dr;
  args[n++] = &dc;
  if (p.bias.defined()) args[n++] = &db;
  if (p.out_move.defined()) args[n++] = &dm;
  args[n++] = &dy;
  switch (n) {  // (an initializer_list of the pointers)
    case 5: return call(*p.gemm, {args[0], args[1], args[2], args[3], args[4]});
    case 6: return call(*p.gemm, {args[0], args[1], args[2], args[3], args[4], args[5]});
    case 7: return call(*p.gemm, {args[0], args[1], args[2], args[3], args[4], args[5], args[6]});
    case 8: return call(*p.gemm, {args[0], args[1], args[2], args[3], args[4], args[5], args[6], args[7]});
    default: TORCH_CHECK(false, "bitfx native: unexpected GEMM arity ", n);
  }
}

// The output of a plan for x_in's leading dims: float32 [..., N], or packed codes int64 [..., N/64].
at::Tensor new_output(const Plan& p, const at::Tensor& x_in) {
  c10::SmallVector<int64_t, 5> shape(x_in.sizes().begin(), x_in.sizes().end() - 1);
  shape.push_back(p.sign_bits ? p.N / 64 : p.N);
  return at::empty(shape, x_in.options().dtype(p.sign_bits ? at::kLong : at::kFloat));
}

// Where a plan's rows go, for rows [0, M): x (float32 [M, K]), the packed activation a (uint64 [M, planes, W]),
// the row scales rs ([M]) and the output y (float32 [M, N], or the packed codes' bytes [M, N/8]).
struct PlanRows {
  const Plan* p;
  float* x;
  uint64_t* a;
  float* rs;
  char* y;
  int64_t M, planes, W;
};

// Rows [m0, m0 + mt) of a plan's call: quantize and pack them, then their GEMM. Every kernel is row-wise, so a
// slice of rows is a whole call on views (pointers moved by whole rows; shapes mt).
void plan_rows(const PlanRows& r, int64_t m0, int64_t mt) {
  const Plan& p = *r.p;
  const int64_t W = r.W, planes = r.planes;
  int64_t x_shape[2] = {mt, p.K}, a_shape[3] = {mt, planes, W}, a2_shape[2] = {mt, W}, r_shape[1] = {mt};
  DLTensor dx = dl(r.x + m0 * p.K, {kDLFloat, 32, 1}, x_shape, 2);
  uint64_t* a = r.a + m0 * planes * W;
  DLTensor da = p.kind == kAbsmax ? dl(a, {kDLUInt, 64, 1}, a_shape, 3) : dl(a, {kDLUInt, 64, 1}, a2_shape, 2);
  DLTensor dr = dl(r.rs + m0, {kDLFloat, 32, 1}, r_shape, 1);
  if (p.kind == kAbsmax) {
    call(*p.quant, {&dx, &da, &dr});
  } else if (p.kind == kUnsigned) {
    DLTensor dt = dl(p.threshold);  // x is already x + move here (run_plan)
    call(*p.quant, {&dx, &dt, &da});
  } else {
    DLTensor dm = p.move.defined() ? dl(p.move) : DLTensor{};
    if (p.kind == kSignMean) {
      if (p.move.defined()) call(*p.quant, {&dx, &dm, &da, &dr});
      else call(*p.quant, {&dx, &da, &dr});
    } else {
      if (p.move.defined()) call(*p.quant, {&dx, &dm, &da});
      else call(*p.quant, {&dx, &da});
    }
  }
  const int64_t row_bytes = p.sign_bits ? p.N / 8 : p.N * 4;
  run_gemm(p, &da, &dr, r.y + m0 * row_bytes, mt);
}

// Rows per slice of a call split over the team: a multiple of 16, so every slice's pointers keep the
// 64-byte alignment of the whole (16 rows of floats, of packed words, of output bytes: multiples of 64 bytes).
constexpr int64_t kSliceRows = 16;

struct RowsJob {
  const PlanRows* rows;
  std::mutex mutex;
  std::string error;  // the first task's failure
};

int run_rows_task(int task, TVMParallelGroupEnv* env, void* cdata);
int pool_launch(FTVMParallelLambda f, void* cdata, int num_task);
bool pool_installed();

at::Tensor run_plan(const Plan& p, const at::Tensor& x_in) {
  at::Tensor x = rows(x_in, p.K, "x");  // x itself when float32 and contiguous
  const int64_t M = x.numel() / std::max<int64_t>(p.K, 1), W = words(p.K);
  const int64_t planes = p.kind == kAbsmax ? p.bits : 1;
  WorkHint hint(M * p.N * p.K * planes);
  if (p.kind == kUnsigned && p.move.defined()) x = at::add(x.view({M, p.K}), p.move);  // as LinearPlan: x2 + move
  float* rows_ = scratch(t_rows, M);
  if (p.kind == kUnsigned || p.kind == kSignAlpha) std::fill(rows_, rows_ + M, p.alpha.data_ptr<float>()[0]);
  at::Tensor y = new_output(p, x_in);
  const PlanRows r{&p, x.data_ptr<float>(), scratch(t_packed, M * planes * W), rows_,
                   static_cast<char*>(y.data_ptr()), M, planes, W};
  // With the team (bitfx's pool) and at least kSliceRows rows for each thread: one launch, each thread
  // quantizing and multiplying its own rows (the packed rows it multiplies are the ones it just wrote, in
  // its cache), instead of a launch for the quantizer and another for the GEMM (two team wake-ups and a
  // barrier between them). Fewer rows (decode): the kernels' own launches, whose GEMM splits the columns.
  if (pool_installed() && M >= kSliceRows * std::max(at::get_num_threads(), 2)) {
    RowsJob job{&r, {}, {}};
    if (pool_launch(&run_rows_task, &job, 0) != 0) TORCH_CHECK(false, job.error);
  } else {
    plan_rows(r, 0, M);
  }
  return x_in.scalar_type() == at::kFloat || p.sign_bits ? y : y.to(x_in.scalar_type());
}

// A plan of act "sign" with a given α on codes already packed (bit_linear_on_bits): the GEMM alone.
at::Tensor run_plan_on_bits(const Plan& p, const at::Tensor& bits) {
  const int64_t W = words(p.K);
  TORCH_CHECK_TYPE(bits.scalar_type() == at::kLong || bits.scalar_type() == at::kUInt64,
                   "bits must be packed words (int64 or uint64); got torch.", c10::getDtypeNames(bits.scalar_type()).first);
  TORCH_CHECK_VALUE(bits.dim() >= 1 && bits.size(-1) == W, "bits has ", bits.dim() ? bits.size(-1) : 0,
                    " words in its last dim; K=", p.K, " needs ", W);
  TORCH_CHECK_VALUE(bits.device().is_cpu(), "bits is on ", bits.device(), "; the host kernels run on CPU tensors");
  TORCH_CHECK_VALUE(p.kind == kSignAlpha && !p.sign_bits, "bit_linear_on_bits needs act_mode='sign' with a given "
                    "alpha and a float output");
  const at::Tensor b = bits.contiguous();
  const int64_t M = b.numel() / W;
  WorkHint hint(M * p.N * p.K);
  int64_t a_shape[2] = {M, W}, r_shape[1] = {M};
  DLTensor da = dl(b.data_ptr(), {kDLUInt, 64, 1}, a_shape, 2);
  float* rows_ = scratch(t_rows, M);
  std::fill(rows_, rows_ + M, p.alpha.data_ptr<float>()[0]);
  DLTensor dr = dl(rows_, {kDLFloat, 32, 1}, r_shape, 1);
  c10::SmallVector<int64_t, 5> shape(b.sizes().begin(), b.sizes().end() - 1);
  shape.push_back(p.N);
  at::Tensor y = at::empty(shape, b.options().dtype(at::kFloat));
  run_gemm(p, &da, &dr, y.data_ptr(), M);
  return y;
}

using WeakImpl = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;

struct Slot {  // one layer: its parameter (weak), the key its plan was built for, the plan
  WeakImpl base;
  Ints key;
  std::string weight_mode, act_mode, activation, output;
  std::shared_ptr<Plan> plan;
  bool same_modes(Args args, std::string_view out) const {
    return weight_mode == view(args[6]) && act_mode == view(args[7]) && activation == view(args[13]) && output == out;
  }
};

struct Geometry {
  const c10::TensorImpl* base;
  Ints g;  // offset, ndim, sizes, strides, the epilogue's hash
  bool operator==(const Geometry& o) const { return base == o.base && g == o.g; }
};
struct GeometryHash {
  size_t operator()(const Geometry& k) const {
    size_t h = std::hash<const void*>()(k.base);
    for (int64_t v : k.g) h = h * 1000003u ^ std::hash<int64_t>()(v);
    return h;
  }
};

std::mutex g_mutex;
std::unordered_map<Geometry, Slot, GeometryHash> g_plans;
int64_t g_misses = 0;

void push_version(Ints& key, const c10::IValue& v) {
  if (v.isNone()) {
    key.push_back(0);
    key.push_back(-1);
    return;
  }
  const at::Tensor& t = v.toTensor();
  key.push_back(reinterpret_cast<int64_t>(t.data_ptr()));
  key.push_back(static_cast<int64_t>(t._version()));
}

// The plan of a bit_linear call: `args` its 14 arguments (bit_linear(Tensor x, Tensor weight, Tensor? bias,
// Tensor? weight_scale, Tensor? move, Tensor? alpha, str weight_mode, str act_mode, int act_bits, bool cache=True,
// int[]? view_size=None, int[]? view_stride=None, int view_offset=0, str activation="none")), with bit_linear_to_bits'
// out_move and the output ("float" or "sign_bits"). The activation and output are in the plan's GEMM epilogue:
// only the plan's key needs them here.
std::shared_ptr<Plan> lookup_plan(Args args, const c10::IValue& out_move, const char* output) {
  const at::Tensor& param = args[1].toTensor();
  if (!args[9].toBool()) return plan_from_python(args, out_move, output);  // a weight the graph computes
  // the layer's weight: the view given (view_size...) of the parameter, else the tensor itself
  const at::Tensor base = param.is_view() ? at::Tensor(param._base()) : param;
  Geometry geo{base.unsafeGetTensorImpl(), {}};
  if (args[10].isNone()) {
    geo.g.push_back(param.storage_offset());
    geo.g.push_back(param.dim());
    for (int64_t s : param.sizes()) geo.g.push_back(s);
    for (int64_t s : param.strides()) geo.g.push_back(s);
  } else {
    const auto size = args[10].toIntList(), stride = args[11].toIntList();
    geo.g.push_back(args[12].toInt());
    geo.g.push_back(static_cast<int64_t>(size.size()));
    for (int64_t v : size) geo.g.push_back(v);
    for (int64_t v : stride) geo.g.push_back(v);
  }
  // one slot per output activation and kind: a weight used both with and without one keeps both plans (the
  // slot by the names' hash; the exact names are checked with the modes below)
  geo.g.push_back(static_cast<int64_t>(std::hash<std::string_view>()(view(args[13])) * 31u ^
                                       std::hash<std::string_view>()(output)));
  Ints key;
  for (size_t i = 1; i <= 5; ++i) push_version(key, args[i]);
  push_version(key, out_move);
  key.push_back(args[8].toInt());
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    auto it = g_plans.find(geo);
    if (it != g_plans.end() && !it->second.base.expired() && it->second.key == key &&
        it->second.same_modes(args, output))
      return it->second.plan;
  }
  std::shared_ptr<Plan> plan = plan_from_python(args, out_move, output);  // outside the lock: Python takes the GIL
  std::lock_guard<std::mutex> lock(g_mutex);
  ++g_misses;
  for (auto it = g_plans.begin(); it != g_plans.end();)  // drop layers whose parameter is gone
    it = it->second.base.expired() ? g_plans.erase(it) : std::next(it);
  g_plans.insert_or_assign(geo, Slot{WeakImpl(base.getIntrusivePtr()), std::move(key), std::string(view(args[6])),
                                     std::string(view(args[7])), std::string(view(args[13])), output, plan});
  return plan;
}

// Replaces an op's n arguments on the stack by its result.
void finish(Stack* stack, size_t n, c10::IValue result) {
  torch::jit::drop(*stack, n);
  stack->emplace_back(std::move(result));
}

// A plan this file cannot run (kind -1): the op's Python implementation, through the dispatcher.
void run_python(const char* op_name, Stack* stack, size_t n) {
  const c10::OperatorHandle op = c10::Dispatcher::singleton().findSchemaOrThrow(op_name, "");
  Stack args(stack->end() - n, stack->end());
  op.redispatchBoxed(c10::DispatchKeySet(c10::DispatchKey::CPU), &args);
  finish(stack, n, std::move(args.at(0)));
}

void bit_linear(const c10::OperatorHandle&, c10::DispatchKeySet, Stack* stack) {
  Args args = torch::jit::last(*stack, kPlanArgs);
  std::shared_ptr<Plan> plan = lookup_plan(args, c10::IValue(), "float");
  if (plan->kind == kPython) return run_python("bitfx_kernels::_bit_linear_python", stack, kPlanArgs);
  finish(stack, kPlanArgs, run_plan(*plan, args[0].toTensor()));
}

// bit_linear_to_bits(<bit_linear's arguments>, Tensor? out_move=None) -> int64 [..., N/64]
void bit_linear_to_bits(const c10::OperatorHandle&, c10::DispatchKeySet, Stack* stack) {
  Args args = torch::jit::last(*stack, kPlanArgs + 1);
  std::shared_ptr<Plan> plan = lookup_plan(args, args[kPlanArgs], "sign_bits");
  if (plan->kind == kPython) return run_python("bitfx_kernels::_bit_linear_to_bits_python", stack, kPlanArgs + 1);
  finish(stack, kPlanArgs + 1, run_plan(*plan, args[0].toTensor()));
}

// bit_linear_on_bits(Tensor bits, <bit_linear's other arguments>) -> float32 [..., N]
void bit_linear_on_bits(const c10::OperatorHandle&, c10::DispatchKeySet, Stack* stack) {
  Args args = torch::jit::last(*stack, kPlanArgs);
  TORCH_CHECK_VALUE(args[4].isNone() && !args[5].isNone() && view(args[7]) == "sign",
                    "bit_linear_on_bits takes codes signed with a given alpha: act_mode='sign', alpha given, "
                    "move=None (applied by the producer); got act_mode='", view(args[7]), "'");
  std::shared_ptr<Plan> plan = lookup_plan(args, c10::IValue(), "float");
  finish(stack, kPlanArgs, run_plan_on_bits(*plan, args[0].toTensor()));
}

// ------------------------------------------------------------------------- sign_scores / binary_pv
// Kernel handles by (which, width), resolved once through kernel_ops._attention_kernels.
std::mutex g_kmutex;
std::unordered_map<std::string, std::vector<std::shared_ptr<Fn>>> g_kernels;

const std::vector<std::shared_ptr<Fn>>& attention_kernels(const std::string& which, int64_t width) {
  const std::string key = which + ":" + std::to_string(width);
  {
    std::lock_guard<std::mutex> lock(g_kmutex);
    auto it = g_kernels.find(key);
    if (it != g_kernels.end()) return it->second;
  }
  static const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow("bitfx_kernels::_attention_kernels", "");
  Stack stack{c10::IValue(which), c10::IValue(width)};
  op.redispatchBoxed(c10::DispatchKeySet(c10::DispatchKey::CPU), &stack);
  std::vector<std::shared_ptr<Fn>> fns;
  for (int64_t h : stack.at(0).toIntVector()) fns.push_back(std::make_shared<Fn>(h));
  std::lock_guard<std::mutex> lock(g_kmutex);
  return g_kernels.emplace(key, std::move(fns)).first->second;  // unordered_map: references stay valid
}

std::string shape_str(const at::Tensor& t) {
  std::string s = "(";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + (t.dim() == 1 ? ",)" : ")");
}

std::vector<int64_t> lead_shape(const at::Tensor& t, int64_t tail) {
  return std::vector<int64_t>(t.sizes().begin(), t.sizes().end() - tail);
}

at::Tensor sign_scores(const at::Tensor& q, const at::Tensor& k) {
  TORCH_CHECK_VALUE(q.dim() >= 2 && k.dim() >= 2 && lead_shape(q, 2) == lead_shape(k, 2) && q.size(-1) == k.size(-1),
                    "sign_scores needs q [..., Lq, D] and k [..., Lk, D]; got ", shape_str(q), ", ", shape_str(k));
  const int64_t Lq = q.size(-2), D = q.size(-1), Lk = k.size(-2), W = words(D);
  at::Tensor q2 = rows(q, D, "q").view({-1, D}), k2 = rows(k, D, "k").view({-1, D});
  const int64_t G = Lq ? q2.size(0) / Lq : 0;
  WorkHint hint(G * Lq * Lk * D);
  const auto& fns = attention_kernels("scores", D);  // pack_rows(sign), batched xnor GEMM
  auto u64 = q2.options().dtype(at::kUInt64);
  at::Tensor qp = at::empty({q2.size(0), W}, u64), kp = at::empty({k2.size(0), W}, u64);
  call(*fns[0], {&q2, &qp});
  call(*fns[0], {&k2, &kp});
  at::Tensor q3 = qp.view({G, Lq, W});
  at::Tensor kt = kp.view({G, Lk, W}).transpose(1, 2).contiguous();
  at::Tensor out = at::empty({G, Lq, Lk}, q2.options().dtype(at::kInt));
  call(*fns[1], {&q3, &kt, &out});
  auto shape = lead_shape(q, 2);
  shape.push_back(Lq);
  shape.push_back(Lk);
  return out.view(shape);
}

at::Tensor binary_pv(const at::Tensor& p_in, const at::Tensor& v) {
  TORCH_CHECK_VALUE(p_in.dim() >= 2 && v.dim() >= 2 && lead_shape(p_in, 2) == lead_shape(v, 2) &&
                        p_in.size(-1) == v.size(-2),
                    "binary_pv needs p [..., Lq, Lk] and v [..., Lk, Dv]; got ", shape_str(p_in), ", ", shape_str(v));
  const int64_t Lq = p_in.size(-2), Lk = p_in.size(-1), Dv = v.size(-1);
  at::Tensor p = p_in.scalar_type() == at::kBool ? p_in.view(at::kByte) : p_in;
  const bool u8 = p.scalar_type() == at::kByte;
  at::Tensor p2 = p.reshape({-1, Lk});
  p2 = (u8 ? p2 : p2.to(at::kFloat)).contiguous();
  at::Tensor v3 = rows(v, Dv, "v").view({-1, Dv});
  const int64_t G = Lk ? v3.size(0) / Lk : p2.size(0) / std::max<int64_t>(Lq, 1);
  WorkHint hint(G * Lq * Lk * Dv);
  const auto& fns = attention_kernels(u8 ? "pv_uint8" : "pv_float32", Dv);  // pack_rows, pack_cols, and-GEMM
  auto u64 = v3.options().dtype(at::kUInt64);
  at::Tensor pp = at::empty({p2.size(0), words(Lk)}, u64);
  call(*fns[0], {&p2, &pp});
  at::Tensor v4 = v3.view({G, Lk, Dv});
  at::Tensor vp = at::empty({G, words(Lk), Dv}, u64);
  call(*fns[1], {&v4, &vp});
  at::Tensor p3 = pp.view({G, Lq, -1});
  at::Tensor out = at::empty({G, Lq, Dv}, v3.options().dtype(at::kInt));
  call(*fns[2], {&p3, &vp, &out});
  auto shape = lead_shape(p_in, 2);
  shape.push_back(Lq);
  shape.push_back(Dv);
  return out.view(shape);
}

// ----------------------------------------------------------------------------------- fused_attention
// What fused_attention.fused_attention does per call, for the common shapes a compiled graph passes: q, k, v
// [B, H, L, D] float32 with a unit last stride (transposed views as they are), the bias a contiguous float32
// [bB, bH, bQ, Lk] (each of the first three dims full or 1), est_v [B, H, Lk, 1], est_q/est_k contiguous
// [B, H, L, 2r], scalars given as one-element tensors. Anything else (other ranks or dtypes, a bias to
// broadcast, bad shapes: the Python implementation's errors) goes to the Python implementation,
// bitfx_kernels::_fused_attention_python. Kernel handles come from Python once per configuration, through
// bitfx_kernels::_fused_attention_kernel.
constexpr double kEps = 1e-5;  // bitfx.ops.quantizers.EPS: elastic's alpha_P floor (a test compares them)
constexpr int64_t kMaxD = 1024, kMaxDv = 256, kMaxEstRank = 8;  // fused_attention.MAX_D, MAX_DV, MAX_EST_RANK
std::atomic<int64_t> g_attention_calls{0};
std::mutex g_amutex;
std::unordered_map<std::string, std::shared_ptr<Fn>> g_attention_kernels;

bool f32_cpu(const at::Tensor& t) { return t.scalar_type() == at::kFloat && t.device().is_cpu(); }
bool scalar(const c10::optional<at::Tensor>& t) { return !t.has_value() || t->numel() == 1; }
double value(const c10::optional<at::Tensor>& t, double none) {  // as Python's float(t)
  return t.has_value() ? t->item().toDouble() : none;
}

const Fn& attention_kernel(int64_t D, int64_t Dv, const std::string& mode, int64_t pattern, bool causal, bool aq,
                           bool ak, bool av, bool est_v, int64_t rank) {
  const std::string key = std::to_string(D) + ":" + std::to_string(Dv) + ":" + mode + ":" + std::to_string(pattern) +
                          ":" + std::to_string(causal) + std::to_string(aq) + std::to_string(ak) +
                          std::to_string(av) + std::to_string(est_v) + ":" + std::to_string(rank);
  {
    std::lock_guard<std::mutex> lock(g_amutex);
    auto it = g_attention_kernels.find(key);
    if (it != g_attention_kernels.end()) return *it->second;
  }
  static const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow("bitfx_kernels::_fused_attention_kernel", "");
  Stack stack{D, Dv, mode, pattern, causal, aq, ak, av, est_v, rank};
  op.redispatchBoxed(c10::DispatchKeySet(c10::DispatchKey::CPU), &stack);
  auto fn = std::make_shared<Fn>(stack.at(0).toInt());
  std::lock_guard<std::mutex> lock(g_amutex);
  return *g_attention_kernels.emplace(key, std::move(fn)).first->second;
}

void fused_attention(const c10::OperatorHandle&, c10::DispatchKeySet, Stack* stack) {
  constexpr size_t kArgs = 14;
  Args args = torch::jit::last(*stack, kArgs);
  auto opt = [&](size_t i) { return args[i].isNone() ? c10::optional<at::Tensor>() : args[i].toTensor(); };
  const at::Tensor &q = args[0].toTensor(), &k = args[1].toTensor(), &v = args[2].toTensor();
  const auto bias = opt(3), est_v = opt(4), aq = opt(5), ak = opt(6), av = opt(7), pp = opt(8);
  const auto est_q = opt(12), est_k = opt(13);
  const std::string mode(args[11].toStringRef());
  const bool causal = args[10].toBool();
  const bool has_est = est_q.has_value() && est_k.has_value();
  bool fast = q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && f32_cpu(q) && f32_cpu(k) && f32_cpu(v) &&
              (mode == "bivit" || mode == "bool" || (mode == "elastic" && pp.has_value())) &&
              scalar(aq) && scalar(ak) && scalar(av) && scalar(pp);
  int64_t B = 0, H = 0, Lq = 0, D = 0, Lk = 0, Dv = 0, pattern = -1, rank = 0;
  if (fast) {
    B = q.size(0), H = q.size(1), Lq = q.size(2), D = q.size(3), Lk = k.size(2), Dv = v.size(3);
    fast = k.size(0) == B && k.size(1) == H && v.size(0) == B && v.size(1) == H && k.size(3) == D &&
           v.size(2) == Lk && Lq > 0 && Lk > 0 && B * H > 0 && 1 <= D && D <= kMaxD && 1 <= Dv && Dv <= kMaxDv &&
           (q.stride(3) == 1 || D == 1) && (k.stride(3) == 1 || D == 1) && (v.stride(3) == 1 || Dv == 1);
  }
  if (fast && bias.has_value()) {
    const at::Tensor& b = *bias;
    fast = b.dim() == 4 && f32_cpu(b) && b.is_contiguous() && b.size(3) == Lk;
    const int64_t full[3] = {B, H, Lq};
    pattern = 0;
    for (int i = 0; fast && i < 3; ++i) {
      fast = b.size(i) == 1 || b.size(i) == full[i];
      if (b.size(i) != 1) pattern |= 1 << i;
    }
  }
  if (fast && est_v.has_value()) {
    const at::Tensor& e = *est_v;
    fast = e.dim() == 4 && f32_cpu(e) && e.is_contiguous() && e.size(0) == B && e.size(1) == H && e.size(2) == Lk &&
           e.size(3) == 1;
  }
  if (fast && has_est) {
    const at::Tensor &eq = *est_q, &ek = *est_k;
    const int64_t w = eq.dim() == 4 ? eq.size(3) : 0;
    rank = w / 2;
    fast = eq.dim() == 4 && ek.dim() == 4 && f32_cpu(eq) && f32_cpu(ek) && eq.is_contiguous() && ek.is_contiguous() &&
           eq.size(0) == B && eq.size(1) == H && eq.size(2) == Lq && ek.size(0) == B && ek.size(1) == H &&
           ek.size(2) == Lk && ek.size(3) == w && w % 2 == 0 && 1 <= rank && rank <= kMaxEstRank;
  }
  if (!fast) return run_python("bitfx_kernels::_fused_attention_python", stack, kArgs);

  float p = 0.0f;  // bivit: ln β (β <= 0: -inf, every code 1); elastic: α_P floored at EPS; bool: unused
  if (mode == "bivit") {
    const double beta = value(pp, 0.25);
    p = beta > 0 ? static_cast<float>(std::log(beta)) : -std::numeric_limits<float>::infinity();
  } else if (mode == "elastic") {
    p = static_cast<float>(std::max(value(pp, 0.0), kEps));
  }
  float scalars[5] = {static_cast<float>(args[9].toDouble()), static_cast<float>(value(aq, 0.0)),
                      static_cast<float>(value(ak, 0.0)), static_cast<float>(value(av, 0.0)), p};
  const Fn& fn = attention_kernel(D, Dv, mode, pattern, causal, aq.has_value(), ak.has_value(), av.has_value(),
                                  est_v.has_value(), rank);
  WorkHint hint(B * H * Lq * Lk * (D + Dv));
  at::Tensor out = at::empty({B, H, Lq, Dv}, q.options());
  DLTensor d[10];
  int n = 0;
  d[n++] = dl(q);
  d[n++] = dl(k);
  d[n++] = dl(v);
  if (bias.has_value()) d[n++] = dl(*bias);
  int64_t ev_shape[3] = {B, H, Lk}, s_shape[1] = {5};
  if (est_v.has_value()) d[n++] = dl(est_v->data_ptr(), {kDLFloat, 32, 1}, ev_shape, 3);
  if (has_est) {
    d[n++] = dl(*est_q);
    d[n++] = dl(*est_k);
  }
  d[n++] = dl(scalars, {kDLFloat, 32, 1}, s_shape, 1);
  d[n++] = dl(out);
  DLTensor* p_[10];
  for (int i = 0; i < n; ++i) p_[i] = &d[i];
  switch (n) {
    case 5: call(fn, {p_[0], p_[1], p_[2], p_[3], p_[4]}); break;
    case 6: call(fn, {p_[0], p_[1], p_[2], p_[3], p_[4], p_[5]}); break;
    case 7: call(fn, {p_[0], p_[1], p_[2], p_[3], p_[4], p_[5], p_[6]}); break;
    case 8: call(fn, {p_[0], p_[1], p_[2], p_[3], p_[4], p_[5], p_[6], p_[7]}); break;
    case 9: call(fn, {p_[0], p_[1], p_[2], p_[3], p_[4], p_[5], p_[6], p_[7], p_[8]}); break;
    default: TORCH_CHECK(false, "bitfx native: unexpected fused_attention arity ", n);
  }
  g_attention_calls.fetch_add(1, std::memory_order_relaxed);
  finish(stack, kArgs, std::move(out));
}

// ------------------------------------------------------------------------------------ one thread pool
// TVM-generated host kernels run their parallel loops through two function pointers that every kernel
// library holds, __TVMBackendParallelLaunch and __TVMBackendParallelBarrier. TVM-FFI fills them in when
// it loads the library (or JIT-links a module), from a registry of "context symbols" where the last
// registration of a name wins. TVM's runtime registers its own thread pool there. bitfx_pool_install()
// registers the two functions below instead, so the kernels run on torch's OpenMP pool, the one ATen and
// inductor's compiled float glue use: one set of workers on the cores, and no second pool that sleeps
// between kernel calls or spins against OpenMP's. bitfx_pool_patch(path) rewrites the pointers of a
// library loaded before the install.
//
// The OpenMP runtime is reached through the GNU OpenMP ABI (GOMP_parallel is what `#pragma omp parallel`
// compiles to with g++), declared weak. It resolves to the libgomp that libtorch_cpu loaded, which is also
// the one inductor's -fopenmp glue resolves to (by soname), whatever compiler builds this file. With a
// torch that has no libgomp the symbols stay null and bitfx_pool_install() refuses: TVM's pool stays.

char g_team;  // the sync_handle of every env launched as an OpenMP team (its barrier is an OpenMP barrier)
std::atomic<int64_t> g_launches{0}, g_team_launches{0};
std::atomic<int64_t> g_min_work{0};  // bitfx_pool_set_min_work

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

struct PoolJob {
  FTVMParallelLambda f;
  void* cdata;
  std::atomic<int> rc;
  std::atomic<int> done;
};

// One task per team thread. A thread that finishes waits for the others here, spinning briefly and then
// yielding its core, before it enters OpenMP's end-of-region barrier: libgomp spins there without yielding,
// so on a busy machine a thread could hold the core that a teammate waits to run on for a whole time slice
// (measured on 2 loaded cores: ~24 ms per call instead of 60 us). By the time anyone reaches libgomp's
// barrier, every task is done and the team arrives together.
void run_task(void* data) {
  auto* job = static_cast<PoolJob*>(data);
  const int n = omp_get_num_threads();
  TVMParallelGroupEnv env{&g_team, n};
  if (int rc = job->f(omp_get_thread_num(), &env, job->cdata)) job->rc.store(rc, std::memory_order_relaxed);
  job->done.fetch_add(1, std::memory_order_acq_rel);
  for (int spin = 0; job->done.load(std::memory_order_acquire) < n; ++spin) {
    if (spin < 256)
      cpu_relax();
    else
      sched_yield();
  }
}

// TVMBackendParallelLaunch on torch's pool. num_task 0 (what TVM's codegen passes) means one task per
// torch thread (torch.set_num_threads); the lambda splits its loop by env.num_task, the team's size.
// It runs as one task on this thread instead with one thread, inside a parallel region (a nested
// launch), or when the op calling the kernel has less work than the threshold (t_work).
int pool_launch(FTVMParallelLambda f, void* cdata, int num_task) {
  g_launches.fetch_add(1, std::memory_order_relaxed);
  int n = num_task > 0 ? num_task : at::get_num_threads();
  if (n <= 1 || (t_work >= 0 && t_work < g_min_work.load(std::memory_order_relaxed)) || omp_in_parallel()) {
    TVMParallelGroupEnv env{nullptr, 1};
    return f(0, &env, cdata);
  }
  g_team_launches.fetch_add(1, std::memory_order_relaxed);
  PoolJob job{f, cdata, {0}, {0}};
  GOMP_parallel(&run_task, &job, static_cast<unsigned>(n), 0);
  return job.rc.load(std::memory_order_relaxed);
}

std::atomic<bool> g_pool_installed{false};
bool pool_installed() { return g_pool_installed.load(std::memory_order_relaxed); }

// One task of run_plan's split: rows [task * size, ...) of the call, size a multiple of kSliceRows. The
// kernels it calls are inside this parallel region, so their own loops run on this thread (pool_launch).
int run_rows_task(int task, TVMParallelGroupEnv* env, void* cdata) {
  auto* job = static_cast<RowsJob*>(cdata);
  const int64_t M = job->rows->M, n = std::max<int32_t>(env->num_task, 1);
  const int64_t size = (M + n - 1) / n, slice = (size + kSliceRows - 1) / kSliceRows * kSliceRows;
  const int64_t m0 = std::min<int64_t>(M, task * slice), m1 = std::min<int64_t>(M, m0 + slice);
  if (m1 <= m0) return 0;
  try {
    plan_rows(*job->rows, m0, m1 - m0);
    return 0;
  } catch (const std::exception& e) {  // no exception may leave an OpenMP region
    std::lock_guard<std::mutex> lock(job->mutex);
    if (job->error.empty()) job->error = e.what();
    return -1;
  }
}

int pool_barrier(int, TVMParallelGroupEnv* env) {
  if (env->sync_handle == &g_team && env->num_task > 1) GOMP_barrier();
  return 0;
}

}  // namespace

// 0: installed; 1: no GNU OpenMP runtime in this process (torch built without libgomp); 2: TVM-FFI refused.
extern "C" int bitfx_pool_install() {
  if (!GOMP_parallel || !GOMP_barrier || !omp_get_thread_num || !omp_get_num_threads || !omp_in_parallel)
    return 1;
  if (TVMFFIEnvModRegisterContextSymbol("__TVMBackendParallelLaunch", reinterpret_cast<void*>(&pool_launch)) ||
      TVMFFIEnvModRegisterContextSymbol("__TVMBackendParallelBarrier", reinterpret_cast<void*>(&pool_barrier)))
    return 2;
  g_pool_installed.store(true, std::memory_order_relaxed);
  return 0;
}

// Points an already loaded kernel library's launch and barrier at the functions above. 1: patched; 0: the
// library is not loaded, or has no parallel loops (nothing to do).
extern "C" int bitfx_pool_patch(const char* path) {
  void* h = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
  if (!h) return 0;
  int patched = 0;
  if (auto** p = reinterpret_cast<void**>(dlsym(h, "__TVMBackendParallelLaunch"))) {
    *p = reinterpret_cast<void*>(&pool_launch);
    patched = 1;
  }
  if (auto** p = reinterpret_cast<void**>(dlsym(h, "__TVMBackendParallelBarrier")))
    *p = reinterpret_cast<void*>(&pool_barrier);
  dlclose(h);
  return patched;
}

// Below this many bit-MACs, an op's kernels (bit_linear, sign_scores, binary_pv from this file) run their
// parallel loops on the calling thread alone; 0: always on the team.
extern "C" void bitfx_pool_set_min_work(int64_t work) { g_min_work.store(work, std::memory_order_relaxed); }
extern "C" int64_t bitfx_pool_min_work() { return g_min_work.load(std::memory_order_relaxed); }

// How many parallel launches ran through pool_launch, and how many of them as a team of several threads.
extern "C" int64_t bitfx_pool_launches() { return g_launches.load(std::memory_order_relaxed); }
extern "C" int64_t bitfx_pool_team_launches() { return g_team_launches.load(std::memory_order_relaxed); }

// For tests and benchmarks (ctypes): fused_attention calls run here; elastic's α_P floor (= quantizers.EPS).
extern "C" int64_t bitfx_native_attention_calls() { return g_attention_calls.load(std::memory_order_relaxed); }
extern "C" double bitfx_native_eps() { return kEps; }

// For tests and benchmarks (ctypes): how many plans were built, and how many are held.
extern "C" int64_t bitfx_native_plan_misses() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return g_misses;
}
extern "C" int64_t bitfx_native_plans_held() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return static_cast<int64_t>(g_plans.size());
}

TORCH_LIBRARY_IMPL(bitfx_kernels, CPU, m) {
  m.impl("bit_linear", torch::CppFunction::makeFromBoxedFunction<&bit_linear>());
  m.impl("bit_linear_to_bits", torch::CppFunction::makeFromBoxedFunction<&bit_linear_to_bits>());
  m.impl("bit_linear_on_bits", torch::CppFunction::makeFromBoxedFunction<&bit_linear_on_bits>());
  m.impl("fused_attention", torch::CppFunction::makeFromBoxedFunction<&fused_attention>());
  m.impl("sign_scores", TORCH_FN(sign_scores));
  m.impl("binary_pv", TORCH_FN(binary_pv));
}
