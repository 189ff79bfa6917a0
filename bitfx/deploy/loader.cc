// bitfx loader: run a Relax module exported by `bitfx` on a device, with no Python.
//
//   bitfx_loader MODEL.so OUT_DIR [INPUT ...] [--func main] [--repeat N] [--warmup N] [--maps FILE]
//
// INPUT is a .npy file (little-endian, C order) or a raw file spelled `path:dtype:d0xd1x...`
// (e.g. `x.bin:float32:1x128x768`). Outputs are written as OUT_DIR/output_<i>.npy, in the order of
// the (flattened) result tuple. With --repeat N the function is timed over N runs after --warmup
// runs and the mean/min latency is printed as `bitfx_loader: <func> mean_ms=... min_ms=...`.
// --maps FILE copies /proc/self/maps to FILE at the end, so that a profiler can map code addresses
// to the model's symbols (benchmarks/arm_profile.py; under qemu-user the addresses are the guest's).
//
// What it does is what `tvm.runtime.vm.VirtualMachine` does in Python:
//   exe = Module::LoadFromFile(model)        // libtvm_ffi's dlopen loader; the Relax bytecode blob
//                                            // inside the .so is decoded by libtvm_runtime
//   vm  = exe->GetFunction("vm_load_executable")()
//   vm->GetFunction("vm_initialization")(kDLCPU, 0, kPooledAllocator)
//   out = vm->GetFunction("main")(inputs...)
//
// Link it against libtvm_runtime.so *and* libtvm_ffi.so with --no-as-needed: libtvm_runtime must be
// in the global symbol scope (as if dlopen'ed RTLD_GLOBAL) because it registers the VM executable
// loader and the TVMBackendParallelLaunch thread pool that parallel kernels call.
#include <dlpack/dlpack.h>
#include <tvm/ffi/any.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace ffi = tvm::ffi;

// tvm-ffi's ErrorBuilder default-constructs a std::ostringstream, whose out-of-line constructor is
// versioned GLIBCXX_3.4.26 (GCC 9): newer than the libstdc++ of Ubuntu 18.04 / Debian 10 (3.4.25).
// Instantiating it here binds the loader to its own copy (the header's inline body), so the loader
// needs nothing above GLIBCXX_3.4.21 (checked by tests/targets/test_deploy_glibc.py).
template std::ostringstream::basic_ostringstream();

