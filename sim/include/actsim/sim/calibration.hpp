// actsim::sim::Calibration — measured op times (from `actsim replay --calibration-out`) that the
// time model uses instead of, or to scale, its roofline estimates.
//
//   Calibration c = load_calibration("cpu.calib.json");   // InputError naming the file on bad input
//   StepTables tables(g, device, &c);                      // durations from the measurements
//
// An op's duration is, in order of preference: the measured seconds of an op with the same name
// and the same FLOPs and bytes moved (the same model shapes), or its roofline time times the measured/predicted ratio of its kind
// (another shape on the same machine), or the roofline time (a kind never measured).
#pragma once

#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <span>
#include <string>
#include <utility>

#include "actsim/graph/graph.hpp"
#include "actsim/sim/device.hpp"

namespace actsim::sim {

struct Calibration {
  std::string file;                              // where it was loaded from ("" if built in memory)
  std::string device;                            // the measured machine, e.g. "cpu (16 threads)"
  std::string backend;                           // "cpu" or "cuda"
  std::map<std::string, double> seconds_by_name; // op name -> mean measured seconds
  std::map<std::string, std::pair<double, int64_t>> signature_by_name;  // name -> (flops, bytes_moved) measured
  std::map<std::string, double> scale_by_kind;   // kind key -> measured / predicted (roofline)

  // The op's duration under this calibration (falls back to op_time_ns).
  int64_t op_time_ns(const graph::Graph& g, const graph::Op& op, const DeviceSpec& d) const;
};

// "mm", "softmax", or "backward.mm" for the backward of an mm: the unit of the per-kind scale.
std::string calibration_kind(const graph::Graph& g, const graph::Op& op);

// A calibration file (JSON) from measured seconds per op [ops] and the model's predicted
// nanoseconds per op [ops]. Ops with no kernel (views) are left out.
nlohmann::json calibration_json(const graph::Graph& g, std::span<const double> measured_s,
                                 std::span<const int64_t> predicted_ns, const std::string& device,
                                 const std::string& backend);

// Reads a calibration file. Throws InputError naming the file.
Calibration load_calibration(const std::string& path);


}  // namespace actsim::sim
