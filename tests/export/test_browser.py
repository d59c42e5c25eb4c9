"""Renders the HTML report (and the SVG chart alone) in headless Chromium and checks that the chart
was drawn: category-coloured pixels in the chart area of the screenshot, and the peak label in the
DOM. Exits 77 (skipped) when chromium is not installed (tests/export/setup.sh installs it).

usage: test_browser.py ACTSIM_EXPORT_FIXTURE
"""
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib

from common import MEDIUM, run_exports

# category_colour() in report/src/export_trace.cpp, in Category order.
COLOURS = ["#4e79a7", "#9c755f", "#f28e2b", "#76b7b2", "#e15759", "#59a14f", "#edc948"]
WIDTH, HEIGHT = 1200, 900


def chromium():
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


def run_chromium(exe, args, url):
    profile = tempfile.mkdtemp(prefix="actsim_chromium_")
    try:
        cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--hide-scrollbars", f"--user-data-dir={profile}", f"--window-size={WIDTH},{HEIGHT}"] + args + [url]
        return subprocess.run(cmd, check=True, capture_output=True, timeout=120).stdout.decode("utf-8", "replace")
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def decode_png(path):
    """Returns (width, height, rows of (r, g, b)) of an 8-bit RGB/RGBA PNG, with zlib and struct only."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat = 8, b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            w, h, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    assert depth == 8 and ctype in (2, 6) and interlace == 0, (depth, ctype, interlace)
    bpp = 3 if ctype == 2 else 4
    raw = zlib.decompress(idat)
    stride = w * bpp
    prev = bytearray(stride)
    rows = []
    i = 0
    for _ in range(h):
        ftype = raw[i]
        line = bytearray(raw[i + 1:i + 1 + stride])
        i += 1 + stride
        for x in range(stride):
            a = line[x - bpp] if x >= bpp else 0
            b = prev[x]
            c = prev[x - bpp] if x >= bpp else 0
            if ftype == 1:
                line[x] = (line[x] + a) & 0xff
            elif ftype == 2:
                line[x] = (line[x] + b) & 0xff
            elif ftype == 3:
                line[x] = (line[x] + (a + b) // 2) & 0xff
            elif ftype == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[x] = (line[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xff
        rows.append([tuple(line[x:x + 3]) for x in range(0, stride, bpp)])
        prev = line
    return w, h, rows


def coloured_pixels(rows):
    """Pixels close to a category colour, per category (the areas are drawn at 90% opacity)."""
    targets = [tuple(int(c[k:k + 2], 16) for k in (1, 3, 5)) for c in COLOURS]
    counts = [0] * len(targets)
    for row in rows:
        for px in row:
            for k, t in enumerate(targets):
                if sum(abs(px[j] - t[j]) for j in range(3)) <= 60:
                    counts[k] += 1
                    break
    return counts


def check(exe, folder, page, min_pixels):
    url = "file://" + os.path.join(folder, page)
    png = os.path.join(folder, page + ".png")
    run_chromium(exe, [f"--screenshot={png}"], url)
    w, h, rows = decode_png(png)
    assert (w, h) == (WIDTH, HEIGHT), (w, h)
    counts = coloured_pixels(rows)
    # The activations and parameters areas must both be visible.
    assert counts[4] >= min_pixels and counts[0] >= min_pixels, f"chart not drawn? category pixels {counts}"
    dom = run_chromium(exe, ["--dump-dom"], url)
    assert 'id="peak-label"' in dom, "peak label missing from the DOM"
    start = dom.index('id="peak-label"')
    assert "peak " in dom[start:start + 400]
    return counts


def main():
    exe = chromium()
    if not exe:
        print("chromium not installed (run tests/export/setup.sh): skipped")
        return 77
    actsim = sys.argv[1]
    folder, summary = run_exports(actsim, MEDIUM)
    try:
        for page in ("report.html", "chart.svg"):
            counts = check(exe, folder, page, 500)
            print(f"ok: {page}: category pixels {counts}")
    finally:
        shutil.rmtree(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
