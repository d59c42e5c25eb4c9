// See cuts.hpp. Boost.Graph's biconnected_components (Hopcroft-Tarjan) on the undirected view of
// the forward dataflow graph; the block-cut tree is walked from the input's component to the loss's.
#include "actsim/graph/cuts.hpp"

#include <boost/graph/adjacency_list.hpp>
#include <boost/graph/biconnected_components.hpp>
#include <boost/property_map/property_map.hpp>

#include <algorithm>
#include <iterator>
#include <queue>

#include "actsim/util/error.hpp"

namespace actsim::graph {

namespace {

using UGraph = boost::adjacency_list<boost::vecS, boost::vecS, boost::undirectedS, boost::no_property,
                                     boost::property<boost::edge_index_t, size_t>>;

constexpr uint32_t kOut = UINT32_MAX;  // not a vertex of the dataflow graph

}  // namespace

std::vector<CutTensor> forward_cuts(const Graph& g, TensorId source, TensorId sink) {
  const size_t n_t = g.tensors().size();
  // Activations: tensors that depend on an input leaf, and the forward ops that read one.
  std::vector<bool> act(n_t, false);
  for (size_t t = 0; t < n_t; ++t) {
    const Tensor& tt = g.tensor(TensorId{static_cast<uint32_t>(t)});
    act[t] = tt.producer == kNoOp && g.storage(tt.storage).category == Category::input;
  }
  std::vector<uint32_t> vertex_of_t(n_t, kOut);
  std::vector<OpId> ops;      // forward ops in the dataflow graph, in order
  std::vector<uint32_t> vertex_of_op;
  uint32_t n_v = 0;
  for (size_t i = 0; i < g.n_ops(); ++i) {
    const Op& op = g.ops()[i];
    if (op.phase != Phase::forward) continue;
    bool reads = false;
    for (TensorId t : op.inputs) reads = reads || act[index(t)];
    if (!reads) continue;
    for (TensorId t : op.outputs) act[index(t)] = true;
    ops.push_back(OpId{static_cast<uint32_t>(i)});
  }
  if (ops.empty()) return {};
  if (source == kNoTensor) {
    for (TensorId t : g.op(ops.front()).inputs) {
      if (act[index(t)] && g.tensor(t).producer == kNoOp) {
        source = t;
        break;
      }
    }
  }
  if (sink == kNoTensor) sink = g.op(ops.back()).outputs.at(0);
  ACTSIM_ASSERT(source != kNoTensor && act[index(source)] && act[index(sink)], "forward_cuts: no input or output");

  // Vertices: tensors (in id order, as they are first met) and ops; an edge per read and write.
  UGraph u;
  auto tv = [&](TensorId t) {
    uint32_t& v = vertex_of_t[index(t)];
    if (v == kOut) v = n_v++, boost::add_vertex(u);
    return v;
  };
  size_t n_e = 0;
  vertex_of_op.reserve(ops.size());
  for (OpId o : ops) {
    const uint32_t ov = n_v++;
    boost::add_vertex(u);
    vertex_of_op.push_back(ov);
    const Op& op = g.op(o);
    for (const auto* list : {&op.inputs, &op.outputs}) {
      for (TensorId t : *list) {
        if (!act[index(t)]) continue;
        boost::add_edge(tv(t), ov, n_e++, u);
      }
    }
  }
  // A tensor read twice by one op (x * x) makes a parallel edge: harmless for both algorithms.
  std::vector<size_t> component(n_e);
  auto comp = boost::make_iterator_property_map(component.begin(), boost::get(boost::edge_index, u));
  std::vector<UGraph::vertex_descriptor> art;
  const size_t n_comp = boost::biconnected_components(u, comp, std::back_inserter(art)).first;

  // The block-cut tree: component nodes 0..n_comp-1, articulation point a as node n_comp + k.
  std::vector<int64_t> art_node(n_v, -1);
  for (size_t k = 0; k < art.size(); ++k) art_node[art[k]] = static_cast<int64_t>(n_comp + k);
  const size_t n_tree = n_comp + art.size();
  std::vector<std::vector<uint32_t>> adj(n_tree);
  auto [ei, ee] = boost::edges(u);
  for (; ei != ee; ++ei) {
    const size_t c = component[boost::get(boost::edge_index, u, *ei)];
    for (auto v : {boost::source(*ei, u), boost::target(*ei, u)}) {
      if (art_node[v] < 0) continue;
      auto& a = adj[static_cast<size_t>(art_node[v])];
      if (std::find(a.begin(), a.end(), static_cast<uint32_t>(c)) == a.end()) {
        a.push_back(static_cast<uint32_t>(c));
        adj[c].push_back(static_cast<uint32_t>(art_node[v]));
      }
    }
  }
  // A vertex's tree node: itself if it is an articulation point, else the component of an edge.
  auto node_of = [&](uint32_t v) -> size_t {
    if (art_node[v] >= 0) return static_cast<size_t>(art_node[v]);
    auto [oi, oe] = boost::out_edges(v, u);
    ACTSIM_ASSERT(oi != oe, "forward_cuts: an isolated vertex");
    return component[boost::get(boost::edge_index, u, *oi)];
  };
  const size_t from = node_of(vertex_of_t[index(source)]), to = node_of(vertex_of_t[index(sink)]);
  std::vector<int64_t> parent(n_tree, -2);
  std::queue<size_t> q;
  q.push(from);
  parent[from] = -1;
  while (!q.empty() && parent[to] == -2) {
    const size_t x = q.front();
    q.pop();
    for (uint32_t y : adj[x]) {
      if (parent[y] != -2) continue;
      parent[y] = static_cast<int64_t>(x);
      q.push(y);
    }
  }
  ACTSIM_ASSERT(parent[to] != -2, "forward_cuts: the loss does not depend on the input");
  // Tensor articulation points on the path (walked back from the loss), source and sink aside.
  std::vector<uint32_t> vertex_tensor(n_v, kOut);
  for (size_t t = 0; t < n_t; ++t) {
    if (vertex_of_t[t] != kOut) vertex_tensor[vertex_of_t[t]] = static_cast<uint32_t>(t);
  }
  std::vector<CutTensor> out;
  for (int64_t x = static_cast<int64_t>(to); x >= 0; x = parent[static_cast<size_t>(x)]) {
    if (static_cast<size_t>(x) < n_comp) continue;
    const uint32_t v = static_cast<uint32_t>(art[static_cast<size_t>(x) - n_comp]);
    const uint32_t t = vertex_tensor[v];
    if (t == kOut || t == index(source) || t == index(sink)) continue;
    out.push_back({TensorId{t}, g.tensor(TensorId{t}).producer});
  }
  std::reverse(out.begin(), out.end());
  for (size_t k = 1; k < out.size(); ++k) {
    ACTSIM_ASSERT(index(out[k - 1].producer) < index(out[k].producer), "forward_cuts: cuts out of forward order");
  }
  return out;
}

}  // namespace actsim::graph
