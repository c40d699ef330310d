"""A quiet ComfyUI log (issue 35 item 5): a real ComfyUI 0.8.0 server's log during a fal-node run (against the
fal-protocol test server, tests/helpers/fal_server.py) and a LoRA switch holds one line per status change and per step, in
the pack's words, and no line from httpx, tqdm, PEFT or PIL, none twice (skipped without COMFYUI_DIR)."""

from __future__ import annotations

import json
import re

import pytest

import fal_server
from comfyui_harness import ROOT, SKIP_REASON, comfyui_dir, running_comfyui
from fal_server import fal_test_server  # noqa: F401 - the session's server
from pictures import make_test_image

pytestmark = pytest.mark.skipif(comfyui_dir() is None, reason=SKIP_REASON)

LORAS = ("style_a.safetensors", "style_b.safetensors")


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_models, tiny_pipe, fal_test_server):  # noqa: F811
    """ComfyUI pointed at the session's fal-protocol server (one per session: tests/test_browser.py's and others'
    share its port; a second server of this module's own could not bind it)."""
    import lora_factory

    env = fal_server.configure_environment()  # FAL_QUEUE_RUN_HOST, FAL_RUN_HOST, SSL_CERT_FILE: inherited
    d = tmp_path_factory.mktemp("loras")
    for seed, name in enumerate(LORAS):
        lora_factory.write(lora_factory.kohya_state_dict(tiny_pipe, seed=seed + 1), d / name)
    models = {"diffusers": {"tiny-sdxl": tiny_models["checkpoint"]},
              "controlnet": {"tiny-controlnet-canny": tiny_models["controlnet"]},
              "loras": {name: d / name for name in LORAS}}
    base = tmp_path_factory.mktemp("comfyui-base")
    (base / "input").mkdir()
    make_test_image(64, 64, 1).save(base / "input" / "sdxlcn_test_image.png")
    with running_comfyui(base, models, env={"FAL_KEY": fal_server.TEST_KEY, "FAL_KEY_ID": None,
                                            "FAL_KEY_SECRET": None, "SDXLCN_FAL_URL": None}) as s:
        s.fal = fal_test_server
        assert env["host"]
        yield s
    fal_test_server.reset()


def fal_workflow() -> dict:
    node = {"prompt": "a red fortress", "negative_prompt": "", "controlnet_conditioning_scale": 0.5,
            "image_size": "custom", "width": 64, "height": 64, "num_inference_steps": 2, "guidance_scale": 1.0,
            "strength": 1.0, "seed": 7, "num_images": 1, "enable_safety_checker": False, "expand_prompt": False,
            "loras": "", "sync_mode": False, "request_id": "", "max_concurrency": 1, "timeout_s": 120,
            "image": ["1", 0], "control_image": ["1", 0]}
    return {"1": {"class_type": "LoadImage", "inputs": {"image": "sdxlcn_test_image.png"}},
            "4": {"class_type": "SDXLCNFalImg2Img", "inputs": node},
            "5": {"class_type": "SaveImage", "inputs": {"filename_prefix": "fal_node", "images": ["4", 0]}}}


def lora_workflow(seed, loras) -> dict:
    wf = json.loads((ROOT / "workflows" / "api" / "sdxl_controlnet_img2img_tiny.json").read_text())
    upstream = ["3", 0]
    for i, name in enumerate(loras):
        wf[f"1{i}"] = {"class_type": "SDXLCNLoraLoader",
                       "inputs": {"pipeline": upstream, "lora_name": name, "strength": 0.8}}
        upstream = [f"1{i}", 0]
    wf["4"]["inputs"].update(pipeline=upstream, seed=seed, num_inference_steps=3)
    return wf


def run(server, wf):
    entry = server.wait_history(server.queue_prompt(wf), deadline_s=300)
    assert entry["status"]["status_str"] == "success", entry["status"]


# ComfyUI's own lines, said once per prompt (or per model load) by design
COMFYUI_PER_PROMPT = re.compile(r"^(got prompt|Prompt executed in .*|Requested to load .*|loaded (completely|partially).*"
                                r"|0 models unloaded\.|Unloaded .*)$")
TQDM_BAR = re.compile(r"\d+%\||it/s\]|s/it\]")
THIRD_PARTY = re.compile(r"HTTP Request:|(?i:httpx|\bpeft\b|tqdm)|\bPIL\b|DecompressionBomb|site-packages|(?i:\bwarning\b)")


