"""The workspace: one root folder that lets the commands chain without path arguments.

    <root>/datasets/            dataset files (cbvs5m.txt, cbvs10m.txt, ...) and image folders
    <root>/embeddings/<dataset>/  Parquet shards and their _manifest.json
    <root>/indexes/<name>/        one folder per built index
    <root>/models/                model checkpoints (UniCLIP-base-QA-CLIP-5M.pt is found here)

The root is `--workspace`, else $VSEARCH_HOME, else ~/.vsearch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_ROOT = Path("~/.vsearch")
ENV_VAR = "VSEARCH_HOME"


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def resolve(cls, root: str | os.PathLike | None = None) -> "Workspace":
        chosen = root or os.environ.get(ENV_VAR) or DEFAULT_ROOT
        return cls(Path(chosen).expanduser().resolve())

    @property
    def datasets(self) -> Path:
        return self.root / "datasets"

    @property
    def embeddings(self) -> Path:
        return self.root / "embeddings"

    @property
    def indexes(self) -> Path:
        return self.root / "indexes"

    @property
    def models(self) -> Path:
        return self.root / "models"

    def embeddings_dir(self, dataset: str) -> Path:
        return self.embeddings / dataset

    def index_dir(self, name: str) -> Path:
        return self.indexes / name

    @staticmethod
    def holding(folder: Path, marker: str) -> list[Path]:
        """The subfolders of `folder` with a `marker` file (a manifest), by name; hidden ones (a build
        in progress, `.<name>.tmp-…`) left out."""
        return sorted(path.parent for path in folder.glob(f"*/{marker}") if not path.parent.name.startswith("."))

    @classmethod
    def latest(cls, folder: Path, marker: str) -> Path | None:
        """The subfolder of `folder` whose `marker` file (a manifest) was written last."""
        candidates = cls.holding(folder, marker)
        if not candidates:
            return None
        return max(candidates, key=lambda path: (path / marker).stat().st_mtime_ns)
