"""LoRA: kohya and PEFT files on the tiny models, cheap switching, exact base output, the chainable node, bad LoRAs."""

from __future__ import annotations

import http.server
import logging
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))
import lora_factory as F  # noqa: E402
from sdxl_controlnet_img2img.pipeline.local.lora import adapters as L  # noqa: E402
from sdxl_controlnet_img2img.pipeline.local.lora import sources as S  # noqa: E402
from sdxl_controlnet_img2img.pipeline.local.generate import generate  # noqa: E402
from sdxl_controlnet_img2img.pipeline.handle import PipelineHandle  # noqa: E402
from sdxl_controlnet_img2img.pipeline.local.lora.adapters import LoraError, activate, load_lora  # noqa: E402
from sdxl_controlnet_img2img.pipeline.request import GenerationRequest, LoraSpec  # noqa: E402


def _own_pipeline(models):
    """A pipeline object of our own, built with plain diffusers (the library loader caches and would hand
    back the session's shared tiny_pipe, which must stay free of LoRA adapters)."""
    from diffusers import ControlNetModel, StableDiffusionXLControlNetImg2ImgPipeline

    cn = ControlNetModel.from_pretrained(models["controlnet"], local_files_only=True)
    p = StableDiffusionXLControlNetImg2ImgPipeline.from_pretrained(models["checkpoint"], controlnet=cn, local_files_only=True)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def pipe(tiny_models):
    p = _own_pipeline(tiny_models)
    yield p
    L.unload_all(p)


