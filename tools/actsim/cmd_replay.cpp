// actsim replay [SCENARIO|SCHEDULE]: run the simulated schedule for real on a backend and confirm
// the simulation (safety, tightness, memory, PyTorch); optionally write measured op times.
#include <fmt/format.h>

#include "actsim/graph/checkpoint.hpp"
#include "actsim/backends/cuda_info.hpp"
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cctype>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <limits>
#include <optional>
#include <nlohmann/json.hpp>

#include "actsim/util/error.hpp"
#include "actsim/replay/replay.hpp"
#include "actsim/sim/calibration.hpp"
#include "actsim/sim/device.hpp"
#include "actsim/study/analyze.hpp"
#include "actsim/schedule/schedule.hpp"
#include "actsim/util/units.hpp"
#include "actsim/study/make_schedule.hpp"
#include "actsim/util/output.hpp"
#include "actsim/util/text.hpp"
#include "cli.hpp"

namespace actsim::cli {

using sim::simulate;

namespace {

using nlohmann::json;
using Clock = std::chrono::steady_clock;

double since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// A schedule file is JSON lines whose first line is an object; a scenario is TOML. Sniffed from
// the text already read, so a pipe is read once.
bool is_schedule_text(const std::string& text) {
  const size_t i = text.find_first_not_of(" \t\r\n");
  return i != std::string::npos && text[i] == '{';
}

std::string cpu_model() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("model name", 0) == 0) {
      const size_t colon = line.find(':');
      if (colon != std::string::npos) return line.substr(colon + 2);
    }
  }
  return "unknown CPU";
}

std::string shell_quote(const std::string& s) {
  std::string out = "'";
  for (char c : s) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

struct TorchOutcome {
  std::optional<bool> ok;  // nullopt: not run
  std::string detail;
  double seconds = 0;
};

// Dumps weights, inputs, loss and gradients, and runs python/torch_check.py on them: a script
// shipped with the tool (beside scenarios/, found from the same data directory), not a test file.
TorchOutcome run_torch_check(const schedule::Schedule& s, const replay::ReplayResult& r) {
  TorchOutcome t;
  if (!replay::torch_checkable(s, t.detail)) return t;
  const auto t0 = Clock::now();
  const char* env_script = std::getenv("ACTSIM_TORCH_CHECK");
  const std::string script = env_script ? env_script : sim::data_dir() + "/../python/torch_check.py";
  const char* env_py = std::getenv("ACTSIM_PYTHON");
  const std::string python = env_py ? env_py : "/usr/bin/python3";
  if (!std::filesystem::exists(script)) {
    t.detail = fmt::format("not run: {} not found (set ACTSIM_TORCH_CHECK)", script);
    return t;
  }
  const std::filesystem::path dump =
      std::filesystem::temp_directory_path() / fmt::format("actsim-torch-{}.bin", ::getpid());
  {
    std::ofstream out(dump, std::ios::binary);
    out << replay::torch_dump(s, r);
    if (!out.flush()) {
      t.detail = fmt::format("not run: cannot write {}", dump.string());
      return t;
    }
  }
  const std::string cmd = fmt::format("{} {} {}", shell_quote(python), shell_quote(script), shell_quote(dump.string()));
  std::string output;
  int status = -1;
  if (FILE* p = ::popen(cmd.c_str(), "r")) {
    char buf[4096];
    size_t n;
    while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) output.append(buf, n);
    status = ::pclose(p);
  }
  std::filesystem::remove(dump);
  t.seconds = since(t0);
  const int rc = (status >= 0 && WIFEXITED(status)) ? WEXITSTATUS(status) : -1;
  json j = json::parse(output.substr(0, output.find('\n')), nullptr, false);
  if (rc == 77) {
    t.detail = "not run: python3-torch is not installed";
    return t;
  }
  if (j.is_discarded() || !j.contains("ok")) {
    t.detail = fmt::format("not run: {} exited {} without a result", script, rc);
    return t;
  }
  t.ok = j["ok"].get<bool>();
  t.detail = j.value("detail", std::string());
  return t;
}

