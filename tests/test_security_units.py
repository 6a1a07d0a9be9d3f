"""The security stage's parts on their own: token bucket, credentials, tenants, limits, config
errors, and the BYTES element kernel against its twin. The gateway-level behaviour is
tests/test_security.py's (real gateway, real Triton, stock clients)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.config import config_from_mapping
from gateway.errors import ConfigError, InvalidArgument, PermissionDenied, RateLimited, ResourceExhausted, Unauthenticated
from gateway.ext import tensorcheck, tensorcheck_py
from gateway.protocol import pb
from gateway.security.config import AuthConfig, LimitsConfig, ModelLimits, Secret, TenantConfig
from gateway.security.guard import Guard
from gateway.security.limits import RequestLimits
from gateway.security.ratelimit import TokenBucket
from gateway.security.tenants import TenantDirectory
from gateway.server.rpc import Call


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_allows_its_burst_then_its_rate_and_says_when_to_retry():
    clock = Clock()
    bucket = TokenBucket(rate=2.0, capacity=3.0, clock=clock)
    assert [bucket.take() for _ in range(3)] == [0, 0, 0]
    assert bucket.take() == 500  # one token comes every 500 ms
    clock.now += 0.25
    assert bucket.take() == 250
    clock.now += 0.25
    assert bucket.take() == 0
    clock.now += 60  # a long pause refills only up to the capacity
    assert [bucket.take() for _ in range(4)] == [0, 0, 0, 500]
    assert (bucket.taken, bucket.refused) == (7, 3)


def _directory(monkeypatch, tmp_path, **tenant) -> TenantDirectory:
    monkeypatch.setenv("UNIT_TOKEN", "s3cret-token")
    keys = tmp_path / "keys"
    keys.write_text("# comment\n\nkey-one\nkey-two\n")
    config = AuthConfig(tenants={
        "alpha": TenantConfig(models=("m1",), tokens=(Secret(env="UNIT_TOKEN"),), api_keys=(Secret(file=str(keys)),),
                              **tenant),
    })
    return TenantDirectory(config)


def _call(*metadata) -> Call:
    return Call(None, tuple(metadata), "")


def test_credentials_find_their_tenant_and_nothing_else_does(monkeypatch, tmp_path):
    directory = _directory(monkeypatch, tmp_path)
    alpha = directory.tenants["alpha"]
    assert directory.authenticate(_call(("authorization", "Bearer s3cret-token"))) is alpha
    assert directory.authenticate(_call(("authorization", "bearer  s3cret-token "))) is alpha
    assert directory.authenticate(_call(("x-api-key", "key-one"))) is alpha
    assert directory.authenticate(_call(("x-api-key", "key-two"))) is alpha  # rotation: both lines count
    for metadata in [(), (("authorization", "Bearer key-one"),), (("x-api-key", "s3cret-token"),),
                     (("authorization", "s3cret-token"),), (("x-api-key", "# comment"),),
                     (("authorization", "Bearer s3cret-tokeN"),)]:
        with pytest.raises(Unauthenticated) as error:
            directory.authenticate(_call(*metadata))
        assert "s3cret" not in error.value.message and "key-" not in error.value.message
    assert "s3cret" not in repr(directory) + repr(alpha)


def test_a_tenant_is_refused_other_models_and_its_rate(monkeypatch, tmp_path):
    from gateway.security.config import RateLimit

    directory = _directory(monkeypatch, tmp_path, rate=RateLimit(requests_per_s=1.0, burst=2))
    alpha = directory.tenants["alpha"]
    alpha.check_model("m1")
    with pytest.raises(PermissionDenied, match="tenant 'alpha' may not use model 'm2'"):
        alpha.check_model("m2")
    with pytest.raises(PermissionDenied) as error:
        alpha.check_model("x" * 100_000)
    assert len(error.value.message) < 400  # a huge name is not echoed in full
    alpha.spend()
    alpha.spend()
    with pytest.raises(RateLimited) as error:
        alpha.spend()
    assert error.value.code.name == "RESOURCE_EXHAUSTED"
    assert error.value.trailers[0][0] == "grpc-retry-pushback-ms" and 0 < int(error.value.trailers[0][1]) <= 1000


def test_config_errors_name_where_a_secret_was_never_what_it_is(monkeypatch, tmp_path):
    base = {"listen": "127.0.0.1:0", "pools": {"p": {"backends": ["127.0.0.1:9"]}}}
    monkeypatch.delenv("UNIT_MISSING", raising=False)
    auth = {"tenants": {"a": {"tokens": [{"env": "UNIT_MISSING"}], "models": ["*"]}}}
    config = config_from_mapping({**base, "auth": auth})
    with pytest.raises(ConfigError) as error:
        Guard.from_config(config.auth, config.limits)
    assert error.value.path == "auth.tenants.a.tokens[0]" and "UNIT_MISSING" in str(error.value)
    monkeypatch.setenv("UNIT_SAME", "shared-secret-value")
    auth = {"tenants": {"a": {"tokens": [{"env": "UNIT_SAME"}], "models": ["*"]},
                        "b": {"api_keys": [{"env": "UNIT_SAME"}], "tokens": [{"env": "UNIT_SAME"}], "models": ["*"]}}}
    config = config_from_mapping({**base, "auth": auth})
    with pytest.raises(ConfigError) as error:
        Guard.from_config(config.auth, config.limits)
    assert "the same credential is given to tenant 'a' too" in str(error.value)
    assert "shared-secret-value" not in str(error.value)
    for bad, path in [
        ({"tenants": {"a": {"models": ["*"]}}}, "auth.tenants.a"),
        ({"tenants": {"a": {"tokens": [{"env": "X", "file": "/y"}], "models": ["*"]}}}, "auth.tenants.a.tokens[0]"),
        ({"tenants": {"a": {"tokens": [{"env": "X"}], "models": []}}}, "auth.tenants.a.models"),
        ({"tenants": {}}, "auth.tenants"),
        ({"tenants": {"a": {"tokens": [{"env": "X"}], "models": ["*"]}}, "api_key_header": "authorization"},
         "auth.api_key_header"),
    ]:
        with pytest.raises(ConfigError) as error:
            config_from_mapping({**base, "auth": bad})
        assert error.value.path == path, error.value
    with pytest.raises(ConfigError) as error:
        config_from_mapping({**base, "server": {"tls": {"cert_file": str(tmp_path / "none.crt"), "key_file": "k"}}})
    assert error.value.path == "server.tls.cert_file"
    with pytest.raises(ConfigError) as error:
        config_from_mapping({**base, "upstream": {"tls": {"cert_file": str(tmp_path)}}})
    assert error.value.path == "upstream.tls.cert_file"
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello")
    with pytest.raises(ConfigError) as error:
        config_from_mapping({**base, "server": {"tls": {"cert_file": str(not_pem), "key_file": str(not_pem)}}})
    assert error.value.path == "server.tls.key_file" and "not a PEM certificate chain" in str(error.value)
    with pytest.raises(ConfigError) as error:
        config_from_mapping({**base, "upstream": {"tls": {"ca_file": str(not_pem)}}})
    assert error.value.path == "upstream.tls"


def test_nothing_configured_means_no_guard_at_all():
    config = config_from_mapping({"listen": "127.0.0.1:0", "pools": {"p": {"backends": ["127.0.0.1:9"]}}})
    assert config.auth is None and not config.limits.enabled
    assert Guard.from_config(config.auth, config.limits) is None


def _bytes_tensor(*elements: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(element)) + element for element in elements)


def test_limits_refuse_with_what_was_wrong_and_the_limit():
    limits = RequestLimits(LimitsConfig(max_tensors=2, max_bytes_element_bytes=4,
                                        models={"m": ModelLimits(max_message_bytes=50)}))
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="TEXT", datatype="BYTES", shape=[2])
    request.raw_input_contents.append(_bytes_tensor(b"abcd", b"ab"))
    limits.check(request, 50)
    with pytest.raises(ResourceExhausted, match="request of 51 bytes is over model 'm''s limit of 50 bytes"):
        limits.check(request, 51)
    limits.check(pb.ModelInferRequest(model_name="other"), 10_000)  # the size limit is m's alone
    request.raw_input_contents[0] = _bytes_tensor(b"abcde")
    with pytest.raises(InvalidArgument, match="input 'TEXT' has a BYTES element of 5 bytes; the limit is 4 bytes"):
        limits.check(request, 10)
    typed = pb.ModelInferRequest(model_name="m")
    typed.inputs.add(name="T", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"12345")
    with pytest.raises(InvalidArgument, match="BYTES element of 5 bytes"):
        limits.check(typed, 10)
    request.outputs.add(name="A")
    request.outputs.add(name="B")
    with pytest.raises(InvalidArgument, match=r"request has 3 tensors \(1 inputs, 2 outputs requested\); the limit is 2"):
        limits.check(request, 10)


@given(st.lists(st.binary(max_size=40), max_size=12), st.binary(max_size=6))
def test_longest_bytes_element_kernel_matches_its_twin(elements, tail):
    data = _bytes_tensor(*elements)
    assert tensorcheck.bytes_longest_element(data) == max(map(len, elements), default=0)
    for buffer in (data, data + tail, data[:-1] if data else data):
        assert tensorcheck.bytes_longest_element(buffer) == tensorcheck_py.bytes_longest_element(buffer)