@pytest.fixture(scope="module")
def lora_files(pipe, tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    return {
        "kohya": F.write(F.kohya_state_dict(pipe, seed=1), d / "kohya_a.safetensors"),
        "peft": F.write(F.peft_state_dict(pipe, seed=2), d / "peft_b.safetensors"),
        "dir": d,
    }


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from conftest import make_test_image

    d = tmp_path_factory.mktemp("lora-imgs")
    make_test_image(64, 64, 1).save(d / "img.png")
    make_test_image(64, 64, 2).save(d / "ctl.png")
    return d / "img.png", d / "ctl.png"


def _run(pipe, inputs, loras=()):
    req = GenerationRequest.from_dict({
        "prompt": "ice fortress aurora", "image_url": str(inputs[0]), "control_image_url": str(inputs[1]),
        "num_inference_steps": 4, "strength": 0.5, "seed": 11, "enable_safety_checker": False,
        "loras": [{"path": str(l.path), "scale": l.scale} for l in loras],
    })
    return np.asarray(generate(pipe, req).images[0])


@pytest.fixture(scope="module")
def base(pipe, inputs):
    return _run(pipe, inputs)


@pytest.fixture
def count_reads(monkeypatch):
    """Count real file reads: wraps the one reader (it still reads)."""
    calls = []
    real = L.read_lora_file

    def counting(path, name=None, *args, **kwargs):
        calls.append(str(path))
        return real(path, name, *args, **kwargs)

    monkeypatch.setattr(L, "read_lora_file", counting)
    return calls


@pytest.mark.parametrize("fmt", ["kohya", "peft"])
def test_lora_changes_output_and_loads_every_layer(pipe, inputs, base, lora_files, fmt):
    out = _run(pipe, inputs, [LoraSpec(str(lora_files[fmt]), 1.0)])
    assert not np.array_equal(out, base)
    info = load_lora(pipe, str(lora_files[fmt]))
    assert info.format == ("kohya" if fmt == "kohya" else "diffusers")
    assert set(info.modules) == {"unet", "text_encoder", "text_encoder_2"} and info.skipped == ()


def test_scale_zero_equals_no_lora_and_removing_all_gives_base_exactly(pipe, inputs, base, lora_files):
    assert np.array_equal(_run(pipe, inputs, [LoraSpec(str(lora_files["kohya"]), 0.0)]), base)
    _run(pipe, inputs, [LoraSpec(str(lora_files["kohya"]), 1.0), LoraSpec(str(lora_files["peft"]), 0.7)])
    assert np.array_equal(_run(pipe, inputs), base)  # pixel for pixel, no residue


def test_deterministic_and_a_then_b_equals_b_alone(pipe, inputs, lora_files, tiny_models):
    a, b = LoraSpec(str(lora_files["kohya"]), 0.8), LoraSpec(str(lora_files["peft"]), 1.2)
    first_b = _run(pipe, inputs, [b])
    assert np.array_equal(_run(pipe, inputs, [b]), first_b)
    _run(pipe, inputs, [a])
    assert np.array_equal(_run(pipe, inputs, [b]), first_b)
    # and B on a fresh pipeline that never saw A
    fresh = _own_pipeline(tiny_models)
    assert fresh is not pipe
    assert np.array_equal(_run(fresh, inputs, [b]), first_b)


def test_switching_reads_no_file(pipe, inputs, lora_files, count_reads):
    a, b = str(lora_files["kohya"]), str(lora_files["peft"])
    activate(pipe, [LoraSpec(a, 1.0), LoraSpec(b, 1.0)])  # both kept by now (earlier tests or this call)
    count_reads.clear()
    for loras in ([LoraSpec(a, 0.5)], [LoraSpec(b, 1.0), LoraSpec(a, 0.3)], [], [LoraSpec(b, 2.0)]):
        activate(pipe, loras)  # what generate() does before sampling
    _run(pipe, inputs, [LoraSpec(b, 0.9)])
    assert count_reads == []


def test_changed_file_is_read_again(pipe, lora_files, count_reads, tmp_path):
    path = F.write(F.peft_state_dict(pipe, seed=5), tmp_path / "changing.safetensors")
    first = load_lora(pipe, str(path))
    assert load_lora(pipe, str(path)) is first and len(count_reads) == 1
    F.write(F.peft_state_dict(pipe, seed=6, rank=2), path)
    second = load_lora(pipe, str(path))
    assert second.adapter_name != first.adapter_name and len(count_reads) == 2
    assert first.adapter_name not in pipe.unet.peft_config  # the stale adapter is gone


def test_two_chained_nodes_equal_the_list_of_two(pipe, inputs, lora_files):
    from sdxl_controlnet_img2img.nodes.lora_node import SDXLCNLoraLoader

    types = SDXLCNLoraLoader.INPUT_TYPES()["required"]
    assert types["strength"][1]["default"] == 1.0 and types["lora_name"][0] == []  # no ComfyUI here
    node = SDXLCNLoraLoader()
    base_handle = PipelineHandle(pipe)
    (h1,) = node.add_lora(base_handle, str(lora_files["kohya"]), 0.6)
    (h2,) = SDXLCNLoraLoader().add_lora(h1, str(lora_files["peft"]), 1.1)
    assert base_handle.loras == () and len(h1.loras) == 1  # branches stay independent
    chained = _run(h2.get_pipe(), inputs, h2.loras)
    listed = _run(pipe, inputs, [LoraSpec(str(lora_files["kohya"]), 0.6), LoraSpec(str(lora_files["peft"]), 1.1)])
    assert np.array_equal(chained, listed)


def test_lora_dirs_and_bare_names(pipe, lora_files):
    found = S.resolve_source("kohya_a", [lora_files["dir"]])
    assert found == lora_files["kohya"].resolve()
    with pytest.raises(LoraError, match="'no_such_lora'.*not found"):
        S.resolve_source("no_such_lora", [lora_files["dir"]])


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LoraError, match="nobody-here/some-lora.*network access is off"):
        S.resolve_source("nobody-here/some-lora")


# ---- URLs: a real local HTTP server ----------------------------------------------------------------


@pytest.fixture(scope="module")
def http_server(lora_files):
    hits = []
    big = b"x" * 4096

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            hits.append(self.path)
            if self.path.startswith("/kohya_a.safetensors"):
                data = lora_files["kohya"].read_bytes()
            elif self.path == "/big.safetensors":
                data = big
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", hits
    server.shutdown()
    server.server_close()


def test_url_downloaded_once_into_cache(pipe, inputs, lora_files, http_server, tmp_path, monkeypatch):
    url, hits = http_server
    monkeypatch.setenv("SDXLCN_LORA_CACHE", str(tmp_path / "cache"))
    hits.clear()
    out_url = _run(pipe, inputs, [LoraSpec(url + "/kohya_a.safetensors?token=secret", 1.0)])
    activate(pipe, [LoraSpec(url + "/kohya_a.safetensors?token=secret", 0.5)])
    assert len(hits) == 1
    assert np.array_equal(out_url, _run(pipe, inputs, [LoraSpec(str(lora_files["kohya"]), 1.0)]))
    assert len(list((tmp_path / "cache").iterdir())) == 1


