"""Load and fault test of the hosted set-up: worker process(es), the app server, N sessions.

    python bench/load_test.py                       # 8 sessions x 3 requests, one worker, app server
    python bench/load_test.py --fault               # SIGKILL the worker mid-batch, restart it
    python bench/load_test.py --workers 2 --no-app  # two workers on one queue
    python bench/load_test.py --hostile             # issue 13: honest phase, then the same with a hostile
                                                    # session (the 10,000-image link, a tab closed mid-capture,
                                                    # a zip-bomb upload) and the worker killed; Chromium too

Each simulated session is a thread doing what the app's data layer does in hosted mode:
``vitlens.client.Client.compute_traces`` on its own images (crops of the offline gallery,
different for every request), which queues a job and polls it. The report gives throughput,
p50/p95 latency, how the worker batched, and accounts for every job: each must end ``done``,
or ``failed`` / ``cancelled`` with a reason. Everything runs on this machine; the app server listens on
127.0.0.1 only. Loops are bounded by ``--timeout``.

``--hostile`` runs two phases on fresh images: honest sessions alone, then honest sessions
while a hostile one, in Chromium, opens the ``?images=coffee,…`` link (ten thousand copies),
opens every gallery image at a large side once the killed worker is back and closes the tab
once the job is queued (the job must end cancelled, the worker must stop after its batch), and uploads a zip-bomb ``.pth`` through the app's weights upload (then
asks the worker for the same bomb in the weights folder), while the worker is SIGKILLed and
restarted. ``--browsers N`` of the honest sessions are real Chromium pages on the app: each
request opens a link for a gallery image and uploads a fresh photograph crop through the
sidebar (latency: until the upload's charts are drawn). It reports jobs done / failed with a
reason / cancelled with a reason / lost, p50/p95 latency of the honest sessions in each phase,
the peak memory (RSS) of the app server and the worker in each phase, and the load average.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import re
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vitlens.client import Client  # noqa: E402
from vitlens.errors import VitlensError  # noqa: E402
from vitlens.images import GALLERY, DecodedImage, decode_image, gallery_image  # noqa: E402
from vitlens.jobs import CANCELLED, DONE, FAILED, FINISHED, RUNNING, JobSpec  # noqa: E402
from vitlens.models import resolve_spec, weights_fingerprint  # noqa: E402
from vitlens.settings import Settings  # noqa: E402
from vitlens.store import CaptureOptions  # noqa: E402


@dataclass
class Outcome:
    session: int
    request: int
    latency: float
    state: str  # done, failed, error
    message: str = ""
    job_id: str | None = None


@dataclass
class Run:
    outcomes: list[Outcome] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, outcome: Outcome) -> None:
        with self.lock:
            self.outcomes.append(outcome)


def main() -> int:
    args = _parser().parse_args()
    work = Path(args.dir or tempfile.mkdtemp(prefix="vitlens-load-"))
    weights_dir = work / "weights"
    weights_dir.mkdir(parents=True, exist_ok=True)
    settings = Settings(cache_dir=work / "cache", device="cpu", mode="hosted", poll_interval=0.05,
                        worker_lease=args.lease, worker_batch=args.batch, job_timeout=args.timeout,
                        worker_wait=args.timeout, job_attempts=args.attempts, weights_dir=weights_dir)
    env = _env(settings)
    if args.hostile:
        return _hostile_main(args, settings, env, work)
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    workers = [_start_worker(env, logs / f"worker{i}.log") for i in range(args.workers)]
    app = _start_app(env, logs / "app.log") if args.app else None
    client = Client(settings)
    report: dict = {"model": args.model, "side": args.side, "sessions": args.sessions, "requests_per_session": args.requests,
                    "images_per_request": args.images, "workers": args.workers, "batch": args.batch, "fault": args.fault}
    try:
        if app is not None:
            report["app"] = _wait_app(app, args.timeout)
        warm = time.monotonic()
        client.compute_traces([_image(-1, 0, 0)], args.model, "random", CaptureOptions(side=args.side), timeout=args.timeout)
        report["warm_up_s"] = round(time.monotonic() - warm, 2)  # model load + first pass, not in the numbers below
        run = Run()
        args.ready = threading.Barrier(args.sessions + 1, timeout=args.timeout)  # images prepared, then all start at once
        sessions = [threading.Thread(target=_session, args=(client, run, s, args)) for s in range(args.sessions)]
        for thread in sessions:
            thread.start()
        args.ready.wait()
        start = time.monotonic()
        killer = None
        if args.fault:
            killer = threading.Thread(target=_kill_and_restart, args=(client, workers, env, logs, args, report), daemon=True)
            killer.start()
        for thread in sessions:
            thread.join(args.timeout + 30)
        wall = time.monotonic() - start
        if killer is not None:
            killer.join(30)
        report.update(_summary(run, wall, args))
        report.update(_accounting(client, settings))
        if app is not None:
            report["app_after"] = _health(app[1])
    finally:
        for process in workers:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in workers:
            _wait(process)
        if app is not None:
            app[0].send_signal(signal.SIGTERM)
            _wait(app[0])
        client.close()
    if args.baseline:
        report.update(_baseline(args))
    _print(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    ok = report["unaccounted"] == 0 and report["jobs_unfinished"] == 0 and not report["failed_without_reason"]
    ok = ok and report["outcomes"].get("error", 0) == 0
    ok = ok and (args.fault or report["outcomes"].get("done", 0) == args.sessions * args.requests)
    return 0 if ok else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--requests", type=int, default=3, help="capture requests per session, one after another")
    parser.add_argument("--images", type=int, default=2, help="images per request")
    parser.add_argument("--model", default="vit_small_patch14_reg4_dinov2", help="timm ViT (random weights)")
    parser.add_argument("--side", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8, help="worker batch (images per forward pass)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--lease", type=float, default=10.0, help="worker lease in seconds")
    parser.add_argument("--fault", action="store_true", help="SIGKILL a worker during a batch, then restart it")
    parser.add_argument("--attempts", type=int, default=2, help="starts of a job before a crash fails it (VITLENS_JOB_ATTEMPTS)")
    parser.add_argument("--baseline", action="store_true",
                        help="afterwards, time the same captures with Engine in this process (no queue, no app)")
    parser.add_argument("--restart-after", type=float, default=1.0, help="seconds between the kill and the restart")
    parser.add_argument("--no-app", dest="app", action="store_false", help="do not start the Streamlit server")
    parser.add_argument("--timeout", type=float, default=300.0, help="bound on every wait, in seconds")
    parser.add_argument("--dir", help="working folder (default: a new temporary one)")
    parser.add_argument("--json", help="also write the report here")
    parser.add_argument("--hostile", action="store_true",
                        help="honest phase, then honest + hostile session + worker kill (see the module docstring)")
    parser.add_argument("--browsers", type=int, default=2, help="with --hostile: honest sessions that are Chromium pages")
    return parser


def _env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"VITLENS_CACHE_DIR": str(settings.cache_dir), "VITLENS_DEVICE": settings.device, "VITLENS_MODE": "hosted",
                "VITLENS_POLL_INTERVAL": str(settings.poll_interval), "VITLENS_WORKER_LEASE": str(settings.worker_lease),
                "VITLENS_WORKER_BATCH": str(settings.worker_batch), "VITLENS_JOB_ATTEMPTS": str(settings.job_attempts),
                "PYTHONPATH": str(ROOT), "VITLENS_WEIGHTS_DIR": str(settings.weights_dir),
                "VITLENS_WORKER_WAIT": str(settings.worker_wait), "VITLENS_JOB_TIMEOUT": str(settings.job_timeout),
                "HF_HUB_OFFLINE": "1"})
    return env


def _start_worker(env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vitlens", "worker"], env=env, cwd=ROOT,
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT)


def _start_app(env: dict[str, str], log: Path) -> tuple[subprocess.Popen, int]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "streamlit", "run", "app/main.py", "--server.headless", "true",
               "--server.address", "127.0.0.1", "--server.port", str(port), "--browser.gatherUsageStats", "false"]
    return subprocess.Popen(command, env=env, cwd=ROOT, stdout=open(log, "ab"), stderr=subprocess.STDOUT), port


def _health(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=5) as response:
            return response.read().decode().strip()
    except OSError as error:
        return f"unreachable ({error})"


def _wait_app(app: tuple[subprocess.Popen, int], timeout: float) -> str:
    deadline = time.monotonic() + min(timeout, 60)
    while time.monotonic() < deadline:
        if app[0].poll() is not None:
            return f"exited with {app[0].returncode}"
        if _health(app[1]) == "ok":
            return f"ok on 127.0.0.1:{app[1]}"
        time.sleep(0.5)
    return "not healthy within 60 s"


def _image(session: int, request: int, index: int) -> DecodedImage:
    """A different crop of a gallery photograph for every (session, request, index)."""
    return decode_image(_crop_png(session, request, index), name=f"s{session}r{request}i{index}")


def _crop_png(session: int, request: int, index: int) -> bytes:
    """The PNG of ``_image``'s crop (what a browser session uploads)."""
    import io

    import numpy as np

    rng = np.random.default_rng([session + 1, request, index])
    names = sorted(GALLERY)
    source = _gallery(names[int(rng.integers(len(names)))])
    width, height = source.size
    crop_w, crop_h = int(width * rng.uniform(0.5, 0.9)), int(height * rng.uniform(0.5, 0.9))
    left, top = int(rng.integers(0, width - crop_w + 1)), int(rng.integers(0, height - crop_h + 1))
    buffer = io.BytesIO()
    source.crop((left, top, left + crop_w, top + crop_h)).save(buffer, format="PNG")
    return buffer.getvalue()


