"""Each caller alone with its jobs (issue 25): with API keys, a key sees and touches only the jobs it submitted, in
every route of the OpenAPI schema; an admin key sees all; another key's job is a 404, never a 403. Image links
that leave the server are signed and expire; a forged Host header never makes a link. Keys fail closed."""

from __future__ import annotations

import functools
import hashlib
import subprocess
import sys
import time

import httpx
import pytest
from server import until, wait_for

from sdserve.keys import KeyBook

A, B, ADMIN = "sk-owner-alpha", "sk-owner-bravo", "sk-owner-admin"
SECRET = "a prompt only alpha may read"
LONG = {"prompt": SECRET + " (long)", "steps": 150, "seed": 1, "width": 256, "height": 256}

KEYS = f"""
[[keys]]
key = "{A}"
label = "alpha"

[[keys]]
sha256 = "{hashlib.sha256(B.encode()).hexdigest()}"
label = "bravo"

[[keys]]
key = "{ADMIN}"
label = "ops"
admin = true
"""


@pytest.fixture(scope="module")
def keyed(models_dir, tmp_path_factory, module_servers):
    folder = tmp_path_factory.mktemp("owned")
    (folder / "keys.toml").write_text(KEYS)
    return module_servers(models_dir, folder / "data", "--keys-file", str(folder / "keys.toml"))


def as_key(server, key):
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=120)


@pytest.fixture(scope="module")
def alphas(keyed):
    """Alpha's finished job (its image id) and a long one still running while the others probe."""
    with as_key(keyed, A) as alpha:
        done = alpha.post("/api/v1/jobs", json={"prompt": SECRET, "steps": 2}).json()
        done = wait_for(alpha, done["id"])
        running = alpha.post("/api/v1/jobs", json=LONG).json()
        wait_for(alpha, running["id"], ("running",))
        yield done, running
        alpha.delete(f"/api/v1/jobs/{running['id']}")


def test_another_key_finds_nothing_of_alphas(keyed, alphas):
    done, running = alphas
    image = done["images"][0]["id"]
    with as_key(keyed, B) as bravo:
        assert SECRET not in bravo.get("/api/v1/jobs").text
        for job_id in (done["id"], running["id"]):
            for method, path in (("GET", f"/api/v1/jobs/{job_id}"), ("DELETE", f"/api/v1/jobs/{job_id}"),
                                 ("GET", f"/api/v1/jobs/{job_id}/events")):
                r = bravo.request(method, path)
                assert r.status_code == 404 and SECRET not in r.text, (method, path, r.status_code)
        for path in (f"/api/v1/images/{image}", f"/download/{image}"):
            assert bravo.get(path).status_code == 404, path
        assert running["id"] not in bravo.get("/api/v1/workers").text  # a worker's batch shows only one's own
        mine = bravo.post("/api/v1/jobs", json={"prompt": "bravo's own", "steps": 1}, headers={"Idempotency-Key": "k"})
        assert mine.status_code == 202
    with as_key(keyed, A) as alpha:
        assert alpha.get(f"/api/v1/jobs/{running['id']}").json()["status"] == "running"  # bravo's DELETE did nothing
        # The same Idempotency-Key from another key is another job, never bravo's.
        again = alpha.post("/api/v1/jobs", json={"prompt": "bravo's own", "steps": 1}, headers={"Idempotency-Key": "k"})
        assert again.status_code == 202 and again.json()["id"] != mine.json()["id"]
        assert {j["id"] for j in alpha.get("/api/v1/jobs").json()} >= {done["id"], running["id"]}
        assert alpha.get(f"/api/v1/images/{image}").status_code == 200
        assert running["id"] in alpha.get("/api/v1/workers").text
    with as_key(keyed, ADMIN) as admin:  # an admin key sees and manages everyone's
        listed = {j["id"] for j in admin.get("/api/v1/jobs", params={"limit": 200}).json()}
        assert {done["id"], running["id"], mine.json()["id"]} <= listed
        assert admin.get(f"/api/v1/images/{image}").status_code == 200
        with as_key(keyed, A) as alpha:  # queued behind alpha's running job
            queued = alpha.post("/api/v1/jobs", json={**LONG, "prompt": "alpha's next"}).json()
        assert admin.get(f"/api/v1/jobs/{queued['id']}").json()["request"]["prompt"] == "alpha's next"
        assert admin.delete(f"/api/v1/jobs/{queued['id']}").status_code == 200
        assert wait_for(admin, queued["id"])["status"] == "canceled"


