"""A deterministic synthetic ClamAV database: 1 M MD5 hash signatures and 100 k body signatures.

The size of a production database's hash and body sections, without downloading it:
`synthetic.hdb` holds `md5:size:name` lines (clamd's hash signatures; the MD5s are of
the numbers 0..N-1, so no real file matches), `synthetic.ndb` holds `name:0:*:hex`
body signatures (`target 0`: any file; 16-byte patterns from SHA-256 of the numbers,
which clamd's Aho-Corasick matcher must search every scanned file for). The EICAR
signature comes from the caller's one-signature database. Generated in about a second.

    python bench/synthetic_db.py DIR [--md5 1000000] [--body 100000]
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path


def write(db: Path, md5: int = 1_000_000, body: int = 100_000) -> None:
    """Write `synthetic.hdb` and `synthetic.ndb` into the database directory `db`."""
    with (db / "synthetic.hdb").open("w") as out:
        out.writelines(f"{hashlib.md5(b'%d' % i).hexdigest()}:{4096 + i % 4096}:Synthetic.Hash-{i}\n"
                       for i in range(md5))
    with (db / "synthetic.ndb").open("w") as out:
        out.writelines(f"Synthetic.Body-{i}:0:*:{hashlib.sha256(b'%d' % i).hexdigest()[:32]}\n"
                       for i in range(body))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("db", type=Path)
    parser.add_argument("--md5", type=int, default=1_000_000)
    parser.add_argument("--body", type=int, default=100_000)
    args = parser.parse_args()
    write(args.db, args.md5, args.body)


if __name__ == "__main__":
    main()
