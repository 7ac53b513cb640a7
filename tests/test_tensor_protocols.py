"""TensorFlow Serving's REST API and the Open Inference Protocol v2 (KServe, Triton): the pure translation,
then a real server called with bodies shaped as each protocol's documentation shows them, and with
Triton's own HTTP client, unmodified."""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from PIL import Image
from tolerance import assert_same_picture
from tritonclient.utils import InferenceServerException

from sdserve.protocols import inference_v2 as v2
from sdserve.protocols import tfserving as tf
from sdserve.protocols.tensors import TensorProtocolError

KEY = "sk-tensor"
AUTH = {"Authorization": f"Bearer {KEY}"}


# ---------------------------------------------------------------- TF Serving, pure
def test_tf_rows_take_prompt_strings_or_objects():
    rows, columnar = tf.parse_predict({"instances": ["a cat", {"prompt": "a dog", "seed": 3}]}, 8)
    assert rows == [{"prompt": "a cat"}, {"prompt": "a dog", "seed": 3}] and not columnar


def test_tf_columns_broadcast_scalars_and_check_lengths():
    rows, columnar = tf.parse_predict({"inputs": {"prompt": ["a", "b"], "steps": 3, "seed": [1, 2]}}, 8)
    assert columnar and rows == [{"prompt": "a", "steps": 3, "seed": 1}, {"prompt": "b", "steps": 3, "seed": 2}]
    assert tf.parse_predict({"inputs": "a"}, 8)[0] == [{"prompt": "a"}]
    with pytest.raises(TensorProtocolError, match="2 values for 3 prompts"):
        tf.parse_predict({"inputs": {"prompt": ["a", "b", "c"], "seed": [1, 2]}}, 8)


@pytest.mark.parametrize("body, message", [
    ({}, "exactly one of instances"),
    ({"instances": [], "inputs": []}, "exactly one of instances"),
    ({"instances": "a"}, "must be a list"),
    ({"instances": []}, "no instances"),
    ({"instances": [1.0, 2.0]}, "instances\\[0\\] must be a prompt"),
    ({"instances": [{"seed": 1}]}, "has no prompt"),
    ({"instances": [{"prompt": "a", "model": "x"}]}, "cannot be set per instance"),
    ({"instances": ["a"] * 9}, "over this server's limit of 8"),
])
def test_tf_bad_bodies_say_what_is_wrong(body, message):
    with pytest.raises(TensorProtocolError, match=message):
        tf.parse_predict(body, 8)


def test_tf_answers_in_the_request_format():
    assert tf.predictions([("AA", 1)], False) == {"predictions": [{"image": "AA", "seed": 1}]}
    assert tf.predictions([("AA", 1), ("BB", 2)], True) == {"outputs": {"image": ["AA", "BB"], "seed": [1, 2]}}


# ---------------------------------------------------------------- Open Inference Protocol v2, pure
def header(body: dict) -> bytes:
    return json.dumps(body).encode()


def test_v2_json_inputs_broadcast_and_parameters_apply_to_all():
    rows, reply = v2.parse_infer(header({
        "id": "42", "parameters": {"steps": 3},
        "inputs": [{"name": "prompt", "shape": [2, 1], "datatype": "BYTES", "data": [["a cat"], ["a dog"]]},
                   {"name": "seed", "shape": [1], "datatype": "INT64", "data": [7]},
                   {"name": "cfg_scale", "shape": [2], "datatype": "FP32", "data": [5, 6.5]}],
        "outputs": [{"name": "image"}]}), b"", 8)
    assert rows == [{"steps": 3, "prompt": "a cat", "seed": 7, "cfg_scale": 5.0},
                    {"steps": 3, "prompt": "a dog", "seed": 7, "cfg_scale": 6.5}]
    assert reply.request_id == "42" and reply.outputs == [("image", False)]


