"""`lm info`: versions, the backend, and a one-line warning for a companion package jax rules out."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from lm.parallel.cpu import usable_cores
from lm.tools import info
from tests.conftest import ROOT

JAX_REQUIRES = [  # as jax 0.10.2's metadata states them
    "jaxlib<=0.10.2,>=0.10.1",
    'jaxlib==0.10.1; extra == "minimum-jaxlib"',
    'jaxlib<=0.10.2,>=0.10.2; extra == "tpu"',
    'libtpu==0.0.42.*; extra == "tpu"',
    'jax-cuda13-plugin[with-cuda]<=0.10.2,>=0.10.2; extra == "cuda13"',
]


def versions(**overrides):
    return {**{name: None for name in info.PACKAGES}, "jax": "0.10.2", "jaxlib": "0.10.2", **overrides}


def test_matching_companions_give_no_warning():
    assert info.mismatches(versions(libtpu="0.0.42"), {"jax": JAX_REQUIRES}) == []
    assert info.mismatches(versions(**{"jax-cuda13-plugin": "0.10.2"}), {"jax": JAX_REQUIRES}) == []


def test_a_libtpu_or_cuda_plugin_jax_does_not_name_is_one_sentence_with_the_fix():
    [tpu] = info.mismatches(versions(libtpu="0.0.48"), {"jax": JAX_REQUIRES})
    assert tpu.startswith("libtpu 0.0.48 is installed but jax 0.10.2 asks for libtpu==0.0.42.*")
    assert "pip install 'jax[tpu]==0.10.2'" in tpu and "\n" not in tpu
    [cuda] = info.mismatches(versions(**{"jax-cuda13-plugin": "0.11.2"}), {"jax": JAX_REQUIRES})
    assert "jax-cuda13-plugin 0.11.2" in cuda and "jax[cuda13]" in cuda
    [plugin] = info.mismatches(versions(**{"jax-cuda13-plugin": "0.10.2", "jax-cuda13-pjrt": "0.10.1"}),
                               {"jax-cuda13-plugin": ["jax-cuda13-pjrt==0.10.2"]})
    assert "jax-cuda13-pjrt 0.10.1" in plugin
    # jaxlib 0.10.2 satisfies jax's own range; only the `minimum-jaxlib` extra (not an accelerator) pins 0.10.1.
    assert info.mismatches(versions(jaxlib="0.10.0"), {"jax": JAX_REQUIRES})[0].startswith("jaxlib 0.10.0")


AMD_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC 9B14
power management:
flags\t\t: fpu sse4_2 avx avx2 avx512f avx512_bf16

processor\t: 1
model name\t: another processor
"""
ARM_CPUINFO = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes sve
CPU implementer\t: 0x41
"""


@pytest.mark.parametrize("text, expected", [
    (AMD_CPUINFO, "AMD EPYC 9B14, family 25 model 17, AVX-512"),
    (AMD_CPUINFO.replace(" avx512f", "").replace("model name\t: AMD EPYC 9B14", "model name\t: Intel(R) Xeon(R)"),
     "Intel(R) Xeon(R), family 25 model 17, AVX2"),
    (ARM_CPUINFO, f"{platform.machine()}, SVE"),
])
def test_processor_names_model_family_and_vector_width_of_the_first_cpu(tmp_path, text, expected):
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    assert info.processor(str(path)) == expected


def test_info_names_the_extras_lm_aot_needs():
    assert info.aot_targets(versions()) == {"tpu": False, "gpu": False}
    gpu = versions(**{"jax-cuda13-plugin": "0.10.2", "nvidia-cudnn-cu13": "9.28.1.4"})
    assert info.aot_targets(gpu) == {"tpu": False, "gpu": True}
    assert not info.aot_targets({**gpu, "jax-cuda13-plugin": "0.10.1"})["gpu"]  # another jax's plugin
    assert not info.aot_targets({**gpu, "nvidia-cudnn-cu13": None})["gpu"]
    line = info.format_info({"lm": "0.1.0", "python": "3.12", "machine": "Linux", "processor": "cpu", "cores": 2,
                             "versions": versions(libtpu="0.0.42"), "aot": {"tpu": True, "gpu": False},
                             "warnings": [], "backend": None, "backend_error": "none"}).splitlines()[3]
    assert line == "lm aot: TPU topologies yes, GPU topologies no (pip install -e '.[gpu-aot]')"


def test_processor_without_cpuinfo_falls_back_to_platform(tmp_path):
    assert info.processor(str(tmp_path / "absent")) == (platform.processor() or platform.machine())


def test_lm_info_on_this_machine_prints_the_cpu_and_no_warning():
    env_free = {k: v for k, v in __import__("os").environ.items() if k != "JAX_PLATFORMS"}
    text = subprocess.run([sys.executable, "-m", "lm.info"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=env_free)
    assert text.returncode == 0 and text.stderr == "", text.stderr
    assert "backend cpu:" in text.stdout and "warning" not in text.stdout
    assert f" | {info.processor()} | " in text.stdout.splitlines()[0]
    report = json.loads(subprocess.run([sys.executable, "-m", "lm", "info", "--json"], cwd=ROOT, capture_output=True,
                                       text=True, timeout=120, env=env_free).stdout)
    assert report["backend"] == "cpu" and report["processes"] == 1
    assert report["devices"] == usable_cores() and "commands split the CPU into one device per core" in text.stdout
    assert report["versions"]["jax"] and report["versions"]["flax"] and report["warnings"] == []