def test_two_basic_users_are_kept_apart(models_dir, servers):
    server = servers(models_dir, "basic", "--api-auth", "ann:pw-of-ann,bob:pw-of-bob")
    ann = httpx.Client(base_url=server.url, auth=("ann", "pw-of-ann"), timeout=120)
    bob = httpx.Client(base_url=server.url, auth=("bob", "pw-of-bob"), timeout=120)
    with ann, bob:
        job = ann.post("/api/v1/jobs", json={"prompt": "ann's own", "steps": 1}).json()
        assert wait_for(ann, job["id"])["label"] == "ann"
        assert bob.get(f"/api/v1/jobs/{job['id']}").status_code == 404
        assert "ann's own" not in bob.get("/api/v1/jobs").text
        assert bob.delete(f"/api/v1/jobs/{job['id']}").status_code == 404
        assert [j["id"] for j in ann.get("/api/v1/jobs").json()] == [job["id"]]
        assert httpx.get(server.url + "/api/v1/jobs", auth=("ann", "wrong"), timeout=60).status_code == 401


def test_every_route_with_another_keys_credentials(keyed, alphas):
    """Every route of the OpenAPI schema, called with bravo's key and alpha's ids wherever a path names one:
    never a 500, never a 403 (which would confirm the job exists), never alpha's prompt; a path naming alpha's
    job or image is a 404."""
    done, running = alphas
    image = done["images"][0]["id"]
    # Every path parameter the schema has; a new one must be added here, so no route goes unchecked.
    values = {"job_id": running["id"], "image_id": image, "download_id": image, "name": "tiny", "version": "1"}
    owned = ("{job_id}", "{image_id}", "{download_id}")
    skipped = {("post", "/sdapi/v1/options")}  # free-form settings every caller shares (A1111's); nothing of a job's
    schema = httpx.get(keyed.url + "/openapi.json", headers={"Authorization": f"Bearer {A}"}).json()
    routes = [(method, path) for path, methods in schema["paths"].items() for method in methods]
    checked = []
    with as_key(keyed, B) as bravo, as_key(keyed, A) as alpha:
        for method, path in routes:
            if (method, path) in skipped:
                continue
            url = path
            for name, value in values.items():
                url = url.replace("{" + name + "}", value)
            assert "{" not in url, f"{path}: a path parameter this test does not know"
            # A body every dialect refuses (a list where text goes), so nothing generates meanwhile.
            body = {"prompt": ["x"], "steps": "x"} if method in ("post", "put", "patch") else None
            r = bravo.request(method.upper(), url, json=body, timeout=30)
            checked.append((method, path))
            assert r.status_code not in (403, 500), (method, path, r.status_code, r.text[:200])
            assert SECRET not in r.text, (method, path)
            if any(name in path for name in owned):
                assert r.status_code == 404, (method, path, r.status_code)
                if method == "get":  # the owner reads it: the 404 was bravo's alone
                    with alpha.stream("GET", url, timeout=30) as mine:
                        assert mine.status_code == 200, (path, mine.status_code)
    assert skipped <= set(routes) and len(checked) > 60  # the skip names a real route; the schema was read
    with as_key(keyed, A) as alpha:
        assert alpha.get(f"/api/v1/jobs/{running['id']}").json()["status"] == "running"  # nothing touched it


