"""The rollout servers a run connects to: their URLs (``rollout.server_url`` / ``server_urls`` / ``server_list``) and
the wait until every one answers ``/health``.

``rollout.server_list`` is the file ``slurm/rollout_servers.sbatch`` writes once all of its servers are healthy (one
``http://HOST:PORT`` per line, written whole then renamed, so a reader never sees part of it): the trainer, often
started by another job at the same time, waits for it to appear. Every wait has one deadline
(``rollout.server_wait_s``), prints a progress line while it lasts, and ends in one line naming what never came: the
file, or the URL of each server that never became healthy.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from qrl_megatron.learner.resume import RunStopped

# What the rollout-server job (slurm/rollout_servers.sbatch, launch/job_info.py) writes into run.dir while the learner
# job starts, often before it: its exports and the default server list. They belong to the running companion job,
# not to an earlier run, so qrl-train neither counts them as one nor archives them (it did, and the servers lost
# the model folder they were loading).
SERVER_JOB_ENTRIES = ("rollout_servers", "rollout_servers.txt")

__all__ = [
    "SERVER_JOB_ENTRIES",
    "ServersNotReady",
    "configured_server_urls",
    "connect_servers",
    "read_server_list",
    "run_transport",
    "server_urls",
    "wait_healthy",
]

PROGRESS_EVERY_S = 15.0
POLL_S = 1.0  # between two looks at the file / two rounds of GET /health


class ServersNotReady(RunStopped):
    """A rollout server (or the server list) did not come within ``rollout.server_wait_s``."""


def configured_server_urls(rollout: Any) -> list[str]:
    """The URLs the config names itself (``server_url`` or ``server_urls``; a ``server_list`` file is read later)."""
    if rollout.server_urls:
        return [str(u).rstrip("/") for u in rollout.server_urls]
    return [rollout.server_url.rstrip("/")] if rollout.server_url else []


def read_server_list(path: str | Path) -> list[str]:
    """The URLs of a server list file: one per line; blank lines and ``#`` comments skipped."""
    urls = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        url = line.split("#", 1)[0].strip()
        if not url:
            continue
        if not url.startswith(("http://", "https://")):
            raise ServersNotReady(f"rollout.server_list {path}, line {n}: {url!r} is not an http:// or https:// URL")
        urls.append(url.rstrip("/"))
    if not urls:
        raise ServersNotReady(f"rollout.server_list {path} lists no server")
    return urls


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=5) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def wait_healthy(
    urls: Sequence[str],
    timeout_s: float,
    progress: Callable[[str], None] = print,
    poll_s: float | None = None,
    started: float | None = None,
) -> None:
    """Until every server at ``urls`` answers ``GET /health`` with 200; a progress line every
    :data:`PROGRESS_EVERY_S` while some do not; past ``timeout_s`` (counted from ``started``) ServersNotReady naming
    each URL that never did."""
    start = time.monotonic() if started is None else started
    pending = list(urls)
    last_line = time.monotonic()
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(pending)))) as pool:
        while True:
            pending = [u for u, ok in zip(pending, pool.map(_healthy, pending), strict=True) if not ok]
            if not pending:
                return
            waited = time.monotonic() - start
            if waited > timeout_s:
                raise ServersNotReady(
                    f"rollout server {', '.join(pending)} never became healthy (GET /health) within {timeout_s:g} s "
                    f"(rollout.server_wait_s); {len(urls) - len(pending)} of {len(urls)} did"
                )
            if time.monotonic() - last_line >= PROGRESS_EVERY_S:
                progress(
                    f"waiting for {len(pending)} of {len(urls)} rollout server(s) to be healthy: {', '.join(pending)} "
                    f"({waited:.0f} s of {timeout_s:g} s)"
                )
                last_line = time.monotonic()
            time.sleep(POLL_S if poll_s is None else poll_s)


def server_urls(rollout: Any, progress: Callable[[str], None] = print, poll_s: float | None = None) -> list[str]:
    """The URLs of the servers this run connects to, each healthy: the config's own, or ``rollout.server_list``'s
    (waiting for the file first); empty for a run that starts its server(s) here. One deadline,
    ``rollout.server_wait_s``, for the file and the health of all."""
    start = time.monotonic()
    urls = configured_server_urls(rollout)
    if rollout.server_list:
        path = Path(rollout.server_list)
        last_line = start
        while not (path.is_file() and path.stat().st_size):  # an empty file may be in the making
            waited = time.monotonic() - start
            if waited > rollout.server_wait_s:
                raise ServersNotReady(
                    f"rollout.server_list {path} did not appear within {rollout.server_wait_s:g} s "
                    f"(rollout.server_wait_s); is the rollout-server job (slurm/rollout_servers.sbatch) running?"
                )
            if time.monotonic() - last_line >= PROGRESS_EVERY_S:
                progress(f"waiting for the rollout server list {path} ({waited:.0f} s of {rollout.server_wait_s:g} s)")
                last_line = time.monotonic()
            time.sleep(POLL_S if poll_s is None else poll_s)
        urls = read_server_list(path)
        progress(f"rollout servers from {path}: {', '.join(urls)}")
    if urls:
        wait_healthy(urls, rollout.server_wait_s, progress, poll_s, started=start)
    return urls


def run_transport(sync: Any, rollout: Any, cuda: bool | None = None) -> str:
    """``sync.transport`` resolved for this run's engine and the servers its config names (a ``server_list`` file
    counts as servers on another host: bridge/transport.resolve_transport)."""
    from qrl_megatron.bridge.transport import resolve_transport

    return resolve_transport(
        sync.transport,
        rollout.engine,
        engine_tp=rollout.tp,
        server_url=configured_server_urls(rollout),
        cuda=cuda,
        server_list=bool(rollout.server_list),
    )


def connect_servers(rollout: Any, progress: Callable[[str], None] = print) -> Any:
    """``rollout`` with the servers it names read and healthy (:func:`server_urls`): one in ``server_url``, more in
    ``server_urls`` (one engine each: ``rollout.engines`` must be their number); unchanged when it names none."""
    import dataclasses

    from qrl_megatron.config_fields import ConfigError

    urls = server_urls(rollout, progress)
    if not urls:
        return rollout
    if rollout.engines != len(urls):
        source = f"rollout.server_list {rollout.server_list}" if rollout.server_list else "rollout.server_urls"
        raise ConfigError(
            f"{source} lists {len(urls)} server(s) but rollout.engines={rollout.engines}; set "
            f"rollout.engines={len(urls)} (one engine per server)"
        )
    if len(urls) == 1:
        return dataclasses.replace(rollout, server_url=urls[0], server_urls=[], server_list="")
    return dataclasses.replace(rollout, server_url="", server_urls=urls, server_list="")
