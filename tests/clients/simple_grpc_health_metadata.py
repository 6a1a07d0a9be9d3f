"""The checks of Triton's published example client `simple_grpc_health_metadata.py`
(triton-inference-server/client, src/python/examples), reproduced one for one so that Triton's own
tooling can be run against the gateway: same calls, same headers, same conditions, same exit code
(1 and a "FAILED : ..." line at the first check that fails).

The original asks for the model "simple" (two INT32 [16] inputs) of Triton's example repository;
`--model` names one of ours instead (`add_sub` is its closest twin). Run as
`python simple_grpc_health_metadata.py -u HOST:PORT -m MODEL`.
"""

from __future__ import annotations

import argparse
import sys

import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


def fail(what: str, got: object = None) -> None:
    print(f"FAILED : {what}")
    if got is not None:
        print(f"Got: {got}")
    sys.exit(1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-v", "--verbose", action="store_true", default=False)
    parser.add_argument("-u", "--url", default="localhost:8001")
    parser.add_argument("-m", "--model", default="simple")
    flags = parser.parse_args()
    client = grpcclient.InferenceServerClient(url=flags.url, verbose=flags.verbose)
    model_name = flags.model

    # Health
    if not client.is_server_live(headers={"test": "1", "dummy": "2"}):
        fail("is_server_live")
    if not client.is_server_ready():
        fail("is_server_ready")
    if not client.is_model_ready(model_name):
        fail("is_model_ready")

    # Metadata
    metadata = client.get_server_metadata()
    if metadata.name != "triton":
        fail("get_server_metadata", metadata.name)
    print(metadata)
    metadata = client.get_model_metadata(model_name, headers={"test": "1", "dummy": "2"})
    if metadata.name != model_name:
        fail("get_model_metadata", metadata.name)
    print(metadata)

    # Passing incorrect model name
    try:
        client.get_model_metadata("wrong_model_name")
    except InferenceServerException as error:
        if "Request for unknown model" not in error.message():
            fail("get_model_metadata wrong_model_name", error.message())
    else:
        fail("get_model_metadata wrong_model_name")

    # Configuration
    config = client.get_model_config(model_name)
    if config.config.name != model_name:
        fail("get_model_config", config.config.name)
    print("PASS : health and metadata")


if __name__ == "__main__":
    main()
