"""Inputs, outputs and caches on S3: a real S3 endpoint (moto's server) on loopback, reached
through pyarrow's S3 client with the standard AWS environment only."""

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pyarrow.fs as pafs
import pytest
import ray
import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import load_file

from raysoup.config import load_config
from raysoup.errors import RaysoupError
from raysoup.evaluate import load_eval_sets
from raysoup.inputs import storage
from raysoup.inputs.pool import IngredientPool
from raysoup.inputs.tasks import eval_set_sources
from raysoup.rundir import RunDir
from raysoup.runner import execute

from ..helpers import (
    assert_measured,
    cluster_client_env,
    load_local_cluster,
    own_cache,
    write_config,
)

moto_server = pytest.importorskip("moto.server")
BUCKET = "raysoup-test"
SECRET = f"raysoup-test-secret-{uuid.uuid4().hex}"  # must appear in no file a run writes


@pytest.fixture(scope="module")
def s3():
    """moto's S3 on 127.0.0.1 (a free port), its bucket, and the AWS environment pointing
    at it for this process and every process it starts (Ray's included); all undone after."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "raysoup-test",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    pafs.S3FileSystem(
        endpoint_override=f"{host}:{port}", scheme="http", allow_bucket_creation=True
    ).create_dir(BUCKET)
    yield env
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture(scope="module")
def s3_ray(s3):
    """A local Ray started after the AWS environment is set: its workers inherit it."""
    ray.init(num_cpus=2, num_gpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def objects(uri: str) -> dict[str, bytes]:
    """Every object under `uri`, by path relative to it."""
    fs, base = pafs.FileSystem.from_uri(uri)
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    out = {}
    for info in infos:
        if info.type == pafs.FileType.File:
            with fs.open_input_stream(info.path) as f:
                out[info.path[len(base) + 1 :]] = f.read()
    return out


def upload(local, uri: str) -> None:
    fs, base = pafs.FileSystem.from_uri(uri)
    pafs.copy_files(
        str(local), base, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs
    )


def test_a_zoo_on_s3_reads_the_same_as_its_path(s3, tiny_zoo):
    uri = f"s3://{BUCKET}/zoo"
    upload(tiny_zoo, uri)
    by_path, by_uri = IngredientPool.from_zoo(tiny_zoo), IngredientPool.from_zoo(uri)
    by_uri.validate(verify_sha256=True)  # the manifest's sha256 of every file, read from S3
    for name in by_path.names:
        a, b = by_path.load(name), by_uri.load(name)
        assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    sources = eval_set_sources(uri)
    assert sources and all(s.location.startswith("s3://") for s in sources.values())
    for a, b in zip(load_eval_sets(eval_set_sources(tiny_zoo), 10), load_eval_sets(sources, 10)):
        assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)


def test_run_dir_uploads_weights_before_their_state_and_the_report_last(s3, tmp_path, monkeypatch):
    """The upload order readers rely on, and a replaced step checkpoint removed remotely;
    a fresh staging folder of the same URI (another head) starts as a copy of it."""
    uri = f"s3://{BUCKET}/order"
    order = []
    copy = storage.copy_file
    monkeypatch.setattr(
        storage, "copy_file", lambda src, dst: (order.append(dst), copy(src, dst))[1]
    )
    run = RunDir.open(uri, resume=False)
    (run.local / "driver").mkdir()
    for step in (1, 2):  # the second step replaces the weights: gone from S3 too
        (run.local / "driver" / f"accumulator-000{step - 1}.safetensors").unlink(missing_ok=True)
        (run.local / "driver" / f"accumulator-000{step}.safetensors").write_text(f"w{step}")
        (run.local / "driver" / "state.json").write_text(str(step))
        order.clear()
        run.sync("driver")
        assert [d.rsplit("/", 1)[1] for d in order] == [
            f"accumulator-000{step}.safetensors",
            "state.json",
        ]
    for name in ["report.json", "results.parquet", "zz.png"]:
        (run.local / name).write_text(name)
    order.clear()
    assert run.finish() == uri and not run.local.exists()
    assert order[-1].endswith("/report.json")
    assert len(order) == 3  # only what changed since the last upload
    assert objects(uri) == {
        "driver/state.json": b"2",
        "driver/accumulator-0002.safetensors": b"w2",
        "report.json": b"report.json",
        "results.parquet": b"results.parquet",
        "zz.png": b"zz.png",
    }
    other = RunDir.open(uri, resume=True)
    assert (other.local / "driver" / "state.json").read_text() == "2"
    order.clear()
    other.sync()
    assert order == []  # what it downloaded is not uploaded again


def test_an_unwritable_out_or_cache_uri_is_refused_before_ray_starts(s3, soup_zoo, tmp_path):
    """A bucket that does not exist, as `out` and as the cache: refused before Ray starts,
    naming the URI, and no probe object is left where the check could write."""
    started = ray.is_initialized()
    for i, (out, cache) in enumerate(
        [("s3://no-such-bucket/run", None), (f"s3://{BUCKET}/run-refused", "s3://no-such-bucket/c")]
    ):
        path = write_config(tmp_path / f"run{i}.toml", soup_zoo, out)
        if cache:
            with_cache(path, cache)
        what, uri = ("cache", cache) if cache else ("out", out)
        with pytest.raises(RaysoupError, match=f"^{what} = '{uri}': cannot write there"):
            execute(load_config(path))
    assert ray.is_initialized() == started
    assert objects(f"s3://{BUCKET}/run-refused") == {}


def test_a_zoo_prefix_without_a_manifest_is_refused_before_ray_starts(s3, tmp_path):
    started = ray.is_initialized()
    zoo = f"s3://{BUCKET}/no-zoo-here"
    path = write_config(tmp_path / "run.toml", zoo, f"s3://{BUCKET}/run-no-zoo")
    with pytest.raises(RaysoupError, match=f"^{zoo}: no manifest.json there"):
        execute(load_config(path))
    assert ray.is_initialized() == started


def test_a_long_transfer_logs_its_bytes_and_rate(s3, tmp_path, monkeypatch, caplog):
    """Every PROGRESS_EVERY_S (here: every chunk) a transfer says how far it is and how fast,
    uploading, reading and downloading alike."""
    monkeypatch.setattr(storage, "CHUNK_BYTES", 1 << 16)
    monkeypatch.setattr(storage, "PROGRESS_EVERY_S", 0.0)
    data = os.urandom(1 << 20)
    (tmp_path / "big.bin").write_bytes(data)
    uri = f"s3://{BUCKET}/big/big.bin"
    with caplog.at_level(logging.INFO, logger="raysoup"):
        assert storage.copy_file(str(tmp_path / "big.bin"), uri) == len(data)
        assert storage.read_bytes(uri) == data
        storage.copy_file(uri, str(tmp_path / "back" / "big.bin"))
    assert (tmp_path / "back" / "big.bin").read_bytes() == data
    lines = [r.getMessage() for r in caplog.records]
    for what in [f"uploading {uri}", f"reading {uri}", f"downloading {uri}"]:
        moved = [line for line in lines if line.startswith(f"[storage] {what}: moved ")]
        assert len(moved) == 16, lines  # 1 MiB in 64 KiB chunks
        assert re.fullmatch(r".*: moved 1\.0 of 1\.0 MB in \d+ s \([\d.]+ MB/s\)", moved[-1])
        assert f"[storage] {what}: done, 1.0 of 1.0 MB" in " ".join(lines)


@pytest.mark.slow  # a CLI subprocess: its imports cost most of it on 2 shared cores
def test_an_unreachable_endpoint_fails_the_cli_in_seconds_with_one_line(s3, soup_zoo, tmp_path):
    import socket

    with socket.socket() as s:  # a loopback port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    out = f"s3://{BUCKET}/run"
    path = write_config(tmp_path / "run.toml", soup_zoo, out)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "raysoup.cli", "run", str(path)],
        env={**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{closed}", "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"raysoup: error: out = '{out}': cannot write there")
    assert time.perf_counter() - t0 < 90  # the AWS client's retries: seconds, not minutes


def with_cache(path, cache: str):
    path.write_text(f'cache = "{cache}"\n' + path.read_text())
    return path


def s3_config(path, zoo, out: str, cache: str | None = None):
    """The runs of this file: one component, so a pass is 3 evaluations (the storage is
    under test, not the search)."""
    path = write_config(path, zoo, out, components="whole-model")
    return with_cache(path, cache) if cache else path


@pytest.fixture(scope="module")
def run_on_s3(s3_ray, soup_zoo, tmp_path_factory):
    """A whole run with `out` and the cache on S3 (both empty before), and a fresh local
    RAYSOUP_CACHE that must stay unused."""
    root = tmp_path_factory.mktemp("s3run")
    path = s3_config(root / "run.toml", soup_zoo, f"s3://{BUCKET}/run-a", f"s3://{BUCKET}/cache")
    t0 = time.perf_counter()
    with own_cache(root / "local-cache"):
        report = execute(load_config(path))
    print(f"run on s3: {time.perf_counter() - t0:.1f} s")
    return report, root


@pytest.mark.slow
def test_a_run_with_out_on_s3_uploads_every_output_and_no_secret(run_on_s3):
    report, root = run_on_s3
    uploaded = objects(f"s3://{BUCKET}/run-a")
    assert {
        "report.json",
        "results.parquet",
        "correctness.parquet",
        "beta.parquet",
        "beta.png",
        "history.json",
        "fused.safetensors",
        "raysoup.log",
        "driver/ranking.json",
        "driver/manifold_mix/state.json",
    } <= set(uploaded)
    assert json.loads(uploaded["report.json"])["methods"] == json.loads(
        json.dumps(report["methods"])
    )
    history = json.loads(uploaded["history.json"])
    passes = sum(len(s["passes"]) for s in history)
    assert (
        passes >= 1 and len({k.split("/")[1] for k in uploaded if k.startswith("tune/")}) == passes
    )  # every optimiser pass's Tune folder
    assert assert_measured(report["methods"]["manifold_mix"]) > 0
    assert not [k for k, v in uploaded.items() if SECRET.encode() in v]
    with pytest.raises(RaysoupError, match="already holds a finished run"):
        execute(load_config(root / "run.toml"))
    # The cache went to S3, not to this machine's cache.
    assert objects(f"s3://{BUCKET}/cache") and not (root / "local-cache").exists()


@pytest.mark.slow
def test_a_run_on_s3_reports_what_the_same_run_on_a_local_disk_does(run_on_s3, soup_zoo, tmp_path):
    first, _ = run_on_s3
    path = s3_config(tmp_path / "run.toml", soup_zoo, str(tmp_path / "out"))
    with own_cache(tmp_path / "cache"):
        on_disk = execute(load_config(path))
    assert first["methods"].keys() == on_disk["methods"].keys()
    for name, row in first["methods"].items():
        assert {k: row[k] for k in ("val", "id", "ood", "ingredients")} == {
            k: on_disk["methods"][name][k] for k in ("val", "id", "ood", "ingredients")
        }
    assert (
        first["methods"]["manifold_mix"]["history"] == on_disk["methods"]["manifold_mix"]["history"]
    )


@pytest.mark.slow
def test_a_second_run_reads_back_the_shared_cache(run_on_s3, soup_zoo, tmp_path):
    """Another head (fresh local cache and staging) with the same S3 cache: every point
    and judgement the first run measured is read back, and the result is the same."""
    first, _ = run_on_s3
    path = s3_config(
        tmp_path / "run.toml", soup_zoo, f"s3://{BUCKET}/run-c", f"s3://{BUCKET}/cache"
    )
    with own_cache(tmp_path / "local-cache"):
        second = execute(load_config(path))
    cache = second["cache"]
    assert cache["points_cached"] > 0 and cache["judgements_cached"] > 0
    assert cache["judgements_measured"] == 0, cache
    a, b = first["methods"]["manifold_mix"], second["methods"]["manifold_mix"]
    assert b["cached_evaluations"] == b["evaluations"] - len(second["ranking"])
    assert a["ingredients"] == b["ingredients"] and a["history"] == b["history"]


@pytest.fixture(scope="module")
def s3_cluster(s3):
    """A 4-node loopback cluster (cluster/local.py) started with the AWS environment: a head
    without CPUs, and three 1-CPU workers whose evaluators read the zoo from S3."""
    local = load_local_cluster()
    with local.LocalCluster(
        head=local.NodeSpec(cpus=0), workers=[local.NodeSpec(cpus=1)] * 3, start_timeout=180
    ) as cluster:
        yield cluster


@pytest.mark.slow
def test_a_run_killed_on_a_4_node_cluster_resumes_from_s3_on_another_head(
    run_on_s3, s3_cluster, soup_zoo, tmp_path
):
    """The zoo on S3, `out` on S3; a run on a 4-node cluster is killed after its first
    uploaded step, and resumed by another client with fresh staging and cache (nothing local
    shared with the first): it ends where the uninterrupted run (local Ray) did."""
    first, _ = run_on_s3
    zoo, uri = f"s3://{BUCKET}/soup-zoo", f"s3://{BUCKET}/run-b"
    upload(soup_zoo, zoo)
    path = s3_config(tmp_path / "run.toml", zoo, uri)

    def client(cache: str, *flags: str) -> subprocess.Popen:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "raysoup.cli",
                "run",
                str(path),
                "--address",
                s3_cluster.address,
                *flags,
            ],
            env=cluster_client_env(s3_cluster, tmp_path / cache),
            start_new_session=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    proc = client("cache-a")
    fs, base = pafs.FileSystem.from_uri(f"{uri}/driver/manifold_mix/state.json")
    deadline = time.time() + 300
    while (
        fs.get_file_info(base).type != pafs.FileType.File
        and time.time() < deadline
        and proc.poll() is None
    ):
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole process group: the client and its driver
    output = proc.communicate()[0]
    uploaded = objects(uri)
    step = "driver/manifold_mix/state.json"
    assert step in uploaded, f"the run never uploaded a step:\n{output[-3000:]}"
    assert "report.json" not in uploaded
    done = json.loads(uploaded[step])["state"]["next_candidate"] - 1
    with pytest.raises(RaysoupError, match="holds an unfinished run"):
        execute(load_config(path))
    resumed = client("cache-b", "--resume")
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, output[-3000:]
    assert f"[manifold_mix] resuming after step {done}:" in output
    report = json.loads(objects(uri)["report.json"])
    a, b = first["methods"]["manifold_mix"], report["methods"]["manifold_mix"]
    assert a["ingredients"] == b["ingredients"] and a["history"] == b["history"]
    assert a["val"] == b["val"] and report["config"]["resumed"]
    assert f"[manifold_mix] resuming after step {done}:" in objects(uri)["raysoup.log"].decode()
    assert assert_measured(b, after_step=done) > 0


@pytest.mark.slow
def test_report_and_export_read_a_run_on_s3(run_on_s3, tmp_path, capsys):
    """`raysoup report URI` prints the run's table and puts its redrawn figures back beside
    it; `raysoup export URI` writes the fused model to a path or to S3, the same bytes."""
    from raysoup.cli import main
    from raysoup.report import format_table

    report, _ = run_on_s3
    uri = f"s3://{BUCKET}/run-a"
    fs, base = pafs.FileSystem.from_uri(uri)
    fs.delete_file(f"{base}/beta.png")
    assert main(["report", uri]) == 0
    printed = capsys.readouterr().out
    assert (
        format_table(report["methods"], report.get("references"), report["config"]["metric"])
        in printed
    )
    assert f"[report] wrote {uri}/beta.png" in printed and "beta.png" in objects(uri)
    best = report["ranking"][0][0]
    local = tmp_path / "soup.safetensors"
    for out in [str(local), f"s3://{BUCKET}/exported/soup.safetensors"]:
        assert main(["export", uri, "--like", best, "--out", out]) == 0
    assert objects(f"s3://{BUCKET}/exported") == {"soup.safetensors": local.read_bytes()}
    fused = load_file(local)
    uploaded = load_safetensors_bytes(objects(uri)["fused.safetensors"])
    assert fused.keys() == uploaded.keys() and all(
        torch.equal(fused[k], uploaded[k]) for k in fused
    )


def test_a_cache_on_s3_round_trips_and_concurrent_writers_of_a_key_agree(s3, monkeypatch):
    """KeyedArrays under a URI: a miss is None, a put is read back exactly, and writers of
    one key at once (nodes sharing the cache) leave one whole, readable object."""
    from concurrent.futures import ThreadPoolExecutor

    from raysoup.cache import KeyedArrays, cache_dir, cache_location

    monkeypatch.setenv("RAYSOUP_CACHE", f"s3://{BUCKET}/env-cache")
    assert cache_location() == f"s3://{BUCKET}/env-cache"  # RAYSOUP_CACHE as a URI
    assert cache_location(f"s3://{BUCKET}/x") == f"s3://{BUCKET}/x"  # the config's wins
    assert "://" not in str(cache_dir())  # the demo's zoos stay on this machine
    key, value = "ab" + "0" * 62, np.arange(1000, dtype=np.float32)
    arrays = KeyedArrays(cache_location())
    assert arrays.get(key) is None
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: KeyedArrays(cache_location()).put(key, value), range(8)))
    assert np.array_equal(arrays.get(key), value)
    assert list(objects(f"s3://{BUCKET}/env-cache")) == [f"ab/{key}.npy"]
