"""The gRPC server's front door: one interceptor that checks the API key on every Fermi call
(`authorization: Bearer KEY` metadata, the keys of fermi/security.py, UNAUTHENTICATED
otherwise) and turns a request that does not decode into INVALID_ARGUMENT (grpcio's own answer
would be INTERNAL). Health checking and reflection stay open, as HTTP's /health does.

Also: the server credentials for optional TLS (FERMI_GRPC_TLS_CERT / FERMI_GRPC_TLS_KEY)."""

from __future__ import annotations

import ssl
from pathlib import Path

import grpc

from fermi.errors import InvalidRequest
from fermi.security import KeyRing

OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def _authorization(metadata) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            return value
    return None


def tenant_of(context: grpc.ServicerContext, keys: KeyRing) -> str:
    """The caller's tenant (the interceptor already refused calls without a valid key)."""
    tenant = keys.tenant_for_header(_authorization(context.invocation_metadata()))
    if tenant is None:  # unreachable behind the interceptor; refuse all the same
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or incorrect API key")
    return tenant


class GuardInterceptor(grpc.ServerInterceptor):
    """API keys (when configured) and request decoding for the services that are not open."""

    def __init__(self, keys: KeyRing) -> None:
        self.keys = keys

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(OPEN_SERVICES):
            return handler
        header = _authorization(handler_call_details.invocation_metadata)
        if self.keys.tenant_for_header(header) is None:
            return _refusal(handler)
        return _decoding_checked(handler)


REFUSED = "missing or incorrect API key: send the metadata 'authorization: Bearer KEY'"


def _refusal(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    def refuse(request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSED)

    return _same_kind(handler, refuse, request_deserializer=None)


def _decoding_checked(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """The same handler, decoding its request itself so that bad bytes get INVALID_ARGUMENT."""
    decode = handler.request_deserializer
    behaviour = handler.unary_stream or handler.unary_unary
    if decode is None or behaviour is None:  # streaming requests: left as grpcio does them
        return handler

    def checked(raw: bytes, context):
        try:
            request = decode(raw)
        except Exception as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the request does not decode: {e}")
        return behaviour(request, context)

    return _same_kind(handler, checked, request_deserializer=None)


def _same_kind(handler: grpc.RpcMethodHandler, behaviour, request_deserializer):
    """A handler of the same cardinality as `handler` running `behaviour` instead."""
    kinds = (
        (handler.unary_unary, grpc.unary_unary_rpc_method_handler),
        (handler.unary_stream, grpc.unary_stream_rpc_method_handler),
        (handler.stream_unary, grpc.stream_unary_rpc_method_handler),
        (handler.stream_stream, grpc.stream_stream_rpc_method_handler),
    )
    make = next(make for existing, make in kinds if existing is not None)
    return make(
        behaviour,
        request_deserializer=request_deserializer,
        response_serializer=handler.response_serializer,
    )


def server_credentials(cert: str | None, key: str | None) -> grpc.ServerCredentials | None:
    """TLS credentials from PEM files, or None for a plaintext port. Raises InvalidRequest when
    only one of the two is given, a file cannot be read, or the key does not match the
    certificate (checked here with `ssl`, as gRPC would only fail to bind later)."""
    if not cert and not key:
        return None
    if not (cert and key):
        raise InvalidRequest(
            "TLS needs both a certificate and its key (--tls-cert and --tls-key, or "
            "FERMI_GRPC_TLS_CERT and FERMI_GRPC_TLS_KEY)",
            param="grpc_tls_key" if cert else "grpc_tls_cert",
        )
    try:
        pair = (Path(key).read_bytes(), Path(cert).read_bytes())
    except OSError as e:
        raise InvalidRequest(f"cannot read the TLS files: {e}", param="grpc_tls_cert") from None
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
    except ssl.SSLError as e:
        raise InvalidRequest(
            f"TLS certificate and key do not match (or are not PEM): {cert}, {key}: {e.reason}",
            param="grpc_tls_cert",
        ) from None
    return grpc.ssl_server_credentials([pair])
