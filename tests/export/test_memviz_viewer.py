"""Opens actsim's memory_viz snapshots in PyTorch's own viewer (MemoryViz.js) in headless Chromium,
in all three of its views, and checks what the viewer itself computed:

  Active Memory Timeline          no error; polygons drawn; the largest total (the y-axis domain and
                                  the top of the stacked polygons) == the simulated peak
  Active Cached Segment Timeline  same, against the largest reserved total (replayed here)
  Allocator State History         no error; segments and blocks drawn; "N allocated" after the last
                                  event == live bytes at the end, and after the peak event == peak

The page is the one torch.cuda._memory_viz.trace_plot / segment_plot build (torch 2.x); only its
imports are pointed at local files: MemoryViz.js (the page loads it from a CDN) and d3 5 (Debian's
node-d3 5.16; MemoryViz.js imports d3 5 from a CDN). Served from 127.0.0.1 only.

Skips (exit 77) when a piece is absent: Chromium, torch 2.x in .venv, node-d3, or MemoryViz.js —
the torch 2.13.0 CPU wheel does not ship it, so it is looked for in $ACTSIM_MEMORYVIZ_JS, then in
torch/utils/viz/MemoryViz.js of the installed torch.

usage: test_memviz_viewer.py ACTSIM [VENV_PYTHON]   (re-runs itself under VENV_PYTHON, torch 2.x's)
"""
import functools
import http.server
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import MEDIUM, TINY  # noqa: E402

SKIP = 77
D3_CANDIDATES = ["/usr/share/nodejs/d3/dist/d3.js", "/usr/lib/nodejs/d3/dist/d3.js"]
VIEWS = ("Active Memory Timeline", "Active Cached Segment Timeline", "Allocator State History")

# Runs before the viewer's module: collects every error (script errors, failed loads, rejected
# promises, console.error) and, once the page has settled, measures the visible view and writes a
# JSON report into <pre id="actsim-result"> for --dump-dom.
HARNESS = r"""<script>
window.__actsim = {errors: []};
window.addEventListener('error', e => {
  const where = e.target && e.target !== window ? ' loading ' + (e.target.src || e.target.href || e.target.tagName) : '';
  __actsim.errors.push('error: ' + (e.message || '') + where + (e.filename ? ' at ' + e.filename + ':' + e.lineno : ''));
}, true);
window.addEventListener('unhandledrejection', e => __actsim.errors.push('unhandled rejection: ' + e.reason));
(() => {
  const original = console.error;
  console.error = (...a) => { __actsim.errors.push('console.error: ' + a.join(' ')); original.apply(console, a); };
})();
function __actsim_bytes(text) {  // formatSize() writes "1.2MiB (1234567 bytes)"
  const m = /\((-?\d+) bytes\)/.exec(text || '');
  return m ? Number(m[1]) : null;
}
function __actsim_allocated(text) {  // "(X allocated / Y reserved)"
  const m = /^\((.*?) allocated \/ (.*?) reserved\)/.exec(text || '');
  return m ? [__actsim_bytes(m[1]), __actsim_bytes(m[2])] : null;
}
function __actsim_measure(r) {
  const shown = [...document.querySelectorAll('body > div')].filter(d => (d.getAttribute('style') || '').includes('display: float'));
  r.shown_divs = shown.length;
  if (shown.length !== 1) return;
  const div = shown[0];
  const svgs = div.querySelectorAll('svg');
  r.svgs = svgs.length;
  if (r.view === 'Allocator State History') {
    const outer = div.firstElementChild;
    const info = outer.querySelector(':scope > pre');
    const events = outer.querySelector(':scope > div');
    r.events = events ? events.children.length : 0;
    r.rects = svgs.length ? svgs[0].querySelectorAll('rect').length : 0;
    r.at_last = __actsim_allocated(info && info.textContent);
    const peak_idx = Number(new URLSearchParams(location.search).get('peak_idx'));
    if (events && peak_idx >= 0 && peak_idx < events.children.length) {
      events.children[peak_idx].dispatchEvent(new MouseEvent('mousedown', {bubbles: true}));
      r.at_peak = __actsim_allocated(info.textContent);
      r.peak_event_text = events.children[peak_idx].textContent;
    }
    return;
  }
  const plot = svgs[0];
  const polygons = [...plot.querySelectorAll('polygon')];
  r.polygons = polygons.length;
  r.drawn_polygons = polygons.filter(p => /\d/.test(p.getAttribute('points') || '')).length;
  // The top of the stack: each polygon's offsets + size, as process_alloc_data computed them.
  let top = 0;
  for (const p of polygons) {
    const d = p.__data__;
    if (!d || !d.offsets) continue;
    if (Array.isArray(d.size)) {
      for (let i = 0; i < d.size.length; i++) top = Math.max(top, d.offsets[i + 1] + d.size[i]);
    } else {
      for (const o of d.offsets) top = Math.max(top, o + d.size);
    }
  }
  r.top_of_stack = top;
  // The y-axis domain (the viewer's max_size): from two ticks, H * (v1 - v0) / (y0 - y1) (d3's
  // axis shifts every tick by the same half pixel, which the difference cancels).
  const H = 576;
  const ticks = [];
  for (const t of plot.querySelectorAll('g.tick')) {
    const m = /translate\(\s*[-\d.e]+\s*,\s*([-\d.e]+)\s*\)/.exec(t.getAttribute('transform') || '');
    if (m) ticks.push([t.__data__, Number(m[1])]);
  }
  ticks.sort((a, b) => a[0] - b[0]);
  let domain = null;
  if (ticks.length >= 2) {
    const [v0, y0] = ticks[0], [v1, y1] = ticks[ticks.length - 1];
    domain = H * (v1 - v0) / (y0 - y1);
  }
  r.axis_max = domain === null ? null : Math.round(domain);
  r.legend = [...plot.querySelectorAll('text')].map(t => t.textContent).filter(s => /^[a-z_ ()]+$/.test(s));
}
function __actsim_report(r) {
  r.errors = __actsim.errors;
  const pre = document.createElement('pre');
  pre.id = 'actsim-result';
  pre.textContent = JSON.stringify(r);
  document.body.appendChild(pre);
}
window.addEventListener('load', () => setTimeout(() => {
  const r = {};
  try {
    const selects = document.querySelectorAll('body > select');
    const view = selects[1];
    const want = new URLSearchParams(location.search).get('view');
    r.view_on_load = view ? view.value : null;
    if (view && want && view.value !== want) {  // as a user does: pick the view in the drop-down
      view.value = want;
      view.dispatchEvent(new Event('change'));
    }
    r.view = view ? view.value : null;
  } catch (e) {
    __actsim.errors.push('harness: ' + e);
  }
  setTimeout(() => {
    try { __actsim_measure(r); } catch (e) { __actsim.errors.push('harness: ' + e + ' ' + e.stack); }
    __actsim_report(r);
  }, 500);
}, 300));
</script>
"""


