"""Corpora on an S3 object store, against a local moto server on 127.0.0.1."""

import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from celltron.corpus import Corpus, CorpusStream

pytest.importorskip("s3fs")
pytest.importorskip("moto")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint():
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    port = _free_port()
    server = shutil.which("moto_server") or os.path.join(os.path.dirname(sys.executable), "moto_server")
    process = subprocess.Popen([server, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        process.kill()
        pytest.fail("moto_server did not start within 30 s")
    yield endpoint
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture(scope="module")
def s3_corpus(s3_endpoint, small_corpus):
    import s3fs

    options = {"endpoint_url": s3_endpoint, "key": "testing", "secret": "testing", "client_kwargs": {"region_name": "us-east-1"}}
    import boto3

    boto3.client(
        "s3", endpoint_url=s3_endpoint, aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    ).create_bucket(Bucket="celltron-test")
    fs = s3fs.S3FileSystem(**options)
    fs.put(str(small_corpus), "celltron-test/corpora/pbmc", recursive=True)
    return "s3://celltron-test/corpora/pbmc", options


def test_stream_from_s3_equals_local(s3_corpus, small_corpus):
    url, options = s3_corpus
    remote = CorpusStream(url, storage_options=options, infinite=False, block_size=128, buffer_size=512)
    local = CorpusStream(small_corpus, infinite=False, block_size=128, buffer_size=512)
    for a, b in zip(remote, local, strict=True):
        assert int(a["cell_index"]) == int(b["cell_index"])
        assert a["genes"].tolist() == b["genes"].tolist() and a["counts"].tolist() == b["counts"].tolist()


def test_validate_and_info_on_s3(s3_corpus):
    url, options = s3_corpus
    corpus = Corpus(url, options)
    assert corpus.validate() == []
    assert corpus.summary()["n_cells"] == corpus.manifest["n_cells"]


def test_cli_info_with_storage_options(s3_corpus, capsys):
    from celltron.cli import main

    url, options = s3_corpus
    args = [
        "corpus",
        "validate",
        url,
        "--storage-option",
        f"endpoint_url={options['endpoint_url']}",
        "--storage-option",
        "key=testing",
        "--storage-option",
        "secret=testing",
    ]
    assert main(args) == 0
    assert "valid" in capsys.readouterr().out
