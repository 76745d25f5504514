"""The Dagster UI in a real browser: start `featurelake ui`, launch one activations partition from the
asset page, see the run succeed, stop the server and every process it started.

Chromium is Debian's (/usr/bin/chromium, installed by `make test`), driven by Playwright's Python API.
The server runs on the tiny random Gemma 3 and the small registry, with the lake and DAGSTER_HOME in tmp.
It is started the way a background shell starts it (SIGINT and SIGTERM ignored) and must still stop on
SIGTERM, children included.
"""

import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "dagster_project.cli"]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PARTITION = "oo|1"  # dataset|layer: the smallest dataset at the tiny profile's layer
VIEWPORT = {"width": 1600, "height": 1000}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ignore_stop_signals() -> None:
    """What `cmd &` in a non-interactive shell does: the child starts with SIGINT (and here SIGTERM) ignored."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def wait_until_answering(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"featurelake ui exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{url}/server_info", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"the UI did not answer within {timeout}s:\n{log.read_text()[-4000:]}")


def listening_addresses(port: int) -> set[str]:
    """Local addresses of the LISTEN sockets on ``port``, from /proc/net/tcp and tcp6."""
    found = set()
    for name, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in Path(f"/proc/net/{name}").read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.split(":")
            if state == "0A" and int(p, 16) == port:  # 0A: TCP_LISTEN
                raw = bytes.fromhex(addr)
                raw = b"".join(struct.pack("<I", w) for w in struct.unpack(f">{len(raw) // 4}I", raw))
                found.add(socket.inet_ntop(family, raw))
    return found


def process_groups(pgids: set[int]) -> dict[int, str]:
    """Live processes (pid -> command) whose process group is in ``pgids``."""
    alive = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()
        if fields[0] != "Z" and int(fields[2]) in pgids:
            alive[int(stat.parent.name)] = text[text.index("(") + 1:text.rindex(")")]
    return alive


def children_of(pid: int) -> set[int]:
    kids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if int(text[text.rindex(")") + 2:].split()[1]) == pid:
            kids.add(int(stat.parent.name))
    return kids


def check_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (VIEWPORT["width"], VIEWPORT["height"])
    assert len(data) > 30_000, f"{path} is {len(data)} bytes: a blank page?"


@pytest.fixture
def ui_server(tiny_profile: Path, small_registry: Path, tmp_path: Path) -> Iterator[tuple[str, dict]]:
    """`featurelake ui` on a free port, with samples, SAE and activations of layer 1 materialized by the CLI."""
    env = dict(os.environ)
    port = free_port()
    log = tmp_path / "ui.log"
    with log.open("w") as out:
        proc = subprocess.Popen([*CLI, "ui", "--port", str(port), "--stop-timeout", "20"], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_ignore_stop_signals)
    info = {"proc": proc, "port": port, "log": log, "pgids": {proc.pid}}
    try:
        # The prerequisites (samples, SAE, every activations partition) while the server starts.
        pre = subprocess.run(
            [sys.executable, "-c", "from dagster_project.cli import materialize_steps; "
             "materialize_steps(stages=('corpus', 'sae', 'activations'))"],
            env=env, capture_output=True, text=True, timeout=300)
        assert pre.returncode == 0, pre.stderr[-4000:]
        url = f"http://127.0.0.1:{port}"
        wait_until_answering(url, proc, log)
        info["pgids"] |= children_of(proc.pid)  # dagster dev leads a process group of its own
        yield url, info
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                info["stopped_rc"] = proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                pass
        for pgid in info["pgids"]:  # whatever is left, whatever happened above
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_launch_one_activations_partition_from_the_ui(ui_server: tuple[str, dict], tmp_path: Path) -> None:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import expect, sync_playwright

    url, info = ui_server
    # Only loopback: no socket of the UI listens on another address.
    assert listening_addresses(info["port"]) == {"127.0.0.1"}

    part = tmp_path / "lake" / "tiny" / "activations" / "layer=1" / "dataset=oo" / "part-0.parquet"
    before = part.stat().st_mtime_ns
    shots = tmp_path / "screenshots"
    shots.mkdir()
    assert Path(CHROMIUM).exists(), "Chromium is missing: `make test` installs it (apt-get install chromium)"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.set_default_timeout(60_000)
            # The asset graph, every group open: groups and assets the UI shows.
            page.goto(f"{url}/asset-groups")
            # On a new instance Dagster asks once (a second after the first page) to join its community.
            try:
                page.get_by_role("button", name="Skip").click(timeout=15_000)
            except PlaywrightTimeout:
                pass
            page.add_locator_handler(page.get_by_text("Join the Dagster community"),  # should it come back
                                     lambda: page.get_by_role("button", name="Skip").click())
            page.locator("button:has([aria-label=settings])").last.click()
            page.get_by_role("menuitem").filter(has_text="Expand all groups").first.click()
            page.keyboard.press("Escape")
            for name in ("samples", "sae", "activations"):
                expect(page.get_by_text(name, exact=True).first).to_be_visible()
            page.wait_for_timeout(3_000)  # the nodes' status colours come on a 2 s poll: only the picture waits
            page.screenshot(path=shots / "asset_graph.png")

            # The asset page: docstring, then Materialize -> one dataset and one layer -> launch.
            page.goto(f"{url}/assets/activations")
            expect(page.get_by_text("SAE activations of every sample at one layer")).to_be_visible()
            page.get_by_role("button", name="Materialize").first.click()
            dialog = page.get_by_role("dialog").filter(has_text="Launch runs to materialize activations")
            for key in PARTITION.split("|"):  # dataset, then layer: the dialog's order
                dialog.get_by_text("Select a partition or create one").first.click()
                page.locator(".dagster-popover").get_by_role("menuitem").filter(
                    has=page.get_by_text(key, exact=True)).first.click()
                page.keyboard.press("Escape")
            expect(dialog.get_by_text("1 partition", exact=True)).to_be_visible()
            dialog.get_by_role("button", name="Launch 1 run").click()
            toast = page.locator("a[href^='/runs/']").filter(has_text=re.compile(r"^View$"))
            run_path = toast.first.get_attribute("href")
            assert run_path and re.fullmatch(r"/runs/[0-9a-f-]{36}", run_path), run_path

            # The run page until the run ends (queued -> daemon -> run worker -> step subprocess).
            page.goto(url + run_path)
            header = page.get_by_text(re.compile(r"^(Success|Failure|Canceled)$")).first
            expect(header).to_be_visible(timeout=150_000)
            status = header.inner_text()
            assert status == "Success", f"run {run_path} ended {status}:\n{page.locator('body').inner_text()[-3000:]}"
            expect(page.get_by_text(f"partition: {PARTITION}").first).to_be_visible()
            expect(page.get_by_text("Executing steps using multiprocess executor").first).to_be_visible()
            page.screenshot(path=shots / "run_success.png")

            # The layer x dataset grid of the asset's partitions, all three materialized.
            page.goto(f"{url}/assets/activations?view=partitions")
            expect(page.get_by_text("Materialized (3)")).to_be_visible()
            page.screenshot(path=shots / "partitions.png")
        finally:
            browser.close()

    assert part.stat().st_mtime_ns > before, "the run from the UI did not rewrite the partition"
    for name in ("asset_graph.png", "run_success.png", "partitions.png"):
        check_png(shots / name)

    # SIGTERM stops the server although it started with SIGTERM ignored, and takes every child along.
    proc = info["proc"]
    assert len(info["pgids"]) == 2 and process_groups(info["pgids"])
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=40) == 0, info["log"].read_text()[-3000:]
    deadline = time.monotonic() + 10
    while (left := process_groups(info["pgids"])) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"processes left behind: {left}"
    assert not listening_addresses(info["port"])
