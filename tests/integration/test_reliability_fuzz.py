"""Fuzzing the request paths over gRPC: only OK or INVALID_ARGUMENT, never INTERNAL.

Hypothesis builds requests for both services -- random and mutated image bytes, raw
arrays and tensors of any shape, random option values and parameters, stream items --
and sends them to one real server. Every answer must be OK or INVALID_ARGUMENT with a
message, and the server must still serve a good request afterwards. Examples are
derandomised so CI runs the same ones; ``CVSERVE_FUZZ_EXAMPLES`` fuzzes longer and
``CVSERVE_FUZZ_RANDOM=1`` explores new examples.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cvserve._proto.cvserve.v1 import types_pb2 as types_pb
from cvserve._proto.cvserve.v1 import vision_service_pb2 as pb
from cvserve._proto.cvserve.v1 import vision_service_pb2_grpc as pb_grpc
from cvserve._proto.inference import grpc_service_pb2 as kpb
from cvserve._proto.inference import grpc_service_pb2_grpc as kpb_grpc
from cvserve.config import ServerConfig
from cvserve.kserve.servicer import add_kserve_servicer
from cvserve.models.repository import load_repository
from cvserve.server.build import ServerThread
from tests.integration.test_server_ops import ROOT, red, write_repository
from tests.unit.service.test_fuzz_imaging import SEEDS, mutated_images

EXAMPLES = int(os.environ.get("CVSERVE_FUZZ_EXAMPLES", "120"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=not os.environ.get("CVSERVE_FUZZ_RANDOM"),
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}
MODELS = [{"name": "det", "task": "instance"}, {"name": "seg", "task": "semantic"}]
_INT32 = st.integers(-(2**31), 2**31 - 1)


@pytest.fixture(scope="module")
def channel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[grpc.Channel]:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    specs = load_repository(write_repository(tmp_path_factory.mktemp("repo"), MODELS))
    config = ServerConfig(port=0, metrics_port=None, max_image_pixels=200_000, worker_threads=2)
    with (
        ServerThread(config, specs, servicers=[add_kserve_servicer]).start(wait_loaded=True) as srv,
        grpc.insecure_channel(srv.address) as chan,
    ):
        yield chan


def outcome(call: object) -> grpc.StatusCode:
    """Run ``call()``; its status code, after checking that a failure carries a message."""
    try:
        call()  # type: ignore[operator]
    except grpc.RpcError as e:
        assert e.details(), f"{e.code().name} without a message"
        return e.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def assert_serving(channel: grpc.Channel) -> None:
    raw = types_pb.RawImage(data=red(8, 8).tobytes(), height=8, width=8, channels=3)
    request = pb.DetectRequest(model="det", image=types_pb.Image(raw=raw))
    assert pb_grpc.VisionServiceStub(channel).Detect(request, timeout=10).detections


# ---- cvserve.v1 --------------------------------------------------------------------------------

images = st.one_of(
    st.builds(types_pb.Image, encoded=st.sampled_from(SEEDS)),
    st.builds(types_pb.Image, encoded=st.binary(max_size=1024)),
    st.builds(types_pb.Image, encoded=mutated_images()),
    st.builds(
        types_pb.Image,
        raw=st.builds(
            types_pb.RawImage,
            data=st.binary(max_size=300),
            height=st.integers(0, 2**31 - 1),
            width=st.integers(0, 2**31 - 1),
            channels=st.integers(0, 8),
        ),
    ),
    st.just(types_pb.Image()),
)


@st.composite
def detect_options(draw: st.DrawFn) -> pb.DetectOptions:
    """Mostly valid options (so requests get through to the model), sometimes any value at all."""
    wild = draw(st.integers(0, 3)) == 0
    options = pb.DetectOptions(
        class_ids=draw(st.lists(st.integers(0, 2**32 - 1 if wild else 2), max_size=3)),
        class_names=draw(
            st.lists(st.sampled_from(["red", "blue"] + wild * ["", "Red", "zebra"]), max_size=2)
        ),
    )
    options.mask_format = draw(_INT32 if wild else st.integers(0, 4))
    if draw(st.booleans()):
        options.score_threshold = draw(st.floats(width=32) if wild else st.floats(0, 1, width=32))
    if draw(st.booleans()):
        options.max_detections = draw(st.integers(0, 2**32 - 1))
    return options


def test_detect_and_segment_answer_ok_or_invalid_argument(channel: grpc.Channel) -> None:
    stub = pb_grpc.VisionServiceStub(channel)

    @FUZZ
    @given(st.sampled_from(["det", "seg"]), images, detect_options(), st.integers(0, 9))
    def run(model: str, image: types_pb.Image, options: pb.DetectOptions, dice: int) -> None:
        if (model == "seg") != (dice == 0):  # the wrong RPC for the model one time in ten
            request = pb.SegmentRequest(model=model, image=image)
            code = outcome(lambda: stub.Segment(request, timeout=10))
        else:
            request = pb.DetectRequest(model=model, image=image, options=options)
            code = outcome(lambda: stub.Detect(request, timeout=10))
        assert code in ALLOWED

    run()
    assert_serving(channel)


def test_stream_items_fail_one_by_one(channel: grpc.Channel) -> None:
    stub = pb_grpc.VisionServiceStub(channel)

    @FUZZ
    @given(st.lists(st.tuples(images, detect_options(), st.booleans()), min_size=1, max_size=4))
    def run(items: list[tuple[types_pb.Image, pb.DetectOptions, bool]]) -> None:
        requests = []
        for i, (image, options, empty) in enumerate(items):
            if empty:
                requests.append(pb.StreamRequest(correlation_id=str(i)))  # neither detect nor segment
            else:
                detect = pb.DetectRequest(model="det", image=image, options=options)
                requests.append(pb.StreamRequest(correlation_id=str(i), detect=detect))
        responses = list(stub.PredictStream(iter(requests), timeout=20))
        assert sorted(r.correlation_id for r in responses) == [str(i) for i in range(len(items))]
        for response in responses:
            if response.WhichOneof("result") == "error":
                assert response.error.code_name == "INVALID_ARGUMENT" and response.error.message

    run()
    assert_serving(channel)


# ---- the Open Inference Protocol ---------------------------------------------------------------


@st.composite
def infer_parameters(draw: st.DrawFn) -> dict[str, kpb.InferParameter]:
    names = ["score_threshold", "max_detections", "classes", "mask_format", "timeout", "priority",
             "sequence_id", "binary_data", "", "x"]  # fmt: skip
    values = st.one_of(
        st.builds(kpb.InferParameter, bool_param=st.booleans()),
        st.builds(kpb.InferParameter, int64_param=st.integers(-(2**63), 2**63 - 1)),
        st.builds(kpb.InferParameter, double_param=st.floats()),
        st.builds(
            kpb.InferParameter, string_param=st.sampled_from(["red", "none", "rle", "png", "", "1e9", "x"])
        ),
        st.builds(kpb.InferParameter, uint64_param=st.integers(0, 2**64 - 1)),
    )
    return draw(st.dictionaries(st.sampled_from(names), values, max_size=3))


@st.composite
def infer_requests(draw: st.DrawFn) -> kpb.ModelInferRequest:
    request = kpb.ModelInferRequest(
        model_name=draw(st.sampled_from(["det", "seg"])), id=draw(st.text(max_size=8))
    )
    for key, value in draw(infer_parameters()).items():
        request.parameters[key].CopyFrom(value)
    tensor = request.inputs.add(
        name=draw(st.sampled_from(["image", "image", "IMAGE", ""])),
        datatype=draw(st.sampled_from(["UINT8", "BYTES", "FP32", "INT64", "BF16", "nope"])),
        shape=draw(st.lists(st.integers(-2, 70), max_size=5)),
    )
    kind = draw(st.sampled_from(["raw", "bytes", "uint", "none"]))
    if kind == "raw":
        request.raw_input_contents.append(draw(st.binary(max_size=600)))
    elif kind == "bytes":
        tensor.contents.bytes_contents.extend(
            draw(st.lists(st.one_of(mutated_images(), st.binary()), max_size=3))
        )
    elif kind == "uint":
        tensor.contents.uint_contents.extend(draw(st.lists(st.integers(0, 300), max_size=50)))
    for name in draw(st.lists(st.sampled_from(["boxes", "scores", "labels", "masks", "nope"]), max_size=2)):
        output = request.outputs.add(name=name)
        if draw(st.booleans()):
            output.parameters["binary_data"].bool_param = draw(st.booleans())
    return request


def test_model_infer_answers_ok_or_invalid_argument(channel: grpc.Channel) -> None:
    stub = kpb_grpc.GRPCInferenceServiceStub(channel)

    @FUZZ
    @given(infer_requests())
    def run(request: kpb.ModelInferRequest) -> None:
        assert outcome(lambda: stub.ModelInfer(request, timeout=10)) in ALLOWED

    run()
    image = np.ascontiguousarray(red(8, 8))
    good = kpb.ModelInferRequest(model_name="det", raw_input_contents=[image.tobytes()])
    good.inputs.add(name="image", datatype="UINT8", shape=[8, 8, 3])
    assert stub.ModelInfer(good, timeout=10).outputs
    assert_serving(channel)
