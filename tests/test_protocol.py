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
