import pytest


@pytest.fixture(params=["numpy", "compiled"])
def ranking(request, monkeypatch):
    """Run a test with the numpy per-cell loops and with the compiled kernels (numba)."""
    if request.param == "compiled":
        pytest.importorskip("numba")
    monkeypatch.setenv("CELLTRON_NUMBA", "1" if request.param == "compiled" else "0")
    return request.param
