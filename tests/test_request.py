"""Every bad field and bad image input gets its own clear error, before any model work."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from loopback import Loopback, Quiet

from sdxl_controlnet_img2img.pipeline.errors import ImageInputError, RequestError
from sdxl_controlnet_img2img.pipeline.images import load_image
from sdxl_controlnet_img2img.pipeline.request import GenerationRequest
from sdxl_controlnet_img2img.pipeline.sizes import cover_resize, target_size

BASE = {"prompt": "a castle", "image_url": "a.png", "control_image_url": "b.png"}


def test_defaults_are_fals():
    r = GenerationRequest.from_dict(BASE)
    assert (r.controlnet_conditioning_scale, r.num_inference_steps, r.guidance_scale, r.strength) == (0.5, 25, 7.5, 0.95)
    assert (r.negative_prompt, r.num_images, r.seed, r.image_size, r.loras) == ("", 1, None, None, ())
    assert r.steps_to_run == 23
    assert "apply_canny" not in r.to_fal_arguments() and "seed" not in r.to_fal_arguments()


def test_aliases_image_and_control_image():
    r = GenerationRequest.from_dict({"prompt": "x", "image": "a.png", "control_image": "b.png"})
    assert (r.image_url, r.control_image_url) == ("a.png", "b.png")


@pytest.mark.parametrize("field, value, words", [
    ("prompt", "", "required"),
    ("prompt", 3, "must be text"),
    ("controlnet_conditioning_scale", 1.5, "[0.0, 1.0]"),
    ("controlnet_conditioning_scale", -0.1, "[0.0, 1.0]"),
    ("num_inference_steps", 0, "between 1 and 50"),
    ("num_inference_steps", 51, "between 1 and 50"),
    ("num_inference_steps", 25.0, "write 25"),
    ("guidance_scale", 21, "[0.0, 20.0]"),
    ("guidance_scale", float("nan"), "must be a number"),
    ("strength", 0, "(0.0, 1.0]"),
    ("strength", 1.2, "(0.0, 1.0]"),
    ("seed", -1, "between 0 and"),
    ("seed", "12", "whole number"),
    ("num_images", 0, "between 1 and 8"),
    ("num_images", 9, "between 1 and 8"),
    ("enable_safety_checker", "yes", "true or false"),
    ("image_size", "huge", "unknown preset"),
    ("image_size", {"width": 512}, '"width" and "height"'),
    ("image_size.width", {"width": 5000, "height": 512}, "between 64 and 4096"),
    ("loras", "x.safetensors", "list of"),
    ("loras[0].path", [{"path": ""}], "required"),
    ("loras[0].scale", [{"path": "a", "scale": 9}], "[-4.0, 4.0]"),
    ("colour", "red", "not a field"),
])
def test_each_bad_field_names_itself(field, value, words):
    key = field.split(".")[0].split("[")[0]
    with pytest.raises(RequestError) as info:
        GenerationRequest.from_dict({**BASE, key: value})
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ") and words in str(info.value)


@pytest.mark.parametrize("missing", ["prompt", "image_url", "control_image_url"])
def test_missing_required_fields(missing):
    data = dict(BASE)
    del data[missing]
    with pytest.raises(RequestError, match=f"^{missing}: is required"):
        GenerationRequest.from_dict(data)


def test_strength_that_runs_no_step_is_refused():
    with pytest.raises(RequestError, match="^strength: .*runs no denoising step"):
        GenerationRequest.from_dict({**BASE, "strength": 0.03, "num_inference_steps": 25})


def test_seed_plus_index_wraps_and_seedless_gets_one():
    r = GenerationRequest.from_dict({**BASE, "seed": 2**64 - 1, "num_images": 2})
    assert [r.image_seed(i) for i in range(2)] == [2**64 - 1, 0]
    assert GenerationRequest.from_dict(BASE).with_seed().seed is not None


# ---- sizes ---------------------------------------------------------------------------------
@pytest.mark.parametrize("image_size, expected", [
    ("square_hd", (1024, 1024)), ("square", (512, 512)), ("portrait_4_3", (768, 1024)),
    ("portrait_16_9", (576, 1024)), ("landscape_4_3", (1024, 768)), ("landscape_16_9", (1024, 576)),
    ({"width": 1001, "height": 517}, (1000, 512)), (None, (72, 64)),
])
def test_target_sizes(image_size, expected):
    assert target_size(image_size, (77, 71)) == expected


@pytest.mark.parametrize("size", [{"width": 10, "height": 10}, {"width": 512, "height": 63}])
def test_custom_sizes_under_64_are_refused(size):
    with pytest.raises(RequestError, match=r"image_size\.(width|height).*between 64 and 4096"):
        GenerationRequest.from_dict({**BASE, "image_size": size})


def test_a_control_image_under_64_with_image_size_none_is_refused():
    with pytest.raises(RequestError, match=r"image_size: is none.*40x90.*at least 64.*preset"):
        target_size(None, (40, 90))


@pytest.mark.parametrize("value", [123, 1.5, ["a.png"], {"url": "a.png"}])
def test_an_image_field_of_the_wrong_type_says_so(value):
    with pytest.raises(RequestError, match=r"image_url: must be a path.*got " + type(value).__name__):
        GenerationRequest.from_dict({**BASE, "image_url": value})


def test_cover_resize_keeps_aspect_and_centre():
    from PIL import Image

    img = Image.new("RGB", (200, 100), (0, 0, 0))
    img.paste((255, 0, 0), (90, 0, 110, 100))  # a red band in the middle
    out = cover_resize(img, (50, 50))
    assert out.size == (50, 50)
    arr = np.asarray(out)
    assert arr[25, 25, 0] > 200 and arr[25, 2, 0] < 30  # centre kept, sides cropped, not squashed


# ---- image inputs --------------------------------------------------------------------------
def _png_bytes(color=(10, 200, 30), size=(8, 6)):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_image_sources_path_file_url_data_uri(tmp_path):
    p = tmp_path / "x.png"
    p.write_bytes(_png_bytes())
    data_uri = "data:image/png;base64," + base64.b64encode(_png_bytes()).decode()
    for src in (str(p), p.as_uri(), data_uri):
        img = load_image(src, "image_url")
        assert img.mode == "RGB" and img.size == (8, 6) and img.getpixel((0, 0)) == (10, 200, 30)


def test_exif_orientation_is_applied(tmp_path):
    from PIL import Image

    img = Image.new("RGB", (8, 4), (0, 0, 0))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    p = tmp_path / "rot.jpg"
    img.save(p, exif=exif)
    assert load_image(str(p), "image_url").size == (4, 8)


def test_transparent_png_is_composited_on_white(tmp_path):
    from PIL import Image

    p = tmp_path / "a.png"
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(p)
    assert load_image(str(p), "control_image_url").getpixel((1, 1)) == (255, 255, 255)


class _Server(Loopback):
    def __init__(self, routes):
        class H(Quiet):
            def do_GET(self):
                status, body, headers = routes.get(self.path.split("?")[0], (404, b"nope", {}))
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        super().__init__(H)


def test_http_images_and_their_errors():
    from sdxl_controlnet_img2img.pipeline.images import download

    big = b"x" * 2048
    srv = _Server({"/ok.png": (200, _png_bytes(), {}), "/big.png": (200, big, {}), "/bad.png": (200, b"not an image", {})})
    try:
        assert load_image(srv.url + "/ok.png?token=secret", "image_url").size == (8, 6)
        with pytest.raises(ImageInputError, match=r"^image_url: downloading .*/missing.png failed with HTTP 404") as info:
            load_image(srv.url + "/missing.png?token=secret", "image_url")
        assert "secret" not in str(info.value)
        with pytest.raises(ImageInputError, match="^control_image_url: .*not a readable image"):
            load_image(srv.url + "/bad.png", "control_image_url")
        with pytest.raises(ImageInputError, match=r"big.png is 2.0 KB, over the 1.0 KB limit$"):  # in words
            download(srv.url + "/big.png", "image_url", max_bytes=1024)
    finally:
        srv.close()
    with pytest.raises(ImageInputError, match="^image_url: downloading .* failed"):
        load_image(srv.url + "/ok.png", "image_url")  # server gone: connection refused


@pytest.mark.parametrize("source, words", [
    ("/no/such/file.png", "file not found"),
    ("", "is missing"),
    (None, "is missing"),
    ("data:image/png;base64", "without a ','"),
    ("data:image/png;base64,AAAA", "not a readable image"),
])
def test_bad_image_inputs(source, words):
    with pytest.raises(ImageInputError) as info:
        load_image(source, "control_image_url")
    assert str(info.value).startswith("control_image_url: ") and words in str(info.value)


def test_undecodable_file(tmp_path):
    p = tmp_path / "broken.png"
    p.write_bytes(_png_bytes()[:20])
    with pytest.raises(ImageInputError, match="^image_url: .*broken.png is not a readable image"):
        load_image(str(p), "image_url")


@pytest.mark.parametrize("image_size, control", [(None, (4032, 3024)), ({"width": 4096, "height": 2048}, (64, 64))])
def test_sizes_over_the_maximum_are_refused(image_size, control):
    with pytest.raises(RequestError, match=r"image_size: .*MP\), over the 4.2 MP.*pick a preset"):
        target_size(image_size, control)


def test_a_size_over_the_maximum_says_the_images_own_size_then_the_rounded_one(tmp_path):
    """A control image of 2101x2099 (PIL's size of the file) with image_size none: the message says that size, then
    the multiples of 8 it would run at (it said only 2096x2096, a size the user never saw)."""
    from PIL import Image

    from sdxl_controlnet_img2img.pipeline.local.generate import prepare_inputs

    path = tmp_path / "photo.png"
    Image.new("RGB", (2101, 2099), (40, 90, 160)).save(path)
    req = GenerationRequest.from_dict({"prompt": "a", "image_url": str(path), "control_image_url": str(path)})
    with pytest.raises(RequestError) as info:
        prepare_inputs(req)
    assert Image.open(path).size == (2101, 2099)
    assert str(info.value).startswith("image_size: the control image's size (image_size none) is 2101x2099 "
                                      "(2096x2096 in multiples of 8: 4.4 MP), over the 4.2 MP"), str(info.value)


def test_the_largest_allowed_sizes_pass():
    assert target_size({"width": 4096, "height": 1024}, (64, 64)) == (4096, 1024)
    assert target_size(None, (2048, 2048)) == (2048, 2048)
