// The recompute confirmation and the result digest (replay.hpp).
#include <fmt/format.h>

#include <algorithm>

#include "actsim/replay/replay.hpp"
#include "actsim/util/hash.hpp"

namespace actsim::replay {

std::vector<std::string> recompute_policies(const std::vector<std::string>& asked, const std::string& own) {
  std::vector<std::string> policies;
  for (const std::string& p : asked) {
    if (p != "none") policies.push_back(p);
  }
  if (own != "none" && std::find(policies.begin(), policies.end(), own) == policies.end()) policies.push_back(own);
  return policies;
}

RecomputeCheck confirm_recompute(const std::vector<std::string>& policies,
                                 const std::function<schedule::Schedule(const std::string& policy)>& schedule_of,
                                 backends::Backend& be, uint64_t seed) {
  auto run_policy = [&](const std::string& p) {
    const schedule::Schedule ps = schedule_of(p);
    schedule::validate_schedule(ps);
    return run(ps, be, {.seed = seed, .stop_after_backward = true});
  };
  const ReplayResult ref = run_policy("none");
  RecomputeCheck c;
  for (const std::string& p : policies) {
    const bool equal = grads_equal(ref, run_policy(p));
    c.items.push_back({p, equal});
    c.ok = c.ok && equal;
  }
  return c;
}

std::string result_digest(const ReplayResult& r) {
  util::Fnv1a h;
  h.add_bytes(r.loss_bytes.data(), r.loss_bytes.size());
  for (const auto& v : r.grads) h.add_bytes(v.data(), v.size());
  for (const auto& v : r.params_after) h.add_bytes(v.data(), v.size());
  return fmt::format("{:016x}", h.value());
}

}  // namespace actsim::replay
