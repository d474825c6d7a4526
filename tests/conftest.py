from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

# The test models are tiny: more threads only add synchronisation (and oversubscribe a shared CPU).
torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).parent))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory):
    """Module- and session-wide fixtures (which run before any test's own cache is set) never touch the user's cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ICD_CACHE_DIR", str(tmp_path_factory.mktemp("session-cache")))
        yield


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test sees its own fused-model cache, never the user's, and runs on PyTorch unless it says otherwise.

    The cache goes when the test ends: a whole run's fused models and exported graphs would fill gigabytes."""
    cache = tmp_path_factory.mktemp("icd-cache")
    monkeypatch.setenv("ICD_CACHE_DIR", str(cache))
    monkeypatch.setenv("ICD_BACKEND", "torch")
    yield
    shutil.rmtree(cache, ignore_errors=True)


@pytest.fixture(scope="session")
def sd15_parts(tmp_path_factory):
    from tiny import make_parts

    return make_parts(tmp_path_factory.mktemp("sd15-parts"), "sd15")


@pytest.fixture(scope="session")
def sdxl_parts(tmp_path_factory):
    from tiny import make_parts

    return make_parts(tmp_path_factory.mktemp("sdxl-parts"), "sdxl")


@pytest.fixture(scope="session")
def merged_dir(sd15_parts, tmp_path_factory) -> Path:
    """A merged-model folder (with teacher) made from the tiny SD1.5 parts."""
    from icdcli.models.fusion import LoraSources, fuse_lora_model

    sources = LoraSources(sd15_parts.base, sd15_parts.teacher_pt, sd15_parts.forward_lora, sd15_parts.reverse_lora)
    folder = tmp_path_factory.mktemp("merged") / "tiny-sd15"
    fuse_lora_model(sources, keep_teacher=True).save_merged(folder)
    return folder


@pytest.fixture(scope="session")
def merged_model(merged_dir):
    from icdcli.models.runtime import load_merged

    return load_merged(merged_dir, need_teacher=True)


@pytest.fixture(scope="module")
def module_model(merged_dir):
    """The tiny merged model, loaded once per test module (its tests may change it: processors, execution)."""
    from icdcli.models.runtime import load_merged

    return load_merged(merged_dir, need_teacher=True)


@pytest.fixture
def one_model(module_model, monkeypatch):
    """Every command of the test loads this one model instead of reading it from disk again."""
    import icdcli.models.sources

    monkeypatch.setattr(icdcli.models.sources, "load_requested_model", lambda *args, **kwargs: module_model)
    return module_model