def assert_quiet(log: str):
    lines = [ln for ln in log.replace("\r", "\n").splitlines() if ln.strip()]
    noisy = [ln for ln in lines if TQDM_BAR.search(ln) or THIRD_PARTY.search(ln)]
    assert not noisy, "\n".join(noisy)
    ours = [ln for ln in lines if not COMFYUI_PER_PROMPT.match(ln)]
    twice = sorted({ln for ln in ours if ours.count(ln) > 1})
    assert not twice, "lines said more than once:\n" + "\n".join(twice)


def test_fal_run_logs_each_status_change_and_each_fal_line_once_in_our_words(server):
    """The fal node against the test server: a request two places back in the queue, then running with the
    server's three log lines. Before: every httpx status-poll line twice (fal-client's transport sends each call
    through a second httpx client), every fal line twice (the client and the node each logged it), the queue
    position at every poll."""
    server.fal.reset(queue_s=1.5, queue_ahead=2, run_s=1.0, logs=["loading model", "step 1/2", "step 2/2"])
    start = len(server.log())
    run(server, fal_workflow())
    log = server.log()[start:]
    assert_quiet(log)
    (rid,) = server.fal.jobs
    said = [ln.split(f"fal {rid}: ", 1)[1] for ln in log.splitlines() if ln.startswith(f"fal {rid}: ")]
    queue = [s for s in said if s.startswith("in fal's queue")]
    positions = [int(s.rsplit(" ", 1)[1]) for s in queue]
    assert positions[0] == 2 and positions == sorted(set(positions), reverse=True), said  # each change once
    rest = said[len(queue):]
    assert rest[0] == "running" and rest[1:-1] == server.fal.behaviour.logs, said  # the server's lines, in order
    assert re.fullmatch(r"done \(waited \d+\.\d s\)", rest[-1]), said
    assert f"fal: submitted request {rid} to " in log


def test_lora_switch_logs_one_line_per_lora_read_and_nothing_from_libraries(server):
    """A first LoRA (the pipeline loads too), a switch to a second (PEFT warned "Already found a `peft_config`" with
    its site-packages path; transformers drew "Loading weights" bars per text encoder), then both (nothing read)."""
    start = len(server.log())
    run(server, lora_workflow(1, [LORAS[0]]))
    run(server, lora_workflow(2, [LORAS[1]]))
    run(server, lora_workflow(3, [LORAS[0], LORAS[1]]))
    log = server.log()[start:]
    assert_quiet(log)
    loras = [ln for ln in log.splitlines() if ln.startswith("LoRA ")]
    assert loras == [f"LoRA {LORAS[0]}: loaded",
                     f"LoRA {LORAS[1]}: loaded (kept beside 1 other LoRA: switching between them reads no file)"], log


def test_the_loaders_line_says_what_it_loads_in_the_users_words(server):
    """One line per load: the models, the device and precision ComfyUI runs on (--cpu: the CPU in fp32), the memory
    mode, then only the inputs set away from their defaults. It dumped the whole LoadOptions(device='cpu',
    dtype=torch.float32, ..., host_placement=True)."""
    loads = []
    for options in ({"vae_tiling": True, "attention": "classic"}, {"memory_mode": "none"}):
        wf = lora_workflow(5, [])
        wf["3"]["inputs"].update(options)  # options no other test loads with: this run loads the pipeline
        start = len(server.log())
        run(server, wf)
        loads += [ln for ln in server.log()[start:].splitlines() if ln.startswith("SDXLCNLoader")]
    assert loads == ["SDXLCNLoader: loading tiny-sdxl + tiny-controlnet-canny on cpu, fp32, memory mode auto, VAE "
                     "tiling, classic attention",
                     "SDXLCNLoader: loading tiny-sdxl + tiny-controlnet-canny on cpu, fp32, memory mode none"], loads


def test_fetching_a_finished_result_by_id_logs_one_line(server):
    """A finished request fetched by id (the node's request_id): fal's status answer brings every line of that
    earlier run (here the server's ten step lines), which were said when it ran; the fetch says one line (it
    replayed every step line)."""
    server.fal.reset(run_s=0.2, logs=[f"step {i}/10" for i in range(1, 11)])
    wf = fal_workflow()
    wf["4"]["inputs"]["seed"] = 11  # not the other test's request: ComfyUI would answer it from its cache
    run(server, wf)
    (rid,) = server.fal.jobs
    wf["4"]["inputs"]["request_id"] = rid
    start = len(server.log())
    run(server, wf)
    log = server.log()[start:]
    assert_quiet(log)
    assert [ln for ln in log.splitlines() if rid in ln] == [f"fal {rid}: already done: fetching its result"], log
    assert len(server.fal.jobs) == 1  # fetched, not submitted again