def find_chromium():
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


def find_memoryviz(torch_dir):
    for path in (os.environ.get("ACTSIM_MEMORYVIZ_JS", ""), os.path.join(torch_dir, "utils", "viz", "MemoryViz.js")):
        if path and os.path.isfile(path):
            return path
    return None


def d3_modules(d3_path):
    """ES modules for Debian's UMD d3 bundle (MemoryViz.js imports d3 as a module; Debian ships
    d3 5.16 as a UMD script). d3-live.mjs makes globalThis.d3 an object whose properties are
    accessors of its exported bindings, so that d3.js, imported next, fills them and every later
    change (d3.event, set during each event listener) is seen by the importer, as with ES d3."""
    with open(d3_path, encoding="utf-8") as f:
        src = f.read()
    version = re.search(r"https://d3js\.org v(\d+\.\d+\.\d+)", src)
    assert version and version.group(1).startswith("5."), f"{d3_path}: not d3 5 ({version and version.group(1)})"
    names = sorted(set(re.findall(r"^\s*exports\.([A-Za-z_$][\w$]*)\s*=", src, re.M)))
    assert {"scaleLinear", "axisLeft", "brushX", "zoom", "event", "select"} <= set(names), "d3 bundle: exports not found"
    live = "".join(f"export let {n};\n" for n in names) + "globalThis.d3 = {};\n" + "".join(
        f"Object.defineProperty(globalThis.d3, '{n}', {{get: () => {n}, set: v => {{ {n} = v; }}, enumerable: true}});\n"
        for n in names)
    entry = "export * from './d3-live.mjs';\nimport './d3.js';\n"
    return {"d3-live.mjs": live, "d3.mjs": entry}, version.group(1)


def rewrite_viewer(js):
    """MemoryViz.js with its d3 imports pointed at the local module; nothing else changes."""
    out, n = re.subn(r'from\s+"https://cdn\.skypack\.dev/d3(?:-[a-z]+)?@\d+"', 'from "./d3.mjs"', js)
    assert n >= 1, "MemoryViz.js: no d3 import found to point at the local d3"
    assert "cdn." not in out.split("const schemeTableau10")[0], "MemoryViz.js: an import still names a CDN"
    return out


