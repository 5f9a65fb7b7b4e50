"""Test set-up: 8 fake CPU devices (for sharding tests) and small configs."""

import os

# Must happen before jax is imported anywhere.
# LLVM at -O0: the suite's programs are small and compiled once or twice each, so compile time is most of
# its run time (about a third less at -O0); what a test checks does not depend on the optimisation level.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

from ijepa_jax import config_lib  # noqa: E402

SHARED_DATA = os.environ.get(
    "IJEPA_SHARED_DATA", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
)


def pytest_configure(config):
    """One persistent compilation cache for the whole session, its subprocesses and later sessions, in
    pytest's cache folder (`pytest --cache-clear` empties it; $JAX_COMPILATION_CACHE_DIR, when set, wins).
    jax keys each program on its HLO, devices, flags and versions, so a changed model or mesh compiles
    afresh; an unreadable entry costs a warning and a compile."""
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        if getattr(config, "cache", None) is None:  # -p no:cacheprovider: run without the cache
            return
        os.environ["JAX_COMPILATION_CACHE_DIR"] = str(config.cache.mkdir("jax_compilation_cache"))
    # Subprocesses read the environment; this process imported jax already, so tell it too.
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # small CPU programs compile in < 1 s
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update(
        "jax_persistent_cache_min_compile_time_secs", float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"])
    )


def small_config(**overrides):
    """config_lib.smoke on generated data (64 images: 8 steps per epoch), every step logged and the
    whole 2 epochs run unless `total_steps` says otherwise."""
    c = config_lib.smoke(config_lib.default_config())
    c.data.source = "synthetic"
    c.total_steps, c.log_every_steps = -1, 1
    c.checkpoint.every_steps = config_lib.default_config().checkpoint.every_steps
    c.update_from_flattened_dict(overrides)
    return c


def skip_without_real_data(message: str):
    """Skip a test that needs ../shared/data where it is absent, except under CI (CI=true), where the
    data is always provided: there its absence fails the test, so CI cannot pass without real data."""
    message += " (set IJEPA_SHARED_DATA to the folder holding the shared data)"
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(f"CI=true but {message}")
    pytest.skip(message)


@pytest.fixture
def shared_data():
    """Path of ../shared/data; skips the test when it is absent (fails under CI)."""
    if not os.path.isdir(SHARED_DATA):
        skip_without_real_data(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_imagenet(tmp_path_factory):
    """The shared Tiny-ImageNet subset extracted to a temporary folder; skips when absent."""
    import tarfile

    archive = os.path.join(SHARED_DATA, "tiny-imagenet-100cls.tar.gz")
    if not os.path.isfile(archive):
        skip_without_real_data(f"{archive} not found")
    out = tmp_path_factory.mktemp("tiny_imagenet")
    with tarfile.open(archive) as tar:
        tar.extractall(out, filter="data")
    return str(out / "tiny-imagenet-100cls")
