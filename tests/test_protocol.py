import numpy as np
import pytest
from flwr.app import ConfigRecord, RecordDict

from hyprstream.errors import ValidationError
from hyprstream.protocol import ReplyStatus, TrainReply, TrainRequest

pytestmark = pytest.mark.unit


def request(**over):
    base = dict(model="m", model_version=3, task="digits", layers=("fc1", "head"), local_steps=5, batch_size=8,
                lr=0.01, seed=7, weights={"fc1.weight": np.ones((2, 2), np.float32)})
    return TrainRequest(**{**base, **over})


def test_request_round_trip():
    req = request()
    back = TrainRequest.from_content(req.to_content())
    assert back.layers == ("fc1", "head") and back.model_version == 3 and back.lr == pytest.approx(0.01)
    np.testing.assert_array_equal(back.weights["fc1.weight"], req.weights["fc1.weight"])
    assert req.payload_bytes() == 16


def test_reply_round_trip():
    rep = TrainReply(ReplyStatus.OK, 3, ("fc1",), {"fc1.weight": np.full((2, 2), 0.5, np.float32)},
                     num_examples=40, train_loss=0.25, steps=5)
    back = TrainReply.from_content(rep.to_content())
    assert back.status is ReplyStatus.OK and back.num_examples == 40 and back.train_loss == 0.25
    np.testing.assert_array_equal(back.delta["fc1.weight"], rep.delta["fc1.weight"])


@pytest.mark.parametrize("mutate, match", [
    (lambda c: c["config"].__setitem__("schema", "other/1"), "schema"),
    (lambda c: c["config"].__setitem__("layers", []), "layers"),
    (lambda c: c["config"].__setitem__("local_steps", 0), "local_steps"),
    (lambda c: c["config"].__setitem__("lr", float("nan")), "lr"),
    (lambda c: c["config"].__setitem__("model_version", "3"), "model_version"),
    (lambda c: c.__delitem__("weights"), "weights"),
])
def test_request_validation(mutate, match):
    content = request().to_content()
    mutate(content)
    with pytest.raises(ValidationError, match=match):
        TrainRequest.from_content(content)


def test_reply_rejects_unknown_status_and_wrong_record_kind():
    content = TrainReply(ReplyStatus.DECLINED, 1, (), reason="busy").to_content()
    content["config"]["status"] = "maybe"
    with pytest.raises(ValidationError, match="status"):
        TrainReply.from_content(content)
    with pytest.raises(ValidationError, match="is a ConfigRecord, expected"):
        TrainReply.from_content(RecordDict({"delta": ConfigRecord({}), "metrics": ConfigRecord({}),
                                            "config": ConfigRecord({"schema": "hyprstream.train-reply/1"})}))


def test_request_encoding_is_sent_only_when_not_fp32():
    from hyprstream.codec import Encoding

    plain = request().to_content()
    assert "update_encoding" not in plain["config"]  # older agents see exactly the old message
    assert TrainRequest.from_content(plain).update_encoding is Encoding.FP32
    content = request(update_encoding="int8").to_content()
    assert content["config"]["update_encoding"] == "int8"
    assert TrainRequest.from_content(content).update_encoding is Encoding.INT8
    content["config"]["update_encoding"] = "int4"
    with pytest.raises(ValidationError, match="unknown update encoding"):
        TrainRequest.from_content(content)
    with pytest.raises(ValidationError, match="unknown update encoding"):
        request(update_encoding="fp16")


def test_int8_reply_round_trip_and_bytes():
    rng = np.random.default_rng(3)
    delta = {"fc1.weight": rng.standard_normal((20, 30)).astype(np.float32),
             "fc1.bias": rng.standard_normal(30).astype(np.float32)}
    rep = TrainReply(ReplyStatus.OK, 3, ("fc1",), delta, num_examples=40, encoding="int8", encoding_seed=11)
    content = rep.to_content()
    assert content["config"]["encoding"] == "int8"
    assert content["delta"]["fc1.weight"].dtype == "int8"
    back = TrainReply.from_content(content)
    assert back.payload_bytes() == (600 + 4) + (30 + 4)  # int8 values plus one float32 scale per tensor
    assert rep.payload_bytes() == back.payload_bytes()
    for name, d in delta.items():
        step = np.abs(d).max() / 127
        assert back.delta[name].dtype == np.float32
        assert np.all(np.abs(back.delta[name] - d) <= step * (1 + 1e-5))
    # the same seed encodes the same way
    again = TrainReply.from_content(rep.to_content())
    np.testing.assert_array_equal(again.delta["fc1.weight"], back.delta["fc1.weight"])
    # a plain reply carries no encoding key and counts float32 bytes
    plain = TrainReply(ReplyStatus.OK, 3, ("fc1",), delta, num_examples=40)
    assert "encoding" not in plain.to_content()["config"] and plain.payload_bytes() == 4 * 630


@pytest.mark.parametrize("mutate, match", [
    (lambda c: c.__delitem__("scales"), "scales"),
    (lambda c: c["scales"].__delitem__("fc1.bias"), "scales"),
    (lambda c: c["config"].__setitem__("encoding", "int3"), "unknown update encoding"),
])
def test_int8_reply_validation(mutate, match):
    rep = TrainReply(ReplyStatus.OK, 3, ("fc1",), {"fc1.weight": np.ones((2, 2), np.float32),
                                                    "fc1.bias": np.ones(2, np.float32)}, encoding="int8")
    content = rep.to_content()
    mutate(content)
    with pytest.raises(ValidationError, match=match):
        TrainReply.from_content(content)


def test_int8_reply_with_non_finite_scale_or_fp32_values_is_refused():
    from flwr.app import ArrayRecord

    from hyprstream.protocol import arrays_to_record

    rep = TrainReply(ReplyStatus.OK, 3, ("fc1",), {"fc1.weight": np.ones((2, 2), np.float32)}, encoding="int8")
    content = rep.to_content()
    content["scales"] = arrays_to_record({"fc1.weight": np.full(1, np.nan, np.float32)})
    with pytest.raises(ValidationError, match="scale"):
        TrainReply.from_content(content)
    content = rep.to_content()
    content["delta"] = arrays_to_record({"fc1.weight": np.ones((2, 2), np.float32)})
    assert isinstance(content["delta"], ArrayRecord)
    with pytest.raises(ValidationError, match="int8"):
        TrainReply.from_content(content)
    with pytest.raises(ValidationError, match="NaN or infinite"):
        TrainReply(ReplyStatus.OK, 3, ("fc1",), {"fc1.weight": np.full((2,), np.nan, np.float32)},
                   encoding="int8").to_content()
