// actsim fit [SCENARIO]: per checkpoint policy, the largest batch size (and with --vary-seq the
// largest sequence length) whose simulated peak fits the device.
#include <fmt/format.h>

#include <atomic>
#include <exception>
#include <iostream>
#include <thread>

#include "actsim/util/error.hpp"
#include "actsim/graph/profile.hpp"
#include "actsim/study/analyze.hpp"
#include "actsim/study/batch_search.hpp"
#include "actsim/util/units.hpp"
#include "cli.hpp"

namespace actsim::cli {

namespace {

const char* const kDefaultPolicies[] = {"none", "selective", "full", "sqrt", "every:2", "offload"};

struct FitRow {
  std::string policy;
  int64_t max_batch_size = 0;
  int64_t peak_bytes = 0;                  // at max_batch_size (batch 1 when nothing fits)
  int64_t step_time_ns = 0;
  int64_t max_seq_len = -1;                // --vary-seq: at the scenario's batch size; -1 = not asked
};

std::vector<std::string> split_policies(const std::string& s) {
  std::vector<std::string> out(1);
  bool quoted = false;
  for (char c : s) {
    if (c == '"') {
      quoted = !quoted;
      continue;
    }
    if (c == ',' && !quoted) out.emplace_back();
    else out.back() += c;
  }
  return out;
}

}  // namespace

int cmd_fit(const std::vector<std::string>& args) {
  po::options_description opts("actsim fit [SCENARIO] [options]");
  opts.add_options()("help,h", "show this help");
  add_scenario_options(opts);
  opts.add_options()
      ("policies", po::value<std::string>(),
       "comma-separated checkpoint policies (default: none,selective,full,sqrt,every:2,offload); "
       "quote an ops list: --policies 'none,\"ops:addmm,bmm\"'")
      ("vary-seq", "also find the largest model.seq_len that fits at the scenario's batch size")
      ("json", "print one JSON object (the contract in README.md) instead of the table");
  add_force_option(opts);
  po::variables_map vm = parse(args, opts, "fit");
  if (vm.count("help")) {
    std::cout << opts << "\nSCENARIO is a TOML file (see scenarios/); without one, defaults plus --set make one.\n\n"
              << scenario_help();
    return 0;
  }
  std::vector<std::string> policies(std::begin(kDefaultPolicies), std::end(kDefaultPolicies));
  std::vector<graph::CheckpointPolicy> parsed;  // [policies], parsed once
  for (const std::string& p : policies) parsed.push_back(graph::parse_policy(p, "--policies"));
  if (vm.count("policies")) {
    const std::string text = vm["policies"].as<std::string>();
    policies = split_policies(text);
    parsed.clear();
    for (const std::string& p : policies) {
      if (p.empty()) throw InputError(fmt::format("--policies {}: empty policy in the list", text));
      const graph::CheckpointPolicy cp = graph::parse_policy(p, "--policies " + text);
      if (cp.kind == graph::CheckpointPolicy::Kind::budget) {
        throw InputError(fmt::format("--policies {}: \"{}\": a budget is planned by `actsim plan --budget`, not fitted",
                                     text, p));
      }
      parsed.push_back(cp);
    }
  }
  const study::Scenario base = scenario_from(vm);
  const bool vary_seq = vm.count("vary-seq") > 0;
  {
    // Per policy: about 2 log2(max batch) searches of lowerings (and as many for --vary-seq).
    const double searches = 14.0 * (vary_seq ? 2 : 1) * static_cast<double>(policies.size());
    const double threads = std::max(1u, std::min<unsigned>(std::thread::hardware_concurrency(), policies.size()));
    check_long_work(vm, searches * static_cast<double>(base.model.n_layers) * kSecondsPerLayer / threads,
                    fmt::format("fit of {} policies at {} layers", policies.size(), base.model.n_layers));
  }

  std::vector<FitRow> rows(policies.size());
  std::vector<std::exception_ptr> errors(policies.size());
  std::atomic<size_t> next{0};
  auto work = [&] {
    for (size_t i; (i = next.fetch_add(1)) < policies.size();) {
      try {
        study::Scenario s = base;
        s.checkpoint = parsed[i];
        s.origin["checkpoint.policy"] = "--policies";
        FitRow& r = rows[i];
        r.policy = policies[i];
        r.max_batch_size = study::max_batch_size(s);
        if (vary_seq) r.max_seq_len = study::max_seq_len(s);
        s.training.batch_size = std::max<int64_t>(1, r.max_batch_size);
        const study::Analysis a = study::analyze(s);
        r.peak_bytes = a.result.peak_bytes;
        r.step_time_ns = a.result.step_time_ns;
      } catch (...) {
        errors[i] = std::current_exception();
      }
    }
  };
  const size_t n_threads = std::min<size_t>(policies.size(), std::max(1u, std::thread::hardware_concurrency()));
  std::vector<std::thread> pool;
  for (size_t t = 1; t < n_threads; ++t) pool.emplace_back(work);
  work();
  for (std::thread& t : pool) t.join();
  for (const std::exception_ptr& e : errors) {
    if (e) std::rethrow_exception(e);
  }

  if (vm.count("json")) {
    nlohmann::json j;
    j["scenario"] = base.name;
    j["device"] = base.device.name;
    j["device_bytes"] = base.device.memory_bytes;
    if (vary_seq) j["batch_size"] = base.training.batch_size;
    j["policies"] = nlohmann::json::array();
    for (const FitRow& r : rows) {
      nlohmann::json p{{"policy", r.policy},
                       {"max_batch_size", r.max_batch_size},
                       {"peak_bytes", r.peak_bytes},
                       {"step_time_ns", r.step_time_ns},
                       {"fits", r.max_batch_size > 0}};
      if (vary_seq) p["max_seq_len"] = r.max_seq_len;
      j["policies"].push_back(std::move(p));
    }
    std::cout << j.dump(2) << "\n";
    return 0;
  }
  const auto& m = base.model;
  fmt::print("actsim fit: {} -- {} family, {} layers, d_model {}, seq {}; device {} ({})\n", base.name,
             graph::to_string(m.family), m.n_layers, m.d_model, m.seq_len, base.device.name,
             util::human_bytes(base.device.memory_bytes));
  std::string head = fmt::format("  {:<20} {:>10} {:>14} {:>14}", "policy", "max batch", "peak at it", "step time");
  if (vary_seq) head += fmt::format(" {:>22}", fmt::format("max seq at batch {}", base.training.batch_size));
  fmt::print("\n{}\n", head);
  for (const FitRow& r : rows) {
    std::string line = fmt::format("  {:<20} {:>10} {:>14} {:>11.2f} ms", r.policy, r.max_batch_size,
                                   util::human_bytes(r.peak_bytes), r.step_time_ns / 1e6);
    if (vary_seq) line += fmt::format(" {:>22}", r.max_seq_len);
    fmt::print("{}\n", line);
  }
  if (std::any_of(rows.begin(), rows.end(), [](const FitRow& r) { return r.max_batch_size == 0; })) {
    fmt::print("\n  max batch 0: not even a batch of 1 fits; its peak and step time are shown.\n");
  }
  return 0;
}

}  // namespace actsim::cli