@functools.lru_cache(maxsize=None)
def _gallery(name: str):
    return gallery_image(name).image


def _session(client: Client, run: Run, session: int, args: argparse.Namespace, seed: int = 0) -> None:
    options = CaptureOptions(side=args.side)
    requests = [[_image(session + seed, request, index) for index in range(args.images)] for request in range(args.requests)]
    args.ready.wait()
    for request, images in enumerate(requests):
        job_id = JobSpec(args.model, "random", tuple(image.digest for image in images), options,
                         weights_fingerprint(resolve_spec(args.model), "random")).job_id
        start = time.monotonic()
        try:
            results = client.compute_traces(images, args.model, "random", options, timeout=args.timeout)
            assert len(results) == len(images)
            run.add(Outcome(session, request, time.monotonic() - start, "done", job_id=job_id))
        except VitlensError as error:
            run.add(Outcome(session, request, time.monotonic() - start, "failed", str(error), job_id))
        except Exception as error:  # counted, reported, never hidden
            run.add(Outcome(session, request, time.monotonic() - start, "error", f"{type(error).__name__}: {error}", job_id))


def _faulted(client: Client, workers: list[subprocess.Popen], env, logs: Path, args, report: dict) -> None:
    """``_kill_and_restart``, then tell the hostile session (``args.fault_over``) that a worker is back."""
    try:
        _kill_and_restart(client, workers, env, logs, args, report)
    finally:
        args.fault_over.set()


