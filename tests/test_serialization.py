"""save_quantized / load_quantized in the diffusers layout: round trips for every method, a
pipeline around a loaded transformer, atomic loading, clear errors that name the file."""

import copy
import json
import os

import numpy as np
import pytest
import torch

import clq_triton
from clq_triton import CLQ, QuantConfig, QuantLinear
from clq_triton.blocks import output_tensors, run_model
from diffusers_models import MODELS, output
from toy_models import dit_pipeline, planted_dit, sample


@pytest.fixture(autouse=True)
def torch_backend():
    with clq_triton.backend("torch"):  # many model replays: the references are faster here
        yield


def outputs(model, data):
    with torch.no_grad():
        return [output_tensors(run_model(model, s, "cpu"))[0] for s in data.samples]


METHODS = {"rtn": "rtn", "hadamard": "hadamard", "quarot": "quarot",
           "smoothquant": clq_triton.SmoothQuant(alpha=0.6),
           "svdquant": clq_triton.SVDQuant(rank=4),
           "clq": CLQ(w_clip_grid=(1.0, 0.85), a_clip_grid=(1.0, 0.9))}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_save_load_bit_identical_for_every_method(pipe_and_data, tmp_path, name):
    pipe, data = pipe_and_data
    model = copy.deepcopy(pipe.transformer)
    clq_triton.patch(model, QuantConfig.from_bits("w4a8", group_size=None if name == "rtn"
                                                  else 64), METHODS[name],
                     data if clq_triton.METHODS[name]().calibrated else None, progress=False)
    clq_triton.save_quantized(model, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["config.json", "diffusion_pytorch_model.safetensors"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["_class_name"] == "DiTTransformer2DModel"
    q = config["quantization_config"]
    assert q["quant_method"] == "clq_triton" and q["format"] == 2
    assert q["method"]["method"] == name and len(q["layers"]) == 12
    want = outputs(model, data)
    for target in (None, copy.deepcopy(pipe.transformer)):  # built from config.json, or given
        loaded = clq_triton.load_quantized(str(tmp_path), target)
        assert all(torch.equal(a, b) for a, b in zip(outputs(loaded, data), want))
        assert sum(isinstance(m, QuantLinear) for m in loaded.modules()) == 12


def test_pipeline_from_pretrained_with_a_loaded_transformer(tmp_path, capfd):
    from diffusers import DiffusionPipeline

    pipe = dit_pipeline(seed=4, layers=1)
    pipe.save_pretrained(tmp_path / "base")
    clq_triton.patch(pipe.transformer, "w4a4", progress=False)
    clq_triton.save_quantized(pipe.transformer, str(tmp_path / "q"))
    want = sample(pipe, [2, 5], steps=2)
    loaded = DiffusionPipeline.from_pretrained(
        tmp_path / "base", transformer=clq_triton.load_quantized(str(tmp_path / "q")))
    loaded.set_progress_bar_config(disable=True)
    assert "accelerate" not in capfd.readouterr().err  # a dependency: no warning about it
    assert isinstance(loaded.transformer.transformer_blocks[0].ff.net[2], QuantLinear)
    np.testing.assert_array_equal(sample(loaded, [2, 5], steps=2), want)


def test_bf16_model_keeps_its_dtypes(tmp_path, gen):
    model, inputs = MODELS["pixart"](gen)
    model = model.to(torch.bfloat16).eval()
    clq_triton.patch(model, QuantConfig(group_size=None), progress=False)
    clq_triton.save_quantized(model, str(tmp_path))
    loaded = clq_triton.load_quantized(str(tmp_path))
    assert {k: v.dtype for k, v in loaded.state_dict().items() if torch.is_tensor(v)} == \
        {k: v.dtype for k, v in model.state_dict().items() if torch.is_tensor(v)}


def _saved(tmp_path, bits="w4a4"):
    model = planted_dit(0, layers=1).eval()
    clq_triton.patch(model, bits, progress=False)
    clq_triton.save_quantized(model, str(tmp_path))
    return model


def _snapshot(model):
    return ([type(m) for m in model.modules()],
            {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)})


def _unchanged(model, snap):
    types, state = _snapshot(model)
    return types == snap[0] and all(torch.equal(state[k], v) for k, v in snap[1].items())


def _refused_and_untouched(directory, match):
    """Loading into a fresh FP model raises ``match`` and leaves that model as it was."""
    target = planted_dit(0, layers=1).eval()
    snap = _snapshot(target)
    with pytest.raises(ValueError, match=match):
        clq_triton.load_quantized(str(directory), target)
    assert _unchanged(target, snap)


def _edit_weights(directory, edit):
    from safetensors.torch import load_file, save_file

    path = str(directory / "diffusion_pytorch_model.safetensors")
    state = load_file(path)
    edit(state)
    save_file(state, path)


def test_truncated_weights_name_the_file_and_leave_the_model_alone(tmp_path):
    _saved(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    _refused_and_untouched(tmp_path, "diffusion_pytorch_model.safetensors: cannot read")


def test_wrong_tensor_shape_leaves_the_model_alone(tmp_path):
    def cut(state):
        key = next(k for k in state if k.endswith("ff.net.2.qweight"))
        state[key] = state[key][:, :-1].contiguous()

    _saved(tmp_path)
    _edit_weights(tmp_path, cut)
    _refused_and_untouched(tmp_path, "does not match the model.*ff.net.2.qweight")


def test_a_broken_perm_is_refused_before_the_model_changes(tmp_path):
    def duplicate_an_entry(state):
        key = next(k for k in state if k.endswith(".perm"))
        state[key][0] = state[key][1]

    model = planted_dit(0, layers=1).eval()
    clq_triton.patch(model, "w4a4", CLQ(clps=False), clq_triton.CalibrationData.from_inputs(
        [dict(hidden_states=torch.randn(1, 4, 8, 8), timestep=torch.tensor([5]),
              class_labels=torch.tensor([1]))]), progress=False)
    clq_triton.save_quantized(model, str(tmp_path))
    _edit_weights(tmp_path, duplicate_an_entry)
    _refused_and_untouched(tmp_path, "not a permutation")


def test_config_errors_name_the_file(tmp_path):
    _saved(tmp_path)
    cfg = tmp_path / "config.json"
    text = cfg.read_text()
    cfg.write_text(text[:-20])
    with pytest.raises(ValueError, match="config.json: cannot read it as JSON"):
        clq_triton.load_quantized(str(tmp_path))
    meta = json.loads(text)
    meta["quantization_config"]["format"] = 1
    cfg.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="config.json: clq checkpoint format 1.*again"):
        clq_triton.load_quantized(str(tmp_path))
    del meta["quantization_config"]
    cfg.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="no clq_triton quantization_config"):
        clq_triton.load_quantized(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nowhere/config.json"):
        clq_triton.load_quantized(str(tmp_path / "nowhere"))


def test_format_1_directory_is_refused_clearly(tmp_path):
    (tmp_path / "clq_config.json").write_text(json.dumps({"format": 1}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="clq_config.json: a clq-triton 0.1 checkpoint"):
        clq_triton.load_quantized(str(tmp_path))


def test_mismatched_models_are_refused(tmp_path, gen):
    _saved(tmp_path)
    with pytest.raises(ValueError, match="is for DiTTransformer2DModel"):
        clq_triton.load_quantized(str(tmp_path), MODELS["pixart"](gen)[0])
    other = planted_dit(0, layers=1).eval()
    clq_triton.patch(other, QuantConfig.from_bits("w8a8", group_size=128), progress=False)
    snap = _snapshot(other)
    with pytest.raises(ValueError, match="quantized as w8a8 group 128 .* in the model but as "
                                         "w4a4 group 64"):
        clq_triton.load_quantized(str(tmp_path), other)
    assert _unchanged(other, snap)
    with pytest.raises(ValueError, match="no QuantLinear"):
        clq_triton.save_quantized(planted_dit(0, layers=1), str(tmp_path))


@pytest.mark.parametrize("cast", ["before patching", "after patching"])
def test_bf16_model_round_trips_bit_for_bit(tmp_path, gen, cast):
    """Built in the saved dtype: non-persistent buffers (PixArt's pos_embed) are cast as the
    saved model's were, so the loaded model gives the saved model's output exactly. Cast
    after patch(), QuantLinear's scales, shift and bias stay float32, so it saves and loads
    the same way."""
    model, inputs = MODELS["pixart"](gen)
    model = model.eval()
    if cast == "before patching":
        model.to(torch.bfloat16)
    clq_triton.patch(model, QuantConfig(group_size=None), progress=False)
    model.to(torch.bfloat16)
    clq_triton.save_quantized(model, str(tmp_path))
    loaded = clq_triton.load_quantized(str(tmp_path))
    bf16 = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v
            for k, v in inputs.items()}
    with torch.no_grad():
        assert torch.equal(output(loaded, bf16), output(model, bf16))


@pytest.mark.parametrize("where", ["top", "method", "config", "layer", "layer config"])
def test_unknown_fields_are_refused_naming_the_writing_version(tmp_path, where):
    """One rule: a field this clq-triton does not know, wherever it is in the
    quantization_config, is refused (never ignored), naming the version that wrote it; the
    model loaded into is left alone."""
    _saved(tmp_path)
    cfg = tmp_path / "config.json"
    meta = json.loads(cfg.read_text())
    quant = meta["quantization_config"]
    quant["clq_triton_version"] = "9.1.0"
    layer = next(iter(quant["layers"].values()))
    target = {"top": quant, "method": quant["method"], "config": quant["config"],
              "layer": layer, "layer config": layer["config"]}[where]
    target["from_the_future"] = 1
    cfg.write_text(json.dumps(meta))
    _refused_and_untouched(tmp_path, "unknown to this clq-triton .*written by clq-triton "
                                     "9.1.0, a newer version")
