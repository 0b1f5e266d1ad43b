"""fermi as a Ray Serve application: N runtimes as replicas behind one OpenAI endpoint.

Two deployments:
- `FermiReplica`: one runtime each, serving the OpenAI server's own Sanic app in ASGI mode
  (fermi/ray_serve/bridge.py). Replicas are placed by Ray (one per CPU asked for, on any node)
  and autoscaled by their ongoing requests (running + queued) between min and max replicas.
- `FermiFront`: the HTTP ingress, a thin pass-through (fermi/ray_serve/front.py) that computes
  each request's routing key and calls a replica through a handle whose router
  (fermi/ray_serve/router.py) sends keyed requests to the replica holding their cache.

`fermi serve ray` builds it with `build(settings, scale)`; `serve run` / `serve deploy` configs
import `fermi.ray_serve.app:app_builder` with their `args` (setting names as in fermi.toml, plus
the ScaleOptions fields), for example:

    serve run fermi.ray_serve.app:app_builder model=Qwen/Qwen3-0.6B min_replicas=1 max_replicas=4
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import fields, replace
from typing import Any

from ray import serve
from ray.exceptions import RayActorError
from ray.serve.config import RequestRouterConfig
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
)

from fermi.errors import InvalidRequest, QueueFull
from fermi.ray_serve.bridge import Lifespan, exchange
from fermi.ray_serve.front import ACCEPTED, Front, ReplicaGone
from fermi.ray_serve.router import CacheAwareRouter
from fermi.ray_serve.scale import ScaleOptions
from fermi.settings import ENV, Settings, load_settings

log = logging.getLogger("fermi.ray")
REPLICA_LOST = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)
LOAD_POLL_S = 0.1


@serve.deployment(name="FermiReplica", health_check_period_s=5, graceful_shutdown_timeout_s=10)
class FermiReplica:
    """One fermi runtime behind the OpenAI server's Sanic app (ASGI mode). Ready once the
    model is loaded; a model that fails to load fails the replica with its error."""

    async def __init__(self, settings: Settings):
        from fermi import logs
        from fermi.openai_server.server import create_app

        logs.configure(settings.log_format)
        context = serve.get_replica_context()
        self.name = context.replica_id.unique_id
        self.app = create_app(settings)
        host, _, port = settings.openai_addr.rpartition(":")
        self.app.ctx.address = (host or "127.0.0.1", int(port or 0))  # the endpoint's
        self.lifespan = Lifespan(self.app)
        await self.lifespan.start()
        while self.app.ctx.runtime is None and self.app.ctx.load_error is None:
            await asyncio.sleep(LOAD_POLL_S)
        if self.app.ctx.load_error is not None:
            raise self.app.ctx.load_error
        log.info("replica %s ready (pid %d)", self.name, os.getpid())

    async def handle(self, scope: dict[str, Any], body: bytes):
        """Stream the response messages of one HTTP request, after an ACCEPTED marker that
        tells the front this replica took the request."""
        yield {"type": ACCEPTED, "replica": self.name}
        async for message in exchange(self.app, scope, body):
            yield message

    def check_health(self) -> None:
        if self.app.ctx.load_error is not None:
            raise RuntimeError(f"the runtime failed: {self.app.ctx.load_error}")

    async def __del__(self):
        await self.lifespan.stop()


@serve.deployment(name="FermiFront", max_ongoing_requests=4096)
@serve.ingress()
class FermiFront:
    """The HTTP ingress: routing key, then a replica call (see fermi/ray_serve/front.py)."""

    def __init__(self, replicas, max_body_bytes: int):
        self.replicas = replicas.options(stream=True, method_name="handle")
        self.front = Front(self.forward, max_body_bytes)

    def __serve_build_asgi_app__(self) -> Front:
        return self.front

    async def forward(self, scope: dict[str, Any], body: bytes, key: str | None):
        """One replica call's messages; a lost replica raises ReplicaGone."""
        handle = self.replicas.options(session_id=key) if key else self.replicas
        messages = handle.remote(scope, body)
        done = False
        try:
            async for message in messages:
                yield message
            done = True
        except REPLICA_LOST as e:
            raise ReplicaGone(f"{type(e).__name__}: {str(e).splitlines()[0]}") from None
        except BackPressureError:
            raise QueueFull(
                "every replica is at its limit and the router's queue is full; retry later"
            ) from None
        finally:
            if not done:
                messages.cancel()


def build(settings: Settings, scale: ScaleOptions):
    """The Serve application (pass it to `serve.run`)."""
    scale.check()
    if settings.threads == 0:  # one onnxruntime thread per reserved CPU, not per core
        settings = replace(settings, threads=max(1, int(scale.replica_cpus)))
    replica = FermiReplica.options(
        # A replica takes what its runtime runs and queues; beyond every replica's share, the
        # router queues up to max_queue more, then refuses with 429 queue_full as one process.
        max_ongoing_requests=settings.engine_pool + settings.max_queue,
        max_queued_requests=settings.max_queue,
        ray_actor_options={"num_cpus": scale.replica_cpus, "num_gpus": scale.replica_gpus},
        request_router_config=RequestRouterConfig(request_router_class=CacheAwareRouter),
        **_replica_count(settings, scale),
    )
    front = FermiFront.options(
        num_replicas=scale.router_replicas, ray_actor_options={"num_cpus": 0}
    )
    return front.bind(replica.bind(settings), settings.max_body_bytes)


def _replica_count(settings: Settings, scale: ScaleOptions) -> dict[str, Any]:
    if scale.num_replicas is not None:
        return {"num_replicas": scale.num_replicas}
    target = scale.target_ongoing_requests or float(settings.engine_pool)
    return {
        "autoscaling_config": {
            "min_replicas": scale.min_replicas,
            "initial_replicas": max(1, scale.min_replicas),
            "max_replicas": scale.max_replicas,
            "target_ongoing_requests": target,
            "look_back_period_s": 10.0,  # queues form in seconds: decide on the last 10
            "upscale_delay_s": 5.0,
            "downscale_delay_s": 120.0,
        }
    }


SETTING_VARS = {name: var for var, name in reversed(ENV.items())}  # field -> its FERMI_* name
SCALE_FIELDS = {f.name: f.type for f in fields(ScaleOptions)}


def app_builder(args: dict[str, Any]):
    """Ray Serve's application builder: `args` holds settings (fermi.toml names: model,
    engine_pool, api_key, ...) over the environment's FERMI_* variables, and ScaleOptions
    fields. Raises InvalidRequest naming an unknown or invalid argument."""
    env = dict(os.environ)
    scale: dict[str, Any] = {}
    for key, value in args.items():
        if key in SCALE_FIELDS:
            scale[key] = _number(key, value)
        elif key in SETTING_VARS:
            env[SETTING_VARS[key]] = str(value).lower() if isinstance(value, bool) else str(value)
        else:
            raise InvalidRequest(f"unknown argument {key!r} for fermi's Serve app", param=key)
    return build(load_settings(env), ScaleOptions(**scale))


def _number(key: str, value: Any) -> float | int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InvalidRequest(f"{key} must be a number, got {value!r}", param=key) from None
    return int(number) if "int" in str(SCALE_FIELDS[key]) else number