def test_v2_binary_inputs_and_outputs():
    prompts = v2.serialize_bytes(["ein Hund".encode(), "un chat".encode()])
    seeds = np.array([5, 6], dtype="<i4").tobytes()
    head = header({"inputs": [
        {"name": "prompt", "shape": [2], "datatype": "BYTES", "parameters": {"binary_data_size": len(prompts)}},
        {"name": "seed", "shape": [2], "datatype": "INT32", "parameters": {"binary_data_size": len(seeds)}}],
        "parameters": {"binary_data_output": True}})
    body = head + prompts + seeds
    rows, reply = v2.parse_infer(*v2.split_body(body, str(len(head))), 8)
    assert rows == [{"prompt": "ein Hund", "seed": 5}, {"prompt": "un chat", "seed": 6}]
    assert reply.outputs == [("image", True), ("seed", True)]
    out, length = v2.encode_response("tiny", reply, [(b"\x89PNG1", 5), (b"\x89PNG22", 6)])
    meta = json.loads(out[:length])
    assert [t["name"] for t in meta["outputs"]] == ["image", "seed"] and meta["model_name"] == "tiny"
    image_size = meta["outputs"][0]["parameters"]["binary_data_size"]
    assert v2.deserialize_bytes(out[length:length + image_size]) == [b"\x89PNG1", b"\x89PNG22"]
    assert np.frombuffer(out[length + image_size:], dtype="<i8").tolist() == [5, 6]


def test_v2_json_outputs_carry_base64_pngs():
    out, length = v2.encode_response("tiny", v2.Reply("7", [("image", False), ("seed", False)]), [(b"png", 9)])
    assert length is None
    assert json.loads(out) == {"model_name": "tiny", "model_version": "1", "id": "7", "outputs": [
        {"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(b"png").decode()]},
        {"name": "seed", "datatype": "INT64", "shape": [1], "data": [9]}]}


def prompt_input(data=("a",)) -> dict:
    return {"name": "prompt", "shape": [len(data)], "datatype": "BYTES", "data": list(data)}


@pytest.mark.parametrize("body, message", [
    ({"inputs": []}, "prompt input is required"),
    ({"input": []}, "not an inference request"),
    ({"inputs": [prompt_input(), {"name": "colour", "shape": [1], "datatype": "BYTES", "data": ["red"]}]},
     "unknown input 'colour'"),
    ({"inputs": [prompt_input(), prompt_input()]}, "given twice"),
    ({"inputs": [{"name": "prompt", "shape": [1], "datatype": "FP32", "data": [1.0]}]}, "datatype FP32"),
    ({"inputs": [{"name": "prompt", "shape": [3], "datatype": "BYTES", "data": ["a", "b"]}]}, "does not match"),
    ({"inputs": [{"name": "prompt", "shape": [1], "datatype": "BYTES"}]}, "neither data"),
    ({"inputs": [prompt_input(("a", "b", "c")), {"name": "seed", "shape": [2], "datatype": "INT64", "data": [1, 2]}]},
     "2 elements for 3 prompts"),
    ({"inputs": [prompt_input(), {"name": "steps", "shape": [1], "datatype": "FP32", "data": [2.5]}]},
     "datatype FP32 is not one of INT16"),
    ({"inputs": [prompt_input(), {"name": "steps", "shape": [1], "datatype": "INT32", "data": ["2"]}]},
     "expected a number"),
    ({"inputs": [prompt_input(["a"] * 9)]}, "1 to 8"),
    ({"inputs": [prompt_input()], "parameters": {"temperature": 1}}, "unknown parameters"),
    ({"inputs": [prompt_input()], "outputs": [{"name": "latents"}]}, "unknown output"),
    ({"inputs": [{"name": "prompt", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 10}}]},
     "past the body"),
])
def test_v2_bad_requests_say_what_is_wrong(body, message):
    with pytest.raises(TensorProtocolError, match=message):
        v2.parse_infer(header(body), b"", 8)


