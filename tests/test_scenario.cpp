// Tests of the scenario loader (sim/scenario): defaults, every key, and every kind of bad input,
// which must be an InputError naming the file, the line and the key.
#include <catch2/catch.hpp>

#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>
#include <vector>

#include "actsim/util/error.hpp"
#include "actsim/study/scenario.hpp"

using namespace actsim;
namespace fs = std::filesystem;

namespace {

// A fresh directory under the system's temporary directory, removed with the object.
class TempDir {
 public:
  TempDir() {
    static std::atomic<int> counter{0};
    path_ = fs::temp_directory_path() /
            ("actsim_test_scenario_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  // Writes `text` to a file named `name` in the directory; returns its path.
  std::string write(const std::string& name, const std::string& text) const {
    const fs::path p = path_ / name;
    std::ofstream(p) << text;
    return p.string();
  }
  std::string path() const { return path_.string(); }

 private:
  fs::path path_;
};

// The InputError message of loading `path` with `overrides`; fails the test if nothing is thrown.
std::string error_of(const std::string& path, const std::vector<std::string>& overrides = {}) {
  try {
    study::load_scenario(path, overrides);
  } catch (const InputError& e) {
    return e.what();
  }
  FAIL("no InputError for " << path);
  return "";
}

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

}  // namespace

TEST_CASE("study::load_scenario: without a file, the defaults (gpt2 small on an H100)", "[scenario]") {
  study::Scenario s = study::load_scenario("", {});
  CHECK(s.name == "default");
  CHECK(s.file.empty());
  CHECK(s.model.family == graph::Family::gpt2);
  CHECK(s.model.vocab_size == 50257);
  CHECK(s.model.seq_len == 1024);
  CHECK(s.model.d_model == 768);
  CHECK(s.model.n_heads == 12);
  CHECK(s.model.kv_heads() == 12);
  CHECK(s.model.n_layers == 12);
  CHECK(s.model.ff() == 3072);
  CHECK(s.model.dropout == 0.0);
  CHECK(s.model.attention == graph::Attention::eager);
  CHECK(s.model.tied());
  CHECK(s.training.batch_size == 8);
  CHECK(s.training.dtype == graph::DType::f32);
  CHECK(s.training.optimizer == graph::Optimizer::adamw);
  CHECK(s.training.optimizer_impl == graph::OptimizerImpl::profile_default);
  CHECK(s.profile == graph::ProfileId::torch_cuda);
  CHECK(s.device.name == "H100-SXM-80GB");
  CHECK(s.device.memory_bytes == 80LL * 1024 * 1024 * 1024);
  CHECK(s.checkpoint_text() == "none");
  CHECK(s.origin.empty());
  CHECK(s.where("model.d_model") == "model.d_model");
}

TEST_CASE("study::scenario_keys: distinct dotted keys in documentation order", "[scenario]") {
  const auto& keys = study::scenario_keys();
  std::set<std::string> unique(keys.begin(), keys.end());
  CHECK(unique.size() == keys.size());
  CHECK(keys.front() == "name");
  CHECK(unique.count("model.n_heads") == 1);
  CHECK(unique.count("training.batch_size") == 1);
  CHECK(unique.count("runtime.profile") == 1);
  CHECK(unique.count("device.name") == 1);
  CHECK(unique.count("checkpoint.policy") == 1);
}

TEST_CASE("study::load_scenario: every key is parsed and remembers its line", "[scenario]") {
  TempDir dir;
  const std::string path = dir.write("every-key.toml",
                                     "name = \"my-run\"\n"               // 1
                                     "description = \"all keys\"\n"      // 2
                                     "[model]\n"                         // 3
                                     "family = \"llama\"\n"              // 4
                                     "vocab_size = 1000\n"               // 5
                                     "seq_len = 128\n"                   // 6
                                     "d_model = 256\n"                   // 7
                                     "n_heads = 8\n"                     // 8
                                     "n_kv_heads = 2\n"                  // 9
                                     "n_layers = 3\n"                    // 10
                                     "d_ff = 512\n"                      // 11
                                     "dropout = 0.0\n"                   // 12
                                     "attention = \"flash\"\n"           // 13
                                     "tie_embeddings = true\n"           // 14
                                     "rope_theta = 500000\n"             // 15
                                     "[training]\n"                      // 16
                                     "batch_size = 4\n"                  // 17
                                     "dtype = \"bf16\"\n"                // 18
                                     "optimizer = \"sgd_momentum\"\n"    // 19
                                     "optimizer_impl = \"fused\"\n"      // 20
                                     "weight_decay = 0.01\n"             // 21
                                     "[runtime]\n"                       // 22
                                     "profile = \"torch-cuda\"\n"        // 23
                                     "cpu_isa = \"avx2\"\n"              // 24
                                     "[device]\n"                        // 25
                                     "name = \"A100-80GB\"\n"            // 26
                                     "[checkpoint]\n"                    // 27
                                     "policy = \"none\"\n"               // 28
                                     "[lora]\n"                          // 29 (issue 12, recipe 3)
                                     "r = 4\n"                           // 30
                                     "alpha = 16\n"                      // 31
                                     "dropout = 0.1\n"                   // 32
                                     "targets = [\"q_proj\", \"v_proj\"]\n");  // 33
  // Keys added after this file was written are set with --set (its lines stay as they are).
  study::Scenario s = study::load_scenario(path, {"training.grad_accum_steps=2", "training.trainable=lora",
      // checkpoint implementation (issue 12, recipe 4)
      "checkpoint.impl=reentrant", "checkpoint.preserve_rng_state=false",
      "training.autocast=bf16"});  // autocast recipe (issue 12, recipe 1)
  CHECK(s.training.grad_accum_steps == 2);
  CHECK(s.training.autocast == graph::DType::bf16);
  CHECK(s.where("training.autocast") == "--set: training.autocast");
  // issue 13: the [parallel] keys and training.master_weights, in a scenario of their own (data
  // parallelism does not combine with accumulation, LoRA or autocast yet).
  const std::string ppath = dir.write("every-parallel-key.toml",
                                      "[parallel]\n"                       // 1
                                      "dp = 2\n"                           // 2
                                      "sharding = \"none\"\n"              // 3
                                      "bucket_cap_mb = 10\n"               // 4
                                      "gradient_as_bucket_view = true\n");  // 5
  study::Scenario par = study::load_scenario(ppath, {"training.master_weights=none",
                                                     // dp2: DDP with accumulation
                                                     "training.grad_accum_steps=2", "parallel.no_sync=false"});
  CHECK(par.training.parallel.dp == 2);
  CHECK(par.training.parallel.bucket_cap_mb == 10);
  CHECK(par.training.parallel.gradient_as_bucket_view);
  CHECK(par.where("parallel.bucket_cap_mb") == ppath + ":4: parallel.bucket_cap_mb");
  // issue 13, pipeline parallelism: its keys in a scenario of their own (gpt2's 12 layers).
  const std::string pppath = dir.write("every-pp-key.toml",
                                       "[parallel]\n"                          // 1
                                       "pp = 2\n"                              // 2
                                       "microbatches = 4\n"                    // 3
                                       "pp_schedule = \"interleaved:2\"\n");  // 4
  study::Scenario pps = study::load_scenario(pppath, {});
  CHECK(pps.training.parallel.pp == 2);
  CHECK(pps.training.parallel.pp_micro() == 4);
  CHECK(pps.training.parallel.pp_schedule == graph::PpSchedule::interleaved);
  CHECK(pps.training.parallel.pp_chunks == 2);
  CHECK(pps.where("parallel.pp_schedule") == pppath + ":4: parallel.pp_schedule");
  CHECK(s.name == "my-run");
  CHECK(s.file == path);
  CHECK(s.model.family == graph::Family::llama);
  CHECK(s.model.vocab_size == 1000);
  CHECK(s.model.seq_len == 128);
  CHECK(s.model.d_model == 256);
  CHECK(s.model.n_heads == 8);
  CHECK(s.model.n_kv_heads == 2);
  CHECK(s.model.n_layers == 3);
  CHECK(s.model.d_ff == 512);
  CHECK(s.model.dropout == 0.0);
  CHECK(s.model.attention == graph::Attention::flash);
  CHECK(s.model.tie_embeddings == 1);
  CHECK(s.model.tied());
  CHECK(s.model.rope_theta == 500000.0);
  CHECK(s.training.batch_size == 4);
  CHECK(s.training.dtype == graph::DType::bf16);
  CHECK(s.training.optimizer == graph::Optimizer::sgd_momentum);
  CHECK(s.training.optimizer_impl == graph::OptimizerImpl::fused);
  CHECK(s.training.weight_decay == 0.01);
  CHECK(s.profile == graph::ProfileId::torch_cuda);
  CHECK(s.cpu_isa == graph::CpuIsa::avx2);
  CHECK(s.device.name == "A100-80GB");
  CHECK(s.checkpoint_text() == "none");
  CHECK(s.training.checkpoint_impl == graph::CheckpointImpl::reentrant);  // issue 12, recipe 4
  CHECK(!s.training.preserve_rng_state);
  CHECK(s.where("checkpoint.preserve_rng_state") == "--set: checkpoint.preserve_rng_state");
  // issue 13, tensor and sequence parallelism: its keys in a scenario of their own (torch-cuda only).
  const std::string tpath = dir.write("every-tp-key.toml",
                                      "[parallel]\n"              // 1
                                      "tp = 2\n"                  // 2
                                      "sp = true\n"               // 3
                                      "tp_impl = \"megatron\"\n");  // 4
  study::Scenario tps = study::load_scenario(tpath, {"runtime.profile=torch-cuda"});
  CHECK(tps.training.parallel.tp == 2);
  CHECK(tps.training.parallel.sp);
  CHECK(tps.where("parallel.tp_impl") == tpath + ":4: parallel.tp_impl");
  // zero_redundancy (issue 13): parallel.zero_impl in a scenario of its own
  const std::string zpath = dir.write("every-zero-redundancy-key.toml",
                                      "[parallel]\n"               // 1
                                      "dp = 2\n"                   // 2
                                      "sharding = \"zero1\"\n"     // 3
                                      "zero_impl = \"torch\"\n");  // 4
  study::Scenario zrs = study::load_scenario(zpath, {});
  CHECK(zrs.training.parallel.zero_redundancy());
  CHECK(zrs.where("parallel.zero_impl") == zpath + ":4: parallel.zero_impl");
  // Every key was set, each at its own line.
  std::set<std::string> set_keys;
  for (const auto& [k, where] : s.origin) set_keys.insert(k);
  for (const auto& [k, where] : par.origin) set_keys.insert(k);  // issue 13
  for (const auto& [k, where] : tps.origin) set_keys.insert(k);  // issue 13: tensor parallelism
  for (const auto& [k, where] : pps.origin) set_keys.insert(k);  // issue 13, pipeline parallelism
  for (const auto& [k, where] : zrs.origin) set_keys.insert(k);  // zero_redundancy (issue 13)
  const auto& keys = study::scenario_keys();
  CHECK(set_keys == std::set<std::string>(keys.begin(), keys.end()));
  CHECK(s.where("name") == path + ":1: name");
  CHECK(s.where("model.d_model") == path + ":7: model.d_model");
  CHECK(s.where("training.weight_decay") == path + ":21: training.weight_decay");
  CHECK(s.where("checkpoint.policy") == path + ":28: checkpoint.policy");

  // The file's stem names the scenario when it has no `name`; unset keys keep their defaults.
  study::Scenario e = study::load_scenario(dir.write("stem.toml", "[training]\nbatch_size = 2\n"), {});
  CHECK(e.name == "stem");
  CHECK(e.model.d_model == 768);
  // An empty, whitespace-only or comment-only file is not a scenario (issue 14, item 2).
  CHECK_THROWS_AS(study::load_scenario(dir.write("empty.toml", ""), {}), InputError);
  CHECK_THROWS_AS(study::load_scenario(dir.write("blank.toml", " \n\t\n"), {}), InputError);
  CHECK_THROWS_AS(study::load_scenario(dir.write("comments.toml", "# nothing\n"), {}), InputError);
  CHECK_THROWS_AS(study::load_scenario("/dev/null", {}), InputError);
  // Other values of the enumerated keys.
  study::Scenario o = study::load_scenario(
      dir.write("other.toml",
                "[model]\nfamily = \"gpt2\"\ntie_embeddings = false\ndropout = 0.1\n"
                "[training]\ndtype = \"fp16\"\noptimizer = \"adam\"\noptimizer_impl = \"for_loop\"\n"
                "[runtime]\nprofile = \"torch-cpu\"\n"),
      {});
  CHECK_FALSE(o.model.tied());
  CHECK(o.model.dropout == 0.1);
  CHECK(o.training.dtype == graph::DType::f16);
  CHECK(o.training.optimizer == graph::Optimizer::adam);
  CHECK(o.training.optimizer_impl == graph::OptimizerImpl::for_loop);
  CHECK(o.profile == graph::ProfileId::torch_cpu);
}

TEST_CASE("study::load_scenario: every malformed file is an InputError naming file, line and key", "[scenario]") {
  struct Bad {
    const char* what;
    const char* toml;
    int line;
    const char* key;
    std::vector<std::string> fragments;
  };
  const Bad cases[] = {
      {"unknown key", "[model]\nn_head = 12\n", 2, "model.n_head",
       {"unknown key", "did you mean \"model.n_heads\""}},
      {"unknown key at the top", "d_model = 64\n", 1, "d_model", {"unknown key"}},
      {"unknown table", "[modle]\nd_model = 64\n", 1, "modle", {"unknown table", "did you mean [model]"}},
      {"unknown sub-table", "[model.extra]\nx = 1\n", 1, "model.extra", {"unknown table"}},
      {"string where an integer is expected", "[model]\nn_heads = \"12\"\n", 2, "model.n_heads",
       {"expected an integer", "a string"}},
      {"float where an integer is expected", "[model]\nn_layers = 12.5\n", 2, "model.n_layers",
       {"expected an integer"}},
      {"integer where a boolean is expected", "[model]\ntie_embeddings = 1\n", 2, "model.tie_embeddings",
       {"expected true or false"}},
      {"number where a string is expected", "[model]\nfamily = 2\n", 2, "model.family", {"expected a string"}},
      {"array value", "[model]\nd_model = [1, 2]\n", 2, "model.d_model", {"expected a number, boolean or string"}},
      {"zero size", "[model]\nd_model = 0\n", 2, "model.d_model", {"must be a positive integer, got 0"}},
      {"negative size", "[training]\nbatch_size = -8\n", 2, "training.batch_size",
       {"must be a positive integer, got -8"}},
      {"zero layers", "[model]\nn_layers = 0\n", 2, "model.n_layers", {"positive"}},
      {"heads do not divide d_model", "[model]\nd_model = 768\nn_heads = 7\n", 3, "model.n_heads",
       {"model.n_heads = 7 does not divide model.d_model = 768"}},
      {"d_model not divisible by the default heads", "[model]\nd_model = 100\n", 2, "model.d_model",
       {"does not divide model.d_model = 100"}},
      {"kv heads do not divide heads", "[model]\nfamily = \"llama\"\nn_heads = 12\nn_kv_heads = 5\n", 4,
       "model.n_kv_heads", {"model.n_kv_heads = 5 does not divide model.n_heads = 12"}},
      {"gpt2 with grouped-query attention", "[model]\nn_kv_heads = 4\n", 2, "model.n_kv_heads",
       {"gpt2 has no grouped-query attention"}},
      {"llama with dropout", "[model]\nfamily = \"llama\"\ndropout = 0.1\n", 3, "model.dropout",
       {"llama has no dropout"}},
      {"llama with an odd head size", "[model]\nfamily = \"llama\"\nd_model = 36\nn_heads = 12\n", 4, "model.n_heads",
       {"even head size"}},
      {"flash attention on torch-cpu", "[model]\nattention = \"flash\"\n[runtime]\nprofile = \"torch-cpu\"\n", 2,
       "model.attention", {"torch-cuda"}},
      {"fused optimizer on torch-cpu", "[training]\noptimizer_impl = \"fused\"\n[runtime]\nprofile = \"torch-cpu\"\n",
       2, "training.optimizer_impl", {"fused"}},
      {"dropout of 1", "[model]\ndropout = 1.0\n", 2, "model.dropout", {"must be in [0, 1)"}},
      {"rope_theta of 0", "[model]\nrope_theta = 0\n", 2, "model.rope_theta", {"must be positive"}},
      {"negative weight decay", "[training]\nweight_decay = -0.1\n", 2, "training.weight_decay", {"non-negative"}},
      {"vocabulary overflowing int64 bytes", "[model]\nvocab_size = 4000000000000000000\n", 2, "model.vocab_size",
       {"overflows int64"}},
      {"sequence overflowing the attention scores", "[model]\nseq_len = 3000000000\n", 2, "model.seq_len",
       {"overflows int64"}},
      {"more layers than actsim simulates", "[model]\nn_layers = 4000000000000000\n", 2, "model.n_layers",
       {"more than actsim simulates"}},
      {"d_ff overflowing the weights", "[model]\nd_ff = 4000000000000000000\n", 2, "model.d_ff",
       {"overflows int64"}},
      {"unknown family", "[model]\nfamily = \"lama\"\n", 2, "model.family",
       {"unknown family \"lama\"", "did you mean \"llama\""}},
      {"unknown device", "[device]\nname = \"H100-SXM-80G\"\n", 2, "device.name",
       {"unknown device \"H100-SXM-80G\"", "did you mean \"H100-SXM-80GB\""}},
      {"unknown profile", "[runtime]\nprofile = \"torch_cpu\"\n", 2, "runtime.profile",
       {"unknown runtime profile \"torch_cpu\"", "did you mean \"torch-cpu\""}},
      {"unknown dtype", "[training]\ndtype = \"fp8\"\n", 2, "training.dtype", {"unknown dtype \"fp8\""}},
      {"unknown optimizer", "[training]\noptimizer = \"adamw8bit\"\n", 2, "training.optimizer",
       {"unknown optimizer \"adamw8bit\""}},
      {"unknown attention", "[model]\nattention = \"flash2\"\n", 2, "model.attention",
       {"unknown attention \"flash2\"", "did you mean \"flash\""}},
      {"dotted keys at the top level", "model.d_model = 64\nmodel.n_heads = 5\n", 2, "model.n_heads",
       {"does not divide"}},
  };
  TempDir dir;
  int i = 0;
  for (const Bad& c : cases) {
    INFO(c.what << ":\n" << c.toml);
    const std::string path = dir.write("bad" + std::to_string(i++) + ".toml", c.toml);
    const std::string msg = error_of(path);
    INFO("message: " << msg);
    CHECK(msg.rfind(path + ":" + std::to_string(c.line) + ": " + c.key + ": ", 0) == 0);
    for (const std::string& f : c.fragments) CHECK(contains(msg, f));
    CHECK_FALSE(contains(msg, "\n"));
  }
}

TEST_CASE("study::load_scenario: a TOML syntax error names the file and line", "[scenario]") {
  TempDir dir;
  for (const auto& [text, line] : std::vector<std::pair<std::string, int>>{
           {"[model]\nd_model = 64\nn_heads = = 3\n", 3},
           {"[model]\nd_model = 64\nd_model = 128\n", 3},  // duplicate key
           {"[model\nd_model = 64\n", 1},
           {"[model]\nfamily = \"llama\n", 2},            // unterminated string
           {"[model]\nvocab_size = 40000000000000000000\n", 2},  // beyond int64: TOML rejects it
       }) {
    INFO(text);
    const std::string path = dir.write("syntax.toml", text);
    const std::string msg = error_of(path);
    INFO("message: " << msg);
    CHECK(msg.rfind(path + ":" + std::to_string(line) + ": ", 0) == 0);
    CHECK_FALSE(contains(msg, "\n"));
  }
}

TEST_CASE("study::load_scenario: an unreadable file or a directory is an InputError naming it", "[scenario]") {
  TempDir dir;
  const std::string missing = dir.path() + "/missing.toml";
  std::string msg = error_of(missing);
  CHECK(msg.rfind(missing + ": ", 0) == 0);
  CHECK(contains(msg, "cannot read"));
  // A directory opens as a stream that reads nothing; it must not load as all defaults.
  msg = error_of(dir.path());
  CHECK(msg.rfind(dir.path() + ": ", 0) == 0);
  CHECK(contains(msg, "directory"));
}

TEST_CASE("study::load_scenario: --set overrides values and is the location of their errors", "[scenario]") {
  TempDir dir;
  const std::string path = dir.write("base.toml", "[model]\nd_model = 64\nn_heads = 4\n");
  study::Scenario s = study::load_scenario(
      path, {"model.d_model=128", "model.family=llama", "model.dropout=0", "model.tie_embeddings=true",
             "device.name=\"A100-80GB\"", "training.batch_size=3", "model.rope_theta=1e6"});
  CHECK(s.model.d_model == 128);
  CHECK(s.model.family == graph::Family::llama);
  CHECK(s.model.tied());
  CHECK(s.device.name == "A100-80GB");
  CHECK(s.training.batch_size == 3);
  CHECK(s.model.rope_theta == 1e6);
  CHECK(s.where("model.d_model") == "--set: model.d_model");
  CHECK(s.where("model.n_heads") == path + ":3: model.n_heads");
  // Later overrides win.
  CHECK(study::load_scenario("", {"training.batch_size=3", "training.batch_size=5"}).training.batch_size == 5);

  struct Bad {
    std::vector<std::string> sets;
    std::string prefix;
    std::vector<std::string> fragments;
  };
  const Bad cases[] = {
      {{"model.d_model=0"}, "--set: model.d_model: ", {"positive"}},
      {{"model.n_head=4"}, "--set: model.n_head: ", {"unknown key", "did you mean \"model.n_heads\""}},
      {{"model.d_model=abc"}, "--set: model.d_model: ", {"expected an integer", "\"abc\""}},
      {{"model.family=lama"}, "--set: model.family: ", {"did you mean \"llama\""}},
      {{"runtime.profile=torch-gpu"}, "--set: runtime.profile: ", {"unknown runtime profile"}},
      {{"device.name=H100"}, "--set: device.name: ", {"unknown device \"H100\""}},
      {{"model.n_heads=7"}, "--set: model.n_heads: ", {"does not divide"}},
      {{"model.vocab_size=4000000000000000000"}, "--set: model.vocab_size: ", {"overflows int64"}},
      {{"model.family=llama", "model.dropout=0.1"}, "--set: model.dropout: ", {"llama has no dropout"}},
      {{"model.attention=flash", "runtime.profile=torch-cpu"}, "--set: model.attention: ", {"torch-cuda"}},
      {{"model.d_model"}, "--set model.d_model: ", {"expected KEY=VALUE"}},
      {{"=3"}, "--set =3: ", {"expected KEY=VALUE"}},
  };
  for (const Bad& c : cases) {
    INFO(c.sets.back());
    const std::string msg = error_of(path, c.sets);
    INFO("message: " << msg);
    CHECK(msg.rfind(c.prefix, 0) == 0);
    for (const std::string& f : c.fragments) CHECK(contains(msg, f));
  }
  // A file's llama plus a --set dropout: the error is the --set's.
  const std::string llama = dir.write("llama.toml", "[model]\nfamily = \"llama\"\nd_model = 64\nn_heads = 4\n");
  CHECK(error_of(llama, {"model.dropout=0.1"}).rfind("--set: model.dropout: ", 0) == 0);
  // And the reverse: a file's dropout made invalid by a --set family blames the file's line.
  const std::string drop = dir.write("drop.toml", "[model]\ndropout = 0.1\n");
  CHECK(error_of(drop, {"model.family=llama"}).rfind(drop + ":2: model.dropout: ", 0) == 0);
}

TEST_CASE("study::apply_overrides: a loaded scenario takes further overrides and is validated again", "[scenario]") {
  study::Scenario s = study::load_scenario("", {"model.d_model=64", "model.n_heads=4"});
  study::apply_overrides(s, {"training.batch_size=32"});
  CHECK(s.training.batch_size == 32);
  CHECK(s.model.d_model == 64);
  REQUIRE_THROWS_AS(study::apply_overrides(s, {"model.n_heads=6"}), InputError);
  try {
    study::Scenario t = s;
    study::apply_overrides(t, {"model.n_heads=6"});
  } catch (const InputError& e) {
    CHECK(std::string(e.what()).rfind("--set: model.n_heads: ", 0) == 0);
  }
}
