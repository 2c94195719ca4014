"""Signed bundles: `edgepeft keygen`, `export --sign`, and `Session.open(trusted_keys=...)` /
`train --trust`, which refuse a bundle that is unsigned, signed by another key, or altered
after signing (its manifest, any member, or the initial adapter it ships)."""
from __future__ import annotations

import json
import stat

import pytest
from click.testing import CliRunner

from conftest import TRAIN, rewrite_zip
from edgepeft import names
from edgepeft.bundle import open_bundle
from edgepeft.cli import main
from edgepeft.data import write_jsonl
from edgepeft.errors import SignatureError, SpecError
from edgepeft.fsutil import sha256_bytes
from edgepeft.runtime import Session
from edgepeft.signing import SIGNATURE_MEMBER, generate_key, key_id, load_public_key, sign_manifest


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    return generate_key(d / "publisher"), generate_key(d / "other")


def sign_copy(src, dst, key):
    """``src`` re-packed with a signature by ``key`` (what `export --sign` writes)."""
    def transform(name, data):
        if name == names.MANIFEST:
            return [(name, data), (SIGNATURE_MEMBER, sign_manifest(data, key))]
        return [(name, data)]
    return rewrite_zip(src, dst, transform)


@pytest.fixture(scope="module")
def signed(bundle_int8, keys, tmp_path_factory):
    return sign_copy(bundle_int8.path, tmp_path_factory.mktemp("signed") / "signed.edgepeft", keys[0][0])


def _open(path, tmp_path, cache_dir, **kw):
    s = Session.open(path, store=tmp_path / "store", cache_dir=cache_dir, threads=1, **kw)
    s.close()
    return s


def test_signed_bundle_opens_with_the_publisher_key(signed, keys, tmp_path, cache_dir):
    pub = keys[0][1]
    s = _open(signed, tmp_path, cache_dir, trusted_keys=[pub])
    assert s.bundle.signed_by == key_id(load_public_key(pub))
    # Several keys: any one of them will do; a key object or PEM bytes work too.
    assert _open(signed, tmp_path, cache_dir, trusted_keys=[keys[1][1], pub.read_bytes()]).bundle.signed_by
    assert _open(signed, tmp_path, cache_dir, trusted_keys=load_public_key(pub)).bundle.signed_by
    # Without trusted keys nothing is checked (signed or not).
    assert _open(signed, tmp_path, cache_dir).bundle.signed_by is None


def _resign_manifest(edit):
    """Alter the manifest after signing, keeping the old signature."""
    def build(signed_path, out, bundle):
        def transform(name, data):
            if name == names.MANIFEST:
                m = json.loads(data)
                edit(m)
                return [(name, json.dumps(m).encode())]
            return [(name, data)]
        return rewrite_zip(signed_path, out, transform)
    return build


def _alter_member(member, new, update_manifest):
    """Replace a member; with ``update_manifest`` also fix its sha256 in the (signed) manifest,
    as an attacker would."""
    def build(signed_path, out, bundle):
        import zipfile
        with zipfile.ZipFile(signed_path) as z:
            new_data = new(z.read(member))
        def transform(name, data):
            if name == member:
                return [(name, new_data)]
            if name == names.MANIFEST and update_manifest:
                m = json.loads(data)
                m["members"][member] = sha256_bytes(new_data)
                return [(name, json.dumps(m, indent=2).encode())]
            return [(name, data)]
        return rewrite_zip(signed_path, out, transform)
    return build


def _drop_signature(signed_path, out, bundle):
    return rewrite_zip(signed_path, out, lambda n, d: [] if n == SIGNATURE_MEMBER else [(n, d)])


def _signature(content: bytes):
    return lambda signed_path, out, bundle: rewrite_zip(
        signed_path, out, lambda n, d: [(n, content if n == SIGNATURE_MEMBER else d)])


def _other_key(keys):
    return lambda signed_path, out, bundle: sign_copy(bundle.path, out, keys[1][0])


ADAPTER_W = f"{names.INITIAL_ADAPTER_DIR}/{names.ADAPTER_WEIGHTS}"
REFUSED = [
    ("unsigned", _drop_signature, SignatureError, ["not signed", "--sign"]),
    ("other-publisher", "other", SignatureError, ["does not verify with any trusted key"]),
    ("manifest-label-changed", _resign_manifest(lambda m: m.update(labels=["pos", "neg"])), SignatureError,
     ["altered after signing"]),
    ("tokenizer-swapped", _alter_member(names.TOKENIZER, lambda d: d.replace(b"[UNK]", b"[UNX]", 1), True),
     SignatureError, ["altered after signing"]),
    ("initial-adapter-swapped", _alter_member(ADAPTER_W, lambda d: d[:-12] + b"\x00\x00\x80\x3f" + d[-8:], True), SignatureError,
     ["altered after signing"]),
    # A member altered after signing but its hash left alone: the signed manifest is intact, the
    # member is not, so this too is a SignatureError (as the README promises), not a plain BundleError.
    ("graph-swapped-hash-kept", _alter_member(names.INFERENCE_MODEL, lambda d: d[:-3] + b"abc", False),
     SignatureError, ["does not match its sha256"]),
    ("signature-garbage", _signature(b"\x00\xffnot json"), SignatureError, ["malformed manifest.sig"]),
    ("signature-wrong-algorithm", _signature(b'{"algorithm": "rsa", "signature": ""}'), SignatureError, ["malformed"]),
    ("signature-flipped", _signature(json.dumps({"algorithm": "ed25519", "signature": "A" * 88}).encode()),
     SignatureError, ["does not verify"]),
]