def test_image_links_are_signed(keyed):
    with as_key(keyed, A) as alpha:  # a hang guard: it waits behind alpha's long job, as long as the CPU takes
        r = alpha.post("/v1/images/generations", json={"prompt": "a link", "response_format": "url"}, timeout=900)
        assert r.status_code == 200, r.text
    url = r.json()["data"][0]["url"]
    get = functools.partial(httpx.get, timeout=60)  # a busy machine answers slowly, never wrongly
    assert "signature=" in url and "expires=" in url
    assert get(url).status_code == 200  # the link is the credential: no key needed
    forged = url[:-4] + ("0000" if not url.endswith("0000") else "1111")
    assert get(forged).status_code == 401
    other = url.replace(url.split("/api/v1/images/")[1].split("?")[0], "0" * 32 + "-0")
    assert get(other).status_code == 401  # a signature is for its own image only
    assert get(url, headers={"Authorization": f"Bearer {B}"}).status_code == 200  # a colleague's link
    odd = url.split("?")[0] + "?expires=%C2%B2&signature=" + "é" * 64
    assert get(odd).status_code == 401  # odd digits and letters: refused, never a 500


def test_image_links_expire(models_dir, servers):
    server = servers(models_dir, "ttl", "--api-key", "sk-link-ttl-key", env={"SDSERVE_IMAGE_URL_TTL_S": "2"})
    r = httpx.post(server.url + "/v1/images/generations", json={"prompt": "a link", "response_format": "url"},
                   headers={"Authorization": "Bearer sk-link-ttl-key"}, timeout=600)
    url = r.json()["data"][0]["url"]
    expires = int(url.split("expires=")[1].split("&")[0])
    until(lambda: httpx.get(url, timeout=60).status_code == 401, "the link never expired", 120, server, every=0.5)
    assert expires <= time.time()  # refused for its age, not for anything else
def test_a_forged_host_never_makes_a_link(models_dir, servers):
    plain = servers(models_dir, "plain")
    public = servers(models_dir, "public", "--public-url", "https://images.example.org/sd")
    named = servers(models_dir, "named", "--allowed-hosts", "sd.example.org,*.corp.example")
    body = {"prompt": "x", "response_format": "url", "n": 1}
    evil = httpx.post(plain.url + "/v1/images/generations", json=body, headers={"Host": "evil.example"})
    assert evil.status_code == 400 and "evil.example" in evil.json()["error"]["message"]
    assert httpx.get(plain.url + "/readyz", headers={"Host": "10.1.2.3:7860"}).status_code == 200  # probes
    ok = httpx.post(plain.url + "/v1/images/generations", json=body, timeout=120)
    assert ok.json()["data"][0]["url"].startswith(plain.url + "/api/v1/images/")
    r = httpx.post(public.url + "/v1/images/generations", json=body, headers={"Host": "evil.example"}, timeout=120)
    assert r.status_code == 200 and r.json()["data"][0]["url"].startswith("https://images.example.org/sd/api/v1/")
    # --allowed-hosts: those names (a port kept in the links), *.x for its subdomains; anything else is 400
    for host in ("sd.example.org:8443", "a.corp.example"):
        r = httpx.post(named.url + "/v1/images/generations", json=body, headers={"Host": host}, timeout=120)
        assert r.status_code == 200 and r.json()["data"][0]["url"].startswith(f"http://{host}/api/v1/images/"), r.text
    for host in ("corp.example", "evil.example", "127.0.0.1", "sd.example.org.evil.example"):
        r = httpx.get(named.url + "/api/v1/jobs", headers={"Host": host}, timeout=60)
        assert r.status_code == 400, (host, r.status_code)


def test_a_host_header_is_read_as_a_host():
    from sdserve.api.urls import host_allowed, host_of

    assert [host_of(h) for h in ("[::1]:7860", "[::1]", "A.Example:80", "a.example", "::1")] == [
        "::1", "::1", "a.example", "a.example", "::1"]
    assert host_allowed("x.corp.example", ["*.corp.example"]) and not host_allowed("corp.example", ["*.corp.example"])
    assert not host_allowed("evilcorp.example", ["*.corp.example"]) and host_allowed("anything", ["*"])


