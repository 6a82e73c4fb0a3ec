"""Check an exported eStargz OCI layout and dump each layer's TOC (called by make.sh).

usage: check.py LAYOUT TAG OUTDIR

For each layer of LAYOUT:TAG: the blob ends with the 51-byte eStargz gzip footer, the TOC gzip
member at the footer's offset holds a tar with stargz.index.json, the JSON's sha256 is the
layer's containerd.io/snapshot/stargz/toc.digest annotation, the whole blob gunzips to a tar whose
sha256 is the config's diff_id, and every reg/chunk entry's bytes (gunzipped from its offset)
match its chunkDigest and the tar's own file data. Writes OUTDIR/toc-layer<N>.json.
"""

import gzip
import hashlib
import io
import json
import sys
import tarfile
import zlib
from pathlib import Path

TOC_ANN = "containerd.io/snapshot/stargz/toc.digest"
SIZE_ANN = "io.containers.estargz.uncompressed-size"
FOOTER = 51


def blob(layout: Path, digest: str) -> bytes:
    data = (layout / "blobs" / digest.replace(":", "/")).read_bytes()
    assert "sha256:" + hashlib.sha256(data).hexdigest() == digest, digest
    return data


def resolve(layout: Path, tag: str) -> dict:
    index = json.loads((layout / "index.json").read_text())
    desc = next(m for m in index["manifests"]
                if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag)
    while desc["mediaType"].endswith("image.index.v1+json"):
        print(f"  {desc['digest']} is an index; descending")
        inner = json.loads(blob(layout, desc["digest"]))["manifests"]
        desc = next(m for m in inner if m.get("platform", {}).get("architecture", "amd64") == "amd64")
    return desc


def gunzip_at(data: bytes, offset: int, want: int) -> bytes:
    """Decompress gzip members starting at *offset* until *want* bytes came out."""
    out = b""
    while len(out) < want:
        d = zlib.decompressobj(31)
        out += d.decompress(data[offset:])
        offset = len(data) - len(d.unused_data)
    return out[:want]


def check_layer(n: int, data: bytes, desc: dict, diff_id: str, outdir: Path) -> None:
    foot = data[-FOOTER:]
    print(f"layer {n}: {desc['digest']} size={len(data)}")
    print(f"  footer: {foot.hex()}")
    assert foot[:4] == b"\x1f\x8b\x08\x04", foot[:4]
    assert foot[10:12] == (26).to_bytes(2, "little") and foot[12:14] == b"SG", foot[10:14]
    assert foot[14:16] == (22).to_bytes(2, "little") and foot[32:38] == b"STARGZ", foot[14:38]
    assert gzip.decompress(foot) == b""
    toc_off = int(foot[16:32], 16)
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(data[toc_off:-FOOTER]))) as t:
        assert t.getnames() == ["stargz.index.json"], t.getnames()
        toc_json = t.extractfile("stargz.index.json").read()
    toc_digest = "sha256:" + hashlib.sha256(toc_json).hexdigest()
    ann = desc.get("annotations", {})
    print(f"  toc offset={toc_off} toc.digest={toc_digest} annotation={ann.get(TOC_ANN)}")
    assert ann.get(TOC_ANN) == toc_digest
    whole = gzip.decompress(data)
    print(f"  uncompressed={len(whole)} annotation={ann.get(SIZE_ANN)}")
    assert SIZE_ANN not in ann or int(ann[SIZE_ANN]) == len(whole)
    assert "sha256:" + hashlib.sha256(whole).hexdigest() == diff_id, "diff_id"
    with tarfile.open(fileobj=io.BytesIO(whole)) as t:
        files = {m.name: t.extractfile(m).read() for m in t.getmembers() if m.isreg()}
    toc = json.loads(toc_json)
    contents: dict[str, bytes] = {}
    for e in toc["entries"]:
        if e["type"] not in ("reg", "chunk") or "offset" not in e:  # empty files have no offset
            continue
        start = e.get("chunkOffset", 0)
        total = len(files[e["name"]])
        length = e.get("chunkSize") or (total - start)
        got = gunzip_at(data, e["offset"], length)
        assert "sha256:" + hashlib.sha256(got).hexdigest() == e["chunkDigest"], e["name"]
        contents[e["name"]] = contents.get(e["name"], b"") + got
    for name, got in contents.items():
        assert got == files[name], name
    print(f"  {len(toc['entries'])} TOC entries; {len(contents)} files' chunks verified")
    (outdir / f"toc-layer{n}.json").write_text(json.dumps(toc, indent=2) + "\n")


def main() -> None:
    layout, tag, outdir = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    desc = resolve(layout, tag)
    manifest = json.loads(blob(layout, desc["digest"]))
    config = json.loads(blob(layout, manifest["config"]["digest"]))
    diff_ids = config["rootfs"]["diff_ids"]
    for n, layer in enumerate(manifest["layers"], 1):
        check_layer(n, blob(layout, layer["digest"]), layer, diff_ids[n - 1], outdir)
    print("check.py: ok")


if __name__ == "__main__":
    main()
