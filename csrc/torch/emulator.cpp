// The emulator's own functions in moe_kernels._simt: traffic counters and the static
// shared memory it assigns a kernel. Nothing here exists in moe_kernels._C.
#include "common.h"

#if !defined(MOE_KERNELS_TARGET_CUDA)
#include "../simt/traffic.h"

namespace moe {
namespace {

// The emulator's traffic counters as a list of dicts, one per launch.
py::list traffic_end() {
  py::list rows;
  for (const simt::TrafficRow& r : simt::traffic_end()) {
    py::dict row;
    row["kernel"] = r.kernel;
    row["grid"] = py::make_tuple(r.grid[0], r.grid[1], r.grid[2]);
    row["block"] = py::make_tuple(r.block[0], r.block[1], r.block[2]);
    row["global_instructions"] = r.global_instructions;
    row["global_bytes_read"] = r.global_bytes_read;
    row["global_bytes_written"] = r.global_bytes_written;
    row["sectors_read"] = r.sectors_read;
    row["sectors_written"] = r.sectors_written;
    row["unique_bytes_read"] = r.unique_bytes_read;
    row["unique_bytes_written"] = r.unique_bytes_written;
    row["shared_instructions"] = r.shared_instructions;
    row["shared_wavefronts"] = r.shared_wavefronts;
    row["shared_ideal_wavefronts"] = r.shared_ideal_wavefronts;
    row["max_bank_conflict_ways"] = r.max_bank_conflict_ways;
    rows.append(row);
  }
  return rows;
}
}  // namespace

void register_emulator(py::module_& m) {
  m.def("traffic_begin", &simt::traffic_begin, "Count the memory traffic of every launch from now on");
  m.def("traffic_end", &traffic_end, "Stop counting; one dict per launch since traffic_begin");
  m.def("static_shared_bytes", &simt::static_shared_bytes_of_symbol,
        "Static shared memory of a kernel (mangled name), as the emulator counts it",
        py::arg("mangled_name"));
}

}  // namespace moe
#else
namespace moe {
void register_emulator(py::module_&) {}
}  // namespace moe
#endif
