"""Device and dtype plumbing, checked on the CPU: names, defaults, GPUs asked of Ray, clear refusals."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from moe.loader import check_device_name, resolve_device, resolve_dtype
from serving.app import check_resources, engine_deployment
from serving.config import ServeConfig

NO_GPU = not torch.cuda.is_available()


def test_device_names_and_the_dtype_default() -> None:
    assert resolve_device("cpu") == "cpu"
    assert check_device_name("cuda") == "cuda" and check_device_name("cuda:3") == "cuda:3"
    for bad in ("tpu", "cuda:x", "gpu", "CPU", "cuda:"):
        with pytest.raises(ValueError, match=repr(bad)):
            check_device_name(bad)
    assert resolve_dtype("auto", "cpu") == "fp32" and resolve_dtype("auto", "cuda:1") == "bf16"
    assert resolve_dtype("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match="'fp16'"):
        resolve_dtype("fp16", "cpu")


@pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_refused_before_anything_loads(tiny_model) -> None:
    from moe.loader import load_model

    with pytest.raises(ValueError, match="'cuda' asked, but torch .* sees no CUDA GPU"):
        load_model(str(tiny_model("llama")), device="cuda")


@pytest.mark.parametrize("device,says", [("tpu", "unknown device 'tpu'"), ("cuda", "no CUDA GPU")])
def test_the_cli_names_a_bad_device_in_one_line_and_exits_2(device, says, tiny_model, capsys) -> None:
    if device == "cuda" and not NO_GPU:
        pytest.skip("this machine has a GPU")
    from spectutor.cli import main

    assert main(["generate", "--model", str(tiny_model("llama")), "--prompt", "hi", "--device", device]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("spectutor generate: error:") and says in err[0]


def test_serve_configs_validate_device_and_dtype() -> None:
    assert ServeConfig().device == "cpu" and ServeConfig().dtype == "auto"
    with pytest.raises(ValueError, match="'tpu'"):
        ServeConfig(device="tpu")
    with pytest.raises(ValueError, match="'fp16'"):
        ServeConfig(dtype="fp16")
    ServeConfig(device="cuda:0")  # a config may name a GPU the deploying machine lacks: workers have it


def test_engine_deployment_asks_ray_for_what_the_device_needs() -> None:
    cfg, args, opts = engine_deployment({"num_cpus": 3, "num_replicas": 2})
    assert opts["ray_actor_options"] == {"num_cpus": 3.0} and cfg.threads == 3 and args["threads"] == 3
    cfg, _, opts = engine_deployment({"device": "cuda", "num_cpus": 0.5})
    assert opts["ray_actor_options"] == {"num_cpus": 0.5, "num_gpus": 1.0} and cfg.threads == 1
    _, _, opts = engine_deployment({"device": "cuda:1", "num_gpus": 0.5})
    assert opts["ray_actor_options"]["num_gpus"] == 0.5
    with pytest.raises(ValueError, match="num_gpus must be > 0 for device 'cuda'"):
        engine_deployment({"device": "cuda", "num_gpus": 0})
    with pytest.raises(ValueError, match="threads"):
        engine_deployment({"threads": 0})


def test_a_deployment_the_cluster_cannot_place_is_refused_naming_the_shortfall() -> None:
    _, _, opts = engine_deployment({"device": "cuda", "num_replicas": 2})
    with pytest.raises(ValueError, match=r"2 engine replica\(s\) x num_gpus 1.0 need 2 GPU\(s\); the Ray cluster has 1"):
        check_resources(opts, {"CPU": 16.0, "GPU": 1.0})
    check_resources(opts, {"CPU": 16.0, "GPU": 2.0})
    _, _, cpu_opts = engine_deployment({"num_cpus": 2, "num_replicas": 2})
    with pytest.raises(ValueError, match="need 4 CPU"):
        check_resources(cpu_opts, {"CPU": 2.0})


@pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU")
def test_spectutor_serve_asking_for_a_gpu_ray_lacks_exits_2_instead_of_hanging(tiny_model, tmp_path) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "OMP_NUM_THREADS": "1", "RAY_ADDRESS": "",
           "SPECTUTOR_HOME": str(tmp_path / "home")}
    res = subprocess.run([sys.executable, "-m", "spectutor.cli", "serve", "--model", str(tiny_model("llama")),
                          "--device", "cuda", "--num-cpus", "1", "--port", "8931"],
                         capture_output=True, text=True, timeout=180, env=env)
    assert res.returncode == 2, res.stderr[-2000:]
    line = [x for x in res.stderr.splitlines() if x.startswith("spectutor serve: error:")]
    assert line and "need 1 GPU(s); the Ray cluster has 0" in line[0], res.stderr[-2000:]