def _kill_and_restart(client: Client, workers: list[subprocess.Popen], env, logs: Path, args, report: dict) -> None:
    """Wait for a job that is running with a batch under way, SIGKILL its worker, restart it."""
    start = time.monotonic()
    with sqlite3.connect(client.queue.db_path) as conn:
        while time.monotonic() - start < args.timeout:
            rows = conn.execute("SELECT id, worker FROM jobs WHERE state = ?", (RUNNING,)).fetchall()
            if len(rows) >= 2 or (rows and time.monotonic() - start > 5):  # a batch of several jobs, else any
                break
            time.sleep(0.01)
    if not rows:
        report["fault_note"] = "no running job was seen; nothing was killed"
        return
    victim_pid = int(rows[0][1].split(":")[1])
    index = next(i for i, process in enumerate(workers) if process.pid == victim_pid)
    workers[index].send_signal(signal.SIGKILL)
    workers[index].wait(30)
    killed_at = time.monotonic()
    report["killed"] = {"worker": rows[0][1], "its_running_jobs": sum(1 for _, worker in rows if worker == rows[0][1]),
                        "all_running_jobs": len(rows)}
    time.sleep(args.restart_after)
    workers[index] = _start_worker(env, logs / f"worker{index}-restarted.log")
    deadline = time.monotonic() + args.timeout
    while not client.queue.workers() and time.monotonic() < deadline:
        time.sleep(0.1)
    report["worker_back_s_after_kill"] = round(time.monotonic() - killed_at, 1)  # restarted, registered in the queue