@pytest.mark.parametrize("build, error, parts", [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_untrusted_bundles_are_refused(signed, bundle_int8, keys, tmp_path, build, error, parts):
    if build == "other":
        build = _other_key(keys)
    bad = build(signed, tmp_path / "bad.edgepeft", bundle_int8)
    cache = tmp_path / "cache"
    with pytest.raises(error) as exc:
        Session.open(bad, store=tmp_path / "store", cache_dir=cache, trusted_keys=[keys[0][1]])
    assert type(exc.value) is error
    assert all(p in str(exc.value) for p in parts), str(exc.value)
    assert not cache.exists() or not [p for p in cache.rglob("*") if p.is_file()]
    assert not (tmp_path / "store").exists()


def test_bad_trusted_keys(signed, tmp_path, keys):
    with pytest.raises(SpecError, match="empty"):
        open_bundle(signed, tmp_path / "c", trusted_keys=[])
    (tmp_path / "junk.pub").write_text("not a key")
    with pytest.raises(SignatureError, match="cannot read the public key"):
        open_bundle(signed, tmp_path / "c", trusted_keys=[tmp_path / "junk.pub"])
    with pytest.raises(SignatureError, match="cannot read the public key"):
        open_bundle(signed, tmp_path / "c", trusted_keys=[keys[0][0]])  # the private key file is not a public key


def test_keygen_cli(tmp_path):
    r = CliRunner().invoke(main, ["keygen", "--out", str(tmp_path / "k")])
    assert r.exit_code == 0, r.output
    assert "key id" in r.output
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o600
    assert (tmp_path / "k.pub").read_text().startswith("-----BEGIN PUBLIC KEY-----")
    r = CliRunner().invoke(main, ["keygen", "--out", str(tmp_path / "k")])
    assert r.exit_code == 1 and "refusing to overwrite" in r.output
    assert CliRunner().invoke(main, ["keygen", "--out", str(tmp_path / "k"), "--force"]).exit_code == 0


def test_export_sign_and_train_trust_cli(tmp_path, keys):
    """The whole path through the CLI: export --sign, train --trust (ok), train --trust with
    another key (refused, one line, no traceback)."""
    out = tmp_path / "tiny.edgepeft"
    cache = {"EDGEPEFT_CACHE": str(tmp_path / "cache")}
    r = CliRunner().invoke(main, ["export", "--model", "tiny-encoder", "--labels", "neg,pos", "--out", str(out),
                                  "--backend", "ort-training", "--sign", str(keys[0][0])])
    assert r.exit_code == 0, r.output
    data = tmp_path / "d.jsonl"
    write_jsonl(data, TRAIN)
    args = ["train", str(out), "--data", str(data), "--adapter", "alice", "--steps", "1", "--threads", "1"]
    r = CliRunner().invoke(main, args + ["--trust", str(keys[0][1])], env=cache)
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, args + ["--trust", str(keys[1][1])], env=cache)
    assert r.exit_code == 1 and "does not verify with any trusted key" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["export", "--model", "tiny-encoder", "--out", str(tmp_path / "x.edgepeft"),
                                  "--sign", str(keys[0][1])])
    assert r.exit_code == 1 and "cannot read the private key" in r.output, r.output
    assert not (tmp_path / "x.edgepeft").exists()


def test_devices_that_check_no_signatures_need_no_cryptography(signed, keys, tmp_path):
    """`cryptography` is imported only to make or check signatures: a device without it opens
    bundles (signed or not), and asking it to check one says what to install."""
    import subprocess
    import sys

    code = ("import sys\nsys.modules['cryptography'] = None\n"
            "from edgepeft.bundle import open_bundle\nfrom edgepeft.errors import BundleError\n"
            "b = open_bundle(sys.argv[1], sys.argv[2])\nprint('opened', b.signed_by)\n"
            "try:\n    open_bundle(sys.argv[1], sys.argv[2], trusted_keys=[sys.argv[3]])\n"
            "except BundleError as e:\n    print('refused:', e)\n")
    out = subprocess.run([sys.executable, "-c", code, str(signed), str(tmp_path / "c"), str(keys[0][1])],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "opened None" in out.stdout and "pip install cryptography" in out.stdout, out.stdout
