"""Auth on every RPC (reflection and adapter management included), TLS and mutual TLS."""

from __future__ import annotations

import datetime
import hmac
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from loraplex.backend.demo import DEMO_ADAPTERS, expected_output
from loraplex.backend.server.config import ServerConfig
from loraplex.clients import Client, pb
from tests.helpers import DigestSpy, GuardedKey
from tests.server.harness import RunningServer, chat_request

TOKEN = "s3cret-token"


def every_rpc(client: Client, token: str | None) -> dict[str, Callable[[], object]]:
    """One call of each RPC the token must guard."""
    channel = client.channel
    metadata = [("authorization", f"Bearer {token}")] if token is not None else None

    def reflect() -> object:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        return list(stub.ServerReflectionInfo(iter([request]), timeout=10, metadata=metadata))

    return {
        "Generate": lambda: client.generate(chat_request("hi", max_tokens=4), timeout=10),
        "LoadAdapter": lambda: client.load_adapter("auth-x", str(DEMO_ADAPTERS["upper"]), timeout=30),
        "UnloadAdapter": lambda: client.unload_adapter("auth-x", timeout=10),
        "ListAdapters": lambda: client.list_adapters(timeout=10),
        "GetServerInfo": lambda: client.server_info(timeout=10),
        "ServerReflectionInfo": reflect,
    }


@pytest.fixture(scope="module")
def auth_target(demo: RunningServer) -> str:
    return demo.add_server(ServerConfig(host="127.0.0.1", port=0, metrics_port=None, api_key=TOKEN))


@pytest.mark.parametrize("token", [None, "wrong-token", TOKEN + "x", ""])
def test_every_rpc_without_the_right_token_is_unauthenticated(auth_target: str, token: str | None) -> None:
    with Client(auth_target, token=token) as client:
        for name, call in every_rpc(client, token).items():
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, name


def test_every_rpc_with_the_token_works(auth_target: str) -> None:
    with Client(auth_target, token=TOKEN) as client:
        for name, call in every_rpc(client, TOKEN).items():
            assert call() is not None or name == "UnloadAdapter"
        assert client.generate(chat_request("Auth", "upper"), timeout=30).text == expected_output("upper", "Auth")


def test_health_stays_open_for_probes_unless_asked(demo: RunningServer, auth_target: str) -> None:
    with Client(auth_target) as client:
        assert client.health()
    closed = demo.add_server(ServerConfig(host="127.0.0.1", port=0, metrics_port=None, api_key=TOKEN,
                                          auth_health_checks=True))
    with grpc.insecure_channel(closed) as channel, pytest.raises(grpc.RpcError) as err:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with Client(closed, token=TOKEN) as client:
        assert client.health()


@dataclass
class Pki:
    ca: bytes
    server_cert: bytes
    server_key: bytes
    client_cert: bytes
    client_key: bytes


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name | None,
          issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool = False, sans: list[x509.GeneralName] | None = None
          ) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki() -> Pki:
    """A throw-away CA, a server certificate for localhost / 127.0.0.1, and a client certificate."""
    ca_key, server_key, client_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = _cert("loraplex-test-ca", ca_key, None, ca_key, ca=True)
    sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    server = _cert("localhost", server_key, ca.subject, ca_key, sans=sans)
    client = _cert("client", client_key, ca.subject, ca_key)
    pem = serialization.Encoding.PEM
    return Pki(ca.public_bytes(pem), server.public_bytes(pem), _key_pem(server_key), client.public_bytes(pem),
               _key_pem(client_key))


def _tls_server(demo: RunningServer, pki: Pki, tmp_path_factory: pytest.TempPathFactory, mutual: bool) -> str:
    d = tmp_path_factory.mktemp("pki")
    for name, data in (("ca.pem", pki.ca), ("cert.pem", pki.server_cert), ("key.pem", pki.server_key)):
        (d / name).write_bytes(data)
    config = ServerConfig(host="127.0.0.1", port=0, metrics_port=None, tls_cert_file=str(d / "cert.pem"),
                          tls_key_file=str(d / "key.pem"), tls_client_ca_file=str(d / "ca.pem") if mutual else None)
    return demo.add_server(config)


