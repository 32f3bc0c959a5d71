// What the emulator learns from the ELF symbol table of the module that holds the kernels.
//
// In the emulator `__shared__` is `static thread_local`, so each static shared variable is
// a thread-local object with its own symbol: a local static of the kernel function `f` is
// named `_ZZ<f's mangled name without _Z>E<variable>` (the Itanium C++ ABI's local-name
// encoding) and its value is its offset in the module's thread-local block. From that we
// know each kernel's static shared memory (launch limits, as cudaFuncGetAttributes'
// sharedSizeBytes on a GPU), where static shared memory lives (race detector, traffic
// counters) and what to poison at the start of each block. The table is read once.
#include "internal.h"

#include <cxxabi.h>
#include <dlfcn.h>
#include <elf.h>
#include <link.h>

#include <fstream>
#include <map>
#include <mutex>
#include <sstream>

namespace simt {
namespace detail {
namespace {

struct ModuleSymbols {
  uintptr_t load_base = 0;
  std::string path;
  std::map<uintptr_t, std::string> functions;  // load address -> mangled name
  std::vector<SharedObject> shared_objects;     // thread-local `_ZZ...` objects
  size_t tls_size = 0;                          // the module's PT_TLS memory size
};

ModuleSymbols read_symbols() {
  ModuleSymbols m;
  Dl_info info{};
  if (dladdr(reinterpret_cast<void*>(&read_symbols), &info) == 0 || info.dli_fname == nullptr) {
    throw KernelError("simt: cannot find the module that holds the kernels (dladdr failed)");
  }
  m.load_base = reinterpret_cast<uintptr_t>(info.dli_fbase);
  m.path = info.dli_fname;
  std::ifstream file(m.path, std::ios::binary);
  std::string image((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  if (image.size() < sizeof(Elf64_Ehdr) || image.compare(0, 4, ELFMAG) != 0) {
    throw KernelError("simt: " + m.path + " is not an ELF file");
  }
  const auto* ehdr = reinterpret_cast<const Elf64_Ehdr*>(image.data());
  const auto* sections = reinterpret_cast<const Elf64_Shdr*>(image.data() + ehdr->e_shoff);
  const auto* phdrs = reinterpret_cast<const Elf64_Phdr*>(image.data() + ehdr->e_phoff);
  for (int i = 0; i < ehdr->e_phnum; ++i) {
    if (phdrs[i].p_type == PT_TLS) m.tls_size = phdrs[i].p_memsz;
  }
  bool found = false;
  for (int i = 0; i < ehdr->e_shnum; ++i) {
    if (sections[i].sh_type != SHT_SYMTAB) continue;
    found = true;
    const char* names = image.data() + sections[sections[i].sh_link].sh_offset;
    const auto* symbols = reinterpret_cast<const Elf64_Sym*>(image.data() + sections[i].sh_offset);
    const size_t count = sections[i].sh_size / sizeof(Elf64_Sym);
    for (size_t j = 0; j < count; ++j) {
      const Elf64_Sym& sym = symbols[j];
      const char* name = names + sym.st_name;
      const int type = ELF64_ST_TYPE(sym.st_info);
      if (type == STT_FUNC && sym.st_value != 0) {
        m.functions.emplace(m.load_base + sym.st_value, name);
      } else if (type == STT_TLS && std::strncmp(name, "_ZZ", 3) == 0) {
        m.shared_objects.push_back(SharedObject{name, sym.st_value, sym.st_size});
      }
    }
  }
  if (!found) {
    throw KernelError("simt: " + m.path + " has no symbol table (stripped?); the emulator needs "
                      "it to know each kernel's static shared memory");
  }
  return m;
}

const ModuleSymbols& module_symbols() {
  static const ModuleSymbols symbols = read_symbols();
  return symbols;
}

}  // namespace

std::vector<const SharedObject*> kernel_shared_objects(const void* kernel) {
  static std::mutex mutex;
  static std::map<const void*, std::vector<const SharedObject*>> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(kernel);
  if (it != cache.end()) return it->second;
  const ModuleSymbols& m = module_symbols();
  auto fn = m.functions.find(reinterpret_cast<uintptr_t>(kernel));
  if (fn == m.functions.end() || fn->second.compare(0, 2, "_Z") != 0) {
    throw KernelError("simt: no C++ symbol for the kernel at " +
                      std::to_string(reinterpret_cast<uintptr_t>(kernel)) + " in " + m.path);
  }
  const std::string prefix = "_ZZ" + fn->second.substr(2) + "E";
  std::vector<const SharedObject*> objects;
  for (const SharedObject& object : m.shared_objects) {
    if (object.name.compare(0, prefix.size(), prefix) == 0) objects.push_back(&object);
  }
  return cache[kernel] = objects;
}

void thread_local_block(unsigned char** begin, unsigned char** end) {
  thread_local unsigned char* cached = nullptr;
  if (cached != nullptr) {
    *begin = cached;
    *end = cached + module_symbols().tls_size;
    return;
  }
  // dl_iterate_phdr reports this thread's instance of each module's TLS block.
  struct Query {
    uintptr_t load_base;
    unsigned char* tls = nullptr;
  } query{module_symbols().load_base};
  dl_iterate_phdr(
      [](dl_phdr_info* info, size_t, void* data) {
        auto* q = static_cast<Query*>(data);
        if (info->dlpi_addr != q->load_base) return 0;
        q->tls = static_cast<unsigned char*>(info->dlpi_tls_data);
        return 1;
      },
      &query);
  if (query.tls == nullptr) throw KernelError("simt: this thread has no thread-local block for the kernels");
  cached = query.tls;
  *begin = query.tls;
  *end = query.tls + module_symbols().tls_size;
}

std::string function_name(const void* address) {
  const ModuleSymbols& m = module_symbols();
  auto it = m.functions.upper_bound(reinterpret_cast<uintptr_t>(address));
  if (it == m.functions.begin()) return "";
  --it;
  int status = 0;
  char* demangled = abi::__cxa_demangle(it->second.c_str(), nullptr, nullptr, &status);
  std::string name = status == 0 && demangled ? demangled : it->second;
  std::free(demangled);
  return name;
}

const std::string& module_path() { return module_symbols().path; }
uintptr_t module_base() { return module_symbols().load_base; }

}  // namespace detail
}  // namespace simt