// Bytes this process may still allocate on the host: the least of MemAvailable, the address
// space left under RLIMIT_AS / RLIMIT_DATA, and the cgroup's memory.max headroom. -1 = unknown.
int64_t host_available_bytes() {
  int64_t avail = -1;
  auto least = [&](int64_t x) {
    if (x >= 0 && (avail < 0 || x < avail)) avail = x;
  };
  {
    std::ifstream in("/proc/meminfo");
    std::string key;
    int64_t kb = 0;
    std::string unit;
    while (in >> key >> kb >> unit) {
      if (key == "MemAvailable:") least(kb * 1024);
    }
  }
  int64_t vm_bytes = 0;
  {
    std::ifstream in("/proc/self/statm");
    int64_t pages = 0;
    if (in >> pages) vm_bytes = pages * ::sysconf(_SC_PAGESIZE);
  }
  for (int res : {RLIMIT_AS, RLIMIT_DATA}) {
    struct rlimit rl;
    if (::getrlimit(res, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY) {
      least(std::max<int64_t>(0, static_cast<int64_t>(rl.rlim_cur) - vm_bytes));
    }
  }
  {
    std::ifstream mx("/sys/fs/cgroup/memory.max"), cur("/sys/fs/cgroup/memory.current");
    std::string m;
    int64_t c = 0;
    if (mx >> m && m != "max" && cur >> c) least(std::max<int64_t>(0, std::stoll(m) - c));
  }
  return avail;
}

// The host bytes a CPU replay holds at once, from the schedule itself (not its header, which a
// file could misstate): the peak of its storages and workspaces in entry order; with --confirm
// every storage at once (the safety run frees nothing), twice (tightness probes save the live
// buffers). Saturates instead of overflowing.
int64_t cpu_replay_bytes(const schedule::Schedule& s, bool confirm) {
  const graph::Graph& g = s.graph();
  auto add = [](int64_t a, int64_t b) {
    int64_t r;
    return __builtin_add_overflow(a, b, &r) ? std::numeric_limits<int64_t>::max() : r;
  };
  int64_t live = 0, peak = 0, total = 0;
  for (const graph::Storage& st : g.storages()) {
    total = add(total, st.bytes);
    if (st.producer == graph::kNoOp) live = add(live, st.bytes);
  }
  peak = live;
  for (const schedule::ScheduleEntry& e : s.entries) {
    if (e.kind == schedule::ScheduleEntry::Kind::alloc || e.kind == schedule::ScheduleEntry::Kind::ws_alloc) live = add(live, e.bytes);
    if (e.kind == schedule::ScheduleEntry::Kind::ws_free) live -= std::min(live, e.bytes);
    if (e.kind == schedule::ScheduleEntry::Kind::free) live -= std::min(live, g.storages()[e.id].bytes);
    peak = std::max(peak, live);
  }
  return confirm ? add(add(total, total), peak) : peak;
}

}  // namespace