namespace {

constexpr int kPooledAllocator = 2;  // tvm.runtime.vm.VirtualMachine.POOLED_ALLOCATOR

struct CPUAlloc {
  void AllocData(DLTensor* t) {
    size_t n = std::max<size_t>(ffi::GetDataSize(*t), 1);
    t->data = std::aligned_alloc(64, (n + 63) / 64 * 64);
    if (t->data == nullptr) throw std::runtime_error("out of memory");
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

struct DTypeName {
  const char* npy;   // numpy descr without byte order
  const char* name;  // numpy dtype name
  DLDataType dl;
};

const DTypeName kDTypes[] = {
    {"f4", "float32", {kDLFloat, 32, 1}}, {"f8", "float64", {kDLFloat, 64, 1}},
    {"f2", "float16", {kDLFloat, 16, 1}}, {"i1", "int8", {kDLInt, 8, 1}},
    {"i2", "int16", {kDLInt, 16, 1}},     {"i4", "int32", {kDLInt, 32, 1}},
    {"i8", "int64", {kDLInt, 64, 1}},     {"u1", "uint8", {kDLUInt, 8, 1}},
    {"u2", "uint16", {kDLUInt, 16, 1}},   {"u4", "uint32", {kDLUInt, 32, 1}},
    {"u8", "uint64", {kDLUInt, 64, 1}},   {"b1", "bool", {kDLBool, 8, 1}},
};

const DTypeName& FindDType(const std::string& key) {
  for (const auto& d : kDTypes) {
    if (key == d.npy || key == d.name) return d;
  }
  throw std::runtime_error("unsupported dtype '" + key + "'");
}

const DTypeName& FindDType(DLDataType dl) {
  for (const auto& d : kDTypes) {
    if (d.dl.code == dl.code && d.dl.bits == dl.bits && d.dl.lanes == dl.lanes) return d;
  }
  throw std::runtime_error("output dtype code=" + std::to_string(dl.code) +
                           " bits=" + std::to_string(dl.bits) + " has no .npy spelling");
}

std::string ReadFile(const std::string& path) {
  // (not an ostringstream: its default constructor is GLIBCXX_3.4.26, newer than the libstdc++ of
  // the oldest systems the bundle supports; see glibc_start.c)
  std::ifstream f(path, std::ios::binary | std::ios::ate);
  if (!f) throw std::runtime_error("cannot open " + path);
  std::string data(static_cast<size_t>(f.tellg()), '\0');
  f.seekg(0);
  if (!f.read(&data[0], static_cast<std::streamsize>(data.size()))) {
    throw std::runtime_error("cannot read " + path);
  }
  return data;
}

ffi::Tensor NewTensor(const std::vector<int64_t>& shape, DLDataType dtype, const char* src,
                      size_t nbytes, const std::string& what) {
  ffi::Tensor t = ffi::Tensor::FromNDAlloc(CPUAlloc(), ffi::ShapeView(shape.data(), shape.size()),
                                           dtype, DLDevice{kDLCPU, 0});
  size_t want = ffi::GetDataSize(*t.GetDLTensorPtr());
  if (want != nbytes) {
    throw std::runtime_error(what + ": " + std::to_string(nbytes) + " bytes of data, shape needs " +
                             std::to_string(want));
  }
  std::memcpy(t.GetDLTensorPtr()->data, src, nbytes);
  return t;
}

// Minimal .npy (v1/v2/v3) reader: little-endian or byte-order-free dtypes, C order only.
ffi::Tensor LoadNpy(const std::string& path) {
  std::string buf = ReadFile(path);
  if (buf.size() < 10 || buf.compare(0, 6, "\x93NUMPY") != 0) {
    throw std::runtime_error(path + ": not a .npy file");
  }
  int major = static_cast<unsigned char>(buf[6]);
  size_t hlen, hstart;
  if (major == 1) {
    hlen = static_cast<unsigned char>(buf[8]) | (static_cast<unsigned char>(buf[9]) << 8);
    hstart = 10;
  } else {
    hlen = 0;
    for (int i = 0; i < 4; ++i) hlen |= size_t(static_cast<unsigned char>(buf[8 + i])) << (8 * i);
    hstart = 12;
  }
  std::string header = buf.substr(hstart, hlen);
  auto field = [&](const std::string& key) {
    size_t p = header.find("'" + key + "'");
    if (p == std::string::npos) throw std::runtime_error(path + ": header lacks " + key);
    return header.substr(header.find(':', p) + 1);
  };
  std::string descr = field("descr");
  descr = descr.substr(descr.find('\'') + 1);
  descr = descr.substr(0, descr.find('\''));
  if (descr[0] == '>') throw std::runtime_error(path + ": big-endian .npy is not supported");
  if (descr[0] == '<' || descr[0] == '|' || descr[0] == '=') descr = descr.substr(1);
  if (field("fortran_order").find("True") < field("fortran_order").find(',')) {
    throw std::runtime_error(path + ": Fortran-order .npy is not supported");
  }
  std::string shp = field("shape");
  shp = shp.substr(shp.find('(') + 1, shp.find(')') - shp.find('(') - 1);
  std::vector<int64_t> shape;
  std::stringstream ss(shp);
  for (std::string item; std::getline(ss, item, ',');) {
    if (item.find_first_of("0123456789") != std::string::npos) shape.push_back(std::stoll(item));
  }
  size_t off = hstart + hlen;
  return NewTensor(shape, FindDType(descr).dl, buf.data() + off, buf.size() - off, path);
}

// `path:dtype:d0xd1x...` raw little-endian data.
ffi::Tensor LoadRaw(const std::string& spec) {
  size_t c2 = spec.rfind(':');
  size_t c1 = spec.rfind(':', c2 - 1);
  if (c1 == std::string::npos || c2 == std::string::npos) {
    throw std::runtime_error("input '" + spec + "': expected a .npy file or path:dtype:d0xd1x...");
  }
  std::string path = spec.substr(0, c1);
  const DTypeName& dt = FindDType(spec.substr(c1 + 1, c2 - c1 - 1));
  std::vector<int64_t> shape;
  std::stringstream ss(spec.substr(c2 + 1));
  for (std::string item; std::getline(ss, item, 'x');) shape.push_back(std::stoll(item));
  std::string buf = ReadFile(path);
  return NewTensor(shape, dt.dl, buf.data(), buf.size(), path);
}

void SaveNpy(const std::string& path, const ffi::Tensor& t) {
  const DLTensor* dl = t.GetDLTensorPtr();
  if (dl->device.device_type != kDLCPU) throw std::runtime_error("output is not on the CPU");
  if (!t.IsContiguous()) throw std::runtime_error("output is not contiguous");
  std::string shape = "(";
  for (int i = 0; i < dl->ndim; ++i) shape += std::to_string(dl->shape[i]) + ",";
  if (dl->ndim > 1) shape.pop_back();
  shape += ")";
  const DTypeName& dt = FindDType(dl->dtype);
  std::string order = (dl->dtype.bits == 8) ? "|" : "<";
  std::string header = "{'descr': '" + order + dt.npy + "', 'fortran_order': False, 'shape': " +
                       shape + ", }";
  while ((10 + header.size() + 1) % 64 != 0) header += ' ';
  header += '\n';
  std::ofstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot write " + path);
  const char magic[8] = {'\x93', 'N', 'U', 'M', 'P', 'Y', 1, 0};
  uint16_t hlen = static_cast<uint16_t>(header.size());
  f.write(magic, 8);
  f.put(static_cast<char>(hlen & 0xff)).put(static_cast<char>(hlen >> 8));
  f << header;
  f.write(static_cast<const char*>(dl->data) + dl->byte_offset, ffi::GetDataSize(*dl));
}

void Flatten(const ffi::Any& v, std::vector<ffi::Tensor>* out) {
  if (auto t = v.as<ffi::Tensor>()) {
    out->push_back(*t);
  } else if (auto arr = v.as<ffi::Array<ffi::Any>>()) {
    for (const ffi::Any& x : *arr) Flatten(x, out);
  } else {
    throw std::runtime_error("output of type " + v.GetTypeKey() + " is not a tensor or tuple");
  }
}

int Run(int argc, char** argv) {
  std::vector<std::string> pos;
  std::string func = "main", maps;
  int repeat = 0, warmup = 1;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if ((a == "--func" || a == "--repeat" || a == "--warmup" || a == "--maps") && i + 1 < argc) {
      std::string v = argv[++i];
      if (a == "--func") func = v;
      if (a == "--maps") maps = v;
      if (a == "--repeat") repeat = std::stoi(v);
      if (a == "--warmup") warmup = std::stoi(v);
    } else {
      pos.push_back(a);
    }
  }
  if (pos.size() < 2) {
    std::cerr << "usage: " << argv[0]
              << " MODEL.so OUT_DIR [INPUT.npy | RAW:dtype:d0xd1 ...] [--func main] [--repeat N]"
                 " [--warmup N] [--maps FILE]\n";
    return 2;
  }
  std::vector<ffi::Tensor> inputs;
  for (size_t i = 2; i < pos.size(); ++i) {
    const std::string& s = pos[i];
    bool npy = s.size() > 4 && s.compare(s.size() - 4, 4, ".npy") == 0;
    inputs.push_back(npy ? LoadNpy(s) : LoadRaw(s));
  }

  // dlopen() searches LD_LIBRARY_PATH for a bare name; a model path is a path.
  std::string model = pos[0].find('/') == std::string::npos ? "./" + pos[0] : pos[0];
  ffi::Module exe = ffi::Module::LoadFromFile(model);
  auto load = exe->GetFunction("vm_load_executable");
  if (!load) throw std::runtime_error(pos[0] + " is not a Relax VM executable (no vm_load_executable)");
  ffi::Module vm = (*load)().cast<ffi::Module>();
  vm->GetFunction("vm_initialization").value()(static_cast<int>(kDLCPU), 0, kPooledAllocator);
  auto f = vm->GetFunction(func);
  if (!f) throw std::runtime_error("the module has no function '" + func + "'");

  std::vector<ffi::AnyView> args(inputs.begin(), inputs.end());
  ffi::Any result;
  f->CallPacked(args.data(), static_cast<int32_t>(args.size()), &result);
  if (repeat > 0) {
    for (int i = 0; i < warmup; ++i) f->CallPacked(args.data(), int32_t(args.size()), &result);
    double total = 0, best = 1e300;
    for (int i = 0; i < repeat; ++i) {
      auto t0 = std::chrono::steady_clock::now();
      f->CallPacked(args.data(), static_cast<int32_t>(args.size()), &result);
      double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0)
                      .count();
      total += ms;
      best = std::min(best, ms);
    }
    std::printf("bitfx_loader: %s mean_ms=%.4f min_ms=%.4f repeat=%d\n", func.c_str(),
                total / repeat, best, repeat);
  }
  std::vector<ffi::Tensor> outs;
  Flatten(result, &outs);
  for (size_t i = 0; i < outs.size(); ++i) {
    SaveNpy(pos[1] + "/output_" + std::to_string(i) + ".npy", outs[i]);
  }
  std::printf("bitfx_loader: wrote %zu output(s) to %s\n", outs.size(), pos[1].c_str());
  if (!maps.empty()) {
    std::ifstream in("/proc/self/maps");  // size 0 to stat: streamed, not ReadFile
    std::ofstream out(maps, std::ios::binary);
    if (!(out << in.rdbuf())) throw std::runtime_error("cannot copy /proc/self/maps to " + maps);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return Run(argc, argv);
  } catch (const ffi::Error& e) {
    std::cerr << "bitfx_loader: TVM error: " << e.what() << "\n";
  } catch (const std::exception& e) {
    std::cerr << "bitfx_loader: " << e.what() << "\n";
  }
  return 1;
}