def test_url_errors_name_the_lora(http_server, tmp_path):
    url, _ = http_server
    with pytest.raises(LoraError, match=r"LoRA 'http://127\.0\.0\.1:\d+/missing\.safetensors'.*HTTP 404"):
        S.resolve_source(url + "/missing.safetensors?key=secret", cache_dir=tmp_path)
    with pytest.raises(LoraError, match=r"big.safetensors.*, over the 1000 B limit"):  # a size in words
        S.resolve_source(url + "/big.safetensors", cache_dir=tmp_path, max_bytes=1000)
    with pytest.raises(LoraError, match="127.0.0.1:9/x.safetensors.*failed"):
        S.resolve_source("http://127.0.0.1:9/x.safetensors", cache_dir=tmp_path, timeout=5)
    assert not any(tmp_path.iterdir())


# ---- bad LoRAs -----------------------------------------------------------------------------------


def test_not_a_lora(pipe, tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(LoraError, match="junk.safetensors.*not"):
        load_lora(pipe, str(junk))
    model = F.write({"model.diffusion_model.out.0.weight": torch.zeros(4)}, tmp_path / "ckpt.safetensors")
    with pytest.raises(LoraError, match="ckpt.safetensors.*is not a LoRA.*full SDXL checkpoint"):
        load_lora(pipe, str(model))
    pt = tmp_path / "text.pt"
    pt.write_text("hello")
    with pytest.raises(LoraError, match="text.pt.*is not a LoRA file"):
        load_lora(pipe, str(pt), allow_pickle=True)


def test_pickle_loras_need_the_opt_in(pipe, lora_files, tmp_path):
    sd = L.read_lora_file(lora_files["kohya"])
    pt = tmp_path / "kohya_lora.pt"
    torch.save(sd, pt)
    with pytest.raises(LoraError, match="kohya_lora.pt.*pickle.*refused by default.*allow_pickle"):
        load_lora(pipe, str(pt))
    with pytest.raises(LoraError, match="refused by default"):
        L.check_lora_file(pt)
    L.check_lora_file(pt, allow_pickle=True)
    assert load_lora(pipe, str(pt), allow_pickle=True).modules


def test_check_lora_file_reads_only_the_header(lora_files, tmp_path, monkeypatch):
    from safetensors import safe_open

    reads = []
    real_open = safe_open

    class Counting:
        def __init__(self, *a, **k):
            self.f = real_open(*a, **k)

        def __enter__(self):
            inner = self.f.__enter__()

            class Proxy:
                def keys(self_):
                    return inner.keys()

                def get_tensor(self_, k):
                    reads.append(k)
                    return inner.get_tensor(k)
            return Proxy()

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

    import safetensors

    monkeypatch.setattr(safetensors, "safe_open", Counting)
    L.check_lora_file(lora_files["kohya"])
    assert reads == []
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    with pytest.raises(LoraError, match="junk.safetensors.*not a readable safetensors"):
        L.check_lora_file(junk)
    with pytest.raises(LoraError, match="file not found"):
        L.check_lora_file(tmp_path / "missing.safetensors")


def _sd15_lora(te_only_signature: bool):
    """An SD 1.5-shaped kohya LoRA: lora_te_ keys, cross-attention to_k taking 768-wide embeddings."""
    g = torch.Generator().manual_seed(3)
    sd = {}

    def add(name, fi, fo):
        sd[name + ".lora_down.weight"] = torch.randn(4, fi, generator=g)
        sd[name + ".lora_up.weight"] = torch.randn(fo, 4, generator=g)
        sd[name + ".alpha"] = torch.tensor(4.0)

    if te_only_signature:  # SD 1.5's down_blocks.0 has attentions, SDXL's has none
        add("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 32, 32)
        add("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", 32, 32)
    else:  # a UNet-only SD 1.5 LoRA on layers SDXL also has
        add("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q", 64, 64)
        add("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k", 768, 64)
    return sd


@pytest.mark.parametrize("signature", ["key names", "cross-attention width"])
def test_sd15_lora_on_sdxl(pipe, tmp_path, signature):
    path = F.write(_sd15_lora(signature == "key names"), tmp_path / "sd15_style.safetensors")
    with pytest.raises(LoraError, match="sd15_style.safetensors.*SD 1.x/2.x LoRA, not an SDXL LoRA") as exc:
        load_lora(pipe, str(path))
    if signature != "key names":
        assert "768" in str(exc.value)


def test_keys_that_match_nothing(pipe, tmp_path):
    sd = {"lora_unet_foo_bar_baz.lora_down.weight": torch.zeros(4, 8), "lora_unet_foo_bar_baz.lora_up.weight": torch.zeros(8, 4),
          "transformer.blocks.0.attn.lora_A.weight": torch.zeros(4, 8)}
    path = F.write(sd, tmp_path / "other_model.safetensors")
    with pytest.raises(LoraError, match=r"other_model.safetensors.*none of its \d+ LoRA layers matches a layer of this SDXL model"):
        load_lora(pipe, str(path))


def test_partial_lora_reports_skipped_parts(pipe, inputs, tmp_path, caplog):
    sd = F.kohya_state_dict(pipe, seed=9, te=False)
    sd["lora_unet_output_blocks_9_1_transformer_blocks_0_attn1_to_q.lora_down.weight"] = torch.zeros(4, 64)
    sd["lora_unet_output_blocks_9_1_transformer_blocks_0_attn1_to_q.lora_up.weight"] = torch.zeros(64, 4)
    sd["lora_unet_output_blocks_9_1_transformer_blocks_0_attn1_to_q.alpha"] = torch.tensor(1.0)
    path = F.write(sd, tmp_path / "partial.safetensors")
    with caplog.at_level(logging.WARNING):
        info = load_lora(pipe, str(path))
    assert info.modules == {"unet": 132}
    assert len(info.skipped) == 1 and "up_blocks.3" in info.skipped[0]
    assert "partial.safetensors" in caplog.text and "skipped" in caplog.text
    activate(pipe, [])


def test_adapters_beyond_the_active_set_are_bounded(tiny_models, tmp_path, count_reads):
    """Trying many LoRAs does not grow memory without bound: inactive adapters beyond MAX_INACTIVE_ADAPTERS go,
    least recently used first, and are read again (same picture) when used again."""
    own = _own_pipeline(tiny_models)
    paths = [F.write(F.peft_state_dict(own, seed=20 + i), tmp_path / f"try_{i}.safetensors") for i in range(6)]
    for p in paths:
        activate(own, [LoraSpec(str(p), 1.0)])
    kept = L.loaded_adapters(own)
    assert len(kept) == 1 + L.MAX_INACTIVE_ADAPTERS
    assert [l.path for l in kept.values()] == [str(p.resolve()) for p in paths[-4:]]  # the newest stay
    assert len(own.unet.peft_config) == len(kept)  # deleted from the model too, not only from our list
    reads = len(count_reads)
    activate(own, [LoraSpec(str(paths[0]), 1.0)])  # evicted earlier: read again
    assert len(count_reads) == reads + 1
    activate(own, [LoraSpec(str(paths[-1]), 1.0)])  # still kept: no read
    assert len(count_reads) == reads + 1


def test_a_lora_load_takes_its_turn_with_model_loads(pipe, lora_files, tmp_path):
    """peft builds a LoRA's layers under accelerate's init_empty_weights, a patch of torch for the whole process: a
    LoRA loaded while another thread builds a model would cross it (tests/test_loading_threads.py). So it waits for
    the load lock, as model loads do."""
    from sdxl_controlnet_img2img.pipeline.local.models.load_lock import load_lock

    done = threading.Event()
    path = F.write(F.peft_state_dict(pipe, seed=7), tmp_path / "while_locked.safetensors")

    def load():
        load_lora(pipe, str(path))
        done.set()

    with load_lock():  # a model load in progress
        t = threading.Thread(target=load)
        t.start()
        assert not done.wait(2.0), "the LoRA loaded while a model load held the lock"
    assert done.wait(120), "the LoRA did not load once the lock was free"
    t.join()
