"""Hostile ONNX external-data locations are refused before onnx/onnxruntime read them."""

import os
import shutil

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from mythos_deploy import CheckpointError
from mythos_deploy.safety import check_external_data, external_locations
from mythos_deploy.runtimes import load


def _model_with_location(path, location):
    t = numpy_helper.from_array(np.zeros(4, np.float32), "w")
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    t.external_data.add(key="location", value=location)
    t.external_data.add(key="length", value="16")
    g = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], initializer=[t])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 10
    path.write_bytes(m.SerializeToString())


@pytest.mark.parametrize("location", ["/etc/passwd", "../secret.bin", "sub/../../secret.bin", "..\\\\secret.bin", "C:\\\\x.bin", ""])
def test_escaping_locations_are_refused(tmp_path, location):
    (tmp_path / "art").mkdir()
    _model_with_location(tmp_path / "art" / "model.onnx", location)
    with pytest.raises(CheckpointError, match="refused"):
        check_external_data(tmp_path / "art" / "model.onnx")


def test_symlink_out_of_the_directory_is_refused(tmp_path):
    (tmp_path / "art").mkdir()
    (tmp_path / "outside.bin").write_bytes(b"\0" * 16)
    os.symlink(tmp_path / "outside.bin", tmp_path / "art" / "data.bin")
    _model_with_location(tmp_path / "art" / "model.onnx", "data.bin")
    assert external_locations(tmp_path / "art" / "model.onnx") == ["data.bin"]
    with pytest.raises(CheckpointError, match="outside"):
        check_external_data(tmp_path / "art" / "model.onnx")


def test_plain_relative_location_is_accepted(tmp_path):
    (tmp_path / "model.onnx.data").write_bytes(b"\0" * 16)
    _model_with_location(tmp_path / "model.onnx", "model.onnx.data")
    check_external_data(tmp_path / "model.onnx")


def test_runtime_load_refuses_a_hostile_artifact_even_without_verification(artifacts, tmp_path):
    _, od = artifacts[("mla", "loop")]
    bad = tmp_path / "bad"
    shutil.copytree(od, bad)
    _model_with_location(bad / "model.onnx", "../../etc/passwd")
    with pytest.raises(CheckpointError, match="refused"):
        load(bad, verify=False)
    (bad / "model.onnx").write_bytes(b"\x08\x01garbage")
    with pytest.raises(CheckpointError):
        load(bad, verify=False)