int cmd_replay(const std::vector<std::string>& args) {
  po::options_description opts("actsim replay [SCENARIO|SCHEDULE] [options]");
  opts.add_options()("help,h", "show this help");
  add_scenario_options(opts);
  opts.add_options()
      ("backend", po::value<std::string>()->default_value("cpu"), "cpu (reference kernels) or cuda (needs a GPU)")
      ("confirm", "confirm the simulation: safety, tightness, memory")
      ("torch", "cross-check loss and gradients with python3-torch (profile torch-cpu, dropout 0, eager, fp32)")
      ("json", "print one JSON object (the contract in README.md) instead of the table")
      ("calibration-out", po::value<std::string>(), "write measured op times to FILE (for simulate --calibration)")
      ("sample", po::value<int64_t>()->default_value(40), "tightness: check at most N saved activations (a seeded sample)")
      ("policies", po::value<std::string>()->default_value("full,selective,every:2,offload"),
       "recompute check (with --confirm on a scenario): checkpoint policies whose loss and gradients must "
       "equal, bit for bit, those of the schedule without checkpointing")
      ("seed", po::value<uint64_t>()->default_value(0), "seed of the initial values and dropout masks")
      ("force", "run even when the estimated work is above 60 s (README, \"Reliability\")")
      ("timings", "add the tool's own wall-clock figures to the JSON (measured_step_ns, seconds); without it the "
                  "JSON is the same on every rerun");
  po::variables_map vm = parse(args, opts, "replay");
  if (vm.count("help")) {
    std::cout << opts
              << "\nSCENARIO is a TOML file (see scenarios/); SCHEDULE a file written by "
                 "`actsim simulate --emit-schedule`.\nExit status: 0 every confirmation that ran passed, 1 one "
                 "failed, 2 bad input.\n";
    return 0;
  }
  const std::string backend_name = vm["backend"].as<std::string>();
  if (backend_name != "cpu" && backend_name != "cuda") {
    throw InputError(fmt::format("--backend {}: unknown backend (cpu or cuda)", backend_name));
  }
  const int64_t sample = vm["sample"].as<int64_t>();
  if (sample < 0) throw InputError(fmt::format("--sample {}: must be zero or more", sample));
  const uint64_t seed = vm["seed"].as<uint64_t>();
  // Validate every option before anything runs.
  // The list syntax of every comma-separated option (util::split_list); "" asks for none.
  const std::string policies_text = vm["policies"].as<std::string>();
  std::vector<std::string> policy_list;
  if (!policies_text.empty()) {
    for (const std::string& item : util::split_list(policies_text)) policy_list.push_back(util::strip_quotes(item));
  }
  for (const std::string& p : policy_list) {
    if (p.empty()) throw InputError(fmt::format("--policies {}: empty policy in the list", policies_text));
    (void)graph::parse_policy(p, "--policies");
  }
  const auto t_start = Clock::now();

  // The schedule: read (and validated) from a file, or simulated from a scenario.
  schedule::Schedule s;
  const std::string input = vm.count("scenario") ? vm["scenario"].as<std::string>() : "";
  if (vm.count("scenario") && input.empty()) throw InputError("\"\": an empty path is not a scenario or schedule file");
  if (vm.count("calibration-out")) util::check_output_path("--calibration-out", vm["calibration-out"].as<std::string>(), {input});
  const std::string text = input.empty() ? std::string() : util::read_input_file(input, "scenario or schedule");
  const bool scenario_input = input.empty() || !is_schedule_text(text);
  if (!scenario_input) {
    if (vm.count("set")) throw InputError(fmt::format("--set applies to a scenario; {} is a schedule file", input));
    s = schedule::parse_schedule_text(text, input);
  } else {
    const std::vector<std::string> sets =
        vm.count("set") ? vm["set"].as<std::vector<std::string>>() : std::vector<std::string>{};
    const study::Scenario sc = input.empty() ? study::load_scenario("", sets) : study::load_scenario_text(text, input, sets);
    if (sc.training.autocast == graph::DType::f16) {  // autocast recipe (issue 12)
      throw InputError(sc.where("training.autocast") +
                       ": replay has no kernels for torch.amp.GradScaler (training.autocast = \"fp16\"); "
                       "simulate it, or replay with training.autocast = \"bf16\"");
    }
    study::Analysis a = study::analyze(sc);
    s = study::make_schedule(a);
    try {
      schedule::validate_schedule(s);
    } catch (const InputError& e) {
      // Not the user's input: the simulator produced an order that cannot run.
      std::cerr << "actsim: replay: the simulated schedule cannot run (a simulator bug): " << util::one_line(e.what()) << "\n";
      return 1;
    }
  }
  std::unique_ptr<backends::Backend> be = backends::make_backend(backend_name);
  for (const graph::Op& op : s.graph().ops()) {
    if (const std::string why = be->cannot_run(s.graph(), op); !why.empty()) {
      throw InputError(fmt::format("--backend {}: op {} ({}): {}; use --backend cpu", backend_name, op.name,
                                   graph::to_string(op.kind), why));
    }
  }
  if (backend_name == "cuda") {
    // Refuse rather than over-commit: the whole schedule's peak must fit in free device memory.
    const int64_t free_bytes = backends::cuda_free_bytes();
    if (free_bytes >= 0 && s.simulated_peak_bytes > free_bytes) {
      throw InputError(fmt::format("--backend cuda: the schedule needs {} at its peak but the device has {} free; "
                                   "refusing to over-commit (use a smaller batch or a checkpoint policy)",
                                   util::human_bytes(s.simulated_peak_bytes), util::human_bytes(free_bytes)));
    }
  }

  const bool confirm = vm.count("confirm") > 0, want_torch = vm.count("torch") > 0;
  {
    // The reference kernels run about kCpuFlops; --confirm replays the step about 15 times over
    // (safety, tightness probes sharing prefixes, the recompute policies). Note [Long work].
    constexpr double kCpuFlops = 5e9, kGpuFlops = 5e12;
    double flops = 0;
    for (const graph::Op& op : s.graph().ops()) flops += op.flops;
    const double secs = flops / (backend_name == "cpu" ? kCpuFlops : kGpuFlops) * (confirm ? 15 : 1);
    check_long_work(vm, secs, fmt::format("replay on {} of {:.3g} FLOP{}", backend_name, flops, confirm ? " with --confirm" : ""));
  }
  if (backend_name == "cpu") {
    // As the CUDA path checks device memory: refuse before allocating rather than abort midway.
    const int64_t need = cpu_replay_bytes(s, confirm), avail = host_available_bytes();
    if (avail >= 0 && need > avail) {
      throw InputError(fmt::format("--backend cpu: the replay{} needs about {} of host memory but {} is available; "
                                   "refusing to start (use a smaller model or batch)",
                                   confirm ? " with --confirm" : "", util::human_bytes(need), util::human_bytes(avail)));
    }
  }
  replay::ReplayResult r;
  std::optional<replay::SafetyCheck> safety;
  std::optional<replay::MemoryCheck> memory;
  std::optional<replay::TightnessCheck> tight;
  TorchOutcome torch;
  double t_main = 0, t_safety = 0, t_tight = 0;
  ProgressLine progress("replay", "entries");
  auto show = [&](int64_t done, int64_t total) { progress.update(done, total); };
  std::function<void(int64_t, int64_t)> on_progress;
  if (progress.enabled()) on_progress = show;
  try {
    auto t0 = Clock::now();
    progress.stage("the step");
    r = replay::run(s, *be, {.seed = seed, .poison_freed = confirm, .keep_initial_values = want_torch, .progress = on_progress});
    t_main = since(t0);
    if (confirm) {
      memory = replay::confirm_memory(s, r);
      t0 = Clock::now();
      progress.stage("safety (nothing freed)");
      safety = replay::confirm_safety(s, *be, r, seed, on_progress);
      t_safety = since(t0);
      t0 = Clock::now();
      ProgressLine probes("replay", "tightness probes");
      std::function<void(int64_t, int64_t)> on_probe;
      progress.clear();
      if (probes.enabled()) on_probe = [&](int64_t done, int64_t total) { probes.update(done, total); };
      tight = replay::confirm_tightness(s, *be, r, {.max_checked = static_cast<size_t>(sample), .seed = seed, .progress = on_probe});
      t_tight = since(t0);
    }
  } catch (const replay::ReplayError& e) {
    progress.clear();
    std::cerr << "actsim: replay failed: " << util::one_line(e.what()) << "\n";
    return 1;
  }
  progress.clear();
  // (d) Recompute: every checkpoint policy's schedule gives the plain schedule's gradients.
  std::optional<bool> recompute_ok;
  json recompute_detail = nullptr;
  if (confirm && scenario_input) {
    const std::vector<std::string> sets =
        vm.count("set") ? vm["set"].as<std::vector<std::string>>() : std::vector<std::string>{};
    const study::Scenario plain = input.empty() ? study::load_scenario("", sets) : study::load_scenario_text(text, input, sets);
    // The schedule of the same scenario under another checkpoint policy.
    auto schedule_of = [&](const std::string& p) {
      study::Scenario sc = plain;
      sc.checkpoint = graph::parse_policy(p, "--policies");
      return study::make_schedule(study::analyze(sc));
    };
    try {
      const replay::RecomputeCheck c = replay::confirm_recompute(
          replay::recompute_policies(policy_list, plain.checkpoint_text()), schedule_of, *be, seed);
      recompute_ok = c.ok;
      recompute_detail = json::array();
      for (const replay::RecomputeItem& it : c.items) recompute_detail.push_back({{"policy", it.policy}, {"equal", it.equal}});
    } catch (const std::exception& e) {
      std::cerr << "actsim: replay: recompute check failed to run: " << util::one_line(e.what()) << "\n";
      return 1;
    }
  }
  if (want_torch) torch = run_torch_check(s, r);

  const std::string device = backend_name == "cpu" ? fmt::format("cpu: {}", cpu_model()) : be->name();
  if (vm.count("calibration-out")) {
    std::vector<int64_t> predicted(s.graph().n_ops(), 0);
    for (const schedule::ScheduleEntry& e : s.entries) {
      if (e.kind == schedule::ScheduleEntry::Kind::run) predicted[e.id] = e.duration_ns;
    }
    json cal = sim::calibration_json(s.graph(), r.op_seconds, predicted, device, be->name());
    cal["simulated_device"] = s.device;
    cal["source"] = s.source;
    util::OutputSet files;
    if (vm.count("scenario")) files.protect(vm["scenario"].as<std::string>());
    files.add("--calibration-out", vm["calibration-out"].as<std::string>(), cal.dump(2) + "\n");
    files.commit();
  }

  auto opt_bool = [](const auto& o) { return o ? json(o->ok) : json(nullptr); };
  json j;
  j["backend"] = be->name();
  j["device"] = device;
  j["schedule"] = s.source;
  j["simulated_device"] = s.device;
  j["simulated_peak_bytes"] = s.simulated_peak_bytes;
  j["measured_peak_bytes"] = r.peak_bytes;
  j["loss"] = r.loss;
  j["result_digest"] = replay::result_digest(r);
  j["entries"] = s.entries.size();
  j["ops"] = s.graph().n_ops();
  j["predicted_step_ns"] = s.simulated_step_time_ns;
  const bool timings = vm.count("timings") > 0;
  if (timings) j["measured_step_ns"] = static_cast<int64_t>(r.step_seconds * 1e9 + 0.5);
  json conf;
  conf["safety"] = opt_bool(safety);
  conf["memory"] = opt_bool(memory);
  conf["recompute"] = recompute_ok ? json(*recompute_ok) : json(nullptr);
  conf["torch"] = torch.ok ? json(*torch.ok) : json(nullptr);
  if (tight) {
    json nc = json::array();
    for (const replay::TightnessItem& it : tight->items) {
      if (!it.confirmed) nc.push_back({{"name", it.name}, {"last_reader", it.last_reader}, {"reason", it.reason}});
    }
    conf["tightness"] = {{"confirmed", tight->confirmed}, {"checked", tight->checked},
                         {"candidates", tight->candidates}, {"not_confirmed", nc}};
  } else {
    conf["tightness"] = nullptr;
  }
  j["confirm"] = conf;
  j["details"] = {{"safety", safety ? json(safety->detail) : json(nullptr)},
                  {"memory", memory ? json(memory->detail) : json(nullptr)},
                  {"torch", want_torch ? json(torch.detail) : json(nullptr)},
                  {"recompute", recompute_detail}};
  const double total = since(t_start);
  if (timings) j["seconds"] = {{"replay", t_main}, {"safety", t_safety}, {"tightness", t_tight}, {"torch", torch.seconds},
                  {"total", total}};

  std::vector<std::string> failed;
  if (safety && !safety->ok) failed.push_back("safety");
  if (memory && !memory->ok) failed.push_back("memory");
  if (torch.ok && !*torch.ok) failed.push_back("torch");
  if (recompute_ok && !*recompute_ok) failed.push_back("recompute");

  if (vm.count("json")) {
    std::cout << j.dump(2) << "\n";
  } else {
    auto mark = [](bool ok) { return ok ? "ok" : "FAILED"; };
    fmt::print("actsim replay of {} on {} ({} entries, {} ops)\n", s.source, device, s.entries.size(), s.graph().n_ops());
    fmt::print("  {:<14} {}\n", "loss", r.loss);
    fmt::print("  {:<14} simulated {} ({} B), measured {} ({} B)\n", "peak", util::human_bytes(s.simulated_peak_bytes),
               s.simulated_peak_bytes, util::human_bytes(r.peak_bytes), r.peak_bytes);
    fmt::print("  {:<14} predicted {:.3f} ms on {}, measured {:.3f} ms on {}\n", "step time",
               static_cast<double>(s.simulated_step_time_ns) * 1e-6, s.device.empty() ? "?" : s.device,
               r.step_seconds * 1e3, be->name());
    if (safety) fmt::print("  {:<14} {}: {}\n", "safety", mark(safety->ok), safety->detail);
    if (memory) fmt::print("  {:<14} {}: {}\n", "memory", mark(memory->ok), memory->detail);
    if (tight) {
      fmt::print("  {:<14} {} of {} checked confirmed ({} saved activations)\n", "tightness", tight->confirmed,
                 tight->checked, tight->candidates);
      for (const replay::TightnessItem& it : tight->items) {
        if (!it.confirmed) fmt::print("  {:<14}   not confirmed: {}: {}\n", "", it.name, it.reason);
      }
    }
    if (recompute_ok) {
      std::vector<std::string> parts;
      for (const auto& d : recompute_detail) {
        parts.push_back(fmt::format("{} {}", d["policy"].get<std::string>(), d["equal"].get<bool>() ? "equal" : "DIFFERENT"));
      }
      fmt::print("  {:<14} {}: gradients bit for bit vs no checkpointing: {}\n", "recompute", mark(*recompute_ok),
                 fmt::join(parts, ", "));
    } else {
      fmt::print("  {:<14} not compared (a schedule file, or no --confirm)\n", "recompute");
    }
    if (want_torch) fmt::print("  {:<14} {}: {}\n", "torch", torch.ok ? mark(*torch.ok) : "skipped", torch.detail);
    fmt::print("  {:<14} {:.2f} s (replay {:.2f} s, safety {:.2f} s, tightness {:.2f} s, torch {:.2f} s)\n", "took",
               total, t_main, t_safety, t_tight, torch.seconds);
  }
  if (vm.count("json") == 0 && failed.empty() && (confirm || want_torch)) fmt::print("all confirmations that ran passed\n");
  if (!failed.empty()) {
    std::cerr << fmt::format("actsim: replay: confirmation failed: {}\n", fmt::join(failed, ", "));
    return 1;
  }
  return 0;
}

}  // namespace actsim::cli
