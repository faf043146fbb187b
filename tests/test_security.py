"""Loading a SavedModel runs its graph: tlkit lists its ops first and refuses file-system ops unless trusted.

A SavedModel built here serves predictions and, on every call, copies a "secret" file with
``tf.io.read_file`` / ``tf.io.write_file``: :func:`tlkit.savedmodel_ops.unsafe_ops` flags it,
``tlkit inspect`` says so, and ``tlkit predict`` refuses it (nothing gets copied) unless
``--trust`` is given (then the copy happens: the risk is real). A plain Keras export, a
tlkit SavedModel export and a TF1 SavedModel are not flagged, although every SavedModel's
saver holds ``SaveV2`` / ``RestoreV2``.
"""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tlkit.cli import build_parser, main
from tlkit.errors import ConfigError
from tlkit.predict import load_predictor
from tlkit.savedmodel_ops import inspect_saved_model, saved_model_ops, unsafe_ops

LABELS = ["a", "b"]


def _classifier() -> keras.Model:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((None, None, 3))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255.0)(inputs))
    return keras.Model(inputs, keras.layers.Dense(len(LABELS), activation="softmax")(x))


def _metadata(folder: Path) -> None:
    """What a tlkit version directory holds beside saved_model.pb, so `tlkit predict` accepts it."""
    (folder / "metadata.json").write_text(json.dumps({"labels": LABELS, "modality": "image"}), encoding="utf-8")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("security")
    secret = root / "secret.txt"
    secret.write_text("the user's private key", encoding="utf-8")
    stolen = root / "stolen.txt"
    model = _classifier()

    class Exfiltrating(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="image")])
        def serve(self, image: tf.Tensor) -> dict[str, tf.Tensor]:
            tf.io.write_file(str(stolen), tf.io.read_file(str(secret)))
            return {"probabilities": self.model(tf.cast(image, tf.float32), training=False)}

    bad = root / "bad"
    module = Exfiltrating()
    tf.saved_model.save(module, str(bad), signatures={"serving_default": module.serve})
    _metadata(bad)

    plain = root / "plain_keras"
    model.export(str(plain), verbose=False)

    from tlkit.export.formats import ExportContext
    from tlkit.export.savedmodel import SAVEDMODEL, write_savedmodel
    from tlkit.export.source import ExportSource
    from tlkit.rundir import InputContract

    # tlkit's own serving module around the model (write_savedmodel reads only the model, labels and contract).
    source = ExportSource(
        run=None, name="tiny", model=model, labels=LABELS,  # type: ignore[arg-type]
        contract=InputContract("image", (8, 8)), input_name="image", fixed_shape=(8, 8, 3), status={}, config={},
        multi_label=False, has_savedmodel_backbone=False, notes=[],
    )
    exported = root / "tlkit_export"
    exported.mkdir()
    write_savedmodel(SAVEDMODEL, source, exported, ExportContext(calibration=list))
    _metadata(exported)

    image = root / "x.png"
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(image)
    return {"bad": bad, "plain": plain, "export": exported, "secret": secret, "stolen": stolen, "image": image,
            "tf1": _tf1_saved_model(root / "tf1")}


def _tf1_saved_model(path: Path) -> Path:
    """A TF1 SavedModel (saver nodes in the top-level graph under ``save/``)."""
    tf1 = tf.compat.v1
    with tf.Graph().as_default():
        x = tf1.placeholder(tf.float32, [None, 2], name="x")
        y = tf.matmul(x, tf1.get_variable("w", [2, 2]), name="y")
        with tf1.Session() as session:
            session.run(tf1.global_variables_initializer())
            builder = tf1.saved_model.Builder(str(path))
            signature = tf1.saved_model.predict_signature_def({"x": x}, {"y": y})
            builder.add_meta_graph_and_variables(session, ["serve"], signature_def_map={"serving_default": signature})
            builder.save()
    return path


def test_file_reading_and_writing_ops_are_flagged(models: dict[str, Path]) -> None:
    flagged = unsafe_ops(models["bad"])
    assert flagged == {"ReadFile": "reads files", "WriteFile": "writes files"}
    report = inspect_saved_model(models["bad"])
    assert all(name.startswith("__inference_serve") for name in report.where["ReadFile"])
    # The saver's own checkpoint ops are in every SavedModel and are not what is flagged.
    assert {"SaveV2", "RestoreV2"} <= saved_model_ops(models["bad"])
    assert any("traced_restore" in name for name in report.saver_functions)
    assert not models["stolen"].exists()  # reading the proto ran nothing


@pytest.mark.parametrize("kind", ["plain", "export", "tf1"])
def test_keras_tlkit_and_tf1_saved_models_are_not_flagged(models: dict[str, Path], kind: str) -> None:
    ops = saved_model_ops(models[kind])
    assert {"SaveV2", "RestoreV2"} <= ops and ("MatMul" in ops or "BatchMatMulV2" in ops)
    assert unsafe_ops(models[kind]) == {}


def test_checkpoint_ops_outside_the_saver_are_flagged(tmp_path: Path) -> None:
    class Restoring(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([], tf.string)])
        def serve(self, prefix: tf.Tensor) -> tf.Tensor:
            restored = tf.raw_ops.RestoreV2(prefix=prefix, tensor_names=["v"], shape_and_slices=[""],
                                            dtypes=[tf.float32])
            return restored[0]

    module = Restoring()
    tf.saved_model.save(module, str(tmp_path / "m"), signatures={"serving_default": module.serve})
    assert "outside the SavedModel's own saver" in unsafe_ops(tmp_path / "m")["RestoreV2"]


def test_unregistered_and_python_ops_are_flagged(tmp_path: Path) -> None:
    from tensorflow.core.protobuf import saved_model_pb2

    path = tmp_path / "custom"
    _tf1_saved_model(path)
    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((path / "saved_model.pb").read_bytes())
    graph = proto.meta_graphs[0].graph_def
    graph.node.add(name="shell", op="ShellExecute")  # a custom op from some shared library
    graph.node.add(name="callback", op="EagerPyFunc")
    (path / "saved_model.pb").write_bytes(proto.SerializeToString())
    flagged = unsafe_ops(path)
    assert "not an op of this TensorFlow" in flagged["ShellExecute"]
    assert "runs Python" in flagged["EagerPyFunc"]


def test_tlkit_predict_refuses_an_unsafe_saved_model_unless_trusted(
    models: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    bad, image, stolen = models["bad"], models["image"], models["stolen"]
    with pytest.raises(ConfigError, match=r"ReadFile: reads files.*WriteFile: writes files.*--trust"):
        load_predictor(bad)
    assert main(["predict", str(bad), str(image)]) == 2
    assert "tlkit inspect" in capsys.readouterr().err
    assert not stolen.exists()

    assert main(["inspect", str(bad)]) == 1
    printed = capsys.readouterr().out
    assert "ReadFile" in printed and "reads files" in printed and "refuses" in printed
    assert main(["inspect", str(models["export"]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["unsafe"] == {}

    # A clean export predicts without --trust; the bad one runs only with it, and then it does copy the file.
    assert main(["predict", str(models["export"]), str(image), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["error"] is None
    assert main(["predict", str(bad), str(image), "--trust", "--json"]) == 0
    assert stolen.read_text(encoding="utf-8") == models["secret"].read_text(encoding="utf-8")


def test_predict_help_says_a_model_is_code(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["predict", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "runs its TensorFlow graph" in text and "ReadFile" in text and "--trust" in text
    assert "tlkit inspect" in text
