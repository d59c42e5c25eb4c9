// actsim::util::parallel_for — the one thread pool of the project (sweeps, fit's policies).
//
//   util::parallel_for(rows.size(), threads, [&](int64_t i) { rows[i] = analyze(scen[i]); },
//                      [&] { report_progress(); });   // optional, on the calling thread ~every 100 ms
//
// Jobs are handed out in index order to min(threads, n) workers. After a job throws, no further
// job starts; once every worker has stopped, the exception of the lowest-numbered failed job is
// rethrown on the calling thread (so the error a user sees does not depend on the timing).
#pragma once

#include <cstdint>
#include <functional>

namespace actsim::util {

void parallel_for(int64_t n, int threads, const std::function<void(int64_t)>& fn,
                  const std::function<void()>& tick = {});

// std::thread::hardware_concurrency(), at least 1.
int hardware_threads();

}  // namespace actsim::util
