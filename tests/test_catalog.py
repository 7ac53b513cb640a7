"""The API role's model catalog: what workers publish in the queue's shared table, plus the API's own names.
Run on both queue backends; the lookup rule is the one ModelRegistry uses (tests/test_models.py)."""

import pytest
from test_queue import queue  # noqa: F401  (the fixture: SQLite and Redis)

from sdserve.catalog import ModelInfo, SharedCatalog, UnknownModelError, publish

SHA = "0123456789abcdef" * 4
TINY = ModelInfo("tiny", "diffusers", "/models/tiny", "sd1", 1234)
FILE = ModelInfo("tinyfile", "single-file", "/models/tinyfile.safetensors", "sd1", 99)


def test_nothing_published_and_nothing_declared(queue):  # noqa: F811
    catalog = SharedCatalog(queue, [])
    assert catalog.list() == [] and catalog.default() is None
    with pytest.raises(UnknownModelError, match="no worker has published"):
        catalog.info(None)


def test_a_declared_name_is_accepted_before_any_worker_publishes(queue):  # noqa: F811
    catalog = SharedCatalog(queue, ["sd15"])
    assert [(m.name, m.kind) for m in catalog.list()] == [("sd15", "declared")]
    assert catalog.info(None).name == "sd15" and catalog.sha256(catalog.info("sd15")) is None
    with pytest.raises(UnknownModelError, match="choose one of: sd15"):
        catalog.info("other")


def test_published_models_are_found_as_the_registry_finds_them(queue):  # noqa: F811
    catalog = SharedCatalog(queue, ["tiny"])
    assert catalog.info(None).kind == "declared"
    publish(queue, [TINY, FILE], lambda m: SHA if m is FILE else None)
    assert catalog.info("tinyfile").kind == "single-file"  # a name not seen before is read again at once
    # Declared and published: one entry, the published one.
    assert [(m.name, m.kind) for m in catalog.list()] == [("tiny", "diffusers"), ("tinyfile", "single-file")]
    assert catalog.info("tinyfile.safetensors").name == "tinyfile"  # by filename
    assert catalog.info(f"tinyfile [{SHA[:10]}]").name == "tinyfile"  # by A1111 title
    assert catalog.info(SHA[:10]).name == "tinyfile" and catalog.info(SHA).name == "tinyfile"  # by hash
    assert catalog.short_hash(catalog.info("tinyfile")) == SHA[:10]
    with pytest.raises(UnknownModelError):
        catalog.info("/etc/passwd")


def test_the_default_follows_the_live_workers_when_none_is_declared(queue):  # noqa: F811
    publish(queue, [TINY, FILE], lambda m: None)
    catalog = SharedCatalog(queue, [])
    assert catalog.default() == "tiny"  # no worker running: the first published
    queue.register_worker({"name": "w1", "model": "tinyfile", "ready": True}, ttl_s=30)
    catalog.refresh()  # what the workers run is read at most every TTL_S
    assert catalog.default() == "tinyfile" and catalog.loaded() == ["tinyfile"]
