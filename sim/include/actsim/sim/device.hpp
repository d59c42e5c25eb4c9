// actsim::sim::DeviceSpec — the figures of a GPU that the time and memory models use, loaded from
// scenarios/devices.toml (each entry cites its source).
//
//   DeviceSpec h100 = find_device("H100-SXM-80GB");
//   double s = flops / h100.flops(DType::bf16);
#pragma once

#include <string>
#include <vector>

#include "actsim/graph/types.hpp"

namespace actsim::sim {

struct DeviceSpec {
  std::string name;
  int64_t memory_bytes = 0;        // usable device memory, bytes
  double flops_fp32 = 0;           // dense FLOP/s
  double flops_tf32 = 0;           // dense FLOP/s of fp32 matmuls on tensor cores (0 = not used)
  double flops_bf16 = 0;           // dense FLOP/s
  double flops_fp16 = 0;           // dense FLOP/s
  double mem_bandwidth = 0;        // bytes/s
  double host_bandwidth = 0;       // bytes/s each way (PCIe / C2C), for offload
  int64_t launch_overhead_ns = 0;  // per kernel
  double matmul_efficiency = 0.7;  // fraction of peak FLOP/s a large GEMM reaches
  // issue 13: collectives (ring algorithms) between GPUs of a node and across nodes
  double link_bandwidth = 0;       // bytes/s each way per GPU inside a node (NVLink); 0 = unknown
  double network_bandwidth = 0;    // bytes/s each way per GPU across nodes (InfiniBand)
  int64_t link_latency_ns = 0;     // per ring step
  int64_t gpus_per_node = 8;
  std::string source;              // where the figures come from

  double flops(graph::DType t) const;
};

// The devices in scenarios/devices.toml (or $ACTSIM_DATA/devices.toml).
const std::vector<DeviceSpec>& devices();
// Throws InputError naming `where` (file:line: key) if unknown, with a did-you-mean.
const DeviceSpec& find_device(const std::string& name, const std::string& where = "device.name");

// The folder holding devices.toml and the example scenarios.
std::string data_dir();

// Levenshtein distance, for did-you-mean suggestions.
int edit_distance(const std::string& a, const std::string& b);
// The closest of `names` to `s` if reasonably close, else "".
std::string closest(const std::string& s, const std::vector<std::string>& names);

}  // namespace actsim::sim
