"""One cache folder for everything the pack caches (the assembled SDXL configs and downloaded LoRAs): a user who
moves it with SDXLCN_CACHE_DIR, or with XDG's XDG_CACHE_HOME, finds both there."""

from pathlib import Path

from sdxl_controlnet_img2img.pipeline.local.lora.sources import default_cache_dir
from sdxl_controlnet_img2img.pipeline.local.models.sdxl_config import cache_root


def test_sdxlcn_cache_dir_holds_configs_and_loras(monkeypatch, tmp_path):
    monkeypatch.delenv("SDXLCN_LORA_CACHE", raising=False)
    monkeypatch.setenv("SDXLCN_CACHE_DIR", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    assert default_cache_dir() == tmp_path / "c" / "loras"


def test_xdg_cache_home_is_honoured_by_both(monkeypatch, tmp_path):
    monkeypatch.delenv("SDXLCN_LORA_CACHE", raising=False)
    monkeypatch.delenv("SDXLCN_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_root() == tmp_path / "sdxl_controlnet_img2img"
    assert default_cache_dir().parent == cache_root()


def test_default_is_home_cache(monkeypatch, tmp_path):
    for name in ("SDXLCN_LORA_CACHE", "SDXLCN_CACHE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_root() == Path(tmp_path) / ".cache" / "sdxl_controlnet_img2img"