def rewrite_page(html):
    """torch's page with its MemoryViz.js import pointed at the local copy, and the harness."""
    out, n = re.subn(r'from\s+"https?://[^"]*/MemoryViz\.js"', 'from "./MemoryViz.js"', html)
    if n == 0:
        assert "add_local_files" in html and "import" not in html.split("add_local_files")[0][-200:], "unexpected page"
    assert "<head>" in out
    return out.replace("<head>", "<head>\n" + HARNESS, 1)


class Quiet(http.server.SimpleHTTPRequestHandler):
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map, ".mjs": "text/javascript",
                      ".js": "text/javascript"}

    def log_message(self, *args):
        pass


def run_chromium(exe, url, log_path):
    profile = tempfile.mkdtemp(prefix="actsim_chromium_")
    try:
        cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--enable-logging=stderr", "--v=0", f"--user-data-dir={profile}", "--window-size=1400,1000",
               "--virtual-time-budget=20000", "--dump-dom", url]
        p = subprocess.run(cmd, capture_output=True, timeout=180)
        with open(log_path, "ab") as f:
            f.write(p.stderr)
        return p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace")
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def console_errors(stderr):
    """Uncaught errors and failed loads that Chromium logged from the page's console."""
    bad = []
    for line in stderr.splitlines():
        if "CONSOLE" in line and re.search(r"Uncaught|Error|Failed to load|blocked", line):
            bad.append(line.strip())
    return bad


def expected(snap, summary):
    """What the viewer must compute, replayed here from the snapshot and the simulator's summary."""
    trace = snap["device_traces"][0]
    # Reserved bytes over time (the segment timeline): the segments at the start are the final ones
    # minus those the trace allocated, plus those it freed.
    reserved = sum(s["total_size"] for s in snap["segments"])
    for e in trace:
        reserved += e["size"] if e["action"] == "segment_free" else -e["size"] if e["action"] == "segment_alloc" else 0
    max_reserved = reserved
    for e in trace:
        reserved += e["size"] if e["action"] == "segment_alloc" else -e["size"] if e["action"] == "segment_free" else 0
        max_reserved = max(max_reserved, reserved)
    # The index of the peak event in the viewer's event list (annotate_snapshot elides a
    # free_requested followed by its free_completed into one 'free').
    live = summary["live_bytes"]["step_start"]
    best, best_idx, idx = live, -1, -1
    prev = None
    for e in trace:
        merged = e["action"] == "free_completed" and prev is not None and prev["action"] == "free_requested" \
            and prev["addr"] == e["addr"]
        if not merged:
            idx += 1
        if e["action"] == "alloc":
            live += e["size"]
        elif e["action"] == "free_completed":
            live -= e["size"]
        if live > best:
            best, best_idx = live, idx
        prev = e
    return {"peak": summary["peak"]["bytes"], "replayed_peak": best, "peak_idx": best_idx,
            "end": summary["live_bytes"]["end_step"], "max_reserved": max_reserved}