def test_v2_binary_framing_errors():
    with pytest.raises(TensorProtocolError, match="outside"):
        v2.split_body(b"{}", "10")
    head = header({"inputs": [prompt_input()]})
    with pytest.raises(TensorProtocolError, match="belong to no input"):
        v2.parse_infer(head, b"extra", 8)
    cut = header({"inputs": [{"name": "prompt", "shape": [1], "datatype": "BYTES",
                              "parameters": {"binary_data_size": 6}}]})
    with pytest.raises(TensorProtocolError, match="shorter than its length"):
        v2.parse_infer(cut, b"\x09\x00\x00\x00ab", 8)


# ---------------------------------------------------------------- a real server
@pytest.fixture(scope="module")
def server(models_dir, module_servers):
    return module_servers(models_dir, "tensor", "--api-key", KEY)


def png(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_tf_serving_status_and_predict_as_documented(server):
    # GET /v1/models/${MODEL_NAME}, and the row and columnar predict bodies, as tensorflow.org/tfx/serving/api_rest.
    status = httpx.get(server.url + "/v1/models/tiny", headers=AUTH)
    assert status.status_code == 200
    assert status.json()["model_version_status"] == [
        {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]
    rows = httpx.post(server.url + "/v1/models/tiny:predict", headers=AUTH, timeout=120, json={
        "signature_name": "serving_default",
        "instances": [{"prompt": "a lighthouse", "steps": 2, "seed": 11}, {"prompt": "a boat", "steps": 2}]})
    assert rows.status_code == 200, rows.text
    predictions = rows.json()["predictions"]
    assert len(predictions) == 2 and predictions[0]["seed"] == 11
    assert png(predictions[0]["image"]).size == (64, 64)
    columns = httpx.post(server.url + "/v1/models/tiny/versions/1:predict", headers=AUTH, timeout=120,
                         json={"inputs": {"prompt": ["a lighthouse"], "steps": 2, "seed": 11}})
    assert columns.status_code == 200 and columns.json()["outputs"]["seed"] == [11]
    # The same seed and settings give the same picture, whichever format asked (the row body ran it beside another
    # instance, the columnar one alone: equal within the batch tolerance, not necessarily to the byte).
    assert_same_picture(base64.b64decode(columns.json()["outputs"]["image"][0]),
                        base64.b64decode(predictions[0]["image"]))
    metadata = httpx.get(server.url + "/v1/models/tiny/metadata", headers=AUTH).json()
    assert metadata["metadata"]["signature_def"]["signature_def"]["serving_default"]["inputs"]["prompt"]["dtype"] \
        == "DT_STRING"


def test_tf_serving_errors_are_tf_serving_errors(server):
    missing = httpx.post(server.url + "/v1/models/nope:predict", headers=AUTH, json={"instances": ["a"]})
    assert missing.status_code == 404 and missing.json() == {"error": "Servable not found for request: Latest(nope)"}
    assert httpx.get(server.url + "/v1/models/tiny/versions/2", headers=AUTH).status_code == 404
    for body in ({"instances": [{"prompt": "a", "steps": 0}]}, {"instances": [{"prompt": "a", "colour": "red"}]},
                 {"instances": [1.0, 2.0, 5.0]}):
        bad = httpx.post(server.url + "/v1/models/tiny:predict", headers=AUTH, json=body)
        assert bad.status_code == 400 and isinstance(bad.json()["error"], str), bad.text
    assert httpx.post(server.url + "/v1/models/tiny:predict", headers=AUTH, content=b"{").status_code == 400
    assert httpx.post(server.url + "/v1/models/tiny:predict", json={"instances": ["a"]}).status_code == 401


def test_openai_models_retrieve_shares_the_path(server):
    import openai

    model = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0).models.retrieve("tiny")
    assert model.id == "tiny" and model.owned_by == "sdserve"


def test_v2_health_and_metadata_as_documented(server):
    # Health needs no key: kubelets and KServe's probes carry none.
    assert httpx.get(server.url + "/v2/health/live").json() == {"live": True}
    assert httpx.get(server.url + "/v2/health/ready").status_code == 200
    assert httpx.get(server.url + "/v2/models/tiny/ready", headers=AUTH).json() == {"name": "tiny", "ready": True}
    metadata = httpx.get(server.url + "/v2/models/tiny", headers=AUTH).json()
    assert metadata["name"] == "tiny" and metadata["versions"] == ["1"]
    assert {"name": "prompt", "datatype": "BYTES", "shape": [-1]} in metadata["inputs"]
    assert {"name": "image", "datatype": "BYTES", "shape": [-1]} in metadata["outputs"]
    assert httpx.get(server.url + "/v2/models/nope", headers=AUTH).status_code == 404


def test_v2_infer_json_as_documented(server):
    # The protocol's JSON example, with sdserve's inputs: kserve.github.io/website/docs/concepts/.../v2-protocol
    r = httpx.post(server.url + "/v2/models/tiny/infer", headers=AUTH, timeout=120, json={
        "id": "42",
        "inputs": [{"name": "prompt", "shape": [2], "datatype": "BYTES", "data": ["a lighthouse", "a boat"]},
                   {"name": "steps", "shape": [1], "datatype": "INT32", "data": [2]},
                   {"name": "seed", "shape": [2], "datatype": "INT64", "data": [11, 12]}],
        "outputs": [{"name": "image"}, {"name": "seed"}]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] == "42" and body["model_name"] == "tiny"
    image, seed = body["outputs"]
    assert image["datatype"] == "BYTES" and image["shape"] == [2] and seed["data"] == [11, 12]
    assert png(image["data"][0]).size == (64, 64)
    bad = httpx.post(server.url + "/v2/models/tiny/infer", headers=AUTH, json={
        "inputs": [{"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["a"]},
                   {"name": "steps", "shape": [1], "datatype": "INT32", "data": [1000]}]})
    assert bad.status_code == 400 and "steps" in bad.json()["error"]


def test_tritonclient_unmodified(server):
    client = triton.InferenceServerClient(url=f"127.0.0.1:{server.port}", network_timeout=120)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("tiny", headers=AUTH)
    assert client.get_model_metadata("tiny", headers=AUTH)["outputs"][0]["name"] == "image"
    prompt = triton.InferInput("prompt", [2], "BYTES")
    prompt.set_data_from_numpy(np.array([b"a lighthouse", "un phare".encode()], dtype=object))  # binary by default
    steps = triton.InferInput("steps", [1], "INT32")
    steps.set_data_from_numpy(np.array([2], dtype=np.int32))
    seed = triton.InferInput("seed", [1], "INT64")
    seed.set_data_from_numpy(np.array([11], dtype=np.int64), binary_data=False)
    result = client.infer("tiny", [prompt, steps, seed], headers=AUTH)  # no outputs named: all come back binary
    pngs = result.as_numpy("image")
    assert pngs.shape == (2,) and Image.open(io.BytesIO(pngs[0])).size == (64, 64)
    assert result.as_numpy("seed").tolist() == [11, 11]
    as_json = client.infer("tiny", [prompt, steps, seed], headers=AUTH,
                           outputs=[triton.InferRequestedOutput("image", binary_data=False)])
    # Same prompt, seed and steps: the same picture, base64 in JSON (its batch may have formed otherwise).
    assert_same_picture(base64.b64decode(as_json.as_numpy("image")[0]), pngs[0])
    with pytest.raises(InferenceServerException, match="unknown model 'nope'"):
        client.infer("nope", [prompt], headers=AUTH)
    with pytest.raises(InferenceServerException, match="401|key"):
        client.infer("tiny", [prompt])


def test_v2_binary_request_header_gets_the_json_checks(server):
    """The JSON header of a binary-extension body is checked like any JSON body (depth, NaN), the tail is not."""
    deep = b'{"inputs": [{"name": "prompt", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 5}, ' \
           b'"data": ' + b"[" * 300 + b"]" * 300 + b"}]}"
    r = httpx.post(server.url + "/v2/models/tiny/infer", content=deep + b"\x01\x00\x00\x00a",
                   headers={**AUTH, "Inference-Header-Content-Length": str(len(deep))})
    assert r.status_code == 400 and "nested deeper" in r.json()["error"]
