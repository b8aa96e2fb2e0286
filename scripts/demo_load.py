"""Measure the demo server as visitors see it: page time, memory per visitor, culling.

    python -m rable_nb demo --run runs/NAME --port 8866 &
    python scripts/demo_load.py http://127.0.0.1:8866/ $! [VISITORS] [GAP_S]

Opens VISITORS pages (default 3) in headless Chromium (Debian's /usr/bin/chromium), each
in a browser context of its own (no cache or cookies shared, as different people), one
every GAP_S seconds (default 30: the pool refills meanwhile), each kept open; prints the
time from the request to a ready app, then the memory of every kernel of the server (RSS;
USS = what the process alone holds, freed when it ends), then closes the pages without
the shutdown request they send when left (a crash, a lost connection) and times the
culling back to the pool's kernels.
"""
import sys
import time

import psutil
from playwright.sync_api import sync_playwright


def kernels(server: int) -> list:
    found = []
    for child in psutil.Process(server).children(recursive=True):
        try:
            if "ipykernel_launcher" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:  # ended meanwhile
            pass
    return found


def mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def main(url: str, server: int, visitors: int = 3, gap: float = 30) -> None:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        pages = []
        for i in range(visitors):
            page, start = browser.new_context().new_page(), time.time()
            page.goto(url)
            page.wait_for_selector(".rable-upload", timeout=180_000)
            print(f"visitor {i + 1}: page ready in {time.time() - start:.1f} s", flush=True)
            pages.append(page)
            time.sleep(gap if i < visitors - 1 else 5)
        open_kernels = kernels(server)
        for k in open_kernels:
            m = k.memory_full_info()
            print(f"kernel {k.pid}: RSS {mib(m.rss)}, USS {mib(m.uss)}")
        print(f"{len(open_kernels)} kernels for {visitors} open pages (+ the pool); "
              f"server RSS {mib(psutil.Process(server).memory_info().rss)}")
        for page in pages:
            page.close()  # no beforeunload: only the culler ends these kernels
        start = time.time()
        while len(kernels(server)) > len(open_kernels) - visitors and time.time() - start < 600:
            time.sleep(1)
        print(f"pages closed without a goodbye: {len(kernels(server))} kernels after "
              f"{time.time() - start:.0f} s")
        browser.close()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), *(int(a) for a in sys.argv[3:4]),
         *(float(a) for a in sys.argv[4:5]))
