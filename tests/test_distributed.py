"""Data-parallel profiling: two processes (gloo on 127.0.0.1) give the one-process profile and plan.

One spawned pair of processes runs every case (starting processes costs seconds; each case costs
a fraction of one): an even split (4 batches), an uneven one (3 batches), and a rank with no batch
(1 batch on 2 ranks). Each rank writes what it computed; the test compares both ranks with each
other (bit for bit: every rank must take the same branches) and with one process (to float32
rounding: the sums are added in another order).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import astuple
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor

from allot import Budget, api, distributed, load
from allot.cli import main
from allot.data import Data, supervised
from allot.io import PLAN
from allot.profile.cache import Cache
from allot.profile.engine import Profile, Settings
from allot.profile.measure import mean_loss
from allot.zoo import create_model, get_dataset

CASES = {"even": 4, "uneven": 3, "idle-rank": 1}
WORLD = 2
SETTINGS = Settings(probes_min=4, probes_max=4, lanczos_iterations=3, seed=5)


def _data(batches: int) -> Data:
    """128 digits split into `batches` batches of unequal sizes."""
    (inputs, targets), *_ = (
        get_dataset("digits", calibration_size=128, seed=0).to_data().calibration
    )
    sizes = [128 - 20 * (batches - 1), *[20] * (batches - 1)]
    pairs = list(zip(inputs.split(sizes), targets.split(sizes), strict=True))
    return Data(pairs, supervised(F.cross_entropy))


def _profiled(data: Data, cache: Cache | None = None) -> tuple[dict[str, Tensor], int]:
    """Every statistic the profile offers on test-cnn, by name, and the passes over the data
    the profile spent on them (in forward+backward equivalents)."""
    work, _pairs, discovery, _notes = api.prepare(create_model("test-cnn"))
    profile = Profile(work, discovery.layers, data, settings=SETTINGS, cache=cache, progress=False)
    generator = torch.Generator().manual_seed(1)
    values = {"loss": torch.tensor([mean_loss(work, data)], dtype=torch.float64)}
    for name in profile.names:
        stats = profile.inputs(name)
        assert stats.input_cov is not None
        delta = 0.05 * torch.randn(profile.curvature.shape(name), generator=generator)
        (terms,) = profile.second_order({name: [delta]})[name]
        (change,) = profile.measured({name: [delta]})[name]
        estimate = profile.hessian_estimates()[name]
        values |= {
            f"{name}/cov": stats.input_cov,
            f"{name}/samples": torch.tensor([stats.samples]),
            f"{name}/gradient": profile.gradient(name),
            f"{name}/delta": delta,
            f"{name}/second_order": torch.tensor(astuple(terms), dtype=torch.float64),
            f"{name}/measured": torch.tensor([change], dtype=torch.float64),
            f"{name}/trace": torch.tensor([estimate.trace, estimate.trace_stderr]),
            f"{name}/diagonal": estimate.diagonal,
            f"{name}/eigenvalues": profile.eigenpairs()[name].values,
        }
    passes = profile.curvature.passes.fb_equivalents
    for name in profile.names:  # not cached: the product itself
        values[f"{name}/hvp"] = profile.curvature.layer_hvp(name, values[f"{name}/delta"])
    return values, passes


def _plan(data: Data) -> str:
    result = api.compress(
        create_model("test-cnn"), data, "cet-steer", Budget("ratio", 8), progress=False
    )
    return result.plan.dumps()


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        folder = Path(out)
        for case, batches in CASES.items():
            data = _data(batches)
            values, _ = _profiled(data)
            save_file(values, str(folder / f"{case}-{rank}.safetensors"))
            (folder / f"{case}-{rank}.json").write_text(_plan(data))
        # the cache: ranks sharing one directory all hit it; a rank that misses makes all recompute
        shared = Cache(folder / "cache")
        _profiled(_data(2), shared)
        _, again = _profiled(_data(2), shared)
        _, lonely = _profiled(_data(2), Cache(folder / f"cache-{rank}") if rank else shared)
        passes = [again, lonely]
        (folder / f"passes-{rank}.json").write_text(json.dumps(passes))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder the two ranks wrote their results to."""
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_ranks_hold_the_one_process_profile(ranks: Path, case: str) -> None:
    rank0 = load_file(ranks / f"{case}-0.safetensors")
    rank1 = load_file(ranks / f"{case}-1.safetensors")
    alone, _ = _profiled(_data(CASES[case]))
    assert set(rank0) == set(rank1) == set(alone)
    for key, value in alone.items():
        assert torch.equal(rank0[key], rank1[key]), key
        scale = float(value.abs().max().clamp(min=1e-12))
        assert float((rank0[key] - value).abs().max()) <= 2e-5 * scale, key
    assert rank0["0/samples"].item() == alone["0/samples"].item() == 128 * 8 * 8


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_ranks_choose_the_one_process_plan(ranks: Path, case: str) -> None:
    plans = [json.loads((ranks / f"{case}-{rank}.json").read_text()) for rank in range(WORLD)]
    assert plans[0] == plans[1]
    alone = json.loads(_plan(_data(CASES[case])))
    for mine, theirs in zip(plans[0]["layers"], alone["layers"], strict=True):
        assert {**mine, "damage": None} == {**theirs, "damage": None}
        assert mine["damage"] == pytest.approx(theirs["damage"], rel=1e-4)


def test_a_cache_entry_counts_only_when_every_rank_has_it(ranks: Path) -> None:
    """Ranks sharing a cache load everything the second time; when one rank's cache is empty,
    every rank recomputes (none waits for a reduction the others skip)."""
    for rank in range(WORLD):
        again, lonely = json.loads((ranks / f"passes-{rank}.json").read_text())
        assert again == 0
        assert lonely > 0


def test_without_a_process_group_the_seam_is_the_identity() -> None:
    assert not distributed.active()
    assert (distributed.rank(), distributed.world(), distributed.is_main()) == (0, 1, True)
    assert list(distributed.shard("abc")) == ["a", "b", "c"]
    assert distributed.shard_size(3) == 3 and distributed.shard_size(None) is None
    tensor = torch.ones(2)
    assert distributed.sum_over_ranks([tensor], [3, 0.5]) == [3.0, 0.5]
    assert torch.equal(tensor, torch.ones(2))
    assert distributed.agree(True) and not distributed.agree(False)


@pytest.mark.slow
def test_torchrun_compress_writes_one_artifact_with_the_one_process_plan(tmp_path) -> None:
    """`torchrun --nproc_per_node 2 -m allot compress ...` (about 20 s): rank 0 alone prints and
    writes, and its plan is the one `allot compress` chooses in one process."""
    command = [
        *("compress", "test-cnn", "--method", "cet-steer", "--ratio", "8"),
        *("--calibration", "512", "--no-cache"),
    ]
    runner = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
    done = subprocess.run(
        [*runner, "2", "-m", "allot", "--no-progress", *command, "--out", str(tmp_path / "two")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("accuracy: ") == 2  # float and compressed, once: rank 0 only
    assert main(["--no-progress", *command, "--out", str(tmp_path / "one")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # no staging left
    plans = [json.loads((tmp_path / name / PLAN).read_text()) for name in ("one", "two")]
    assert [layer["label"] for layer in plans[0]["layers"]] == [
        layer["label"] for layer in plans[1]["layers"]
    ]
    load(tmp_path / "two")