def test_tls(demo: RunningServer, pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> None:
    target = _tls_server(demo, pki, tmp_path_factory, mutual=False)
    with Client(target, root_certificates=pki.ca) as client:
        assert client.generate(chat_request("tls", "reverse"), timeout=30).text == expected_output("reverse", "tls")
        assert "tls" in client.server_info(timeout=10).features
    with Client(target) as plaintext, pytest.raises(grpc.RpcError) as err:
        plaintext.list_adapters(timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls(demo: RunningServer, pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> None:
    target = _tls_server(demo, pki, tmp_path_factory, mutual=True)
    with Client(target, root_certificates=pki.ca, private_key=pki.client_key,
                certificate_chain=pki.client_cert) as client:
        assert client.list_adapters(timeout=10)
        result = client.generate(chat_request("mtls"), timeout=30)
        assert result.text == "mtls"
    with Client(target, root_certificates=pki.ca) as no_cert, pytest.raises(grpc.RpcError) as err:
        no_cert.list_adapters(timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_proto_message_limits(demo: RunningServer) -> None:
    """A request over the message size limit is refused before any work."""
    huge = pb.GenerateRequest(prompt="x" * (5 * 2**20))
    with Client(demo.target) as client, pytest.raises(grpc.RpcError) as err:
        client.generate(huge, timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def every_method() -> list[tuple[str, Any, bool, bool]]:
    """(path, request class, client-streaming, server-streaming) of every RPC the server serves:
    the inference service from its proto (a new RPC is covered without editing this), health and
    reflection."""
    from google.protobuf.message_factory import GetMessageClass

    service = pb.DESCRIPTOR.services_by_name["InferenceService"]
    found = [(f"/{service.full_name}/{m.name}", GetMessageClass(m.input_type), False, m.server_streaming)
             for m in service.methods]
    found += [("/grpc.health.v1.Health/Check", health_pb2.HealthCheckRequest, False, False),
              ("/grpc.health.v1.Health/Watch", health_pb2.HealthCheckRequest, False, True),
              ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
               reflection_pb2.ServerReflectionRequest, True, True)]
    return found


def call_once(channel: grpc.Channel, path: str, request_type: Any, client_streaming: bool,
              server_streaming: bool, token: str) -> grpc.StatusCode:
    """One call of ``path`` with an empty request; its status (OK once a stream's first message came)."""
    kwargs = {"request_serializer": request_type.SerializeToString, "response_deserializer": lambda b: b}
    metadata = [("authorization", f"Bearer {token}")]
    try:
        if client_streaming:
            responses = channel.stream_stream(path, **kwargs)(iter([request_type()]), timeout=10, metadata=metadata)
        elif server_streaming:
            responses = channel.unary_stream(path, **kwargs)(request_type(), timeout=10, metadata=metadata)
        else:
            channel.unary_unary(path, **kwargs)(request_type(), timeout=10, metadata=metadata)
            return grpc.StatusCode.OK
        next(iter(responses), None)
        responses.cancel()  # Watch streams for ever
        return grpc.StatusCode.OK
    except grpc.RpcError as err:
        return err.code()


def test_every_token_check_is_constant_time(demo: RunningServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each RPC's token check goes through ``hmac.compare_digest`` on bytes with the configured key,
    and nothing compares the key with ``==``. No timing measurement: the difference a short-circuit
    comparison makes (nanoseconds) is lost in a gRPC call's ~1 ms on a shared machine, so such a
    test could not fail, and one that could would be flaky."""
    key = GuardedKey("s3cret-key-0123")
    target = demo.add_server(ServerConfig(host="127.0.0.1", port=0, metrics_port=None, api_key=key,
                                          auth_health_checks=True))
    spy = DigestSpy()
    monkeypatch.setattr(hmac, "compare_digest", spy)
    tokens = ["x" * len(key), str(key)[:-1], str(key) + "x", "wrong", str(key)]
    with grpc.insecure_channel(target) as channel:
        for path, request_type, client_streaming, server_streaming in every_method():
            for token in tokens:
                spy.calls.clear()
                code = call_once(channel, path, request_type, client_streaming, server_streaming, token)
                assert (code == grpc.StatusCode.UNAUTHENTICATED) == (token != str(key)), (path, token, code)
                assert spy.calls == [(token.encode(), str(key).encode())], (path, token, spy.calls)
                assert all(type(arg) is bytes for arg in spy.calls[0]), (path, spy.calls)
