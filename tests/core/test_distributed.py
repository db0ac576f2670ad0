"""Real torchrun processes (gloo, 2 ranks on CPU): data parallel and --distribute_layers equal one process."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.support.processes import free_port
from tests.support.training import COMMON, check, env, run, sae_params, torchrun

pytestmark = pytest.mark.slow


def assert_same(a: dict, b: dict, atol=1e-5, exact=False) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=atol, msg=k)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data(tiny_model_dir, tiny_text_file):
    return [str(tiny_model_dir), str(tiny_text_file)]


@pytest.fixture(scope="module")
def single(tmp_path_factory, data):
    """One process fed global batches of 4 sequences: the reference for both distributed modes."""
    out = tmp_path_factory.mktemp("single")
    check(
        run(
            [
                sys.executable,
                "-m",
                "sae_core",
                *data,
                *COMMON,
                "--batch_size",
                "4",
                "--max_tokens",
                "2000",
                "--save_dir",
                str(out),
                "--run_name",
                "r",
            ]
        )
    )
    return out / "r"


def test_data_parallel_two_ranks_equals_one_process(tmp_path, data, single):
    # Tolerance: the two ranks' gradient sums are added in a different order than one process adds them.
    p = run(
        torchrun(
            2,
            *data,
            *COMMON,
            "--batch_size",
            "2",
            "--max_tokens",
            "2000",
            "--save_dir",
            str(tmp_path),
            "--run_name",
            "r",
        )
    )
    check(p)
    assert p.stdout.count("saved SAEs to") == 1  # only rank 0 reports
    assert_same(sae_params(tmp_path / "r"), sae_params(single))


def test_distribute_layers_three_layers_on_two_ranks_equals_one_process(tmp_path, data, single):
    p = run(
        torchrun(
            2,
            *data,
            *COMMON,
            "--batch_size",
            "2",
            "--max_tokens",
            "2000",
            "--distribute_layers",
            "--save_dir",
            str(tmp_path),
            "--run_name",
            "r",
        )
    )
    check(p)
    assert_same(sae_params(tmp_path / "r"), sae_params(single))
    # Rank 0 logs every layer's metrics (merged from their owners) and the tokens of the whole global batch.
    lines, ref = metrics(tmp_path / "r"), metrics(single)
    assert [line["tokens"] for line in lines] == [line["tokens"] for line in ref]
    for line, ref_line in zip(lines, ref):
        assert sorted(line) == sorted(ref_line)
        for key in (k for k in line if k.startswith("fvu/")):
            assert line[key] == pytest.approx(ref_line[key], rel=1e-4), key
    states = sorted(x.name.split("-")[0] for x in (tmp_path / "r" / "trainer_state").iterdir())
    assert states == ["rank0", "rank1"]  # each owner saved its own SAEs


def test_transcoders_with_skip_on_two_ranks_equal_one_process(tmp_path, data):
    # Transcoders read a module's input and its output in the same forward; data parallel must average their
    # (and W_skip's) gradients like an SAE's.
    tc = [
        *data,
        *COMMON,
        "--hookpoints",
        "layers.*.mlp",
        "--transcode",
        "--skip_connection",
        "--max_tokens",
        "1200",
    ]
    check(
        run([sys.executable, "-m", "sae_core", *tc, "--batch_size", "4", "--save_dir", str(tmp_path / "one")])
    )
    check(run(torchrun(2, *tc, "--batch_size", "2", "--save_dir", str(tmp_path / "two"))))
    (one,), (two,) = (list(p.iterdir()) for p in (tmp_path / "one", tmp_path / "two"))
    ref = sae_params(one)
    assert any(k.endswith("W_skip") for k in ref) and len({k.split("/")[0] for k in ref}) > 1
    assert_same(sae_params(two), ref)


def test_two_nodes_rendezvous_on_localhost(tmp_path, data):
    endpoint = f"127.0.0.1:{free_port()}"
    node = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "2",
        "--nproc_per_node",
        "1",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        endpoint,
        "--rdzv-id",
        "two-nodes",
        "-m",
        "sae_core",
        *data,
        *COMMON,
        "--batch_size",
        "2",
        "--max_tokens",
        "1000",
        "--save_dir",
        str(tmp_path),
        "--run_name",
        "r",
    ]
    procs = [
        subprocess.Popen(node, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0, o[-2000:] + e[-4000:]
    assert len(sae_params(tmp_path / "r")) == 3 * 4


def test_killed_run_resumes_to_the_same_parameters(tmp_path, data):
    args = [*data, *COMMON, "--batch_size", "2", "--max_tokens", "3000", "--save_every", "3"]
    check(run(torchrun(2, *args, "--save_dir", str(tmp_path / "full"), "--run_name", "r")))

    run_dir = tmp_path / "part" / "r"
    proc = subprocess.Popen(
        torchrun(2, *args, "--save_dir", str(tmp_path / "part"), "--run_name", "r"),
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 180
    while not list((run_dir / "trainer_state").glob("rank0-step*.pt")) and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = sorted((run_dir / "trainer_state").glob("rank0-step*.pt"))
    assert saved and "step000000003" in saved[0].name
    time.sleep(1)  # ranks get SIGTERM from the kernel when torchrun dies (PDEATHSIG)

    check(run(torchrun(2, *args, "--save_dir", str(tmp_path / "part"), "--run_name", "r", "--resume")))
    assert_same(sae_params(run_dir), sae_params(tmp_path / "full" / "r"), exact=True)

    # A resume with another world size is refused with a clear message.
    p = run(
        [
            sys.executable,
            "-m",
            "sae_core",
            *args,
            "--save_dir",
            str(tmp_path / "part"),
            "--run_name",
            "r",
            "--resume",
        ]
    )
    assert p.returncode != 0
    assert "differs from the checkpoint's" in p.stderr or "world size" in p.stderr, p.stderr[-2000:]


def test_more_ranks_than_layers_is_a_clear_error(tmp_path, data):
    p = run(torchrun(2, *data, *COMMON, "--layers", "1", "--distribute_layers", "--save_dir", str(tmp_path)))
    assert p.returncode != 0
    assert "--distribute_layers with 2 ranks but only 1 layers" in p.stderr
    assert "Traceback" not in p.stderr.split("error: --distribute_layers")[0][-500:]


def test_8bit_model_trains_and_fvu_falls(tmp_path, data):
    pytest.importorskip("bitsandbytes")
    p = run(
        [
            sys.executable,
            "-m",
            "sae_core",
            *data,
            *COMMON,
            "--batch_size",
            "4",
            "--load_in_8bit",
            "--max_tokens",
            "6000",
            "--lr",
            "3e-3",
            "--save_dir",
            str(tmp_path),
            "--run_name",
            "r",
        ]
    )
    check(p)
    import json

    lines = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["fvu/layers.1"] < 0.8 * lines[0]["fvu/layers.1"]
