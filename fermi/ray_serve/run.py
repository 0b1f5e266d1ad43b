"""`fermi serve ray`: start (or join) Ray, deploy fermi's Serve application, serve until
SIGINT/SIGTERM, then take the application down.

Without `ray_address` a local Ray instance starts in this process's session with an explicit CPU
count, no dashboard and a small object store (a laptop or a small VM stays usable); with one
(`auto`, `ray://host:10001` or `host:6379`) the application is deployed on that cluster, whose
nodes need fermi installed (and the model reachable at the same path or hub id)."""

from __future__ import annotations

import os
import signal
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

from fermi.errors import FermiError
from fermi.settings import Settings

APP_NAME = "fermi"
OBJECT_STORE_BYTES = 256 * 1024 * 1024  # the local instance's: responses stream, nothing big


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # None: start a local instance
    num_cpus: int | None = None  # the local instance's CPUs (default: this machine's)


def run(settings: Settings, scale, host: str, port: int, ray: RayOptions) -> None:
    """Serve until a signal; raises FermiError when Ray is missing, the port is taken or the
    application fails to deploy (a replica whose model does not load, for one)."""
    try:
        import ray as ray_module
        from ray import serve

        from fermi.ray_serve.app import build
    except ImportError as e:
        raise FermiError(f"fermi serve ray needs Ray Serve ({e.name} is missing): "
                         "pip install 'fermi[ray]'") from None  # fmt: skip
    _check_model_path(settings.model)
    if not ray.address:
        _check_port_free(host, port)
    settings = _absolute_paths(settings).replace(openai_addr=f"{_url_host(host)}:{port}")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    _init(ray_module, ray)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port}, proxy_location="EveryNode")
        serve.run(build(settings, scale), name=APP_NAME, route_prefix="/")
        print(f"fermi: Ray Serve application {APP_NAME!r} ready on http://{_url_host(host)}:"
              f"{port}/v1 ({_replicas(scale)})", flush=True)  # fmt: skip
        while not stop.wait(0.25):  # short slices: a signal another thread takes runs its
            pass  # Python handler only when the main thread next runs
    except RuntimeError as e:
        raise FermiError(f"the Ray Serve application did not start: {e}") from None
    finally:
        if ray.address:  # a shared cluster: take down this application only
            serve.delete(APP_NAME)
        else:
            serve.shutdown()
        ray_module.shutdown()


def _init(ray_module, options: RayOptions) -> None:
    if options.address:
        ray_module.init(address=options.address, log_to_driver=True)
        return
    ray_module.init(
        address="local",  # a new instance, even where another one runs on this machine
        num_cpus=options.num_cpus or os.cpu_count() or 1,
        include_dashboard=False,
        object_store_memory=OBJECT_STORE_BYTES,
        log_to_driver=True,
    )


def _check_model_path(model: str) -> None:
    """A model that is plainly a local path must exist before Ray starts (each replica would
    otherwise fail to load it, retried by Ray, before the deployment gives up)."""
    from export.source import looks_like_path

    if looks_like_path(model) and not Path(model).expanduser().exists():
        raise FermiError(f"no such file or directory: {model}")


def _check_port_free(host: str, port: int) -> None:
    """The local proxy's address must be free before Ray starts (Ray's proxy would otherwise
    retry it in the background while the command waits)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the proxy binds
        try:
            probe.bind((host, port))
        except OSError as e:
            raise FermiError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def _absolute_paths(settings: Settings) -> Settings:
    """Replicas run in other processes (other machines): a local model path, artifacts folder
    or chat template must not depend on this process's working directory."""
    changes = {}
    for name in ("model", "artifacts", "chat_template", "api_keys_file"):
        value = getattr(settings, name)
        if value and Path(value).exists():
            changes[name] = str(Path(value).resolve())
    return settings.replace(**changes)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _replicas(scale) -> str:
    if scale.num_replicas is not None:
        return f"{scale.num_replicas} replica(s)"
    return f"{scale.min_replicas} to {scale.max_replicas} replicas, autoscaled"