def _summary(run: Run, wall: float, args: argparse.Namespace) -> dict:
    latencies = sorted(outcome.latency for outcome in run.outcomes if outcome.state == "done")
    states: dict[str, int] = {}
    for outcome in run.outcomes:
        states[outcome.state] = states.get(outcome.state, 0) + 1
    done_images = states.get("done", 0) * args.images
    return {
        "requests": len(run.outcomes),
        "outcomes": states,
        "wall_s": round(wall, 2),
        "throughput_images_per_s": round(done_images / wall, 2),
        "throughput_requests_per_s": round(states.get("done", 0) / wall, 2),
        "latency_p50_s": round(_percentile(latencies, 50), 2) if latencies else None,
        "latency_p95_s": round(_percentile(latencies, 95), 2) if latencies else None,
        "latency_max_s": round(latencies[-1], 2) if latencies else None,
        "failures": sorted({outcome.message for outcome in run.outcomes if outcome.state != "done"}),
        "unaccounted": args.sessions * args.requests - len(run.outcomes),
    }


def _percentile(values: list[float], q: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def _accounting(client: Client, settings: Settings) -> dict:
    """Every job in the queue: its final state, attempts, and how the worker batched them."""
    with sqlite3.connect(client.queue.db_path) as conn:
        rows = conn.execute("SELECT state, attempts, message, worker, started FROM jobs").fetchall()
    by_state: dict[str, int] = {}
    for state, *_ in rows:
        by_state[state] = by_state.get(state, 0) + 1
    batches = len({(worker, started) for state, _, _, worker, started in rows if state == DONE})
    done = by_state.get(DONE, 0)
    return {
        "jobs": by_state,
        "jobs_unfinished": sum(count for state, count in by_state.items() if state not in FINISHED),
        "jobs_rerun": sum(1 for _, attempts, *_ in rows if attempts > 1),
        "failed_without_reason": sum(1 for state, _, message, *_ in rows if state in (FAILED, CANCELLED) and not message),
        "failed_reasons": sorted({message for state, _, message, *_ in rows if state == FAILED}),
        "cancelled_reasons": sorted({message for state, _, message, *_ in rows if state == CANCELLED}),
        "jobs_per_batch": round(done / batches, 2) if batches else None,
    }


def _baseline(args: argparse.Namespace) -> dict:
    """The same captures straight through ``Engine`` in one process: per request, then all in one call."""
    from vitlens.engine import Engine

    requests = [[_image(s, r, i) for i in range(args.images)] for s in range(args.sessions) for r in range(args.requests)]
    engine, options = Engine(None, device="cpu", max_batch=args.batch), CaptureOptions(side=args.side)
    engine.traces(requests[0], args.model, "random", options)  # load the model
    start = time.monotonic()
    for images in requests:
        engine.traces(images, args.model, "random", options)
    one_by_one = time.monotonic() - start
    start = time.monotonic()
    engine.traces([image for images in requests for image in images], args.model, "random", options)
    together = time.monotonic() - start
    count = len(requests) * args.images
    return {"baseline_engine_per_request_images_per_s": round(count / one_by_one, 2),
            "baseline_engine_one_call_images_per_s": round(count / together, 2)}


def _wait(process: subprocess.Popen) -> None:
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


def _print(report: dict) -> None:
    width = max(map(len, report))
    for key, value in report.items():
        print(f"{key:<{width}}  {value}")


# ----------------------------------------------------------------------------------------------
# --hostile: honest phase, then hostile phase with a worker kill; Chromium sessions; peak memory
# ----------------------------------------------------------------------------------------------

HOSTILE_LINK_COPIES = 10_000
BOMB = "bomb.pth"
CLOSED_TAB_SIDE = 1024  # the closed tab's capture: all gallery images at this side (long enough to outlast ABANDON_S)


def _hostile_main(args: argparse.Namespace, settings: Settings, env: dict[str, str], work: Path) -> int:
    _write_bomb(settings.weights_dir / BOMB, args.model)
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    workers = [_start_worker(env, logs / "worker0.log")]
    app = _start_app(env, logs / "app.log")
    client = Client(settings)
    memory = _MemorySampler(lambda: {"app": [app[0].pid], "worker": [process.pid for process in workers]})
    report: dict = {"model": args.model, "side": args.side, "sessions": args.sessions, "browser_sessions": args.browsers,
                    "requests_per_session": args.requests, "images_per_request": args.images,
                    "load_average_at_start": _load_average()}
    args.work = work
    args.fault_over = threading.Event()  # the closed-tab probe waits for it, so that a live worker takes its job
    try:
        report["app"] = _wait_app(app, args.timeout)
        client.compute_traces([_image(-1, 0, 0)], args.model, "random", CaptureOptions(side=args.side), timeout=args.timeout)
        memory.start()
        url = f"http://127.0.0.1:{app[1]}"
        report["honest_only"] = _phase(client, url, args, seed=100, hostile=None)
        report["honest_only"]["peak_rss_mib"] = memory.take()
        hostile: dict = {}
        fault: dict = {}
        killer = threading.Thread(target=_faulted, args=(client, workers, env, logs, args, fault), daemon=True)
        report["with_hostile"] = _phase(client, url, args, seed=200, hostile=hostile, killer=killer)
        report["with_hostile"]["peak_rss_mib"] = memory.take()
        report["hostile"] = hostile
        report["fault"] = fault
        report["app_after"] = _health(app[1])
        report.update(_accounting(client, settings))
        report["lost"] = (report["jobs_unfinished"] + report["honest_only"]["unaccounted"]
                          + report["with_hostile"]["unaccounted"])
        report["load_average_at_end"] = _load_average()
    finally:
        memory.stop()
        for process in workers:
            process.send_signal(signal.SIGTERM)
        stop = time.monotonic()
        app[0].send_signal(signal.SIGTERM)
        _wait(app[0])
        report["app_sigterm_exit_s"] = round(time.monotonic() - stop, 2)
        for process in workers:
            _wait(process)
        client.close()
    _print(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    ok = report["lost"] == 0 and not report["failed_without_reason"] and report["app_after"] == "ok"
    return 0 if ok else 1


def _phase(client: Client, url: str, args: argparse.Namespace, seed: int, hostile: dict | None,
           killer: threading.Thread | None = None) -> dict:
    """Honest sessions (``--browsers`` of them in Chromium), optionally with the hostile session and a kill."""
    run = Run()
    honest = args.sessions - args.browsers
    args.ready = threading.Barrier(args.sessions + 1, timeout=args.timeout)  # every honest session, then the clock starts
    threads = [threading.Thread(target=_session, args=(client, run, s, args, seed)) for s in range(honest)]
    threads += [threading.Thread(target=_browser_session, args=(url, run, honest + b, args, seed)) for b in range(args.browsers)]
    if hostile is not None:
        threads.append(threading.Thread(target=_hostile_session, args=(client, url, args, hostile)))
    for thread in threads:
        thread.start()
    args.ready.wait()
    start = time.monotonic()
    if killer is not None:
        killer.start()
    for thread in threads:
        thread.join(args.timeout + 60)
    if killer is not None:
        killer.join(30)
    summary = _summary(run, time.monotonic() - start, args)
    summary["unaccounted"] = args.sessions * args.requests - len(run.outcomes)
    return summary


_PLOTS_DRAWN = """() => { const main = document.querySelector('[data-testid=stMain]');
    const plots = main ? [...main.querySelectorAll('.js-plotly-plot')] : [];
    const busy = document.querySelector('[data-stale=true], [data-testid=stMain] [data-testid=stProgress]') !== null;
    return !busy && plots.length > 0 && plots.every(p => p.data && p.data.length > 0); }"""
_PROBLEM = "[data-testid=stMain] [data-testid=stException], [data-testid=stMain] [data-testid=stAlert]"
_DRAWN_OR_PROBLEM = f"() => ({_PLOTS_DRAWN})() || document.querySelector('{_PROBLEM}') !== null"
_IMAGE_UPLOADER = "[data-testid=stSidebar] [data-testid=stFileUploader]:has-text('Upload images') input[type=file]"
_WEIGHTS_UPLOADER = "[data-testid=stSidebar] [data-testid=stFileUploader]:has-text('Weights file') input[type=file]"
_IMAGE_PICKER = "[data-testid=stMain] [data-testid=stSelectbox]:has-text('Image') input"


def _launch(playwright):
    return playwright.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--headless"])


def _browser_session(url: str, run: Run, session: int, args: argparse.Namespace, seed: int) -> None:
    """A Chromium page per request: the app's link for one gallery image, then an upload of a fresh
    photograph crop through the sidebar's file input; latency until the upload's charts are drawn."""
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        run.add(Outcome(session, 0, 0.0, "error", "playwright is not installed"))
        return
    names = sorted(GALLERY)
    uploads = [args.work / f"upload-s{session + seed}r{request}.png" for request in range(args.requests)]
    for request, path in enumerate(uploads):
        path.write_bytes(_crop_png(session + seed, request, 0))
    args.ready.wait()
    with sync_playwright() as playwright:
        browser = _launch(playwright)
        try:
            for request, upload in enumerate(uploads):
                link = (f"{url}/?model={args.model}&weights=random&compare=0&side={args.side}"
                        f"&images={names[(session + seed + request) % len(names)]}")
                page = browser.new_page()
                start = time.monotonic()
                try:
                    page.goto(link, timeout=args.timeout * 1000)
                    page.wait_for_function(_DRAWN_OR_PROBLEM, timeout=args.timeout * 1000)
                    problem = page.locator(_PROBLEM)
                    if not problem.count():
                        page.locator(_IMAGE_UPLOADER).set_input_files(str(upload))
                        expect(page.locator(_IMAGE_PICKER)).to_have_value(f"{upload.name} (upload)",
                                                                          timeout=args.timeout * 1000)
                        page.wait_for_function(_DRAWN_OR_PROBLEM, timeout=args.timeout * 1000)
                    state = "failed" if problem.count() else "done"
                    message = problem.first.inner_text()[:200] if problem.count() else ""
                    run.add(Outcome(session, request, time.monotonic() - start, state, message))
                except Exception as error:  # counted, reported, never hidden
                    run.add(Outcome(session, request, time.monotonic() - start, "error", f"{type(error).__name__}: {error}"[:200]))
                finally:
                    page.close()
        finally:
            browser.close()


def _hostile_session(client: Client, url: str, args: argparse.Namespace, report: dict) -> None:
    """Issue 13's attacks from one session: the ``coffee,`` x 10,000 link, a heavy link whose tab
    is closed mid-capture, a zip-bomb weights upload in Chromium, and a bomb in the weights folder."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = _launch(playwright)
        try:
            _hostile_link(browser, url, args, report)
            _closed_tab(browser, client, url, args, report)
            _bomb_upload(browser, url, args, report)
        finally:
            browser.close()
    start = time.monotonic()
    try:
        client.compute_traces([_image(999, 0, 0)], args.model, BOMB, CaptureOptions(side=args.side), timeout=args.timeout)
        report["bomb_in_weights_folder"] = "accepted (!)"
    except VitlensError as error:
        report["bomb_in_weights_folder"] = f"refused in {time.monotonic() - start:.1f} s: {error}"


def _hostile_link(browser, url: str, args: argparse.Namespace, report: dict) -> None:
    """The issue-13 link: one image ten thousand times (70 KB); how many images it shows, and when."""
    link = f"{url}/?model={args.model}&weights=random&compare=0&side={args.side}&images=" + "coffee," * HOSTILE_LINK_COPIES
    report["link_bytes"] = len(link)
    page, start = browser.new_page(), time.monotonic()
    try:
        page.goto(link, timeout=args.timeout * 1000)
        page.wait_for_function(_DRAWN_OR_PROBLEM, timeout=args.timeout * 1000)
        if page.locator(_PROBLEM).count():
            report["link_problem"] = page.locator(_PROBLEM).first.inner_text()[:200]
        report["link_charts_drawn_s"] = round(time.monotonic() - start, 2)
        shown = urllib.parse.parse_qs(urllib.parse.urlparse(page.url).query).get("images", [""])[0]
        report["link_images_in_the_page_link"] = len([ref for ref in shown.split(",") if ref])  # the view state the app wrote back
    except Exception as error:  # reported
        report["link_error"] = f"{type(error).__name__}: {error}"[:200]
    finally:
        page.close()


def _closed_tab(browser, client: Client, url: str, args: argparse.Namespace, report: dict) -> None:
    """Every gallery image at a large side, tab closed once its job is queued: the job must end cancelled."""
    args.fault_over.wait(args.timeout)
    side = CLOSED_TAB_SIDE
    link = f"{url}/?model={args.model}&weights=random&compare=0&side={side}&images={','.join(sorted(GALLERY))}"
    page = browser.new_page()
    job_id = None
    try:
        page.goto(link, timeout=args.timeout * 1000)
        deadline = time.monotonic() + args.timeout
        while job_id is None and time.monotonic() < deadline:
            job_id = _job_with_side(client, side)
            time.sleep(0.1)
    finally:
        page.close()
    closed, closed_at = time.monotonic(), time.time()
    if job_id is None:
        report["closed_tab"] = "its job never reached the queue"
        return
    status = client.queue.status(job_id)
    while not status.finished and time.monotonic() - closed < args.timeout:
        time.sleep(0.2)
        status = client.queue.status(job_id)
    report["closed_tab"] = {"job_state": status.state, "images_done": f"{status.done} of {status.total}",
                            "started_on_a_worker": status.attempts > 0,
                            "ended_s_after_close": round(time.monotonic() - closed, 1), "reason": status.message}
    if status.state == CANCELLED:  # the worker stops at the end of the batch it is in
        stopped = _worker_stopped_at(args.work / "logs", closed_at, closed_at + args.timeout)
        report["closed_tab"]["worker_stopped_s_after_close"] = None if stopped is None else round(stopped - closed_at, 1)


def _worker_stopped_at(logs: Path, after: float, deadline: float) -> float | None:
    """When a worker's log first says it stopped a cancelled capture after ``after`` (waits until ``deadline``)."""
    import datetime

    while time.time() < deadline:
        for log in sorted(logs.glob("worker*.log")):
            for line in log.read_text(errors="replace").splitlines():
                if "were cancelled; stopped their capture" in line:
                    stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                    if stamp >= after:
                        return stamp
        time.sleep(0.5)
    return None


def _job_with_side(client: Client, side: int) -> str | None:
    with sqlite3.connect(client.queue.db_path) as conn:
        for job_id, spec in conn.execute("SELECT id, spec FROM jobs"):
            if JobSpec.from_json(spec).options.side == side:
                return job_id
    return None


def _bomb_upload(browser, url: str, args: argparse.Namespace, report: dict) -> None:
    """The zip-bomb ``.pth`` through the app's weights upload; what the page says."""
    page, start = browser.new_page(), time.monotonic()
    try:
        page.goto(f"{url}/?model={args.model}&weights=upload:&compare=0&side={args.side}&images=coffee",
                  timeout=args.timeout * 1000)
        page.locator(_WEIGHTS_UPLOADER).set_input_files(str(args.work / "weights" / BOMB))
        shown = page.locator("[data-testid=stAlert], [data-testid=stException]").filter(
            has_not_text="Upload a weights file in the sidebar").filter(has_text=re.compile("weights", re.IGNORECASE))
        shown.first.wait_for(timeout=args.timeout * 1000)
        report["bomb_upload"] = f"refused in {time.monotonic() - start:.1f} s: {shown.first.inner_text()[:200]}"
        report["bomb_upload_charts_drawn"] = page.locator("[data-testid=stMain] .js-plotly-plot").count()
    except Exception as error:  # reported
        report["bomb_upload"] = f"{type(error).__name__}: {error}"[:200]
    finally:
        page.close()


def _write_bomb(path: Path, model: str) -> None:
    """A torch.save checkpoint whose tensor record is replaced by 512 MiB of deflated zeros (about 0.5 MB on disk)."""
    import zipfile

    import torch

    plain = path.with_suffix(".plain")
    torch.save({"pos_embed": torch.zeros(16)}, plain)
    with zipfile.ZipFile(plain) as source, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as bomb:
        for record in source.infolist():
            if "/data/" not in record.filename:
                bomb.writestr(record.filename, source.read(record.filename))
                continue
            with bomb.open(record.filename, "w", force_zip64=True) as inflated:
                for _ in range(32):
                    inflated.write(bytes(16 * 2**20))
    plain.unlink()


class _MemorySampler:
    """Peak resident memory (MiB) of named groups of processes, sampled every 0.2 s."""

    def __init__(self, pids) -> None:
        self._pids = pids
        self.peaks: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def take(self) -> dict[str, float]:
        """The peaks since the last ``take`` (or the start); starts counting afresh."""
        peaks, self.peaks = self.peaks, {}
        return peaks

    def _loop(self) -> None:
        while not self._stop.wait(0.2):
            for name, pids in self._pids().items():
                total = sum(_rss_mib(pid) for pid in pids)
                self.peaks[name] = round(max(self.peaks.get(name, 0.0), total), 1)


def _load_average() -> str:
    """This machine's 1, 5 and 15 minute load averages, and its CPU count."""
    return f"{' / '.join(f'{value:.2f}' for value in os.getloadavg())} on {os.cpu_count()} CPUs"


def _rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


if __name__ == "__main__":
    sys.exit(main())
