"""Embedding in shards on a local Dask cluster of two worker processes: the same rows as in-process,
a worker killed mid-shard loses nothing, and the flows run the shards on prefect-dask's task runner."""

import os
import signal
import threading
import time

import numpy as np
import pytest

from siamese_core import sharding
from siamese_core.config import EvaluateConfig, ModelConfig
from siamese_core.data import scan_folder
from siamese_core.embed import embed_images
from siamese_core.model import build_embedding_model, load_embedding
from siamese_core.recognizer import build_gallery

from support.images import make_digits_dataset
from support.tiny import TINY_NETWORK

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  silence_logs=40) as local:
        yield local


@pytest.fixture(scope="module")
def network_and_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    train_dir, _ = make_digits_dataset(root / "digits", classes=5, train_per_class=24, test_per_class=0)
    build_embedding_model(ModelConfig(**TINY_NETWORK)).save(root / "model.keras")
    return load_embedding(root / "model.keras"), scan_folder(train_dir), root / "model.keras"


def test_a_sharded_gallery_is_the_in_process_gallery(cluster, network_and_images):
    network, folder, model_file = network_and_images
    settings = EvaluateConfig(embed_batch_size=16, test_time_views=3)  # the workers average the same views
    local = build_gallery(network, folder, settings)
    with sharding.dask_mapper(cluster.scheduler_address) as mapper:
        sharded = build_gallery(network, folder, settings, sharder=sharding.Sharder(mapper, 16), model_file=model_file)
    assert len(folder) == 120  # 8 shards over 2 workers
    assert sharded.paths == local.paths and sharded.labels.tolist() == local.labels.tolist()
    np.testing.assert_allclose(sharded.embeddings, local.embeddings, rtol=1e-5, atol=1e-6)
    assert not np.allclose(local.embeddings, build_gallery(network, folder).embeddings, atol=1e-4)


def test_a_worker_killed_mid_shard_loses_and_repeats_nothing(cluster, network_and_images):
    network, folder, model_file = network_and_images
    expected = embed_images(network, folder.paths, 8)
    client = distributed.Client(cluster.scheduler_address, set_as_default=False)
    pids = client.run(os.getpid)
    killed: dict = {}

    def kill_a_busy_worker():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not killed:
            for address, keys in client.processing().items():
                if keys:
                    killed.update(worker=address, pid=pids[address], shards=list(keys))
                    os.kill(pids[address], signal.SIGKILL)
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_a_busy_worker)
    with sharding.dask_mapper(cluster.scheduler_address) as mapper:
        killer.start()
        got = embed_images(network, folder.paths, 8, sharder=sharding.Sharder(mapper, 8), model_file=model_file)
    killer.join()
    client.close()
    print(f"killed worker {killed.get('worker')} (pid {killed.get('pid')}) while it ran {killed.get('shards')}")
    assert killed, "no worker was busy to be killed"
    assert got.shape == expected.shape  # 15 shards of 8: none lost, none twice
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_the_flow_runs_shards_as_tasks_on_the_dask_task_runner(cluster, network_and_images, prefect_server):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from pipelines.flows import dask_sharding
    from pipelines.params import PipelineParams

    network, folder, model_file = network_and_images
    params = PipelineParams.model_validate({"compute": {"dask_address": cluster.scheduler_address, "shard_size": 32}})

    @flow
    def embed_on_dask():
        from prefect.runtime import flow_run

        with dask_sharding(params) as sharder:
            return flow_run.id, embed_images(network, folder.paths, 16, sharder=sharder, model_file=model_file)

    run_id, got = embed_on_dask()
    np.testing.assert_allclose(got, embed_images(network, folder.paths, 16), rtol=1e-5, atol=1e-6)
    with get_client(sync_client=True) as prefect:
        runs = prefect.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
    shards = [r for r in runs if r.name.startswith("embed-shard")]
    assert len(shards) == 4 and all(r.state.is_completed() for r in shards)


def test_a_missing_or_silent_scheduler_is_one_line_within_the_timeout():
    """A closed port, and a listener that accepts connections but never speaks Dask: each a ConfigError
    naming the address, after about the connect timeout, not a traceback or a hang."""
    import socket

    from siamese_core.errors import ConfigError

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    try:
        for address in (f"tcp://127.0.0.1:{closed_port}", f"tcp://127.0.0.1:{silent.getsockname()[1]}"):
            started = time.monotonic()
            with pytest.raises(ConfigError, match=f"{address}: no Dask scheduler answered within 2 s"):
                with sharding.on_dask(address, connect_timeout=2):
                    pass
            assert time.monotonic() - started < 30, address
    finally:
        silent.close()


@pytest.mark.slow  # a scheduler and two dask worker processes, about 40 s: with the slow tests, which CI runs
def test_evaluate_with_a_relative_bundle_path_on_workers_started_elsewhere(tmp_path):
    """`siamese evaluate --model bundle --dask-address ...` run from the bundle's folder, on a real scheduler and two
    `dask worker` processes started in another directory: the workers get absolute paths, and the figures are the
    in-process ones."""
    import json
    import subprocess
    import sys

    from support.http import free_port
    from support.models import make_tiny_bundle

    make_tiny_bundle(tmp_path)  # tmp_path/bundle
    make_digits_dataset(tmp_path / "many", classes=3, train_per_class=0, test_per_class=175)  # 525 queries: 2 shards
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    bin_dir = os.path.dirname(sys.executable)
    address = f"tcp://127.0.0.1:{free_port()}"
    scheduler = subprocess.Popen([f"{bin_dir}/dask", "scheduler", "--host", "127.0.0.1", "--port",
                                  address.rsplit(":", 1)[1], "--no-dashboard"], cwd=elsewhere,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers = [subprocess.Popen([f"{bin_dir}/dask", "worker", address, "--nthreads", "1", "--no-dashboard"],
                                cwd=elsewhere, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(2)]
    try:
        client = distributed.Client(address, timeout=60, set_as_default=False)
        client.wait_for_workers(2, timeout=120)
        client.close()

        def evaluate(*extra: str) -> dict:
            done = subprocess.run([f"{bin_dir}/siamese", "evaluate", "--model", "bundle", "--test", "many/test",
                                   "--no-baselines", "--json", *extra], cwd=tmp_path, capture_output=True, text=True,
                                  timeout=600)
            assert done.returncode == 0, done.stderr[-2000:]
            return json.loads(done.stdout)

        on_dask, in_process = evaluate("--dask-address", address), evaluate()
    finally:
        for process in (*workers, scheduler):
            process.terminate()
            process.wait(timeout=60)
    assert sum(map(sum, in_process["confusion_matrix"]["matrix"])) == 525
    assert on_dask == in_process