def check_snapshot(exe, mv, label, folder, port, snap, summary, log_path):
    want = expected(snap, summary)
    assert want["replayed_peak"] == want["peak"], f"{label}: the trace replays to {want['replayed_peak']}, peak {want['peak']}"
    pages = {"trace": mv.trace_plot(snap), "segment": mv.segment_plot(snap)}
    for name, html in pages.items():
        with open(os.path.join(folder, f"{label}.{name}.html"), "w", encoding="utf-8") as f:
            f.write(rewrite_page(html))
    results = {}
    # Each view as torch's functions open it, and the segment timeline picked in the drop-down
    # (torch 2.13's trace_plot(plot_segments=True) names a view, "Active Cached Memory Timeline",
    # that this MemoryViz.js does not have).
    for view, page in (("Active Memory Timeline", "trace"), ("Allocator State History", "segment"),
                       ("Active Cached Segment Timeline", "trace")):
        q = f"?view={view.replace(' ', '%20')}&peak_idx={want['peak_idx']}"
        url = f"http://127.0.0.1:{port}/{label}.{page}.html{q}"
        dom, stderr = run_chromium(exe, url, log_path)
        m = re.search(r'<pre id="actsim-result">(.*?)</pre>', dom, re.S)
        assert m, f"{label} / {view}: the page never settled (no harness report); console: {console_errors(stderr)[:5]}"
        r = json.loads(m.group(1).replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", '"').replace("&amp;", "&"))
        errors = r["errors"] + console_errors(stderr)
        assert not errors, f"{label} / {view}: errors in the viewer: {errors[:5]}"
        assert r["view"] == view and r["shown_divs"] == 1, f"{label} / {view}: view not shown: {r}"
        if view == "Allocator State History":
            assert r["events"] > 0 and r["rects"] > 0, f"{label}: nothing drawn: {r}"
            assert r["at_last"] and r["at_last"][0] == want["end"], f"{label}: after the last event {r['at_last']}, end {want['end']}"
            assert r["at_peak"] and r["at_peak"][0] == want["peak"], f"{label}: at the peak event {r['at_peak']}, peak {want['peak']}"
            got = r["at_peak"][0]
        else:
            target = want["peak"] if view == "Active Memory Timeline" else want["max_reserved"]
            assert r["drawn_polygons"] >= 2, f"{label} / {view}: no polygons drawn: {r}"
            assert r["top_of_stack"] == target, f"{label} / {view}: viewer's largest total {r['top_of_stack']}, expected {target}"
            assert r["axis_max"] == target, f"{label} / {view}: y-axis domain {r['axis_max']}, expected {target}"
            if view == "Active Memory Timeline":
                assert "unknown" in r["legend"], f"{label}: legend {r['legend']}"
            got = r["top_of_stack"]
        results[view] = got
        print(f"ok: {label} / {view}: viewer {got} bytes"
              + (f" (peak {want['peak']})" if view != "Active Cached Segment Timeline" else f" (reserved max {want['max_reserved']})")
              + (f", {r['drawn_polygons']} polygons" if "drawn_polygons" in r else f", {r['rects']} rects, {r['events']} events"))
    return results


def run_actsim(actsim, command, sets, out, max_events=0):
    cmd = [actsim, command, "--json", "--memviz", out]
    if command == "simulate":
        cmd.append("--no-fit")
    else:  # a budget under the baseline peak: the plan recomputes blocks
        cmd += ["--budget", "75MB"]
    if max_events:
        cmd += ["--max-events", str(max_events)]
    for kv in sets:
        cmd += ["--set", kv]
    p = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(p.stdout)


def main():
    actsim = sys.argv[1]
    if len(sys.argv) > 2:
        venv_python = sys.argv[2]
        if not os.path.isfile(venv_python):
            print(f"{venv_python} absent (scripts/setup.sh --tests makes the .venv): skipped")
            return SKIP
        os.execv(venv_python, [venv_python, os.path.abspath(__file__), actsim])
    exe = find_chromium()
    if not exe:
        print("chromium not installed (scripts/setup.sh --tests installs it): skipped")
        return SKIP
    try:
        import torch
        import torch.cuda._memory_viz as mv
    except Exception as e:  # noqa: BLE001: any import failure means "not available"
        print(f"torch not importable from {sys.executable} ({e}): skipped")
        return SKIP
    if not hasattr(mv, "trace_plot") or not hasattr(mv, "segment_plot"):
        print(f"torch {torch.__version__} has no trace_plot/segment_plot (torch 2.x has): skipped")
        return SKIP
    d3_path = next((p for p in D3_CANDIDATES if os.path.isfile(p)), None)
    if not d3_path:
        print("Debian's node-d3 not installed (scripts/setup.sh --tests installs it): skipped")
        return SKIP
    viewer = find_memoryviz(os.path.dirname(torch.__file__))
    if not viewer:
        print(f"MemoryViz.js not found: torch {torch.__version__}'s wheel does not ship it; set "
              "ACTSIM_MEMORYVIZ_JS to a copy of torch/utils/viz/MemoryViz.js: skipped")
        return SKIP

    folder = tempfile.mkdtemp(prefix="actsim_memviz_viewer_")
    log_path = os.path.join(folder, "chromium.log")
    try:
        modules, d3_version = d3_modules(d3_path)
        shutil.copy(d3_path, os.path.join(folder, "d3.js"))
        for name, text in modules.items():
            with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
                f.write(text)
        with open(viewer, encoding="utf-8") as f:
            viewer_js = f.read()
        with open(os.path.join(folder, "MemoryViz.js"), "w", encoding="utf-8") as f:
            f.write(rewrite_viewer(viewer_js))
        version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout.strip()
        print(f"viewer: {viewer} (torch {torch.__version__}); d3 {d3_version} ({d3_path}); {version}")

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=folder))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            cases = [("tiny", "simulate", TINY, 0), ("medium", "simulate", MEDIUM, 0),
                     ("medium_max_events", "simulate", MEDIUM, 200), ("plan", "plan", MEDIUM, 0)]
            for label, command, sets, max_events in cases:
                path = os.path.join(folder, f"{label}.pickle")
                summary = run_actsim(actsim, command, sets, path, max_events)
                with open(path, "rb") as f:
                    snap = pickle.load(f)
                check_snapshot(exe, mv, label, folder, server.server_address[1], snap, summary, log_path)
        finally:
            server.shutdown()
    except AssertionError:
        print(f"(files kept in {folder}; chromium's log: {log_path})")
        raise
    shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
