// zero_redundancy (issue 13): the rank classes of torch's ZeroRedundancyOptimizer (analyze.hpp).
#include <algorithm>
#include <map>
#include <utility>

#include "actsim/study/analyze.hpp"

namespace actsim::study {

Analysis analyze_zero_redundancy(const Scenario& s, const graph::RuntimeProfile& runtime) {
  const int64_t N = s.training.parallel.dp;
  auto rank_scenario = [&](int64_t r) {
    Scenario sr = s;
    sr.training.parallel.zero_rank = r;
    return sr;
  };
  std::vector<std::shared_ptr<Analysis>> analyses;
  analyses.push_back(std::make_shared<Analysis>(analyze(rank_scenario(0), runtime)));
  // The partition of the optimizer's parameters (measure.py: those that require grad), as the
  // lowering makes it (lower_zero_redundancy.cpp).
  const graph::Graph& g = analyses[0]->step->graph;
  std::vector<int64_t> numels, sizes;
  for (graph::TensorId p : analyses[0]->step->params) {
    const graph::Tensor& t = g.tensor(p);
    if (!t.requires_grad) continue;
    numels.push_back(graph::numel(t.shape));
    sizes.push_back(graph::dtype_size(t.dtype));
  }
  const std::vector<int64_t> rank = graph::zero_redundancy_partition(numels, N);
  // Each rank's parameter sizes in its local optimizer's order (numel, largest first; stable).
  std::vector<std::vector<std::pair<int64_t, int64_t>>> key(static_cast<size_t>(N));
  std::vector<int64_t> elements(static_cast<size_t>(N), 0);
  for (size_t k = 0; k < numels.size(); ++k) {
    key[static_cast<size_t>(rank[k])].emplace_back(numels[k], sizes[k]);
    elements[static_cast<size_t>(rank[k])] += numels[k];
  }
  auto zr = std::make_shared<ZeroRedundancyRanks>();
  std::map<std::vector<std::pair<int64_t, int64_t>>, size_t> class_of;
  for (int64_t r = 0; r < N; ++r) {
    auto& kr = key[static_cast<size_t>(r)];
    std::stable_sort(kr.begin(), kr.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
    auto [it, fresh] = class_of.emplace(kr, zr->classes.size());
    if (fresh) {
      zr->classes.push_back({.ranks = {}, .params = elements[static_cast<size_t>(r)], .analysis = nullptr});
      if (r > 0) analyses.push_back(std::make_shared<Analysis>(analyze(rank_scenario(r), runtime)));
    }
    zr->classes[it->second].ranks.push_back(r);
  }
  for (size_t c = 1; c < analyses.size(); ++c) {
    if (analyses[c]->result.peak_bytes > analyses[static_cast<size_t>(zr->worst)]->result.peak_bytes) {
      zr->worst = static_cast<int>(c);
    }
  }
  Analysis out = std::move(*analyses[static_cast<size_t>(zr->worst)]);
  for (size_t c = 0; c < analyses.size(); ++c) {
    if (static_cast<int>(c) != zr->worst) zr->classes[c].analysis = analyses[c];
  }
  // out.scenario keeps the class's rank (zero_rank): what is asked of this analysis later (fit's
  // batch search) lowers the partition with the highest peak (the partition does not depend on
  // the batch size).
  out.zero_ranks = std::move(zr);
  return out;
}

}  // namespace actsim::study