# ---------------------------------------------------------------- keys fail closed
def test_an_empty_api_key_refuses_to_start(tmp_path):
    for args, env in ((["--api-key", ""], {}), ([], {"SDSERVE_API_KEYS": "sk-one-key-here,"})):
        out = subprocess.run([sys.executable, "-m", "sdserve.cli", "serve", "--data-dir", str(tmp_path), *args],
                             capture_output=True, text=True, timeout=120, env={**__import__("os").environ, **env})
        assert out.returncode == 2 and "empty" in out.stdout + out.stderr, (out.stdout, out.stderr)


def test_a_deleted_keys_file_stops_its_keys_and_a_broken_edit_keeps_the_last_good(tmp_path, monkeypatch):
    path = tmp_path / "keys.toml"
    path.write_text(KEYS)
    book = KeyBook([], path)
    assert book.lookup(A.encode()).label == "alpha" and book.check() is None
    assert book.describe() == "on (3 keys)"

    def after_a_second():  # the file is read again at most once a second
        book._checked -= 1.0

    path.write_text(KEYS + "\n[[keys]\nbroken")
    after_a_second()
    assert book.lookup(A.encode()).label == "alpha"  # a typo locks nobody out...
    assert "keeping the last good keys" in book.check()  # ...and says so
    path.unlink()
    after_a_second()
    assert book.lookup(A.encode()) is None and "refused" in book.check()
    path.write_text(KEYS)
    after_a_second()
    assert book.lookup(A.encode()).label == "alpha" and book.check() is None
    empty = tmp_path / "none.yaml"
    empty.write_text("keys: []\n")
    assert "every request is refused" in KeyBook([], empty).describe()


def test_keys_are_compared_as_utf8_bytes():
    book = KeyBook(["clé-secrète-🔑"], None)
    assert book.lookup("clé-secrète-🔑".encode()) is not None
    assert book.lookup("clé-secrète-🔑".encode("utf-8").decode("latin-1").encode("utf-8")) is None


def test_a_non_ascii_key_over_http_and_the_readyz_warning(models_dir, tmp_path, servers):
    keys = tmp_path / "keys.yaml"
    keys.write_text('keys:\n  - key: "clé-secrète-🔑"\n    label: unicode\n')
    ops = {"Authorization": "Bearer sk-operations-key"}  # a plain --api-key: the scraper's, not from the file
    server = servers(models_dir, "data", "--keys-file", str(keys), "--api-key", "sk-operations-key")
    utf8 = [(b"authorization", "Bearer clé-secrète-🔑".encode())]
    r = httpx.get(server.url + "/api/v1/jobs", headers=utf8, timeout=60)
    assert r.status_code == 200, r.text
    assert "auth: on (2 keys)" in " ".join(server.log().split())  # the banner (rich wraps it)
    keys.write_text("keys: [broken")
    until(lambda: "warning" in httpx.get(server.url + "/readyz", timeout=60).json(), "the broken file is noticed")
    ready = httpx.get(server.url + "/readyz", timeout=60)
    assert ready.status_code == 200 and "last good keys" in ready.json()["warning"]
    assert httpx.get(server.url + "/api/v1/jobs", headers=utf8, timeout=60).status_code == 200
    assert "sdserve_keys_file_problem 1.0" in httpx.get(server.url + "/metrics", headers=utf8, timeout=60).text
    keys.unlink()  # deleted: every key it gave stops, loudly (log, readiness, metric); the others still work
    until(lambda: httpx.get(server.url + "/api/v1/jobs", headers=utf8, timeout=60).status_code == 401,
          "the deleted file's key is refused")
    assert "every key it listed is refused" in httpx.get(server.url + "/readyz", timeout=60).json()["warning"]
    assert "sdserve_keys_file_problem 1.0" in httpx.get(server.url + "/metrics", headers=ops, timeout=60).text
    assert "every key it listed is refused" in server.log()
    keys.write_text('keys:\n  - key: "clé-secrète-🔑"\n    label: unicode\n')
    until(lambda: httpx.get(server.url + "/api/v1/jobs", headers=utf8, timeout=60).status_code == 200,
          "the key works again once its file is back")
    assert "sdserve_keys_file_problem 0.0" in httpx.get(server.url + "/metrics", headers=ops, timeout=60).text
